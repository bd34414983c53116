//! The scheduler benchmark behind `kiln bench scheduler`: starts coordinators and simulated
//! agents in this process over real loopback gRPC and real sled directories, and measures
//! durable submits per second, dispatch latency (submit → the agent has the assignment) and
//! restart recovery time with many queued jobs. It measures its own baseline in the same run:
//! raw sled insert + flush + fdatasync per operation, i.e. what durability costs without
//! group commit.
//! Every loop is bounded in count and time.

mod agent;
mod report;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_proto::v1::coordinator_client::CoordinatorClient;
use kiln_proto::v1::{
    job_spec, JobResources, JobSpec, JobState, ListJobsRequest, MemtestSpec, SubmitJobRequest,
};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

pub use agent::{channel, register, spawn_sim_agent, AgentConn};
pub use report::BenchReport;

use crate::{CoordinatorConfig, CoordinatorError};

/// Why the benchmark could not finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A coordinator failed to start or stop.
    #[error("coordinator: {0}")]
    Coordinator(#[from] CoordinatorError),
    /// A gRPC connection failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A gRPC call failed.
    #[error("gRPC call failed: {0}")]
    Rpc(#[from] tonic::Status),
    /// Local I/O failed (temporary directories, the listener).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The raw sled baseline failed.
    #[error("sled baseline: {0}")]
    Sled(#[from] sled::Error),
    /// A peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A phase did not finish in its time bound.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Recovery lost acknowledged jobs: the benchmark's durability check failed.
    #[error("lost acknowledged jobs: {0}")]
    Lost(String),
}

/// What to measure. `Default` gives the setting: 100 agents, 10,000 queued jobs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Simulated agents connected during the dispatch phase.
    pub agents: usize,
    /// Jobs submitted in the throughput phase.
    pub submit_jobs: usize,
    /// Concurrent submitting clients in the throughput and recovery phases.
    pub submit_clients: usize,
    /// Jobs whose dispatch latency is measured.
    pub dispatch_jobs: usize,
    /// Concurrent submitting clients in the dispatch phase.
    pub dispatch_clients: usize,
    /// Queued jobs in the restart-recovery phase.
    pub recovery_jobs: usize,
    /// Operations of the raw sled insert + flush + fdatasync baseline.
    pub baseline_ops: usize,
    /// Where the temporary sled directories go (the system temp dir when `None`).
    pub work_dir: Option<PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            agents: 100,
            submit_jobs: 5_000,
            submit_clients: 64,
            dispatch_jobs: 2_000,
            dispatch_clients: 8,
            recovery_jobs: 10_000,
            baseline_ops: 300,
            work_dir: None,
        }
    }
}

/// A coordinator started in this process on a loopback port.
pub struct RunningCoordinator {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), CoordinatorError>>,
}

impl RunningCoordinator {
    /// Binds 127.0.0.1 port 0 and runs a coordinator with `config` there.
    pub async fn start(config: CoordinatorConfig) -> Result<RunningCoordinator, BenchError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(crate::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Ok(RunningCoordinator {
            url,
            stop: Some(stop),
            task,
        })
    }

    /// A channel to it, retried until it accepts connections (at most 10 s).
    pub async fn channel(&self) -> Result<Channel, BenchError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match channel(&self.url).await {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// A Coordinator client on a new channel.
    pub async fn client(&self) -> Result<CoordinatorClient<Channel>, BenchError> {
        Ok(CoordinatorClient::new(self.channel().await?))
    }

    /// Fires the shutdown future and waits for `run` to return (store flushed and closed).
    pub async fn stop(mut self) -> Result<(), BenchError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| BenchError::Protocol(format!("coordinator task: {e}")))??;
        Ok(())
    }
}

