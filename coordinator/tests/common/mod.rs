//! Shared helpers for the integration tests: a real coordinator on a loopback port with its
//! sled store in a temp dir, real AgentLink clients, and polling helpers with time bounds.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_coordinator::bench::{channel, register, AgentConn, RunningCoordinator};
use kiln_coordinator::CoordinatorConfig;
use kiln_proto::v1::coordinator_client::CoordinatorClient;
use kiln_proto::v1::{
    coordinator_message, Agent, CoordinatorMessage, DrainAgentRequest, GetJobRequest, Job,
    JobEvent, JobState, Kill, Register, WatchJobRequest,
};
use tonic::transport::Channel;

pub use kiln_coordinator::bench::memtest_request;

pub const GIB: u64 = 1 << 30;
/// Time bound of every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// Short leases so loss and recovery are quick; heartbeats are not needed within a test.
pub fn config(dir: &Path) -> CoordinatorConfig {
    CoordinatorConfig {
        data_dir: dir.to_path_buf(),
        lease_secs: 0.5,
        heartbeat_secs: 5.0,
        ..Default::default()
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A coordinator plus a client to it.
pub struct Harness {
    pub server: RunningCoordinator,
    pub client: CoordinatorClient<Channel>,
}

pub async fn start(dir: &Path) -> Harness {
    start_with(config(dir)).await
}

/// A coordinator with this configuration (e.g. `config(dir)` with short leases).
pub async fn start_with(config: CoordinatorConfig) -> Harness {
    init_tracing();
    let server = RunningCoordinator::start(config)
        .await
        .expect("start coordinator");
    let client = server.client().await.expect("client");
    Harness { server, client }
}

/// An agent with one GPU of `gpu_gib` and `host_gib` host memory.
pub async fn agent(h: &Harness, name: &str, gpu_gib: u64, host_gib: u64) -> AgentConn {
    agent_with(
        h,
        register(name, (gpu_gib > 0) as u32, gpu_gib * GIB, host_gib * GIB),
    )
    .await
}

pub async fn agent_with(h: &Harness, reg: Register) -> AgentConn {
    let ch = channel(&h.server.url).await.expect("agent channel");
    AgentConn::connect(ch, reg).await.expect("register")
}

pub async fn submit(h: &mut Harness, gpus: u32, budget_gib: u64) -> Job {
    h.client
        .submit_job(memtest_request(gpus, budget_gib * GIB))
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job")
}

pub async fn get(h: &mut Harness, id: u64) -> Job {
    h.client
        .get_job(GetJobRequest { id })
        .await
        .expect("get")
        .into_inner()
}

/// Drains agent `name`, or with `resume` puts it back to work; the agent as the coordinator
/// answers.
pub async fn drain(h: &mut Harness, name: &str, resume: bool) -> Agent {
    h.client
        .drain_agent(DrainAgentRequest {
            name: name.into(),
            resume,
        })
        .await
        .expect("drain")
        .into_inner()
}

/// The job's event log after `after_seq`, read through WatchJob until the stream ends (it ends
/// at the terminal state).
pub async fn events_after(h: &mut Harness, id: u64, after_seq: u64) -> Vec<JobEvent> {
    h.client
        .watch_job(WatchJobRequest {
            id,
            after_seq,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner()
        .map(|e| e.expect("event"))
        .collect()
        .await
}

/// Polls until the job is in `state`.
pub async fn wait_state(h: &mut Harness, id: u64, state: JobState) -> Job {
    let deadline = Instant::now() + WAIT;
    loop {
        let job = get(h, id).await;
        if job.state() == state {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} is {:?}, expected {state:?}",
            job.state()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The next message must be an Assign; returns its job.
pub async fn expect_assign(conn: &mut AgentConn) -> Job {
    match next(conn).await.msg {
        Some(coordinator_message::Msg::Assign(a)) => a.job.expect("assigned job"),
        other => panic!("expected Assign, got {other:?}"),
    }
}

/// The next message must be a Kill.
pub async fn expect_kill(conn: &mut AgentConn) -> Kill {
    match next(conn).await.msg {
        Some(coordinator_message::Msg::Kill(k)) => k,
        other => panic!("expected Kill, got {other:?}"),
    }
}

pub async fn next(conn: &mut AgentConn) -> CoordinatorMessage {
    conn.recv_timeout(WAIT)
        .await
        .expect("coordinator message")
        .expect("stream open")
}

/// Asserts nothing arrives for `d`.
pub async fn expect_silence(conn: &mut AgentConn, d: Duration) {
    if let Ok(msg) = tokio::time::timeout(d, conn.recv()).await {
        panic!("expected no message, got {msg:?}");
    }
}
