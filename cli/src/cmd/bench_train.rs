//! `kiln bench train --device cuda`: the GPU train step (`kiln_engine::cuda::train::bench`) on
//! random-init models (tiny, Qwen2.5-0.5B shape) and random token batches, `none` and
//! `nvfp4-ste`: step time, tokens/s, bytes on the GPU, and the PyTorch anchor's tokens/s and
//! ratio when `--anchor` names the JSON `scripts/anchors/torch_train.py --json` wrote in the
//! same run. Runs locally, no coordinator.

use anyhow::{bail, Context};
use clap::Args;
use kiln_engine::cuda::train::bench::{
    run_train_bench, train_table, TrainAnchor, TrainBenchOptions,
};

/// The trainer `kiln bench train` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainBenchDevice {
    /// The GPU train step. (CPU train jobs report their own tokens/s.)
    Cuda,
}

/// `kiln bench train`.
#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// Which trainer to measure: `cuda`, the GPU train step (CPU train jobs report their own
    /// tokens/s).
    #[arg(long, value_enum, default_value_t = TrainBenchDevice::Cuda)]
    pub device: TrainBenchDevice,
    /// GPU index.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Timed steps per model and mode (after two warm-up steps).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Only the tiny model.
    #[arg(long)]
    pub quick: bool,
    /// The JSON `scripts/anchors/torch_train.py --json` wrote (PyTorch measured in the same
    /// run); its tokens/s and the ratios join the table.
    #[arg(long, value_name = "FILE")]
    pub anchor: Option<std::path::PathBuf>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark and prints its table.
pub fn run(args: BenchTrainArgs) -> anyhow::Result<()> {
    if args.batch == 0 || args.seq < 2 || args.steps == 0 {
        bail!("--batch and --steps must be ≥ 1 and --seq ≥ 2");
    }
    let anchor: Option<TrainAnchor> = match &args.anchor {
        Some(p) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(p)
                    .with_context(|| format!("reading the anchor {}", p.display()))?,
            )
            .with_context(|| {
                format!(
                    "{} is not the JSON torch_train.py --json writes",
                    p.display()
                )
            })?,
        ),
        None => None,
    };
    let opts = TrainBenchOptions {
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        quick: args.quick,
    };
    let rows = run_train_bench(args.gpu, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{}",
            train_table(&format!("cuda:{}", args.gpu), &rows, anchor.as_ref())
        );
    }
    Ok(())
}
