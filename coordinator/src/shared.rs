//! The coordinator's one piece of shared state: [`Shared`] owns the store, the in-memory
//! view of active jobs and agents behind one mutex, the group-commit channel, and the event
//! broadcast. Every change goes through [`Shared::mutate`], which takes the lock, lets the
//! change write to the store and queue its effects, and numbers it with a commit ticket. The
//! lock is never held across an `.await`.
//!
//! Recovery on start ([`Shared::recover`]) rebuilds this view from sled.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kiln_proto::v1::{
    job_event, Agent, AgentStatus, CoordinatorMessage, Job, JobEvent, JobState, StateChange,
};
use tokio::sync::{broadcast, mpsc, watch, Notify};

use crate::commit::{wait_durable, CommitStatus, Effect};
use crate::config::CoordinatorConfig;
use crate::error::ApiError;
use crate::store::{Store, StoreError};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether a job in this state is placed on an agent.
pub(crate) fn is_placed(state: JobState) -> bool {
    matches!(state, JobState::Assigned | JobState::Running)
}

/// A job that is not in a terminal state.
#[derive(Debug)]
pub(crate) struct ActiveJob {
    /// The job as stored.
    pub job: Job,
    /// Highest event seq written for it. Invariant: equals the store's last event seq.
    pub last_seq: u64,
    /// When it last entered QUEUED (the anti-starvation clock).
    pub queued_since_ms: u64,
    /// Last phase the job reported (stamped on guard rows).
    pub last_phase: String,
}

/// Budget held on an agent by one placed attempt.
#[derive(Debug, Clone)]
pub(crate) struct Allocation {
    /// The attempt placed.
    pub attempt: u32,
    /// GPU indices (empty: host memory).
    pub gpus: Vec<u32>,
    /// Budget per GPU or of host memory.
    pub budget: u64,
    /// The job was cancelled; the budget stays held until the agent confirms the process
    /// ended (Finished, or not reported at reconnect) or the lease runs out.
    pub cancelled: bool,
}

/// An open AgentLink stream.
#[derive(Debug)]
pub(crate) struct Link {
    /// Distinguishes successive connections of the same agent.
    pub id: u64,
    /// Messages to the agent.
    pub tx: mpsc::UnboundedSender<CoordinatorMessage>,
}

/// An agent as the coordinator tracks it.
#[derive(Debug)]
pub(crate) struct AgentEntry {
    /// What the agent registered (GPUs with current foreign usage, host memory, sessions…);
    /// `status` and `running_jobs` are filled in when listed.
    pub info: Agent,
    /// Set by DrainAgent; kept across reconnects and restarts.
    pub draining: bool,
    /// The open stream, if connected.
    pub link: Option<Link>,
    /// When the stream broke (or the coordinator started); the lease runs from here.
    pub disconnected_at: Option<Instant>,
    /// Last message from the agent.
    pub last_heard: Instant,
    /// Budgets held on this agent, by job id.
    pub allocations: BTreeMap<u64, Allocation>,
}

impl AgentEntry {
    /// Connected and not draining.
    pub fn schedulable(&self) -> bool {
        self.link.is_some() && !self.draining
    }

    /// The agent as ListAgents shows it.
    pub fn view(&self) -> Agent {
        let mut agent = self.info.clone();
        agent.status = if self.link.is_none() {
            AgentStatus::Disconnected
        } else if self.draining {
            AgentStatus::Draining
        } else {
            AgentStatus::Ready
        } as i32;
        agent.running_jobs = self.allocations.keys().copied().collect();
        agent
    }

    /// The record to store (status only says whether it is draining).
    pub fn record(&self) -> Agent {
        let mut agent = self.info.clone();
        agent.status = if self.draining {
            AgentStatus::Draining
        } else {
            AgentStatus::Ready
        } as i32;
        agent.running_jobs.clear();
        agent
    }
}

