//! QueryTelemetry.

use kiln_proto::v1::{QueryTelemetryRequest, QueryTelemetryResponse};
use tonic::{Response, Status};

use crate::shared::Shared;

pub(super) async fn query_telemetry(
    shared: &Shared,
    req: QueryTelemetryRequest,
) -> Result<Response<QueryTelemetryResponse>, Status> {
    let rows = shared.query_telemetry(req).await?;
    Ok(Response::new(QueryTelemetryResponse { rows }))
}
