//! Kiln's GPU agent: dials out to the coordinator, offers its GPUs (or host memory), runs every
//! assigned job as a child process in its own process group under the VRAM guard, and relays
//! the job's events, phase samples and the guard's time series.
//!
//! - `config`: [`AgentConfig`] and [`GpuSelection`].
//! - `error`: [`AgentError`].
//! - `devices`: GPUs from NVML, host memory, and measuring a job's memory.
//! - `procfs`: process trees, RSS and host memory from /proc; killing a tree.
//! - `guard`: the guard's pure decisions (over-budget windows, sample downsampling).
//! - `outbox`: job updates queued for the coordinator, kept across disconnections.
//! - `state`: the shared state: config, devices, outbox, the running jobs.
//! - `data_roots`: the host paths a job may name (`--data-root`).
//! - `exec`: exec jobs (a user's command): building it, the phase socket, its failures.
//! - `job`: one job attempt: spawn in its own process group, read output, poll, clean up.
//! - `job_run`: a running job's state: relay lines as events, guard samples, kills, the end.
//! - `convert`: protocol ↔ job-process contract.
//! - `link`: the `AgentLink.Connect` session: register, heartbeats, reconnect with backoff.
//!
//! Start it with [`run`]; the `kiln agent` verb is a thin wrapper over it.
#![deny(missing_docs)]

pub mod config;
pub mod convert;
pub mod data_roots;
pub mod devices;
pub mod error;
mod exec;
pub mod guard;
mod job;
mod job_run;
mod link;
pub mod outbox;
pub mod procfs;
mod state;

pub use config::{AgentConfig, GpuSelection};
pub use error::AgentError;
pub use job_run::{failure_reason, kill_line};
pub use link::Backoff;

use std::future::Future;
use std::sync::Arc;

/// Runs the agent until `shutdown` completes: discovers devices, connects to the coordinator
/// (retrying forever with backoff while it is unreachable), runs assigned jobs. On shutdown
/// every job's process tree is killed (reported `CANCELLED` when the coordinator is reachable)
/// before this returns. Errors only for configurations that cannot work.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let mut config = config;
    config.validate()?;
    std::fs::create_dir_all(&config.work_dir).map_err(|source| AgentError::WorkDir {
        path: config.work_dir.clone(),
        source,
    })?;
    // Resolved once, here: job processes run in their own scratch directories, where a
    // relative path would name somewhere else (sessions saved there were lost with it).
    config.work_dir =
        std::fs::canonicalize(&config.work_dir).map_err(|source| AgentError::WorkDir {
            path: config.work_dir.clone(),
            source,
        })?;
    let exec_user = match &config.exec_user {
        Some(name) => Some(config::ExecUser::resolve(name)?),
        None => None,
    };
    for root in &mut config.data_roots {
        *root = std::fs::canonicalize(&*root).map_err(|e| {
            AgentError::InvalidConfig(format!("--data-root {}: {e}", root.display()))
        })?;
    }
    let devices = devices::Devices::discover(&config)?;
    tracing::info!(
        name = %config.name,
        coordinator = %config.coordinator,
        gpus = devices.gpus().len(),
        nvml = devices.nvml_available(),
        host_capacity = devices.host_capacity(),
        "agent starting"
    );
    let state = Arc::new(state::AgentState::new(config, devices, exec_user));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        // Keep the sender alive so receivers never see a closed channel.
        std::future::pending::<()>().await;
    });
    let result = link::run(state.clone(), stop_rx).await;
    watcher.abort();
    // Whatever happened above, no job process outlives the agent.
    state.kill_all("agent stopped");
    tracing::info!("agent stopped");
    result
}