/// Everything behind the lock.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Jobs that are not terminal, by id.
    pub jobs: HashMap<u64, ActiveJob>,
    /// Known agents by name.
    pub agents: BTreeMap<String, AgentEntry>,
    /// Id of the next submitted job. Invariant: greater than every stored job id.
    pub next_job_id: u64,
    /// Id of the next agent connection.
    pub next_link_id: u64,
    /// Number of changes made; the committer makes them durable in order.
    pub ticket: u64,
    /// Effects of changes not yet durable, in change order.
    pub outbox: Vec<Effect>,
    /// Set by a change that wrote to the store or queued an effect.
    pub dirty: bool,
    /// The "no agent registered yet" notice was logged (once per process).
    pub told_no_agents: bool,
}

impl State {
    /// Queues an effect to run once the current change is durable.
    pub fn effect(&mut self, effect: Effect) {
        self.dirty = true;
        self.outbox.push(effect);
    }

    /// Writes a job record (and, when placed or finished, its attempt snapshot).
    pub fn write_job(&mut self, store: &Store, job: &Job) -> Result<(), StoreError> {
        self.dirty = true;
        store.put_job(job)
    }

    /// Appends an event to an active job's log and queues it for watchers.
    pub fn record_event(
        &mut self,
        store: &Store,
        job_id: u64,
        event: job_event::Event,
        at_ms: u64,
    ) -> Result<JobEvent, StoreError> {
        let active = self
            .jobs
            .get_mut(&job_id)
            .expect("events are recorded for active jobs");
        active.last_seq += 1;
        let event = JobEvent {
            job_id,
            seq: active.last_seq,
            at_ms,
            attempt: active.job.attempt,
            event: Some(event),
        };
        store.put_event(&event)?;
        self.effect(Effect::Event(event.clone()));
        Ok(event)
    }

    /// Moves an active job to `state`, stores it with a state-change event, and removes it
    /// from the active set when the state is terminal. The caller has already updated the
    /// job's other fields.
    pub fn set_state(
        &mut self,
        store: &Store,
        job_id: u64,
        state: JobState,
        reason: impl Into<String>,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let active = self.jobs.get_mut(&job_id).expect("job is active");
        active.job.state = state as i32;
        let terminal = kiln_proto::is_terminal(state);
        if terminal {
            active.job.finished_at_ms = now;
            record_attempt(&mut active.job, state, now);
        }
        if state == JobState::Queued {
            active.queued_since_ms = now;
        }
        let job = active.job.clone();
        self.write_job(store, &job)?;
        let change = job_event::Event::State(StateChange {
            state: state as i32,
            reason: reason.into(),
        });
        self.record_event(store, job_id, change, now)?;
        if terminal {
            self.jobs.remove(&job_id);
        }
        Ok(())
    }

    /// Marks a placed job LOST, releases its allocation, and requeues it as a new attempt
    /// while it has attempts left (its log then shows LOST, then QUEUED).
    pub fn lose_job(&mut self, store: &Store, job_id: u64, why: &str) -> Result<(), StoreError> {
        let Some(active) = self.jobs.get_mut(&job_id) else {
            return Ok(());
        };
        let agent = active.job.agent.clone();
        let attempt = active.job.attempt;
        let max = active.job.resources.as_ref().map_or(1, |r| r.max_attempts);
        if let Some(entry) = self.agents.get_mut(&agent) {
            entry.allocations.remove(&job_id);
        }
        active.job.error = format!("lost: {why}");
        if attempt < max {
            let reason = format!("requeued for attempt {} of {max}", attempt + 1);
            self.end_attempt_and_requeue(store, job_id, JobState::Lost, why, None, reason)
        } else {
            let reason = format!("{why}; no attempts left ({attempt} of {max})");
            active.job.error = format!("lost: {reason}");
            self.set_state(store, job_id, JobState::Lost, reason)
        }
    }
}

