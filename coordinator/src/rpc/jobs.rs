//! SubmitJob, GetJob, ListJobs, CancelJob and WatchJob.

use std::pin::Pin;

use futures::Stream;
use kiln_proto::v1::{
    job_event, CancelJobRequest, GetJobRequest, Job, JobEvent, ListJobsRequest, ListJobsResponse,
    SubmitJobRequest, SubmitJobResponse, WatchJobRequest,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status};

use crate::shared::{Shared, SharedRef};

/// The WatchJob response stream.
pub(crate) type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

pub(super) async fn submit_job(
    shared: &Shared,
    req: SubmitJobRequest,
) -> Result<Response<SubmitJobResponse>, Status> {
    let job = shared.submit(req).await?;
    Ok(Response::new(SubmitJobResponse { job: Some(job) }))
}

pub(super) async fn get_job(shared: &Shared, req: GetJobRequest) -> Result<Response<Job>, Status> {
    Ok(Response::new(shared.get_job(req.id).await?))
}

pub(super) async fn list_jobs(
    shared: &Shared,
    req: ListJobsRequest,
) -> Result<Response<ListJobsResponse>, Status> {
    Ok(Response::new(shared.list_jobs(req).await?))
}

pub(super) async fn cancel_job(
    shared: &Shared,
    req: CancelJobRequest,
) -> Result<Response<Job>, Status> {
    Ok(Response::new(shared.cancel(req.id).await?))
}

pub(super) async fn watch_job(
    shared: &SharedRef,
    req: WatchJobRequest,
) -> Result<Response<EventStream>, Status> {
    // Subscribe before reading the store so no event falls between the two.
    let live = shared.events.subscribe();
    shared.get_job(req.id).await?;
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(watch_loop(
        shared.clone(),
        req.id,
        req.after_seq,
        req.stored_only,
        live,
        tx,
    ));
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

/// Whether an event moves the job into a terminal state.
fn is_terminal_change(event: &JobEvent) -> bool {
    match &event.event {
        Some(job_event::Event::State(change)) => kiln_proto::is_terminal(change.state()),
        _ => false,
    }
}

/// Sends stored events after `cursor`, then live ones, until the job is terminal, the
/// client goes away, or the server shuts down. A watcher that falls behind the live
/// broadcast catches up from the store.
async fn watch_loop(
    shared: SharedRef,
    job_id: u64,
    mut cursor: u64,
    stored_only: bool,
    mut live: broadcast::Receiver<JobEvent>,
    tx: mpsc::Sender<Result<JobEvent, Status>>,
) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        if let Err(err) = shared.barrier().await {
            let _ = tx.send(Err(err.into())).await;
            return;
        }
        let stored = match shared.store.events_after(job_id, cursor) {
            Ok(events) => events,
            Err(err) => {
                let _ = tx.send(Err(crate::error::ApiError::from(err).into())).await;
                return;
            }
        };
        for event in stored {
            cursor = event.seq;
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        let last_stored = shared.store.last_event_seq(job_id).unwrap_or(0);
        if stored_only || (shared.job_is_terminal(job_id) && last_stored <= cursor) {
            return;
        }
        loop {
            let received = tokio::select! {
                r = live.recv() => r,
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tx.closed() => return,
            };
            match received {
                Ok(event) if event.job_id == job_id && event.seq > cursor => {
                    if event.seq != cursor + 1 {
                        break; // Missed something: catch up from the store.
                    }
                    cursor = event.seq;
                    let terminal = is_terminal_change(&event);
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                    if terminal && shared.job_is_terminal(job_id) {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}
