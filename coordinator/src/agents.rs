//! Agents: registration and reconciliation of what a (re)connecting agent still runs,
//! heartbeats, job reports fenced by attempt number, disconnects, leases, drain and listing.

use std::collections::HashMap;
use std::time::Instant;

use kiln_proto::v1::{
    agent_message, coordinator_message, job_update, Agent, AgentMessage, CoordinatorMessage,
    Heartbeat, JobState, JobUpdate, Kill, Register, Registered,
};
use tokio::sync::mpsc;

use crate::commit::Effect;
use crate::error::ApiError;
use crate::shared::{is_placed, now_ms, AgentEntry, Link, Shared, State};
use crate::store::Store;

fn kill_msg(job_id: u64, attempt: u32, reason: &str) -> CoordinatorMessage {
    CoordinatorMessage {
        msg: Some(coordinator_message::Msg::Kill(Kill {
            job_id,
            attempt,
            reason: reason.to_string(),
        })),
    }
}

impl Shared {
    /// Registers an agent on a new stream: answers `Registered` first on `tx`, then
    /// reconciles the jobs it reports with what the store says. Returns the link id that
    /// later calls for this stream must present.
    pub fn register(
        &self,
        reg: Register,
        tx: mpsc::UnboundedSender<CoordinatorMessage>,
    ) -> Result<u64, ApiError> {
        if reg.name.is_empty() {
            return Err(ApiError::InvalidArgument(
                "Register.name is empty: give the agent a name (--name)".into(),
            ));
        }
        let (result, _) = self.mutate(|state, store| {
            if state
                .agents
                .get(&reg.name)
                .is_some_and(|a| a.link.is_some())
            {
                return Err(ApiError::AlreadyExists(format!(
                    "an agent named {} is already connected; give this one another --name",
                    reg.name
                )));
            }
            let registered = CoordinatorMessage {
                msg: Some(coordinator_message::Msg::Registered(Registered {
                    lease_secs: self.config.lease_wire_secs(),
                    heartbeat_secs: self.config.heartbeat_wire_secs(),
                })),
            };
            let _ = tx.send(registered);
            let link_id = state.next_link_id;
            state.next_link_id += 1;
            let now = Instant::now();
            let entry = state
                .agents
                .entry(reg.name.clone())
                .or_insert_with(|| AgentEntry {
                    info: Agent::default(),
                    draining: false,
                    link: None,
                    disconnected_at: None,
                    last_heard: now,
                    allocations: Default::default(),
                });
            entry.info = Agent {
                name: reg.name.clone(),
                gpus: reg.gpus.clone(),
                host_mem_bytes: reg.host_mem_bytes,
                last_seen_ms: now_ms(),
                sessions: reg.sessions.clone(),
                version: reg.version.clone(),
                nvml: reg.nvml,
                allow_exec: reg.allow_exec,
                ..Default::default()
            };
            entry.link = Some(Link { id: link_id, tx });
            entry.disconnected_at = None;
            entry.last_heard = now;
            let record = entry.record();
            store.put_agent(&record)?;
            state.dirty = true;
            reconcile(state, store, &reg)?;
            tracing::info!(agent = %reg.name, gpus = reg.gpus.len(), running = reg.running.len(),
                "agent registered");
            Ok(link_id)
        });
        self.schedule_wake.notify_one();
        result
    }

    /// Applies one message from a registered stream. An error means the stream is no
    /// longer this agent's current link and must be closed.
    pub fn on_agent_message(
        &self,
        name: &str,
        link_id: u64,
        msg: AgentMessage,
    ) -> Result<(), ApiError> {
        let mut wake = false;
        let (result, _) = self.mutate(|state, store| {
            let entry = current_entry(state, name, link_id)?;
            entry.last_heard = Instant::now();
            entry.info.last_seen_ms = now_ms();
            match msg.msg {
                Some(agent_message::Msg::Heartbeat(hb)) => {
                    wake = apply_heartbeat(entry, hb);
                    Ok(())
                }
                Some(agent_message::Msg::Job(update)) => {
                    wake = apply_update(state, store, name, update)?;
                    Ok(())
                }
                Some(agent_message::Msg::Register(_)) => Err(ApiError::InvalidArgument(
                    "Register may only be the first message of a stream".into(),
                )),
                None => Ok(()),
            }
        });
        if wake {
            self.schedule_wake.notify_one();
        }
        result
    }

    /// The stream `link_id` of agent `name` ended: its lease starts running.
    pub fn disconnect(&self, name: &str, link_id: u64) {
        let (_, _) = self.mutate(|state, _| {
            if let Ok(entry) = current_entry(state, name, link_id) {
                entry.link = None;
                entry.disconnected_at = Some(Instant::now());
                let jobs = entry.allocations.len();
                if jobs > 0 {
                    tracing::warn!(agent = name, jobs,
                        "agent stream ended; its jobs become LOST unless it reconnects within the lease");
                } else {
                    tracing::info!(agent = name, "agent stream ended (no jobs on it)");
                }
            }
            Ok(())
        });
    }

