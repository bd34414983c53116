//! The gRPC surface: the `kiln.v1.Coordinator` trait implementation, which delegates each
//! method to its family's file (`jobs.rs`, `agents.rs`, `telemetry.rs`), the
//! `kiln.v1.AgentLink` service (`agent_link.rs`), and the one place where domain errors
//! become `tonic::Status`.

mod agent_link;
mod agents;
mod jobs;
mod telemetry;

pub(crate) use agent_link::AgentLinkService;

use kiln_proto::v1::coordinator_server::Coordinator;
use kiln_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::shared::SharedRef;

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        let message = err.to_string();
        match err {
            ApiError::InvalidArgument(_) => Status::invalid_argument(message),
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::FailedPrecondition(_) => Status::failed_precondition(message),
            ApiError::ResourceExhausted(_) => Status::resource_exhausted(message),
            ApiError::AlreadyExists(_) => Status::already_exists(message),
            ApiError::Unavailable(_) => Status::unavailable(message),
            ApiError::Store(_) => {
                tracing::error!(%message, "request failed in the store");
                Status::internal(message)
            }
        }
    }
}

/// The user-facing service.
pub(crate) struct CoordinatorService {
    /// The coordinator's shared state.
    pub shared: SharedRef,
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        jobs::submit_job(&self.shared, request.into_inner()).await
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        jobs::get_job(&self.shared, request.into_inner()).await
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        jobs::list_jobs(&self.shared, request.into_inner()).await
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<Job>, Status> {
        jobs::cancel_job(&self.shared, request.into_inner()).await
    }

    type WatchJobStream = jobs::EventStream;

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        jobs::watch_job(&self.shared, request.into_inner()).await
    }

    async fn query_telemetry(
        &self,
        request: Request<QueryTelemetryRequest>,
    ) -> Result<Response<QueryTelemetryResponse>, Status> {
        telemetry::query_telemetry(&self.shared, request.into_inner()).await
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        agents::list_agents(&self.shared, request.into_inner()).await
    }

    async fn drain_agent(
        &self,
        request: Request<DrainAgentRequest>,
    ) -> Result<Response<Agent>, Status> {
        agents::drain_agent(&self.shared, request.into_inner()).await
    }
}
