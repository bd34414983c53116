//! The placement policy, as pure logic with no I/O: given the agents' slots and the queued
//! jobs, decide which jobs go where. The coordinator builds the input from its state
//! (`placement.rs`) and applies the output; everything here is unit-tested exhaustively.
//!
//! Rules:
//! - Placement is by memory amount. A GPU's free budget is its capacity minus foreign usage
//!   minus the budgets of Kiln jobs already on it; several jobs share a GPU while budgets fit.
//!   `gpus = 0` jobs are placed on an agent's host memory the same way. A job asking for
//!   `gpus = n > 1` needs `n` GPUs of one agent, each with its budget free.
//! - Only schedulable agents (connected and not draining) get work.
//! - Order: higher priority first, then earlier submission, then lower id.
//! - Backfill: a job that does not fit now is skipped and later jobs may use what is free.
//! - No starvation: a job that has waited at least `reserve_after_ms` and does not fit now
//!   reserves the slots where it would fit soonest (the least budget that must still be
//!   released); later jobs in the order may not be placed on reserved slots. As jobs on those
//!   slots finish, nothing new takes their place, so the reserved job eventually fits.
//! - Among slots that fit, a session's holder agent wins, then the tightest fit (least free
//!   memory left), then agent name and GPU index order, so results are deterministic.

use std::collections::HashSet;

/// One GPU of an agent as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSlot {
    /// Device index on the agent.
    pub index: u32,
    /// Memory capacity in bytes.
    pub capacity: u64,
    /// Memory used by processes Kiln does not manage.
    pub foreign: u64,
    /// Sum of the budgets of Kiln jobs placed on this GPU.
    pub committed: u64,
}

impl GpuSlot {
    /// Memory a new job could still be given now.
    pub fn free(&self) -> u64 {
        self.capacity
            .saturating_sub(self.foreign)
            .saturating_sub(self.committed)
    }

    /// Memory a job could be given once every Kiln job on this GPU has finished.
    pub fn usable(&self) -> u64 {
        self.capacity.saturating_sub(self.foreign)
    }
}

/// An agent as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSlots {
    /// Unique agent name.
    pub name: String,
    /// Connected and not draining. Agents that are not schedulable get nothing.
    pub schedulable: bool,
    /// The agent's GPUs (empty for a CPU agent).
    pub gpus: Vec<GpuSlot>,
    /// Host memory offered to `gpus = 0` jobs.
    pub host_capacity: u64,
    /// Sum of the budgets of `gpus = 0` Kiln jobs placed on this agent.
    pub host_committed: u64,
    /// Generate sessions this agent holds in memory.
    pub sessions: Vec<String>,
    /// Whether the agent runs exec jobs.
    pub allow_exec: bool,
}

impl AgentSlots {
    fn host_free(&self) -> u64 {
        self.host_capacity.saturating_sub(self.host_committed)
    }
}

/// A queued job as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Job id.
    pub job_id: u64,
    /// Higher runs first.
    pub priority: i32,
    /// Submission time (orders jobs of equal priority).
    pub submitted_at_ms: u64,
    /// Since when the job has waited in the queue (the anti-starvation clock).
    pub queued_since_ms: u64,
    /// GPUs wanted on one agent; 0 = a host memory slot.
    pub gpus: u32,
    /// Budget per GPU (or of host memory), bytes.
    pub budget: u64,
    /// Generate session whose holder agent is preferred.
    pub session: Option<String>,
    /// An exec job: only agents that allow exec may take it.
    pub exec: bool,
}

/// Where a job goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The job.
    pub job_id: u64,
    /// The agent, by index into the `agents` slice given to [`plan`].
    pub agent: usize,
    /// GPU indices on that agent (empty for a host slot).
    pub gpu_indices: Vec<u32>,
}

/// Slots held back for a job that has waited too long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The starving job.
    pub job_id: u64,
    /// The agent, by index into the `agents` slice.
    pub agent: usize,
    /// Reserved GPU indices (empty: the host slot is reserved).
    pub gpu_indices: Vec<u32>,
}

/// Tunables of the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// A job that has waited this long and still does not fit reserves capacity.
    pub reserve_after_ms: u64,
}

/// The outcome of one scheduling pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Jobs to place now, in scheduling order.
    pub placements: Vec<Placement>,
    /// Capacity held back for starving jobs in this pass.
    pub reservations: Vec<Reservation>,
}

/// Sorts candidates into scheduling order: priority (high first), submit time, id.
pub fn order(queue: &mut [Candidate]) {
    queue.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.submitted_at_ms.cmp(&b.submitted_at_ms))
            .then(a.job_id.cmp(&b.job_id))
    });
}

/// A slot: (agent index, GPU position in `gpus`), or the host slot with `None`.
type SlotKey = (usize, Option<usize>);

