//! Connecting to the coordinator: the channel, the bearer-token interceptor, and turning
//! transport and status errors into messages that say what to do.

use crate::args::ClientArgs;
use anyhow::{anyhow, Context};
use kiln_proto::v1::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Adds `authorization: Bearer <token>` when a token is configured.
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The coordinator client every verb uses.
pub type Client = CoordinatorClient<InterceptedService<Channel, BearerToken>>;

/// Connects to the coordinator named by `--coordinator` / `KILN_COORDINATOR`.
pub async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    connect_url(&args.coordinator, args.token.as_deref()).await
}

/// Connects to `url`, failing with a message that names the address and the fix.
pub async fn connect_url(url: &str, token: Option<&str>) -> anyhow::Result<Client> {
    let url = &kiln_proto::address::coordinator_url(url).map_err(|e| anyhow!(e))?;
    let endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| {
            format!("invalid coordinator address {url:?} (expected e.g. http://127.0.0.1:7070)")
        })?
        .connect_timeout(std::time::Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| {
        let chain = crate::output::error_chain(&anyhow::Error::new(e));
        match kiln_proto::address::not_a_coordinator_error(&chain) {
            Some(message) => anyhow!("{url}: {message}"),
            None => anyhow!(
                "cannot reach the coordinator at {url}: {chain}. Is `kiln coordinator` running there? \
                 Set --coordinator or KILN_COORDINATOR to its address."
            ),
        }
    })?;
    let token = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .context("the token contains characters not allowed in a header")?,
        ),
        None => None,
    };
    Ok(CoordinatorClient::with_interceptor(
        channel,
        BearerToken(token),
    ))
}

/// Turns a gRPC status into an error that keeps the coordinator's message.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    if let Some(message) = kiln_proto::address::not_a_coordinator(&status) {
        return anyhow!(message);
    }
    if status.code() == tonic::Code::Cancelled && status.message() == "operation was canceled" {
        // The connection died before the call was answered: hyper does not say why.
        return anyhow!(
            "the connection was closed before any answer (operation was canceled): either the \
             address is not a Kiln coordinator (check --coordinator / KILN_COORDINATOR) or the \
             coordinator stopped while answering"
        );
    }
    let code = match status.code() {
        tonic::Code::NotFound => "not found",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::ResourceExhausted => "resource exhausted",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::Unavailable => "coordinator unavailable",
        tonic::Code::Unauthenticated => "unauthenticated (check --token / KILN_TOKEN)",
        other => return anyhow!("the coordinator answered {other:?}: {}", status.message()),
    };
    anyhow!("{code}: {}", status.message())
}
