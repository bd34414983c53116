//! Job operations users ask for: submit (validation and the capacity check), get, list with
//! filters and paging, and cancel. Each change is durable before it returns.

use std::collections::BTreeMap;

use kiln_proto::v1::{
    job_spec, Job, JobKind, JobResources, JobState, Kill, ListJobsRequest, ListJobsResponse,
    SubmitJobRequest,
};

use crate::commit::Effect;
use crate::config::CoordinatorConfig;
use crate::error::ApiError;
use crate::shared::{is_placed, now_ms, ActiveJob, AgentEntry, Shared};

/// Default and largest ListJobs page.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

// Bytes in human units for messages: the one formatter every Kiln message uses.
use kiln_proto::human_bytes as gib;

/// Checks a submit request and fills in defaults. Returns the job to store (id and times
/// are set by the caller).
pub(crate) fn validate_submit(
    req: SubmitJobRequest,
    config: &CoordinatorConfig,
) -> Result<Job, ApiError> {
    let invalid = |m: &str| Err(ApiError::InvalidArgument(m.to_string()));
    let Some(spec) = req.spec else {
        return invalid(
            "spec is missing: set exactly one of memtest, generate, train, export, exec",
        );
    };
    kiln_proto::validate::check_spec(&spec).map_err(ApiError::InvalidArgument)?;
    let (kind, session_id) = match &spec.spec {
        None => unreachable!("check_spec refuses an empty spec"),
        Some(job_spec::Spec::Memtest(_)) => (JobKind::Memtest, String::new()),
        Some(job_spec::Spec::Generate(g)) => (JobKind::Generate, g.session_id.clone()),
        Some(job_spec::Spec::Train(_)) => (JobKind::Train, String::new()),
        Some(job_spec::Spec::Export(_)) => (JobKind::Export, String::new()),
        Some(job_spec::Spec::Exec(_)) => (JobKind::Exec, String::new()),
    };
    let Some(mut resources) = req.resources else {
        return invalid("resources are missing: budget_bytes must be > 0");
    };
    kiln_proto::validate::check_resources(&resources).map_err(ApiError::InvalidArgument)?;
    if resources.poll_secs == 0.0 {
        resources.poll_secs = config.default_poll_secs;
    }
    if resources.max_attempts == 0 {
        resources.max_attempts = config.default_max_attempts;
    }
    if req.name.len() > 256 {
        return invalid("name is longer than 256 bytes");
    }
    Ok(Job {
        kind: kind as i32,
        spec: Some(spec),
        resources: Some(resources),
        priority: req.priority,
        state: JobState::Queued as i32,
        name: req.name,
        session_id,
        ..Default::default()
    })
}

/// Rejects an exec job when agents are known and none of them runs exec jobs.
pub(crate) fn check_exec_allowed(
    agents: &BTreeMap<String, AgentEntry>,
    kind: JobKind,
) -> Result<(), ApiError> {
    if kind != JobKind::Exec || agents.is_empty() || agents.values().any(|a| a.info.allow_exec) {
        return Ok(());
    }
    Err(ApiError::FailedPrecondition(format!(
        "no known agent runs exec jobs (known agents: {}); start an agent with --allow-exec",
        agents.keys().cloned().collect::<Vec<_>>().join(", ")
    )))
}

