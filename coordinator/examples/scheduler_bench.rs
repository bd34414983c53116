//! Runs the scheduler benchmark without the CLI:
//! `cargo run --release -p kiln-coordinator --example scheduler_bench [AGENTS] [RECOVERY_JOBS]`.
use kiln_coordinator::bench::{run_scheduler_bench, BenchOptions};

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let mut opts = BenchOptions::default();
    if let Some(&agents) = args.first() {
        opts.agents = agents;
    }
    if let Some(&jobs) = args.get(1) {
        opts.recovery_jobs = jobs;
    }
    match run_scheduler_bench(opts).await {
        Ok(report) => println!("{report}"),
        Err(err) => {
            eprintln!("scheduler benchmark failed: {err}");
            std::process::exit(1);
        }
    }
}
