//! The scheduling pass: builds the pure scheduler's input from the coordinator's state,
//! runs it, and applies its placements (attempt + 1, ASSIGNED, budget held on the agent,
//! Assign sent once durable). Passes run on their own task, woken by anything that can
//! change the answer, so bursts of submits share one pass.

use kiln_proto::v1::{coordinator_message, Assign, CoordinatorMessage, JobKind, JobState};

use crate::commit::Effect;
use crate::error::ApiError;
use crate::scheduler::{self, AgentSlots, Candidate, GpuSlot, Policy};
use crate::shared::{now_ms, Allocation, Shared, State};
use crate::store::Store;

impl Shared {
    /// Runs one scheduling pass; returns how many jobs were placed.
    pub fn schedule_pass(&self) -> usize {
        let policy = Policy {
            reserve_after_ms: (self.config.reserve_after_secs * 1000.0) as u64,
        };
        let (result, _) = self.mutate(|state, store| place(state, store, policy));
        match result {
            Ok(n) => n,
            Err(err) => {
                tracing::error!(%err, "scheduling pass failed");
                0
            }
        }
    }
}

/// The scheduler's view of the agents, in name order.
fn agent_slots(state: &State) -> Vec<AgentSlots> {
    state
        .agents
        .values()
        .map(|entry| {
            let mut gpus: Vec<GpuSlot> = entry
                .info
                .gpus
                .iter()
                .map(|g| GpuSlot {
                    index: g.index,
                    capacity: g.total_bytes,
                    foreign: g.foreign_used_bytes,
                    committed: 0,
                })
                .collect();
            let mut host_committed = 0;
            for alloc in entry.allocations.values() {
                if alloc.gpus.is_empty() {
                    host_committed += alloc.budget;
                }
                for index in &alloc.gpus {
                    if let Some(g) = gpus.iter_mut().find(|g| g.index == *index) {
                        g.committed += alloc.budget;
                    }
                }
            }
            AgentSlots {
                name: entry.info.name.clone(),
                schedulable: entry.schedulable(),
                gpus,
                host_capacity: entry.info.host_mem_bytes,
                host_committed,
                sessions: entry.info.sessions.clone(),
                allow_exec: entry.info.allow_exec,
            }
        })
        .collect()
}

fn place(state: &mut State, store: &Store, policy: Policy) -> Result<usize, ApiError> {
    if !state.agents.values().any(|a| a.schedulable()) {
        return Ok(0);
    }
    let now = now_ms();
    let mut slots = agent_slots(state);
    // Jobs that cannot fit in any free slot now and have not waited long enough to reserve
    // capacity would be skipped by the scheduler anyway; leaving them out keeps a pass over a
    // long queue of unplaceable jobs cheap (it runs under the state lock).
    let schedulable = slots.iter().filter(|a| a.schedulable);
    let max_gpu_free = schedulable
        .clone()
        .flat_map(|a| a.gpus.iter().map(GpuSlot::free))
        .max()
        .unwrap_or(0);
    let max_host_free = schedulable
        .map(|a| a.host_capacity.saturating_sub(a.host_committed))
        .max()
        .unwrap_or(0);
    let queue: Vec<Candidate> = state
        .jobs
        .values()
        .filter(|a| a.job.state() == JobState::Queued)
        .filter(|a| {
            let r = a.job.resources.unwrap_or_default();
            let free = if r.gpus == 0 {
                max_host_free
            } else {
                max_gpu_free
            };
            r.budget_bytes <= free
                || now.saturating_sub(a.queued_since_ms) >= policy.reserve_after_ms
        })
        .map(|a| {
            let r = a.job.resources.unwrap_or_default();
            Candidate {
                job_id: a.job.id,
                priority: a.job.priority,
                submitted_at_ms: a.job.submitted_at_ms,
                queued_since_ms: a.queued_since_ms,
                gpus: r.gpus,
                budget: r.budget_bytes,
                session: (!a.job.session_id.is_empty()).then(|| a.job.session_id.clone()),
                exec: a.job.kind == JobKind::Exec as i32,
            }
        })
        .collect();
    if queue.is_empty() {
        return Ok(0);
    }
    let plan = scheduler::plan(&mut slots, &queue, now, policy);
    for r in &plan.reservations {
        tracing::debug!(job = r.job_id, agent = %slots[r.agent].name, gpus = ?r.gpu_indices,
            "capacity reserved for a job that waited too long");
    }
    let placed = plan.placements.len();
    for p in plan.placements {
        let agent_name = slots[p.agent].name.clone();
        let active = state
            .jobs
            .get_mut(&p.job_id)
            .expect("candidates are active");
        active.job.attempt += 1;
        active.job.agent = agent_name.clone();
        active.job.gpu_indices = p.gpu_indices.clone();
        active.job.started_at_ms = 0;
        active.job.error.clear();
        let attempt = active.job.attempt;
        let budget = active.job.resources.as_ref().map_or(0, |r| r.budget_bytes);
        let entry = state
            .agents
            .get_mut(&agent_name)
            .expect("placed on a known agent");
        entry.allocations.insert(
            p.job_id,
            Allocation {
                attempt,
                gpus: p.gpu_indices.clone(),
                budget,
                cancelled: false,
            },
        );
        let tx = entry
            .link
            .as_ref()
            .expect("schedulable agents are connected")
            .tx
            .clone();
        let where_ = if p.gpu_indices.is_empty() {
            format!("placed on agent {agent_name} (host memory)")
        } else {
            format!("placed on agent {agent_name} GPU {:?}", p.gpu_indices)
        };
        state.set_state(store, p.job_id, JobState::Assigned, where_)?;
        let job = state.jobs[&p.job_id].job.clone();
        let msg = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Assign(Assign { job: Some(job) })),
        };
        state.effect(Effect::Send(tx, Box::new(msg)));
    }
    Ok(placed)
}