    /// Expires leases: agents silent too long are disconnected, and the jobs of agents
    /// disconnected longer than the lease become LOST (requeued while attempts remain).
    pub fn check_leases(&self) {
        let lease = self.config.lease();
        let silence = self.config.silence_limit();
        let mut lost_any = false;
        let (result, _) = self.mutate(|state, store| {
            let now = Instant::now();
            let mut expired = Vec::new();
            for (name, entry) in state.agents.iter_mut() {
                if entry.link.is_some() && now.duration_since(entry.last_heard) >= silence {
                    tracing::warn!(agent = %name, "agent silent too long; dropping its stream");
                    entry.link = None;
                    entry.disconnected_at = Some(now);
                }
                let Some(since) = entry.disconnected_at else {
                    continue;
                };
                if entry.link.is_none()
                    && now.duration_since(since) >= lease
                    && !entry.allocations.is_empty()
                {
                    let jobs = std::mem::take(&mut entry.allocations);
                    expired.push((name.clone(), jobs));
                }
            }
            for (name, jobs) in expired {
                for (job_id, alloc) in jobs {
                    if alloc.cancelled {
                        continue;
                    }
                    lost_any = true;
                    let why = format!("agent {name} did not reconnect within the lease");
                    state.lose_job(store, job_id, &why)?;
                }
            }
            Ok(())
        });
        if let Err(err) = result {
            tracing::error!(%err, "lease check failed");
        }
        if lost_any {
            self.schedule_wake.notify_one();
        }
    }

    /// Stops new placements on an agent (its running jobs finish), or with `resume` lets the
    /// scheduler place jobs on it again. Durable either way.
    pub async fn drain(&self, name: &str, resume: bool) -> Result<Agent, ApiError> {
        let view = self
            .mutate_durably(|state, store| {
                let entry = state
                    .agents
                    .get_mut(name)
                    .ok_or_else(|| ApiError::NotFound(format!("agent {name} not found")))?;
                entry.draining = !resume;
                let record = entry.record();
                let view = entry.view();
                store.put_agent(&record)?;
                state.dirty = true;
                if resume {
                    tracing::info!(agent = name, "agent resumed");
                } else {
                    tracing::info!(agent = name, "agent draining");
                }
                Ok(view)
            })
            .await?;
        if resume {
            // queued jobs may fit there now
            self.schedule_wake.notify_one();
        }
        Ok(view)
    }

    /// Every known agent, by name.
    pub fn list_agents(&self) -> Vec<Agent> {
        self.lock().agents.values().map(AgentEntry::view).collect()
    }
}

/// The entry of `name` if `link_id` is its current stream.
fn current_entry<'a>(
    state: &'a mut State,
    name: &str,
    link_id: u64,
) -> Result<&'a mut AgentEntry, ApiError> {
    match state.agents.get_mut(name) {
        Some(entry) if entry.link.as_ref().is_some_and(|l| l.id == link_id) => Ok(entry),
        _ => Err(ApiError::FailedPrecondition(format!(
            "this stream is no longer agent {name}'s current connection; reconnect"
        ))),
    }
}

/// Updates foreign usage and sessions; returns whether placement may change.
fn apply_heartbeat(entry: &mut AgentEntry, hb: Heartbeat) -> bool {
    let mut changed = false;
    for gpu in &mut entry.info.gpus {
        if let Some(&used) = hb.foreign_used_bytes.get(&gpu.index) {
            changed |= gpu.foreign_used_bytes != used;
            gpu.foreign_used_bytes = used;
        }
    }
    changed |= entry.info.sessions != hb.sessions;
    entry.info.sessions = hb.sessions;
    changed
}