impl State {
    /// Ends a placed job's attempt that the guard killed: when the job asks to grow its budget
    /// after a kill and has attempts left, the KILLED attempt is kept in its history and the
    /// job is requeued as a new attempt with the grown budget (true); otherwise false (the kill
    /// is final). The caller has already stored the kill record in the job and released its
    /// allocation.
    pub fn retry_killed(
        &mut self,
        store: &Store,
        job_id: u64,
        why: &str,
    ) -> Result<bool, StoreError> {
        let Some(active) = self.jobs.get_mut(&job_id) else {
            return Ok(false);
        };
        let r = active.job.resources.unwrap_or_default();
        let attempt = active.job.attempt;
        if r.on_kill_grow <= 1.0 || attempt >= r.max_attempts {
            return Ok(false);
        }
        let grown = (r.budget_bytes as f64 * r.on_kill_grow).round() as u64;
        let budget = if r.max_budget_bytes > 0 {
            grown.min(r.max_budget_bytes)
        } else {
            grown
        };
        if budget <= r.budget_bytes {
            return Ok(false); // already at the cap: growing again changes nothing
        }
        let reason = format!(
            "requeued for attempt {} of {} with budget {} (×{} after the guard's kill)",
            attempt + 1,
            r.max_attempts,
            kiln_proto::human_bytes(budget),
            r.on_kill_grow
        );
        self.end_attempt_and_requeue(store, job_id, JobState::Killed, why, Some(budget), reason)?;
        Ok(true)
    }

    /// Ends the current attempt of a placed job in `ended` (kept in its history, stored with
    /// its event), then queues the job again for its next attempt, with a new budget if given.
    fn end_attempt_and_requeue(
        &mut self,
        store: &Store,
        job_id: u64,
        ended: JobState,
        why: &str,
        budget: Option<u64>,
        reason: String,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let active = self.jobs.get_mut(&job_id).expect("job is active");
        active.job.state = ended as i32;
        record_attempt(&mut active.job, ended, now);
        let snapshot = active.job.clone();
        self.write_job(store, &snapshot)?;
        let change = job_event::Event::State(StateChange {
            state: ended as i32,
            reason: why.to_string(),
        });
        self.record_event(store, job_id, change, now)?;
        let active = self.jobs.get_mut(&job_id).expect("still active");
        active.job.agent.clear();
        active.job.gpu_indices.clear();
        active.job.started_at_ms = 0;
        active.job.kill = None;
        if let (Some(b), Some(res)) = (budget, active.job.resources.as_mut()) {
            res.budget_bytes = b;
        }
        self.set_state(store, job_id, JobState::Queued, reason)
    }
}

/// Appends the job's current attempt, as it ends in `state`, to its history (once).
fn record_attempt(job: &mut kiln_proto::v1::Job, state: JobState, now: u64) {
    if job.attempt == 0
        || job
            .attempts
            .last()
            .is_some_and(|a| a.attempt == job.attempt)
    {
        return;
    }
    job.attempts.push(kiln_proto::v1::AttemptRecord {
        attempt: job.attempt,
        agent: job.agent.clone(),
        gpu_indices: job.gpu_indices.clone(),
        budget_bytes: job.resources.map_or(0, |r| r.budget_bytes),
        started_at_ms: job.started_at_ms,
        finished_at_ms: now,
        state: state as i32,
        error: job.error.clone(),
        kill: job.kill.clone(),
        peak_mem: job.peak_mem,
    });
}

/// The shared core of a running coordinator.
pub(crate) struct Shared {
    /// Configuration.
    pub config: CoordinatorConfig,
    /// The sled store.
    pub store: Store,
    state: Mutex<State>,
    /// Wakes the committer.
    pub commit_wake: Notify,
    /// Publishes what is durable.
    pub commit_tx: watch::Sender<CommitStatus>,
    /// Live job events (published after they are durable).
    pub events: broadcast::Sender<JobEvent>,
    /// Wakes the scheduling loop.
    pub schedule_wake: Notify,
    /// Fires when the server starts shutting down; streams end on it.
    pub shutdown: watch::Receiver<bool>,
}