/// A memtest submit asking for `gpus` GPUs (0 = host memory) of `budget` bytes.
pub fn memtest_request(gpus: u32, budget: u64) -> SubmitJobRequest {
    SubmitJobRequest {
        spec: Some(JobSpec {
            spec: Some(job_spec::Spec::Memtest(MemtestSpec {
                bytes: budget / 2,
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

const GIB: u64 = 1 << 30;

/// Submits `n` jobs from `clients` concurrent clients over a few shared connections.
/// Returns the acknowledged ids and the wall time.
async fn submit_many(
    server: &RunningCoordinator,
    n: usize,
    clients: usize,
) -> Result<(Vec<u64>, Duration), BenchError> {
    let connections = clients.clamp(1, 8);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(server.channel().await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients.max(1) {
        let mut client = CoordinatorClient::new(channels[c % connections].clone());
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let job = client
                    .submit_job(memtest_request(1, GIB))
                    .await?
                    .into_inner()
                    .job;
                ids.push(job.map_or(0, |j| j.id));
            }
            Ok::<_, BenchError>(ids)
        }));
    }
    let mut ids = Vec::with_capacity(n);
    for t in tasks {
        ids.extend(t.await.map_err(|e| BenchError::Protocol(e.to_string()))??);
    }
    Ok((ids, start.elapsed()))
}

fn config_in(dir: PathBuf) -> CoordinatorConfig {
    CoordinatorConfig {
        data_dir: dir,
        ..Default::default()
    }
}

/// Raw sled, what the store would do per submit without group commit: insert one job-sized
/// record, flush, and `fdatasync` the log file, `ops` times. Returns ops/s.
fn sled_flush_per_op(dir: PathBuf, ops: usize) -> Result<f64, BenchError> {
    let db = sled::Config::new()
        .path(&dir)
        .flush_every_ms(None)
        .mode(sled::Mode::HighThroughput)
        .open()?;
    let log = std::fs::File::open(dir.join("db"))?;
    let record = kiln_proto::v1::Job {
        spec: memtest_request(1, GIB).spec,
        ..Default::default()
    }
    .encode_to_vec();
    let start = Instant::now();
    for i in 0..ops as u64 {
        db.insert(i.to_be_bytes(), record.as_slice())?;
        db.flush()?;
        log.sync_data()?;
    }
    Ok(ops as f64 / start.elapsed().as_secs_f64())
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs every phase and returns the numbers.
pub async fn run_scheduler_bench(opts: BenchOptions) -> Result<BenchReport, BenchError> {
    let mut tmp = tempfile::Builder::new();
    tmp.prefix("kiln-bench-");
    let root = match &opts.work_dir {
        Some(dir) => tmp.tempdir_in(dir)?,
        None => tmp.tempdir()?,
    };
    let mut report = BenchReport::new(&opts);

    let (dir, ops) = (root.path().join("baseline"), opts.baseline_ops.max(1));
    report.baseline_flush_per_op = tokio::task::spawn_blocking(move || sled_flush_per_op(dir, ops))
        .await
        .map_err(|e| BenchError::Protocol(e.to_string()))??;

    // Durable submits with concurrent clients (no agents: the pure submit path).
    let server = RunningCoordinator::start(config_in(root.path().join("submit"))).await?;
    let flushes_before = crate::commit::flush_count();
    let (ids, took) = bounded(
        "submit phase",
        submit_many(&server, opts.submit_jobs, opts.submit_clients),
    )
    .await?;
    let flushes = crate::commit::flush_count() - flushes_before;
    report.submits_per_s = ids.len() as f64 / took.as_secs_f64();
    report.submits_per_flush = ids.len() as f64 / flushes.max(1) as f64;
    server.stop().await?;

    let (p50, p99, max, rate) = bounded("dispatch phase", dispatch(&root, &opts)).await?;
    report.dispatch_p50 = p50;
    report.dispatch_p99 = p99;
    report.dispatch_max = max;
    report.dispatch_submit_rate = rate;

    let recovery = bounded("recovery phase", recover(&root, &opts)).await?;
    report.recovery_submits_per_s = recovery.0;
    report.recovery_serving = recovery.1;
    report.recovery_all_listed = recovery.2;
    report.recovered = recovery.3;
    Ok(report)
}

/// Bounds a phase to five minutes.
async fn bounded<T>(
    what: &str,
    phase: impl std::future::Future<Output = Result<T, BenchError>>,
) -> Result<T, BenchError> {
    tokio::time::timeout(Duration::from_secs(300), phase)
        .await
        .map_err(|_| BenchError::Timeout(format!("{what} took longer than 5 minutes")))?
}

/// Dispatch latency with `opts.agents` simulated agents: (p50, p99, max, submits/s).
async fn dispatch(
    root: &tempfile::TempDir,
    opts: &BenchOptions,
) -> Result<(Duration, Duration, Duration, f64), BenchError> {
    let server = RunningCoordinator::start(config_in(root.path().join("dispatch"))).await?;
    let (assigned_tx, mut assigned_rx) = mpsc::unbounded_channel();
    let mut agents = Vec::with_capacity(opts.agents);
    for i in 0..opts.agents {
        let reg = register(&format!("sim-{i:03}"), 1, 80 * GIB, 0);
        let conn = AgentConn::connect(server.channel().await?, reg).await?;
        agents.push(spawn_sim_agent(conn, Duration::ZERO, assigned_tx.clone()));
    }
    let n = opts.dispatch_jobs;
    let next = Arc::new(AtomicUsize::new(0));
    let channel = server.channel().await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..opts.dispatch_clients.max(1) {
        let mut client = CoordinatorClient::new(channel.clone());
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t0 = Instant::now();
                let job = client
                    .submit_job(memtest_request(1, GIB))
                    .await?
                    .into_inner()
                    .job;
                sent.push((job.map_or(0, |j| j.id), t0));
            }
            Ok::<_, BenchError>(sent)
        }));
    }
    let mut submitted: HashMap<u64, Instant> = HashMap::with_capacity(n);
    for t in tasks {
        submitted.extend(t.await.map_err(|e| BenchError::Protocol(e.to_string()))??);
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let mut arrived: HashMap<u64, Instant> = HashMap::with_capacity(n);
    while arrived.len() < n {
        match tokio::time::timeout(Duration::from_secs(30), assigned_rx.recv()).await {
            Ok(Some((id, at))) => {
                arrived.insert(id, at);
            }
            _ => {
                return Err(BenchError::Timeout(format!(
                    "only {} of {n} jobs reached an agent",
                    arrived.len()
                )))
            }
        }
    }
    let mut latencies: Vec<Duration> = submitted
        .iter()
        .map(|(id, t0)| {
            arrived
                .get(id)
                .map_or(Duration::MAX, |t1| t1.duration_since(*t0))
        })
        .collect();
    latencies.sort();
    server.stop().await?;
    for a in agents {
        let _ = a.await;
    }
    Ok((
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        *latencies.last().unwrap_or(&Duration::ZERO),
        rate,
    ))
}

/// Restart recovery: queue `opts.recovery_jobs`, stop, start a new coordinator on the same
/// directory. Returns (submits/s while queueing, time to serve, time until every job was
/// listed, jobs recovered); fails if an acknowledged job is missing.
async fn recover(
    root: &tempfile::TempDir,
    opts: &BenchOptions,
) -> Result<(f64, Duration, Duration, usize), BenchError> {
    let dir = root.path().join("recovery");
    let first = RunningCoordinator::start(config_in(dir.clone())).await?;
    let (acked, took) = submit_many(&first, opts.recovery_jobs, opts.submit_clients).await?;
    let rate = acked.len() as f64 / took.as_secs_f64();
    first.stop().await?;

    let t0 = Instant::now();
    let second = RunningCoordinator::start(config_in(dir)).await?;
    let mut client = second.client().await?;
    let queued = || ListJobsRequest {
        states: vec![JobState::Queued as i32],
        page_size: 1000,
        ..Default::default()
    };
    // Serving: the first successful call.
    let mut first_page = client.list_jobs(queued()).await?.into_inner();
    let serving = t0.elapsed();
    let mut listed: HashSet<u64> = first_page.jobs.drain(..).map(|j| j.id).collect();
    let mut token = first_page.next_page_token;
    while !token.is_empty() {
        let mut req = queued();
        req.page_token = token;
        let page = client.list_jobs(req).await?.into_inner();
        listed.extend(page.jobs.iter().map(|j| j.id));
        token = page.next_page_token;
    }
    let all_listed = t0.elapsed();
    second.stop().await?;
    let missing: Vec<u64> = acked
        .iter()
        .filter(|id| !listed.contains(id))
        .copied()
        .collect();
    if !missing.is_empty() {
        return Err(BenchError::Lost(format!(
            "{} of {} acknowledged jobs missing after restart (first: {:?})",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        )));
    }
    Ok((rate, serving, all_listed, listed.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v[..1], 99.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
