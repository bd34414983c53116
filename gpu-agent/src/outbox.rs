//! The agent's outbox: job updates waiting to be sent to the coordinator. Jobs push into it
//! whether or not the coordinator is reachable; the link drains it while connected. It is
//! bounded: when full, the oldest event or guard update is dropped, never a job's start or end,
//! so a job that finishes while the coordinator is down is reported once it is back.

use kiln_proto::v1::{job_update::Update, JobUpdate, RunningJob};
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

/// One queued update and, for a job's end, the pid it ran as (for re-registration).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The update.
    pub update: JobUpdate,
    /// The job's pid (0 when unknown).
    pub pid: u32,
}

impl Outgoing {
    /// Whether this update may be dropped when the queue is full (events and guard samples).
    fn droppable(&self) -> bool {
        matches!(
            self.update.update,
            Some(Update::Event(_)) | Some(Update::Guard(_))
        )
    }

    /// Whether this is a job's end.
    pub fn is_finished(&self) -> bool {
        matches!(self.update.update, Some(Update::Finished(_)))
    }
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Outgoing>,
    /// Updates dropped since the last time the queue was empty.
    dropped: u64,
}

/// A bounded multi-producer, single-consumer queue of job updates.
#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    capacity: usize,
}

impl Outbox {
    /// An empty outbox holding at most `capacity` droppable updates (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an update; drops the oldest droppable one when full.
    pub fn push(&self, item: Outgoing) {
        let mut inner = self.lock();
        if inner.queue.len() >= self.capacity && item.droppable() {
            if let Some(i) = inner.queue.iter().position(Outgoing::droppable) {
                inner.queue.remove(i);
                inner.dropped += 1;
                if inner.dropped == 1 || inner.dropped.is_power_of_two() {
                    tracing::warn!(
                        dropped = inner.dropped,
                        capacity = self.capacity,
                        "outbox full while the coordinator is unreachable: dropping the oldest job events"
                    );
                }
            } else {
                // Only starts and ends are queued: keep them all, drop the new event.
                inner.dropped += 1;
                return;
            }
        }
        inner.queue.push_back(item);
        drop(inner);
        self.notify.notify_one();
    }

    /// Puts updates back at the front, in order (after a send failed).
    pub fn requeue_front(&self, items: Vec<Outgoing>) {
        if items.is_empty() {
            return;
        }
        let mut inner = self.lock();
        for item in items.into_iter().rev() {
            inner.queue.push_front(item);
        }
        drop(inner);
        self.notify.notify_one();
    }

    /// Takes the next update without waiting.
    pub fn try_pop(&self) -> Option<Outgoing> {
        let mut inner = self.lock();
        let item = inner.queue.pop_front();
        if inner.queue.is_empty() {
            inner.dropped = 0;
        }
        item
    }

    /// Waits for the next update. Cancel-safe: an update is only taken in the poll that
    /// returns it.
    pub async fn pop(&self) -> Outgoing {
        loop {
            let notified = self.notify.notified();
            if let Some(item) = self.try_pop() {
                return item;
            }
            notified.await;
        }
    }

    /// Number of queued updates.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Jobs whose end is queued but not yet sent: the coordinator must still count them as
    /// running when the agent re-registers.
    pub fn pending_ends(&self) -> Vec<RunningJob> {
        self.lock()
            .queue
            .iter()
            .filter(|o| o.is_finished())
            .map(|o| RunningJob {
                job_id: o.update.job_id,
                attempt: o.update.attempt,
                pid: o.pid,
                ended: true,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::{GuardSample, JobFinished, JobStarted};

    fn item(job_id: u64, update: Update) -> Outgoing {
        Outgoing {
            update: JobUpdate {
                job_id,
                attempt: 1,
                update: Some(update),
            },
            pid: 10 + job_id as u32,
        }
    }

    fn guard(v: u64) -> Update {
        Update::Guard(GuardSample {
            pid_mem: v,
            ..Default::default()
        })
    }

    #[test]
    fn full_outbox_drops_oldest_events_but_keeps_starts_and_ends() {
        let ob = Outbox::new(3);
        ob.push(item(1, Update::Started(JobStarted { pid: 11 })));
        ob.push(item(1, guard(1)));
        ob.push(item(1, guard(2)));
        ob.push(item(1, guard(3))); // drops guard(1)
        ob.push(item(1, Update::Finished(JobFinished::default()))); // never dropped
        assert_eq!(ob.len(), 4);
        assert_eq!(
            ob.pending_ends(),
            vec![RunningJob {
                job_id: 1,
                attempt: 1,
                pid: 11,
                ended: true,
            }]
        );
        let got: Vec<Outgoing> = std::iter::from_fn(|| ob.try_pop()).collect();
        assert!(matches!(got[0].update.update, Some(Update::Started(_))));
        assert_eq!(got[1].update.update, Some(guard(2)));
        assert_eq!(got[2].update.update, Some(guard(3)));
        assert!(got[3].is_finished());
        assert!(ob.is_empty());
    }

    #[test]
    fn requeue_front_keeps_order() {
        let ob = Outbox::new(10);
        ob.push(item(3, guard(3)));
        ob.requeue_front(vec![item(1, guard(1)), item(2, guard(2))]);
        let ids: Vec<u64> = std::iter::from_fn(|| ob.try_pop())
            .map(|o| o.update.job_id)
            .collect();
        assert_eq!(ids, vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn pop_waits_for_a_push() {
        let ob = std::sync::Arc::new(Outbox::new(10));
        let ob2 = ob.clone();
        let waiter = tokio::spawn(async move { ob2.pop().await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        ob.push(item(5, guard(5)));
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.update.job_id, 5);
    }
}
