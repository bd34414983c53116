//! The sled store: jobs, attempts, agents, per-job event logs and telemetry, as protobuf
//! values under big-endian keys so that sled's key order is the order we read in.
//!
//! # Contract
//! - Every `put_*` writes into sled's in-memory log and is visible to reads at once, but is
//!   **not durable** until a [`Store::flush`] that *started after* the put has returned `Ok`.
//!   The coordinator never tells anyone about a change before that (see `commit.rs`, which
//!   batches concurrent changes onto one flush — group commit).
//! - What "durable" means: sled 0.34's flush writes its log to the file and waits for the
//!   write-back (`sync_file_range`), which survives the process dying (`kill -9`). It does not
//!   flush the device's write cache or the file's metadata, so with `fsync = true` (the
//!   default) [`Store::flush`] also calls `fdatasync` on sled's log file, which makes a
//!   flushed change survive power loss as well.
//! - sled's own background flush is turned off. sled may still write a full log buffer on its
//!   own, so a crash can leave all, part or none of an unflushed change on disk — always a
//!   change that was never acknowledged. A change to a job is several puts (job record,
//!   attempt snapshot, event); on recovery the job record is authoritative and the next event
//!   number is read from the event log, so logs stay gap-free.
//! - Errors are sled's I/O or corruption errors, or a stored value that does not decode.
//!   After a failed flush nothing written since the last good flush may be assumed durable:
//!   the coordinator stops, and a restart recovers from what is on disk.
//!
//! Trees and keys:
//! - `jobs`: job id (u64) → `Job`.
//! - `attempts`: job id, attempt (u32) → `Job` as of that attempt's last change (history).
//! - `events`: job id, seq (u64) → `JobEvent`; seq is 1-based and gap-free per job.
//! - `telemetry`: job id, at_ms, unique id → `TelemetryRow`.
//! - `agents`: name → `Agent` as last registered (status DRAINING is kept across restarts).

use std::path::Path;

use kiln_proto::v1::{Agent, Job, JobEvent, TelemetryRow};
use prost::Message;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O error, corruption, or the directory is locked by another process).
    #[error("sled store error: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value did not decode as the message its tree holds.
    #[error("corrupt record in tree `{tree}`: {source}")]
    Decode {
        /// The tree holding the bad value.
        tree: &'static str,
        /// The protobuf decode error.
        source: prost::DecodeError,
    },
}

/// The coordinator's durable state. Cheap to clone (sled handles are reference counted).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    /// sled's log file, to `fdatasync` after each flush (`None`: flush only).
    log_file: Option<std::sync::Arc<std::fs::File>>,
    jobs: sled::Tree,
    attempts: sled::Tree,
    events: sled::Tree,
    telemetry: sled::Tree,
    agents: sled::Tree,
}

fn key2(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&b.to_be_bytes());
    k
}

fn decode<M: Message + Default>(tree: &'static str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|source| StoreError::Decode { tree, source })
}

