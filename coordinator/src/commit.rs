//! Group commit: one task turns many concurrent changes into one sled flush, then releases
//! what each change was waiting for — the requester's reply and the change's *effects*
//! (events to watchers, messages to agents), in the order the changes were made.
//!
//! Every change is made under the state lock, which also numbers it with a *ticket* and
//! queues its effects in the outbox. The committer takes the outbox and the latest ticket
//! together under the lock, flushes, publishes "durable up to ticket", and only then runs
//! the effects. So nothing is told before it is on disk, and a burst of N submits costs one
//! fsync instead of N.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kiln_proto::v1::{CoordinatorMessage, JobEvent};
use tokio::sync::{mpsc, watch};

use crate::error::ApiError;
use crate::shared::Shared;

/// Flushes done by every committer in this process (the benchmark reports submits per
/// flush from it, which shows how much group commit batches).
static FLUSHES: AtomicU64 = AtomicU64::new(0);

/// Flushes done so far by every committer in this process.
pub(crate) fn flush_count() -> u64 {
    FLUSHES.load(Ordering::Relaxed)
}

/// Something to do once the change that caused it is durable.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Publish a stored job event to watchers.
    Event(JobEvent),
    /// Send a message to one agent connection (dropped if that connection is gone).
    Send(
        mpsc::UnboundedSender<CoordinatorMessage>,
        Box<CoordinatorMessage>,
    ),
}

/// What the committer has made durable.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommitStatus {
    /// Every change with a ticket ≤ this is durable.
    pub durable: u64,
    /// Set when a flush failed: nothing later can be made durable by this process.
    pub failed: Option<String>,
}

/// Waits until the change numbered `ticket` is durable.
pub(crate) async fn wait_durable(
    rx: &mut watch::Receiver<CommitStatus>,
    ticket: u64,
) -> Result<(), ApiError> {
    let status = rx
        .wait_for(|s| s.durable >= ticket || s.failed.is_some())
        .await
        .map_err(|_| ApiError::Unavailable("the coordinator is shutting down".into()))?;
    if status.durable >= ticket {
        return Ok(());
    }
    Err(ApiError::Unavailable(format!(
        "the change could not be made durable ({}); restart the coordinator",
        status.failed.clone().unwrap_or_default()
    )))
}

/// The committer loop. Returns after `stop` fires and a last flush has been done, or with the
/// error of a failed flush. `stop` must fire only after the gRPC server has stopped, since
/// in-flight requests wait on the committer.
pub(crate) async fn run_committer(
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), crate::store::StoreError> {
    loop {
        let stopping = tokio::select! {
            _ = shared.commit_wake.notified() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        loop {
            let (target, effects) = {
                let mut state = shared.lock();
                if state.ticket <= shared.commit_tx.borrow().durable {
                    break;
                }
                (state.ticket, std::mem::take(&mut state.outbox))
            };
            let store = shared.store.clone();
            let flushed = tokio::task::spawn_blocking(move || store.flush())
                .await
                .unwrap_or_else(|e| {
                    Err(crate::store::StoreError::Sled(sled::Error::ReportableBug(
                        format!("flush task failed: {e}"),
                    )))
                });
            if let Err(err) = flushed {
                tracing::error!(%err, "flush failed; no further change can be acknowledged");
                shared
                    .commit_tx
                    .send_modify(|s| s.failed = Some(err.to_string()));
                return Err(err);
            }
            FLUSHES.fetch_add(1, Ordering::Relaxed);
            shared.commit_tx.send_modify(|s| s.durable = target);
            for effect in effects {
                match effect {
                    Effect::Event(event) => {
                        // No receivers is fine: nobody is watching.
                        let _ = shared.events.send(event);
                    }
                    Effect::Send(tx, msg) => {
                        // A closed connection is fine: reconciliation handles its jobs.
                        let _ = tx.send(*msg);
                    }
                }
            }
        }
        if stopping {
            return Ok(());
        }
    }
}
