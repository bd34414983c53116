//! `kiln bench engine`: the engine benchmark (`kiln_engine::generate::bench`) — CPU decode
//! tokens/s with the KV cache against replay on the tiny model and on a randomly initialized
//! Qwen2.5-0.5B-shaped NVFP4 model (each run checks cache/replay agreement first), batch-1
//! linear timings of the 0.5B shape, and multi-turn sessions (turn 2/3 prefill and latency
//! against turn 1 and against replaying the conversation). Runs locally, no coordinator.

use clap::Args;
use kiln_engine::generate::bench::{run_engine_bench, BenchOptions};

/// `kiln bench engine`.
#[derive(Debug, Args)]
pub struct BenchEngineArgs {
    /// Tiny model only (skip the Qwen2.5-0.5B-shaped model, which takes a minute on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Prompt tokens of the decode runs.
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    /// Tokens generated on the tiny model.
    #[arg(long, default_value_t = 64)]
    pub tiny_new_tokens: usize,
    /// Tokens generated on the 0.5B-shaped model.
    #[arg(long, default_value_t = 8)]
    pub big_new_tokens: usize,
    /// Tokens generated per session turn.
    #[arg(long, default_value_t = 16)]
    pub turn_new_tokens: usize,
    /// Print the results as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark and prints its tables (progress on stderr).
pub fn run(args: BenchEngineArgs) -> anyhow::Result<()> {
    let opts = BenchOptions {
        prompt_tokens: args.prompt_tokens,
        tiny_new_tokens: args.tiny_new_tokens,
        big_new_tokens: if args.quick { 0 } else { args.big_new_tokens },
        turn_new_tokens: args.turn_new_tokens,
    };
    let t = std::time::Instant::now();
    let report = run_engine_bench(&opts, &mut |m| {
        eprintln!("[{:>6.1}s] {m}", t.elapsed().as_secs_f64())
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.to_table());
    }
    Ok(())
}