/// Rejects a request no known agent could ever hold. With no known agent at all, everything
/// is accepted (agents may register later).
pub(crate) fn check_capacity(
    agents: &BTreeMap<String, AgentEntry>,
    resources: &JobResources,
) -> Result<(), ApiError> {
    if agents.is_empty() {
        return Ok(());
    }
    let budget = resources.budget_bytes;
    if resources.gpus == 0 {
        let largest = agents
            .values()
            .map(|a| (a.info.host_mem_bytes, a.info.name.as_str()))
            .max();
        return match largest {
            Some((cap, _)) if cap >= budget => Ok(()),
            Some((cap, name)) => Err(ApiError::ResourceExhausted(format!(
                "budget {} is larger than the host memory of every known agent: the largest is \
                 {} (agent {name}); lower --budget-gb or add a larger agent",
                gib(budget),
                gib(cap)
            ))),
            None => Ok(()),
        };
    }
    let want = resources.gpus as usize;
    // For each agent, the capacity of its `want`-th largest GPU: what each of `want` GPUs
    // could give at best.
    let mut largest: Option<(u64, &str)> = None;
    for agent in agents.values() {
        let mut caps: Vec<u64> = agent.info.gpus.iter().map(|g| g.total_bytes).collect();
        if caps.len() < want {
            continue;
        }
        caps.sort_unstable_by(|a, b| b.cmp(a));
        let cap = caps[want - 1];
        if largest.is_none_or(|(c, _)| cap > c) {
            largest = Some((cap, agent.info.name.as_str()));
        }
    }
    match largest {
        Some((cap, _)) if cap >= budget => Ok(()),
        Some((cap, name)) if want == 1 => Err(ApiError::ResourceExhausted(format!(
            "budget {} per GPU is larger than every known GPU: the largest is {} (agent {name}); \
             lower --budget-gb or add a larger GPU",
            gib(budget),
            gib(cap)
        ))),
        Some((cap, name)) => Err(ApiError::ResourceExhausted(format!(
            "budget {} per GPU on {want} GPUs of one agent is more than any known agent has: \
             the best is {} on each of {want} GPUs (agent {name})",
            gib(budget),
            gib(cap)
        ))),
        None => Err(ApiError::ResourceExhausted(format!(
            "no known agent has {want} GPU(s) (known agents: {}); submit with --gpus 0 for a CPU \
             slot or start an agent with enough GPUs",
            agents.keys().cloned().collect::<Vec<_>>().join(", ")
        ))),
    }
}

impl Shared {
    /// Validates, stores (durably) and queues a job.
    pub async fn submit(&self, req: SubmitJobRequest) -> Result<Job, ApiError> {
        let mut job = validate_submit(req, &self.config)?;
        let job = self
            .mutate_durably(|state, store| {
                let resources = job.resources.unwrap_or_default();
                check_exec_allowed(&state.agents, job.kind())?;
                check_capacity(&state.agents, &resources)?;
                let now = now_ms();
                job.id = state.next_job_id;
                state.next_job_id += 1;
                job.submitted_at_ms = now;
                if state.agents.is_empty() && !state.told_no_agents {
                    state.told_no_agents = true;
                    tracing::info!(
                        job = job.id,
                        "no agent has registered yet: jobs are accepted without a capacity \
                         check and queued until one does"
                    );
                }
                state.write_job(store, &job)?;
                state.jobs.insert(
                    job.id,
                    ActiveJob {
                        job: job.clone(),
                        last_seq: 0,
                        queued_since_ms: now,
                        last_phase: String::new(),
                    },
                );
                let queued = kiln_proto::v1::job_event::Event::State(kiln_proto::v1::StateChange {
                    state: JobState::Queued as i32,
                    reason: "submitted".into(),
                });
                state.record_event(store, job.id, queued, now)?;
                Ok(job)
            })
            .await?;
        self.schedule_wake.notify_one();
        Ok(job)
    }

