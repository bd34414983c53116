//! `kiln bench …`: each benchmark lives in the crate it measures; this module only parses
//! flags and prints the tables they return.

use crate::args::BenchCommand;
use std::process::ExitCode;

/// `kiln bench`.
pub async fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Scheduler(a) => {
            let report = kiln_coordinator::bench::run_scheduler_bench(
                kiln_coordinator::bench::BenchOptions {
                    agents: a.agents,
                    submit_jobs: a.submits,
                    submit_clients: a.clients,
                    dispatch_jobs: a.dispatch_jobs,
                    recovery_jobs: a.recovery_jobs,
                    ..Default::default()
                },
            )
            .await?;
            println!("{report}");
        }
        BenchCommand::Kernels(_) | BenchCommand::Engine(_) | BenchCommand::Train(_) => {
            unreachable!("runs without a runtime; see cmd::dispatch")
        }
    }
    Ok(ExitCode::SUCCESS)
}