/// Runs one pass. `agents` is updated in place (committed budgets of the placements are
/// added), so the caller can inspect what is left. `queue` may be in any order.
pub fn plan(agents: &mut [AgentSlots], queue: &[Candidate], now_ms: u64, policy: Policy) -> Plan {
    let mut ordered = queue.to_vec();
    order(&mut ordered);
    let mut reserved: HashSet<SlotKey> = HashSet::new();
    let mut out = Plan::default();
    // Upper bounds of what any slot can give; placements only lower free memory, so stale
    // values stay valid bounds and let unplaceable jobs be skipped in O(1).
    let max_gpu_free = max_free(agents, true);
    let max_host_free = max_free(agents, false);

    for job in &ordered {
        let bound = if job.gpus == 0 {
            max_host_free
        } else {
            max_gpu_free
        };
        let fit = if job.budget <= bound {
            find_fit(agents, job, &reserved)
        } else {
            None
        };
        match fit {
            Some((agent, positions)) => {
                let slots = &mut agents[agent];
                let mut gpu_indices = Vec::with_capacity(positions.len());
                if job.gpus == 0 {
                    slots.host_committed += job.budget;
                } else {
                    for &p in &positions {
                        slots.gpus[p].committed += job.budget;
                        gpu_indices.push(slots.gpus[p].index);
                    }
                }
                // Invariant: a placement never over-commits the slots it uses.
                debug_assert!(positions
                    .iter()
                    .all(|&p| slots.gpus[p].committed + slots.gpus[p].foreign
                        <= slots.gpus[p].capacity));
                debug_assert!(job.gpus > 0 || slots.host_committed <= slots.host_capacity);
                out.placements.push(Placement {
                    job_id: job.job_id,
                    agent,
                    gpu_indices,
                });
            }
            None => {
                let waited = now_ms.saturating_sub(job.queued_since_ms);
                if waited >= policy.reserve_after_ms {
                    if let Some((agent, positions)) = find_reservation(agents, job, &reserved) {
                        let gpu_indices = positions
                            .iter()
                            .map(|&p| agents[agent].gpus[p].index)
                            .collect();
                        if job.gpus == 0 {
                            reserved.insert((agent, None));
                        } else {
                            reserved.extend(positions.iter().map(|&p| (agent, Some(p))));
                        }
                        out.reservations.push(Reservation {
                            job_id: job.job_id,
                            agent,
                            gpu_indices,
                        });
                    }
                }
            }
        }
    }
    out
}

/// Largest free amount among schedulable GPU slots (`gpu`) or host slots.
fn max_free(agents: &[AgentSlots], gpu: bool) -> u64 {
    agents
        .iter()
        .filter(|a| a.schedulable)
        .map(|a| {
            if gpu {
                a.gpus.iter().map(GpuSlot::free).max().unwrap_or(0)
            } else {
                a.host_free()
            }
        })
        .max()
        .unwrap_or(0)
}

/// Whether the agent may take the job at all (schedulable, and allows exec for an exec job).
fn may_take(agent: &AgentSlots, job: &Candidate) -> bool {
    agent.schedulable && (!job.exec || agent.allow_exec)
}

/// Whether the agent holds the job's session.
fn holds_session(agent: &AgentSlots, job: &Candidate) -> bool {
    job.session
        .as_ref()
        .is_some_and(|s| agent.sessions.iter().any(|h| h == s))
}

/// The best slots where the job fits now: (agent index, GPU positions).
fn find_fit(
    agents: &[AgentSlots],
    job: &Candidate,
    reserved: &HashSet<SlotKey>,
) -> Option<(usize, Vec<usize>)> {
    // Score: (not the session holder, leftover memory, agent index) — lower is better.
    let mut best: Option<((bool, u64, usize), Vec<usize>)> = None;
    for (ai, agent) in agents.iter().enumerate() {
        if !may_take(agent, job) {
            continue;
        }
        let choice = if job.gpus == 0 {
            if reserved.contains(&(ai, None)) || agent.host_free() < job.budget {
                continue;
            }
            (agent.host_free() - job.budget, Vec::new())
        } else {
            let mut fitting: Vec<(u64, usize)> = agent
                .gpus
                .iter()
                .enumerate()
                .filter(|(p, g)| !reserved.contains(&(ai, Some(*p))) && g.free() >= job.budget)
                .map(|(p, g)| (g.free() - job.budget, p))
                .collect();
            if fitting.len() < job.gpus as usize {
                continue;
            }
            fitting.sort();
            fitting.truncate(job.gpus as usize);
            let leftover = fitting.iter().map(|(l, _)| *l).sum();
            let mut positions: Vec<usize> = fitting.into_iter().map(|(_, p)| p).collect();
            positions.sort();
            (leftover, positions)
        };
        let score = (!holds_session(agent, job), choice.0, ai);
        if best.as_ref().is_none_or(|(s, _)| score < *s) {
            best = Some((score, choice.1));
        }
    }
    best.map(|((_, _, ai), positions)| (ai, positions))
}

/// Where a job that does not fit now would fit soonest: the slots whose Kiln budgets that
/// must still be released are smallest. `None` when no schedulable agent could ever hold it.
fn find_reservation(
    agents: &[AgentSlots],
    job: &Candidate,
    reserved: &HashSet<SlotKey>,
) -> Option<(usize, Vec<usize>)> {
    let mut best: Option<((u64, usize), Vec<usize>)> = None;
    for (ai, agent) in agents.iter().enumerate() {
        if !may_take(agent, job) {
            continue;
        }
        let choice = if job.gpus == 0 {
            if reserved.contains(&(ai, None)) || agent.host_capacity < job.budget {
                continue;
            }
            (job.budget.saturating_sub(agent.host_free()), Vec::new())
        } else {
            let mut eligible: Vec<(u64, usize)> = agent
                .gpus
                .iter()
                .enumerate()
                .filter(|(p, g)| !reserved.contains(&(ai, Some(*p))) && g.usable() >= job.budget)
                .map(|(p, g)| (job.budget.saturating_sub(g.free()), p))
                .collect();
            if eligible.len() < job.gpus as usize {
                continue;
            }
            eligible.sort();
            eligible.truncate(job.gpus as usize);
            let deficit = eligible.iter().map(|(d, _)| *d).sum();
            let mut positions: Vec<usize> = eligible.into_iter().map(|(_, p)| p).collect();
            positions.sort();
            (deficit, positions)
        };
        let score = (choice.0, ai);
        if best.as_ref().is_none_or(|(s, _)| score < *s) {
            best = Some((score, choice.1));
        }
    }
    best.map(|((_, ai), positions)| (ai, positions))
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
