//! The agent's shared state ([`AgentState`]): configuration, hardware, the outbox, and the table
//! of jobs it runs. One owner (`Arc<AgentState>`), locks inside, never held across `.await`.
//!
//! Invariant: a job is in exactly one of two places from assignment until its end is sent —
//! the job table (while its process may run) or the outbox as a queued `Finished` (after). The
//! move happens under the job table's lock, so re-registration, which reads both under the same
//! lock, always lists every job the coordinator has not yet been told the end of.

use crate::config::AgentConfig;
use crate::convert::SessionsPlace;
use crate::devices::Devices;
use crate::outbox::{Outbox, Outgoing};
use crate::procfs::{self, ProcEntry};
use kiln_proto::v1::{job_update::Update, JobFinished, JobUpdate, RunningJob};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, Notify};

/// A job attempt: (job id, attempt).
pub type JobKey = (u64, u32);

/// What the agent keeps about a running job.
#[derive(Debug)]
struct JobHandle {
    /// The job's process id, also its process group id (0 until spawned).
    pid: u32,
    /// Asks the job's task to kill it, with the reason.
    kill_tx: mpsc::UnboundedSender<String>,
}

/// Everything the agent's tasks share.
#[derive(Debug)]
pub struct AgentState {
    /// The configuration.
    pub config: AgentConfig,
    /// GPUs and host memory.
    pub devices: Devices,
    /// Updates waiting for the coordinator.
    pub outbox: Outbox,
    /// Monotonic clock origin for the guard.
    pub clock: Instant,
    /// Where generate sessions are kept between jobs.
    pub sessions: SessionsPlace,
    /// The account exec jobs run as (`None`: the agent's own).
    pub exec_user: Option<crate::config::ExecUser>,
    jobs: Mutex<HashMap<JobKey, JobHandle>>,
    /// Signalled whenever a job ends.
    job_ended: Notify,
    /// The last process table read from /proc and when, shared by every job's guard poll.
    procs: Mutex<(Instant, Arc<Vec<ProcEntry>>)>,
}

/// How old a shared process table may be before a poll reads /proc again. Reading the whole
/// table is the agent's costliest step (one file per process on the box); with hundreds of jobs
/// each reading it every poll, the agent's few threads did little else. Only the membership of
/// job trees comes from it: each member's memory is read fresh at every sample.
const PROC_TABLE_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(100);

