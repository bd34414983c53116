//! The committer task of the group commit (see `commit`): takes the queued changes' effects
//! and the latest ticket under the state lock, flushes sled once, publishes "durable up to
//! ticket", and only then releases the effects.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;

use crate::commit::{Effect, FLUSHES};
use crate::shared::Shared;

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
