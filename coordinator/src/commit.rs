//! Group commit: one task turns many concurrent changes into one sled flush, then releases
//! what each change was waiting for — the requester's reply and the change's *effects*
//! (events to watchers, messages to agents), in the order the changes were made.
//!
//! Every change is made under the state lock, which also numbers it with a *ticket* and
//! queues its effects in the outbox. The committer takes the outbox and the latest ticket
//! together under the lock, flushes, publishes "durable up to ticket", and only then runs
//! the effects. So nothing is told before it is on disk, and a burst of N submits costs one
//! fsync instead of N. This module holds the vocabulary (effects, the durability status, the
//! wait); `committer` runs the loop.

use std::sync::atomic::{AtomicU64, Ordering};

use kiln_proto::v1::{CoordinatorMessage, JobEvent};
use tokio::sync::{mpsc, watch};

use crate::error::ApiError;

/// Flushes done by every committer in this process (the benchmark reports submits per
/// flush from it, which shows how much group commit batches).
pub(crate) static FLUSHES: AtomicU64 = AtomicU64::new(0);

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