    /// One job by id.
    pub async fn get_job(&self, id: u64) -> Result<Job, ApiError> {
        self.barrier().await?;
        self.store
            .get_job(id)?
            .ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))
    }

    /// A page of jobs, newest first. The page token is the id to continue below.
    pub async fn list_jobs(&self, req: ListJobsRequest) -> Result<ListJobsResponse, ApiError> {
        self.barrier().await?;
        let page = match req.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let before = match req.page_token.as_str() {
            "" => None,
            t => Some(t.parse::<u64>().map_err(|_| {
                ApiError::InvalidArgument(format!("page_token {t:?} is not one we issued"))
            })?),
        };
        let states: Vec<i32> = req.states.clone();
        let mut jobs = Vec::with_capacity(page);
        let mut next_page_token = String::new();
        for job in self.store.jobs_newest_first(before) {
            let job = job?;
            let keep = (states.is_empty() || states.contains(&job.state))
                && (req.kind == 0 || job.kind == req.kind)
                && (req.agent.is_empty() || job.agent == req.agent);
            if !keep {
                continue;
            }
            if jobs.len() == page {
                next_page_token = jobs
                    .last()
                    .map_or(String::new(), |j: &Job| j.id.to_string());
                break;
            }
            jobs.push(job);
        }
        Ok(ListJobsResponse {
            jobs,
            next_page_token,
        })
    }

    /// Cancels a queued job at once, or a placed one by telling its agent to kill it. The
    /// job is CANCELLED (durably) when this returns; a later report from its process is
    /// ignored.
    pub async fn cancel(&self, id: u64) -> Result<Job, ApiError> {
        let result = self
            .mutate_durably(|state, store| {
                let Some(active) = state.jobs.get_mut(&id) else {
                    return match store.get_job(id)? {
                        Some(job) => Err(ApiError::FailedPrecondition(format!(
                            "job {id} is already {}; only queued or running jobs can be cancelled",
                            kiln_proto::state_name(job.state())
                        ))),
                        None => Err(ApiError::NotFound(format!("job {id} not found"))),
                    };
                };
                active.job.error = "cancelled by a user".into();
                let was = active.job.state();
                let (agent, attempt) = (active.job.agent.clone(), active.job.attempt);
                if is_placed(was) {
                    if let Some(entry) = state.agents.get_mut(&agent) {
                        if let Some(alloc) = entry.allocations.get_mut(&id) {
                            alloc.cancelled = true;
                        }
                        if let Some(link) = &entry.link {
                            let kill = Kill {
                                job_id: id,
                                attempt,
                                reason: "cancelled".into(),
                            };
                            let msg = kiln_proto::v1::CoordinatorMessage {
                                msg: Some(kiln_proto::v1::coordinator_message::Msg::Kill(kill)),
                            };
                            let tx = link.tx.clone();
                            state.effect(Effect::Send(tx, Box::new(msg)));
                        }
                    }
                }
                let reason = if is_placed(was) {
                    format!("cancelled by a user; agent {agent} told to kill attempt {attempt}")
                } else {
                    "cancelled by a user".to_string()
                };
                state.set_state(store, id, JobState::Cancelled, reason)?;
                store
                    .get_job(id)?
                    .ok_or_else(|| ApiError::NotFound(format!("job {id} vanished while cancelled")))
            })
            .await;
        self.schedule_wake.notify_one();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::{Agent, Gpu, JobSpec, MemtestSpec};

    fn request(gpus: u32, budget: u64) -> SubmitJobRequest {
        SubmitJobRequest {
            spec: Some(JobSpec {
                spec: Some(job_spec::Spec::Memtest(MemtestSpec {
                    bytes: 1 << 20,
                    steps: 1,
                    ..Default::default()
                })),
            }),
            resources: Some(JobResources {
                gpus,
                budget_bytes: budget,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn agents(gpus: &[u64], host: u64) -> BTreeMap<String, AgentEntry> {
        let info = Agent {
            name: "a".into(),
            host_mem_bytes: host,
            gpus: gpus
                .iter()
                .map(|&t| Gpu {
                    total_bytes: t,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let entry = AgentEntry {
            info,
            draining: false,
            link: None,
            disconnected_at: None,
            last_heard: std::time::Instant::now(),
            allocations: Default::default(),
        };
        BTreeMap::from([("a".to_string(), entry)])
    }

    #[test]
    fn validation_rejects_malformed_requests_and_fills_defaults() {
        let config = CoordinatorConfig::default();
        let mut no_spec = request(1, 1);
        no_spec.spec = None;
        assert!(matches!(
            validate_submit(no_spec, &config),
            Err(ApiError::InvalidArgument(_))
        ));
        let mut empty_spec = request(1, 1);
        empty_spec.spec = Some(JobSpec { spec: None });
        assert!(validate_submit(empty_spec, &config).is_err());
        assert!(validate_submit(request(1, 0), &config).is_err());
        let job = validate_submit(request(1, 5), &config).unwrap();
        assert_eq!(job.kind(), JobKind::Memtest);
        let r = job.resources.unwrap();
        assert_eq!(r.max_attempts, 3);
        assert_eq!(r.poll_secs, 0.5);
    }

    #[test]
    fn capacity_check_names_the_largest_capacity() {
        let a = agents(&[80 << 30, 40 << 30], 16 << 30);
        let ok = |g, b| check_capacity(&a, &request(g, b).resources.unwrap());
        assert!(ok(1, 80 << 30).is_ok());
        let err = ok(1, 81 << 30).unwrap_err().to_string();
        assert!(err.contains("80.00 GiB"), "{err}");
        assert!(ok(2, 40 << 30).is_ok());
        assert!(ok(2, 41 << 30)
            .unwrap_err()
            .to_string()
            .contains("40.00 GiB"));
        assert!(ok(3, 1).unwrap_err().to_string().contains("3 GPU"));
        assert!(ok(0, 16 << 30).is_ok());
        let err = ok(0, 17 << 30).unwrap_err().to_string();
        assert!(err.contains("16.00 GiB"), "{err}");
        // Nobody registered yet: accept.
        assert!(check_capacity(&BTreeMap::new(), &request(1, u64::MAX).resources.unwrap()).is_ok());
    }
}
