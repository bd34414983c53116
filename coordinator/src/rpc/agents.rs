//! ListAgents and DrainAgent.

use kiln_proto::v1::{Agent, DrainAgentRequest, ListAgentsRequest, ListAgentsResponse};
use tonic::{Response, Status};

use crate::shared::Shared;

pub(super) async fn list_agents(
    shared: &Shared,
    _req: ListAgentsRequest,
) -> Result<Response<ListAgentsResponse>, Status> {
    Ok(Response::new(ListAgentsResponse {
        agents: shared.list_agents(),
    }))
}

pub(super) async fn drain_agent(
    shared: &Shared,
    req: DrainAgentRequest,
) -> Result<Response<Agent>, Status> {
    Ok(Response::new(shared.drain(&req.name, req.resume).await?))
}
