//! `kiln bench train --device cuda`: the GPU train step (`kiln_engine::cuda::train::bench`) on
//! random-init models (by default tiny and the Qwen2.5-0.5B shape, `none` and `nvfp4-ste`;
//! `--model` / `--quant` / `--moments` pick others, e.g. the Qwen2.5-14B shape in `nvfp4-full`)
//! and random token batches: step time, tokens/s, planned and measured bytes on the GPU, and the
//! PyTorch anchor's tokens/s and ratio when `--anchor` names the JSON
//! `scripts/anchors/torch_train.py --json` wrote in the same run. Runs locally, no coordinator.

use anyhow::{bail, Context};
use clap::Args;
use kiln_engine::cuda::train::bench::{
    run_train_bench, train_table, TrainAnchor, TrainBenchOptions, BENCH_MODELS,
};
use kiln_engine::cuda::train::TrainAttention;
use kiln_engine::spec::{MomentsSpec, QuantSpec};

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
    /// Only the tiny model (same as --model tiny).
    #[arg(long)]
    pub quick: bool,
    /// Model shapes, comma-separated: tiny, qwen2.5-0.5b, qwen2.5-7b, qwen2.5-14b, qwen3-8b
    /// (random weights).
    #[arg(long, value_delimiter = ',', default_value = "tiny,qwen2.5-0.5b")]
    pub model: Vec<String>,
    /// Modes, comma-separated: none, nvfp4-ste, nvfp4-full.
    #[arg(long, value_delimiter = ',', default_value = "none,nvfp4-ste")]
    pub quant: Vec<String>,
    /// Element type of the AdamW moments: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub moments: String,
    /// Global-norm gradient clip (0 = off; nvfp4-full then runs one backward pass, not two).
    #[arg(long, default_value_t = 1.0)]
    pub clip_grad: f32,
    /// Refuse a row whose planned bytes (CUDA context included) exceed this many GiB, before
    /// allocating — as a train job with --budget-gb does.
    #[arg(long, value_name = "GIB")]
    pub budget_gb: Option<f64>,
    /// Recompute each layer's activations in backward (as a train job with --recompute).
    #[arg(long)]
    pub recompute: bool,
    /// The attention's form, one row each: `materialized` (cuBLAS GEMMs and softmax kernels
    /// over [B·heads·T × T] buffers) and/or `flash` (the flash kernels: no T × T buffers;
    /// head dims 32, 64 and 128, others run materialized and the row says so). Train jobs
    /// use flash, the default here.
    #[arg(long, value_delimiter = ',', default_value = "flash")]
    pub attention: Vec<String>,
    /// The JSON `scripts/anchors/torch_train.py --json` wrote (PyTorch measured in the same
    /// run); its tokens/s and the ratios join the table.
    #[arg(long, value_name = "FILE")]
    pub anchor: Option<std::path::PathBuf>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `--attention`'s forms as the benchmark's flags (`true`: flash).
fn attention_forms(names: &[String]) -> anyhow::Result<Vec<bool>> {
    names
        .iter()
        .map(|a| match TrainAttention::parse(a) {
            Some(form) => Ok(form == TrainAttention::Flash),
            None => {
                bail!("--attention {a}: choose materialized or flash (or both, comma-separated)")
            }
        })
        .collect()
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
    let quants = args
        .quant
        .iter()
        .map(|q| QuantSpec::parse(q).map_err(|e| anyhow::anyhow!("--quant: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let moments =
        MomentsSpec::parse(&args.moments).map_err(|e| anyhow::anyhow!("--moments: {e}"))?;
    let models = if args.quick {
        vec!["tiny".to_string()]
    } else {
        args.model.clone()
    };
    for m in &models {
        if !BENCH_MODELS.contains(&m.as_str()) {
            bail!("--model {m}: choose from {}", BENCH_MODELS.join(", "));
        }
    }
    if !(args.clip_grad.is_finite() && args.clip_grad >= 0.0) {
        bail!("--clip-grad must be ≥ 0 (0 = off)");
    }
    let opts = TrainBenchOptions {
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        models,
        quants,
        moments,
        clip: args.clip_grad,
        budget: args.budget_gb.map(|g| (g * (1u64 << 30) as f64) as u64),
        recompute: args.recompute,
        flash: attention_forms(&args.attention)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_forms_parse_and_a_bad_one_names_the_choices() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            attention_forms(&names(&["materialized", "flash"])).unwrap(),
            [false, true]
        );
        let e = attention_forms(&names(&["fast"])).unwrap_err().to_string();
        assert!(
            e.contains("--attention fast") && e.contains("materialized or flash"),
            "{e}"
        );
    }
}
