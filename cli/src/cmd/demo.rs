//! `kiln demo`: the one-command quick start. Starts a coordinator (sled in a temporary
//! directory) and one agent in this process — GPU if NVML finds one, CPU otherwise — and runs
//! jobs through the real gRPC API exactly as `kiln submit` would, printing progress, results
//! and the telemetry table.

use super::servers;
use crate::args::{AgentArgs, DemoArgs, OutputFormat};
use crate::client::{connect_url, status_error, Client};
use crate::output::{job_state, mib, telemetry_table};
use anyhow::{bail, Context};
use kiln_proto::v1::{self, job_spec::Spec, JobState};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The demo's running servers; dropping the sender stops them.
struct DemoCluster {
    url: String,
    stop: tokio::sync::watch::Sender<bool>,
    coordinator: tokio::task::JoinHandle<()>,
    agent: tokio::task::JoinHandle<()>,
    _tmp: Option<tempfile::TempDir>,
}

async fn start(args: &DemoArgs) -> anyhow::Result<DemoCluster> {
    let (tmp, dir) = match &args.data_dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = tempfile::tempdir().context("creating the demo's temporary directory")?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let config = kiln_coordinator::CoordinatorConfig {
        data_dir: dir.join("coordinator"),
        ..Default::default()
    };
    let mut rx = stop_rx.clone();
    let coordinator = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.changed().await;
        };
        if let Err(e) = kiln_coordinator::run(listener, config, shutdown).await {
            eprintln!("demo coordinator stopped: {e}");
        }
    });
    let agent_config = servers::agent_config(&AgentArgs {
        coordinator: url.clone(),
        name: Some("demo-agent".into()),
        gpus: "all".into(),
        gpu_limit_gb: None,
        mem_limit_gb: None,
        poll_secs: 0.1,
        over_secs: 0.0,
        work_dir: dir.join("agent"),
    })?;
    let mut rx = stop_rx;
    let agent = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.changed().await;
        };
        if let Err(e) = kiln_agent::run(agent_config, shutdown).await {
            eprintln!("demo agent stopped: {e}");
        }
    });
    Ok(DemoCluster { url, stop, coordinator, agent, _tmp: tmp })
}

/// Waits until the agent has registered and returns it.
async fn wait_for_agent(client: &mut Client) -> anyhow::Result<v1::Agent> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let agents = client
            .list_agents(v1::ListAgentsRequest {})
            .await
            .map_err(status_error)?
            .into_inner()
            .agents;
        if let Some(a) = agents.into_iter().find(|a| a.status == v1::AgentStatus::Ready as i32) {
            return Ok(a);
        }
        if Instant::now() > deadline {
            bail!("the demo agent did not register within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Submits a job and follows it to the end, printing its events; returns the final record.
async fn run_job(client: &mut Client, req: v1::SubmitJobRequest) -> anyhow::Result<v1::Job> {
    let job = client
        .submit_job(req)
        .await
        .map_err(status_error)?
        .into_inner()
        .job
        .context("no job in the submit response")?;
    println!("submitted job {}", job.id);
    super::watch::follow(client, job.id, OutputFormat::Table).await?;
    Ok(client
        .get_job(v1::GetJobRequest { id: job.id })
        .await
        .map_err(status_error)?
        .into_inner())
}

fn memtest(name: &str, gpus: u32, mib_alloc: u64, budget_mib: u64) -> v1::SubmitJobRequest {
    v1::SubmitJobRequest {
        spec: Some(v1::JobSpec {
            spec: Some(Spec::Memtest(v1::MemtestSpec {
                bytes: mib_alloc << 20,
                steps: 4,
                hold_secs: 0.5,
                step_pause_secs: 0.3,
            })),
        }),
        resources: Some(v1::JobResources {
            gpus,
            budget_bytes: budget_mib << 20,
            over_secs: 0.0,
            poll_secs: 0.1,
            max_attempts: 1,
        }),
        priority: 0,
        name: name.into(),
    }
}

/// `kiln demo`.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let cluster = start(&args).await?;
    println!("== kiln demo: coordinator at {} (sled in a temporary directory)", cluster.url);
    let mut client = connect_url(&cluster.url, None).await?;
    let agent = wait_for_agent(&mut client).await?;
    let gpus = if agent.gpus.is_empty() { 0 } else { 1 };
    let where_ = if gpus == 0 {
        format!("CPU agent, {} host memory", mib(agent.host_mem_bytes))
    } else {
        format!("GPU agent, {}", agent.gpus[0].name)
    };
    println!("== agent {} registered ({where_})\n", agent.name);

    println!("== 1. memtest within budget: 256 MiB in 4 steps under a 768 MiB budget");
    let ok = run_job(&mut client, memtest("demo-within-budget", gpus, 256, 768)).await?;
    println!("\n== 2. memtest over budget: 1 GiB in 4 steps under a 384 MiB budget (guard kills at the first sample over)");
    let killed = run_job(&mut client, memtest("demo-over-budget", gpus, 1024, 384)).await?;

    println!("\n== telemetry (phase samples)");
    let mut ids = vec![ok.id, killed.id];
    let mut all_rows = Vec::new();
    for id in ids.drain(..) {
        let rows = client
            .query_telemetry(v1::QueryTelemetryRequest { job_id: id, ..Default::default() })
            .await
            .map_err(status_error)?
            .into_inner()
            .rows;
        all_rows.extend(rows);
    }
    println!("{}", telemetry_table(&all_rows));

    let good = ok.state == JobState::Succeeded as i32 && killed.state == JobState::Killed as i32;
    println!(
        "job {}: {} | job {}: {}{}",
        ok.id,
        job_state(&ok),
        killed.id,
        job_state(&killed),
        killed
            .kill
            .as_ref()
            .map(|k| format!(" (pid_mem {} > limit {} in phase {})", mib(k.pid_mem), mib(k.limit), k.phase))
            .unwrap_or_default()
    );
    println!("demo finished in {:.1} s", started.elapsed().as_secs_f64());
    let _ = cluster.stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), cluster.agent).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), cluster.coordinator).await;
    if !good {
        bail!("the demo did not end as expected (want SUCCEEDED then KILLED)");
    }
    Ok(ExitCode::SUCCESS)
}