impl Store {
    /// Opens (or creates) the store in `dir`. Fails with a sled error when another process
    /// holds the directory. With `fsync`, every flush also `fdatasync`s sled's log file.
    pub fn open(dir: &Path, fsync: bool) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(sled::Error::Io)?;
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let log_file = if fsync {
            // sled 0.34 keeps its log in `<dir>/db`.
            let file = std::fs::File::open(dir.join("db")).map_err(sled::Error::Io)?;
            Some(std::sync::Arc::new(file))
        } else {
            None
        };
        Ok(Store {
            log_file,
            jobs: db.open_tree("jobs")?,
            attempts: db.open_tree("attempts")?,
            events: db.open_tree("events")?,
            telemetry: db.open_tree("telemetry")?,
            agents: db.open_tree("agents")?,
            db,
        })
    }

    /// Makes every put that happened before this call durable (see the module docs).
    /// Blocking.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        if let Some(file) = &self.log_file {
            file.sync_data().map_err(sled::Error::Io)?;
        }
        Ok(())
    }

    /// Writes a job record, and its attempt snapshot when an attempt is placed or ended (a
    /// requeued job, QUEUED with the old attempt number, leaves the old snapshot alone).
    pub fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        let bytes = job.encode_to_vec();
        if job.attempt > 0 && job.state() != kiln_proto::v1::JobState::Queued {
            self.attempts
                .insert(key2(job.id, job.attempt as u64), bytes.as_slice())?;
        }
        self.jobs.insert(job.id.to_be_bytes(), bytes)?;
        Ok(())
    }

    /// Reads one job.
    pub fn get_job(&self, id: u64) -> Result<Option<Job>, StoreError> {
        self.jobs
            .get(id.to_be_bytes())?
            .map(|v| decode("jobs", &v))
            .transpose()
    }

    /// Jobs with id < `before` (all when `None`), newest (highest id) first.
    pub fn jobs_newest_first(
        &self,
        before: Option<u64>,
    ) -> impl Iterator<Item = Result<Job, StoreError>> + '_ {
        let end = before.unwrap_or(u64::MAX).to_be_bytes();
        let range = match before {
            Some(_) => self.jobs.range(..end),
            None => self.jobs.range::<&[u8], _>(..),
        };
        range.rev().map(|r| {
            r.map_err(StoreError::from)
                .and_then(|(_, v)| decode("jobs", &v))
        })
    }

    /// Every job, oldest first (recovery).
    pub fn all_jobs(&self) -> impl Iterator<Item = Result<Job, StoreError>> + '_ {
        self.jobs.iter().map(|r| {
            r.map_err(StoreError::from)
                .and_then(|(_, v)| decode("jobs", &v))
        })
    }

    /// The stored attempt snapshots of a job, in attempt order. No RPC serves attempt
    /// history yet; the tree is kept for it (and for operators inspecting the store).
    #[allow(dead_code)]
    pub fn attempts(&self, job_id: u64) -> Result<Vec<Job>, StoreError> {
        self.attempts
            .scan_prefix(job_id.to_be_bytes())
            .map(|r| {
                r.map_err(StoreError::from)
                    .and_then(|(_, v)| decode("attempts", &v))
            })
            .collect()
    }

    /// Appends an event; its `job_id` and `seq` form the key.
    pub fn put_event(&self, event: &JobEvent) -> Result<(), StoreError> {
        debug_assert!(event.seq >= 1, "event seqs start at 1");
        self.events
            .insert(key2(event.job_id, event.seq), event.encode_to_vec())?;
        Ok(())
    }

    /// Events of a job with seq > `after_seq`, in order.
    pub fn events_after(&self, job_id: u64, after_seq: u64) -> Result<Vec<JobEvent>, StoreError> {
        let start = key2(job_id, after_seq.saturating_add(1));
        let end = key2(job_id, u64::MAX);
        self.events
            .range(start..=end)
            .map(|r| {
                r.map_err(StoreError::from)
                    .and_then(|(_, v)| decode("events", &v))
            })
            .collect()
    }

    /// The highest event seq of a job (0 when it has none).
    pub fn last_event_seq(&self, job_id: u64) -> Result<u64, StoreError> {
        let last = self.events.scan_prefix(job_id.to_be_bytes()).next_back();
        match last {
            Some(r) => {
                let (k, _) = r?;
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&k[8..16]);
                Ok(u64::from_be_bytes(seq))
            }
            None => Ok(0),
        }
    }

    /// Stores a telemetry row.
    pub fn put_telemetry(&self, row: &TelemetryRow) -> Result<(), StoreError> {
        let at = row.sample.as_ref().map_or(0, |s| s.at_ms);
        let mut key = [0u8; 24];
        key[..16].copy_from_slice(&key2(row.job_id, at));
        key[16..].copy_from_slice(&self.db.generate_id()?.to_be_bytes());
        self.telemetry.insert(key, row.encode_to_vec())?;
        Ok(())
    }

    /// Telemetry rows of one job (`Some`) or of all jobs, for the caller to filter.
    pub fn telemetry(
        &self,
        job_id: Option<u64>,
    ) -> impl Iterator<Item = Result<TelemetryRow, StoreError>> + '_ {
        let iter = match job_id {
            Some(id) => self.telemetry.scan_prefix(id.to_be_bytes()),
            None => self.telemetry.iter(),
        };
        iter.map(|r| {
            r.map_err(StoreError::from)
                .and_then(|(_, v)| decode("telemetry", &v))
        })
    }

    /// Writes an agent record.
    pub fn put_agent(&self, agent: &Agent) -> Result<(), StoreError> {
        self.agents
            .insert(agent.name.as_bytes(), agent.encode_to_vec())?;
        Ok(())
    }

    /// Every stored agent, by name.
    pub fn agents(&self) -> Result<Vec<Agent>, StoreError> {
        self.agents
            .iter()
            .map(|r| {
                r.map_err(StoreError::from)
                    .and_then(|(_, v)| decode("agents", &v))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::{job_event, JobState, PhaseSample, StateChange};

    fn event(job_id: u64, seq: u64) -> JobEvent {
        JobEvent {
            job_id,
            seq,
            at_ms: seq,
            attempt: 1,
            event: Some(job_event::Event::State(StateChange {
                state: JobState::Queued as i32,
                reason: String::new(),
            })),
        }
    }

    #[test]
    fn flushed_writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), true).unwrap();
            for id in 1..=3 {
                store
                    .put_job(&Job {
                        id,
                        attempt: (id == 2) as u32,
                        ..Default::default()
                    })
                    .unwrap();
                store.put_event(&event(id, 1)).unwrap();
            }
            store.put_event(&event(2, 2)).unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(dir.path(), true).unwrap();
        let ids: Vec<u64> = store.all_jobs().map(|j| j.unwrap().id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        let newest: Vec<u64> = store
            .jobs_newest_first(Some(3))
            .map(|j| j.unwrap().id)
            .collect();
        assert_eq!(newest, vec![2, 1]);
        assert_eq!(store.last_event_seq(2).unwrap(), 2);
        assert_eq!(store.last_event_seq(9).unwrap(), 0);
        assert_eq!(store.events_after(2, 1).unwrap().len(), 1);
        assert_eq!(store.attempts(2).unwrap().len(), 1);
        assert_eq!(store.attempts(1).unwrap().len(), 0);
    }

    #[test]
    fn a_second_open_of_the_same_dir_fails_while_the_first_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path(), true).unwrap();
        assert!(Store::open(dir.path(), true).is_err());
    }

    #[test]
    fn telemetry_is_ordered_by_job_then_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), true).unwrap();
        for (job, at) in [(2, 5), (1, 9), (1, 3)] {
            store
                .put_telemetry(&TelemetryRow {
                    job_id: job,
                    sample: Some(PhaseSample {
                        at_ms: at,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .unwrap();
        }
        let at: Vec<u64> = store
            .telemetry(Some(1))
            .map(|r| r.unwrap().sample.unwrap().at_ms)
            .collect();
        assert_eq!(at, vec![3, 9]);
        assert_eq!(store.telemetry(None).count(), 3);
    }
}