impl Shared {
    /// Rebuilds the in-memory view from the store: queued jobs wait for placement, placed
    /// jobs wait (up to the lease) for their agent to reconnect, every agent starts
    /// disconnected.
    pub fn recover(
        store: Store,
        config: CoordinatorConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Shared, StoreError> {
        let started = Instant::now();
        let now = now_ms();
        let mut state = State {
            next_job_id: 1,
            next_link_id: 1,
            ..Default::default()
        };
        for agent in store.agents()? {
            state
                .agents
                .insert(agent.name.clone(), disconnected(agent, started));
        }
        let (mut queued, mut placed) = (0usize, 0usize);
        for job in store.all_jobs() {
            let job = job?;
            state.next_job_id = state.next_job_id.max(job.id + 1);
            let job_state = job.state();
            if kiln_proto::is_terminal(job_state) {
                continue;
            }
            if is_placed(job_state) {
                placed += 1;
                let entry = state.agents.entry(job.agent.clone()).or_insert_with(|| {
                    let agent = Agent {
                        name: job.agent.clone(),
                        ..Default::default()
                    };
                    disconnected(agent, started)
                });
                let resources = job.resources.unwrap_or_default();
                entry.allocations.insert(
                    job.id,
                    Allocation {
                        attempt: job.attempt,
                        gpus: job.gpu_indices.clone(),
                        budget: resources.budget_bytes,
                        cancelled: false,
                    },
                );
            } else {
                queued += 1;
            }
            let last_seq = store.last_event_seq(job.id)?;
            state.jobs.insert(
                job.id,
                ActiveJob {
                    job,
                    last_seq,
                    queued_since_ms: now,
                    last_phase: String::new(),
                },
            );
        }
        tracing::info!(
            queued,
            placed,
            agents = state.agents.len(),
            next_job_id = state.next_job_id,
            "recovered state from the store"
        );
        let (commit_tx, _) = watch::channel(CommitStatus::default());
        let (events, _) = broadcast::channel(4096);
        Ok(Shared {
            config,
            store,
            state: Mutex::new(state),
            commit_wake: Notify::new(),
            commit_tx,
            events,
            schedule_wake: Notify::new(),
            shutdown,
        })
    }

    /// Takes the state lock (poisoning is ignored: every change leaves the state valid
    /// between statements that can panic only on broken invariants).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one change under the lock and returns its result with the ticket to wait on
    /// (see [`Shared::durable`]).
    pub fn mutate<R>(
        &self,
        change: impl FnOnce(&mut State, &Store) -> Result<R, ApiError>,
    ) -> (Result<R, ApiError>, u64) {
        let (result, ticket, wake) = {
            let mut state = self.lock();
            state.dirty = false;
            let result = change(&mut state, &self.store);
            let wake = state.dirty;
            if wake {
                state.ticket += 1;
            }
            (result, state.ticket, wake)
        };
        if wake {
            self.commit_wake.notify_one();
        }
        (result, ticket)
    }

    /// Runs a change and waits until it is durable before returning its result.
    pub async fn mutate_durably<R>(
        &self,
        change: impl FnOnce(&mut State, &Store) -> Result<R, ApiError>,
    ) -> Result<R, ApiError> {
        let (result, ticket) = self.mutate(change);
        self.durable(ticket).await?;
        result
    }

    /// Waits until the change numbered `ticket` (and every earlier one) is durable.
    pub async fn durable(&self, ticket: u64) -> Result<(), ApiError> {
        wait_durable(&mut self.commit_tx.subscribe(), ticket).await
    }

    /// Waits until everything written so far is durable, so a read never shows a change
    /// that could still be lost.
    pub async fn barrier(&self) -> Result<(), ApiError> {
        let ticket = self.lock().ticket;
        self.durable(ticket).await
    }
}

/// An agent entry for an agent that is not (yet) connected.
fn disconnected(info: Agent, since: Instant) -> AgentEntry {
    AgentEntry {
        draining: info.status() == AgentStatus::Draining,
        info,
        link: None,
        disconnected_at: Some(since),
        last_heard: since,
        allocations: BTreeMap::new(),
    }
}

/// Shared handle type.
pub(crate) type SharedRef = Arc<Shared>;

impl Shared {
    /// Whether a known job is in a terminal state (a requeued LOST job is not).
    pub fn job_is_terminal(&self, job_id: u64) -> bool {
        !self.lock().jobs.contains_key(&job_id)
    }
}
