//! `kiln bench engine`: the engine benchmark (`kiln_engine::generate::bench`) — CPU decode
//! tokens/s with the KV cache against replay on the tiny model and on a randomly initialized
//! Qwen2.5-0.5B-shaped NVFP4 model (each run checks cache/replay agreement first), batch-1
//! linear timings of the 0.5B shape, and multi-turn sessions (turn 2/3 prefill and latency
//! against turn 1 and against replaying the conversation). With `--device cuda`, the GPU
//! engine benchmark instead (`kiln_engine::cuda::bench`): decode tokens/s at batch 1 (graph and
//! plain launches), time to first token, bytes on the GPU and a decode step by kernel class,
//! for the tiny model and random-weight Qwen2.5-0.5B / 7B shapes, with an HF transformers
//! anchor's ratios when `--anchor` names its JSON. Runs locally, no coordinator.

use clap::{Args, ValueEnum};
use kiln_engine::cuda::bench::{run_gpu_bench, Anchor, GpuBenchOptions};
use kiln_engine::cuda::load_bench::run_load_bench;
use kiln_engine::generate::bench::{run_engine_bench, BenchOptions};

/// Which engine `kiln bench engine` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchDevice {
    /// The CPU engine (cache vs replay, sessions).
    Cpu,
    /// The GPU engine (graph decode, prefill, kernel classes).
    Cuda,
}

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
    /// Which engine to measure.
    #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
    pub device: BenchDevice,
    /// GPU index (with --device cuda).
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// With --device cuda: tokens decoded per model (after --gpu-prompt-tokens).
    #[arg(long, default_value_t = 256)]
    pub gpu_new_tokens: usize,
    /// With --device cuda: prompt tokens before the decode run.
    #[arg(long, default_value_t = 128)]
    pub gpu_prompt_tokens: usize,
    /// With --device cuda: skip the Qwen2.5-7B shape (it needs ~6 GB of GPU memory).
    #[arg(long)]
    pub skip_7b: bool,
    /// With --device cuda: the JSON `scripts/anchors/hf_decode.py --json` wrote (HF
    /// transformers bf16 measured in the same run); its ratios join the tables.
    #[arg(long, value_name = "FILE")]
    pub anchor: Option<std::path::PathBuf>,
    /// With --device cuda: instead of the decode benchmark, time loading this Hugging Face
    /// directory onto the GPU with its float linears quantized by the host's cores (the
    /// baseline) and by the GPU's quantize kernel, after checking both give the same bytes.
    #[arg(long, value_name = "DIR")]
    pub load_model: Option<std::path::PathBuf>,
    /// With --load-model: loads per path (the median is printed).
    #[arg(long, default_value_t = 3)]
    pub load_runs: usize,
    /// With --device cuda: also time the longest prompt with the prompt GEMMs' weights
    /// dequantized in slabs of these sizes (MiB of bf16, comma-separated; jobs use the
    /// default, 64 MiB or the largest matrix, which is timed too), each dequantized serially
    /// and overlapped with the GEMMs (the next slab on a side stream) — a table of time to
    /// first token by slab size and form.
    #[arg(long, value_delimiter = ',', value_name = "MIB")]
    pub prefill_slab_mib: Vec<usize>,
    /// With --device cuda: also decode with the fused GEMVs (RMSNorm, SwiGLU and the
    /// attention's combine folded into the GEMVs, six launches a layer instead of ten; and the
    /// same with SwiGLU a launch of its own) where the model's shapes allow, checked to give
    /// the default's tokens — a table of tok/s and step time per form against the default.
    #[arg(long)]
    pub fused_decode: bool,
    /// With --device cuda: also decode with the persistent kernel (the embedding, every layer
    /// and the final norm as one kernel whose stages wait on grid barriers instead of kernel
    /// boundaries) where the model's shapes allow, checked to give the default's tokens — a
    /// row per model in the same table as --fused-decode.
    #[arg(long)]
    pub persistent_decode: bool,
    /// With --device cuda: also time prompts of these lengths (comma-separated) both ways —
    /// 8 rows at a time through the GEMVs (what jobs do up to 8 tokens, or 16 on models of
    /// 1 Gi linear weights and more) and through the GEMMs — a table of time to first token.
    #[arg(long, value_delimiter = ',', value_name = "TOKENS")]
    pub short_prompts: Vec<usize>,
}

/// Runs the benchmark and prints its tables (progress on stderr).
pub fn run(args: BenchEngineArgs) -> anyhow::Result<()> {
    if args.device == BenchDevice::Cuda {
        return run_cuda(args);
    }
    let opts = BenchOptions {
        prompt_tokens: args.prompt_tokens,
        tiny_new_tokens: args.tiny_new_tokens,
        big_new_tokens: if args.quick { 0 } else { args.big_new_tokens },
        turn_new_tokens: args.turn_new_tokens,
    };
    timed_report(
        args.json,
        |progress| Ok(run_engine_bench(&opts, progress)?),
        |r| r.to_table(),
    )
}

/// Run a benchmark with its progress lines on stderr (seconds since the start), then print its
/// report as JSON or as `table` makes it.
fn timed_report<R: serde::Serialize>(
    json: bool,
    run: impl FnOnce(&mut dyn FnMut(&str)) -> anyhow::Result<R>,
    table: impl FnOnce(&R) -> String,
) -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    let report = run(&mut |m| eprintln!("[{:>6.1}s] {m}", t.elapsed().as_secs_f64()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", table(&report));
    }
    Ok(())
}

fn run_cuda(args: BenchEngineArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = &args.load_model {
        let k = std::sync::Arc::new(kiln_kernels::cuda::CudaKernels::new(args.gpu)?);
        return timed_report(
            args.json,
            |progress| Ok(run_load_bench(k, dir, args.load_runs, progress)?),
            |r| r.to_table(),
        );
    }
    let anchor: Option<Anchor> = match &args.anchor {
        Some(p) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(p)
                    .with_context(|| format!("reading the anchor {}", p.display()))?,
            )
            .with_context(|| {
                format!("{} is not the JSON hf_decode.py --json writes", p.display())
            })?,
        ),
        None => None,
    };
    let opts = GpuBenchOptions {
        prompt_tokens: args.gpu_prompt_tokens,
        new_tokens: args.gpu_new_tokens.max(2),
        skip_7b: args.skip_7b,
        prefill_slabs_mib: args.prefill_slab_mib.clone(),
        fused_decode: args.fused_decode,
        persistent_decode: args.persistent_decode,
        short_prompts: args.short_prompts.clone(),
        ..Default::default()
    };
    if let Some(bad) = opts.prefill_slabs_mib.iter().find(|&&m| m == 0 || m > 1024) {
        anyhow::bail!("--prefill-slab-mib {bad}: give sizes from 1 to 1024 MiB");
    }
    timed_report(
        args.json,
        |progress| Ok(run_gpu_bench(args.gpu, &opts, progress)?),
        |r| r.to_table(anchor.as_ref()),
    )
}
