//! AgentLink.Connect: the agent's long-lived stream. The first message must be Register;
//! the coordinator answers Registered, then sends Assign and Kill messages as they become
//! durable, while a task applies everything the agent sends. When the stream ends, the
//! agent's lease starts running.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use kiln_proto::v1::agent_link_server::AgentLink;
use kiln_proto::v1::{agent_message, AgentMessage, CoordinatorMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::ApiError;
use crate::shared::SharedRef;

/// The agents' service.
pub(crate) struct AgentLinkService {
    /// The coordinator's shared state.
    pub shared: SharedRef,
}

/// Messages to one agent.
type OutboundStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentLink for AgentLinkService {
    type ConnectStream = OutboundStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the stream closed before its first message (Register)")
        })?;
        let Some(agent_message::Msg::Register(register)) = first.msg else {
            return Err(Status::invalid_argument(
                "the first AgentMessage on a stream must be Register",
            ));
        };
        let name = register.name.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let link_id = self.shared.register(register, tx)?;
        tokio::spawn(inbound_loop(self.shared.clone(), name, link_id, inbound));
        let mut shutdown = self.shared.shutdown.clone();
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        let outbound = UnboundedReceiverStream::new(rx).map(Ok).take_until(stop);
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// Applies the agent's messages until its stream ends, then starts its lease.
async fn inbound_loop(
    shared: SharedRef,
    name: String,
    link_id: u64,
    mut inbound: Streaming<AgentMessage>,
) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match next {
            Ok(Some(msg)) => match shared.on_agent_message(&name, link_id, msg) {
                Ok(()) => {}
                Err(ApiError::FailedPrecondition(why)) => {
                    tracing::warn!(agent = %name, %why, "closing a superseded agent stream");
                    return;
                }
                Err(err) => tracing::warn!(agent = %name, %err, "bad message from agent"),
            },
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(agent = %name, %status, "agent stream failed");
                break;
            }
        }
    }
    shared.disconnect(&name, link_id);
}
