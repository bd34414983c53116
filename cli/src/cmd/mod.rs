//! One module per verb family. `dispatch` runs the chosen verb and returns the exit code.

mod agents;
mod bench;
pub mod bench_engine;
pub mod bench_kernels;
pub mod bench_train;
mod demo;
mod jobs;
mod logs;
mod phase;
pub mod quantize;
mod random_model;
mod servers;
mod submit;
mod telemetry;
mod watch;

use crate::args::{Cli, Command};
use std::process::ExitCode;

/// Runs the verb. Client verbs and servers run on a multi-threaded tokio runtime; the job
/// process runs without one (its job decides what it needs).
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::JobExec => {
            let code = kiln_engine::exec::job_process_main();
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        // Local, synchronous verbs: no runtime, no coordinator.
        Command::Quantize(a) => return quantize::run(a).map(|()| ExitCode::SUCCESS),
        Command::Phase(a) => return phase::run(a).map(|()| ExitCode::SUCCESS),
        Command::RandomModel(a) => return random_model::run(a).map(|()| ExitCode::SUCCESS),
        Command::Bench(crate::args::BenchCommand::Kernels(a)) => {
            return bench_kernels::run(a).map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(crate::args::BenchCommand::Engine(a)) => {
            return bench_engine::run(a).map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(crate::args::BenchCommand::Train(a)) => {
            return bench_train::run(a).map(|()| ExitCode::SUCCESS)
        }
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Coordinator(a) => servers::coordinator(a).await,
            Command::Agent(a) => servers::agent(a).await,
            Command::Submit(a) => submit::run(a).await,
            Command::Jobs(a) => jobs::list(a).await,
            Command::Job(a) => jobs::show(a).await,
            Command::Cancel(a) => jobs::cancel(a).await,
            Command::Watch(a) => watch::run(a).await,
            Command::Logs(a) => logs::run(a).await,
            Command::Telemetry(a) => telemetry::run(a).await,
            Command::Agents(a) => agents::list(a).await,
            Command::Drain(a) => agents::drain(a).await,
            Command::Bench(b) => bench::run(b).await,
            Command::Demo(a) => demo::run(a).await,
            Command::JobExec
            | Command::Quantize(_)
            | Command::Phase(_)
            | Command::RandomModel(_) => {
                unreachable!("handled above")
            }
        }
    })
}

/// Resolves when Ctrl-C or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// GiB (as users type them) to bytes.
pub fn gib_to_bytes(gib: f64) -> u64 {
    (gib * (1u64 << 30) as f64).round() as u64
}

/// Prints JSON prettily.
pub fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("values always serialize")
    );
}