/// Compares what a registering agent runs with what the coordinator placed there: current
/// attempts stay, anything else is killed, and placed jobs it does not report are LOST.
fn reconcile(state: &mut State, store: &Store, reg: &Register) -> Result<(), ApiError> {
    let name = &reg.name;
    let reported: HashMap<u64, u32> = reg.running.iter().map(|r| (r.job_id, r.attempt)).collect();
    let tx = state.agents[name]
        .link
        .as_ref()
        .expect("just linked")
        .tx
        .clone();
    for r in &reg.running {
        let current = state.jobs.get(&r.job_id).is_some_and(|a| {
            a.job.agent == *name && a.job.attempt == r.attempt && is_placed(a.job.state())
        });
        if current {
            if state.jobs[&r.job_id].job.state() == JobState::Assigned {
                let active = state.jobs.get_mut(&r.job_id).expect("checked");
                active.job.started_at_ms = now_ms();
                let why = format!("agent {name} reports it running (pid {})", r.pid);
                state.set_state(store, r.job_id, JobState::Running, why)?;
            }
            tracing::info!(agent = %name, job = r.job_id, attempt = r.attempt, "job reconciled");
            continue;
        }
        if r.ended {
            // Its process is gone and its end follows on this stream (a repeat of an end this
            // coordinator may already have): nothing to kill, nothing to say.
            tracing::debug!(agent = %name, job = r.job_id, attempt = r.attempt, "agent re-sends the end of a job");
            continue;
        }
        let cancelled = state.agents[name]
            .allocations
            .get(&r.job_id)
            .is_some_and(|a| a.cancelled && a.attempt == r.attempt);
        let reason = if cancelled {
            "cancelled"
        } else {
            "stale attempt"
        };
        tracing::warn!(agent = %name, job = r.job_id, attempt = r.attempt, reason,
            "agent runs a job it should not; killing it");
        state.effect(Effect::Send(
            tx.clone(),
            Box::new(kill_msg(r.job_id, r.attempt, reason)),
        ));
    }
    let held: Vec<(u64, bool, u32)> = state.agents[name]
        .allocations
        .iter()
        .map(|(id, a)| (*id, a.cancelled, a.attempt))
        .collect();
    for (job_id, cancelled, attempt) in held {
        if reported.get(&job_id) == Some(&attempt) {
            continue;
        }
        if cancelled {
            state
                .agents
                .get_mut(name)
                .expect("known")
                .allocations
                .remove(&job_id);
        } else {
            let why = format!("agent {name} reconnected without it");
            state.lose_job(store, job_id, &why)?;
        }
    }
    Ok(())
}

/// Applies a report about one attempt; a report from anything but the job's current
/// attempt on this agent is rejected and answered with Kill. Returns whether capacity was
/// freed (so the scheduler should run).
fn apply_update(
    state: &mut State,
    store: &Store,
    agent: &str,
    update: JobUpdate,
) -> Result<bool, ApiError> {
    let (job_id, attempt) = (update.job_id, update.attempt);
    let current = state.jobs.get(&job_id).is_some_and(|a| {
        a.job.agent == agent && a.job.attempt == attempt && is_placed(a.job.state())
    });
    let tx = state.agents[agent]
        .link
        .as_ref()
        .expect("current link")
        .tx
        .clone();
    if !current {
        let entry = state.agents.get_mut(agent).expect("current agent");
        let cancelled = entry
            .allocations
            .get(&job_id)
            .is_some_and(|a| a.cancelled && a.attempt == attempt);
        if cancelled {
            // The process of a cancelled job reporting on its way out: expected.
            if matches!(update.update, Some(job_update::Update::Finished(_))) {
                entry.allocations.remove(&job_id);
                tracing::debug!(job_id, attempt, "cancelled job's process ended");
                return Ok(true);
            }
            return Ok(false);
        }
        tracing::warn!(
            agent,
            job_id,
            attempt,
            "rejected a report from a stale attempt"
        );
        state.effect(Effect::Send(
            tx,
            Box::new(kill_msg(job_id, attempt, "stale attempt")),
        ));
        return Ok(false);
    }
    let now = now_ms();
    match update.update {
        None => Ok(false),
        Some(job_update::Update::Started(started)) => {
            let active = state.jobs.get_mut(&job_id).expect("current");
            if active.job.state() == JobState::Assigned {
                active.job.started_at_ms = now;
                let why = format!("process {} started on agent {agent}", started.pid);
                state.set_state(store, job_id, JobState::Running, why)?;
            }
            Ok(false)
        }
        Some(job_update::Update::Event(event)) => {
            crate::telemetry::record_job_event(state, store, job_id, event, now)?;
            Ok(false)
        }
        Some(job_update::Update::Guard(sample)) => {
            crate::telemetry::record_guard_sample(state, store, job_id, sample, now)?;
            Ok(false)
        }
        Some(job_update::Update::Finished(fin)) => {
            let mut end = fin.state();
            let active = state.jobs.get_mut(&job_id).expect("current");
            active.job.peak_mem = active.job.peak_mem.max(fin.peak_mem);
            active.job.result = fin.result;
            active.job.kill = fin.kill;
            active.job.error = fin.error;
            if !kiln_proto::is_terminal(end) || end == JobState::Lost {
                active.job.error = format!(
                    "agent reported finishing in state {}: {}",
                    kiln_proto::state_name(end),
                    active.job.error
                );
                end = JobState::Failed;
            }
            state
                .agents
                .get_mut(agent)
                .expect("current agent")
                .allocations
                .remove(&job_id);
            let why = format!("reported by agent {agent}");
            if end == JobState::Killed && state.retry_killed(store, job_id, &why)? {
                return Ok(true);
            }
            state.set_state(store, job_id, end, why)?;
            Ok(true)
        }
    }
}