impl AgentState {
    /// State for a fresh agent.
    pub fn new(
        config: AgentConfig,
        devices: Devices,
        exec_user: Option<crate::config::ExecUser>,
    ) -> Self {
        let outbox = Outbox::new(config.outbox_capacity);
        let sessions = SessionsPlace {
            dir: config.work_dir.join("sessions"),
            budget_bytes: config.sessions_budget_bytes,
        };
        Self {
            config,
            devices,
            outbox,
            clock: Instant::now(),
            sessions,
            exec_user,
            jobs: Mutex::new(HashMap::new()),
            job_ended: Notify::new(),
            procs: Mutex::new((Instant::now(), Arc::new(Vec::new()))),
        }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<JobKey, JobHandle>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The process table, read from /proc at most once per [`PROC_TABLE_MAX_AGE`] (or the
    /// agent's poll interval, if shorter) however many jobs ask.
    pub fn proc_table(&self) -> Arc<Vec<ProcEntry>> {
        let max_age = PROC_TABLE_MAX_AGE.min(std::time::Duration::from_secs_f64(
            self.config.poll_secs.max(0.0),
        ));
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        if procs.1.is_empty() || procs.0.elapsed() >= max_age {
            *procs = (Instant::now(), Arc::new(procfs::read_all()));
        }
        procs.1.clone()
    }

    /// The process table, fresh enough to hold `pid` when it is alive: a job that started
    /// after the shared table was read gets a new read instead of an empty tree.
    pub fn proc_table_with(&self, pid: u32) -> Arc<Vec<ProcEntry>> {
        let table = self.proc_table();
        if pid == 0 || table.iter().any(|e| e.pid == pid) {
            return table;
        }
        let fresh = Arc::new(procfs::read_all());
        *self.procs.lock().unwrap_or_else(|p| p.into_inner()) = (Instant::now(), fresh.clone());
        fresh
    }

    /// Seconds since the agent started (monotonic).
    pub fn now_secs(&self) -> f64 {
        self.clock.elapsed().as_secs_f64()
    }

    /// Adds a job; false when this attempt is already known (a duplicate assignment).
    pub fn insert(&self, key: JobKey, kill_tx: mpsc::UnboundedSender<String>) -> bool {
        let mut jobs = self.jobs();
        if jobs.contains_key(&key)
            || self
                .outbox
                .pending_ends()
                .iter()
                .any(|r| (r.job_id, r.attempt) == key)
        {
            return false;
        }
        jobs.insert(key, JobHandle { pid: 0, kill_tx });
        true
    }

    /// Records the pid of a job's process.
    pub fn set_pid(&self, key: JobKey, pid: u32) {
        if let Some(h) = self.jobs().get_mut(&key) {
            h.pid = pid;
        }
    }

    /// Queues a job's end and forgets the job, in one step (see the module invariant).
    pub fn finish(&self, key: JobKey, pid: u32, finished: JobFinished) {
        let mut jobs = self.jobs();
        self.outbox.push(Outgoing {
            update: JobUpdate {
                job_id: key.0,
                attempt: key.1,
                update: Some(Update::Finished(finished)),
            },
            pid,
        });
        jobs.remove(&key);
        drop(jobs);
        self.job_ended.notify_waiters();
    }

    /// Jobs the coordinator must count as running: live ones and those whose end is queued.
    pub fn running(&self) -> Vec<RunningJob> {
        let jobs = self.jobs();
        let mut out: Vec<RunningJob> = jobs
            .iter()
            .map(|(&(job_id, attempt), h)| RunningJob {
                job_id,
                attempt,
                pid: h.pid,
                ended: false,
            })
            .collect();
        out.extend(self.outbox.pending_ends());
        drop(jobs);
        out.sort_by_key(|r| (r.job_id, r.attempt));
        out
    }

    /// Asks a job to die (attempt 0 = whatever attempt runs). False if no such job runs.
    pub fn kill(&self, job_id: u64, attempt: u32, reason: &str) -> bool {
        let jobs = self.jobs();
        let mut found = false;
        for (&(id, att), h) in jobs.iter() {
            if id == job_id && (attempt == 0 || att == attempt) {
                found = true;
                let _ = h.kill_tx.send(reason.to_string());
            }
        }
        found
    }

    /// Kills every job at once (the process groups directly, then tells the tasks why).
    pub fn kill_all(&self, reason: &str) {
        let jobs = self.jobs();
        for h in jobs.values() {
            // The reason first, so the job's loop knows why its process died.
            let _ = h.kill_tx.send(reason.to_string());
            procfs::kill_tree(h.pid, &[]);
        }
    }

    /// Number of jobs whose process may still run.
    pub fn live_jobs(&self) -> usize {
        self.jobs().len()
    }

    /// Waits until no job runs (or `timeout` passes); true when none runs.
    pub async fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ended = self.job_ended.notified();
            if self.live_jobs() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return self.live_jobs() == 0;
            }
        }
    }

    /// Ids of the generate sessions this agent holds (empty, with a warning, when the store
    /// cannot be read).
    pub fn session_ids(&self) -> Vec<String> {
        let listed = kiln_job::sessions::list_sessions(&self.sessions.dir);
        match listed {
            Ok(list) => list.into_iter().map(|s| s.id).collect(),
            // No session was ever kept here.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(dir = %self.sessions.dir.display(), error = %e, "cannot list sessions");
                Vec::new()
            }
        }
    }

    /// Pids of every process of every Kiln job, from an already-read process table.
    pub fn kiln_pids(&self, table: &[ProcEntry]) -> HashSet<u32> {
        let pgids: Vec<u32> = self
            .jobs()
            .values()
            .map(|h| h.pid)
            .filter(|&p| p != 0)
            .collect();
        pgids
            .into_iter()
            .flat_map(|pg| procfs::tree_of(table, pg).into_iter().map(|e| e.pid))
            .collect()
    }
}
