//! The GPU train benchmark (`kiln bench train --device cuda`): train steps of random-init
//! models (by default the tiny model and the Qwen2.5-0.5B shape; also the Qwen2.5-7B / 14B
//! shapes) on random token batches, per mode (`none`, `nvfp4-ste`, `nvfp4-full`) — step time,
//! tokens/s, the plan's bytes against the device memory the trainer took — with the PyTorch
//! anchor (`scripts/anchors/torch_train.py --json`, measured in the same GPU script) joined in
//! for the ratios.

use std::sync::Arc;
use std::time::Instant;

use kiln_kernels::cpu::AdamWParams;
use kiln_kernels::cuda::CudaKernels;
use serde::{Deserialize, Serialize};

use super::{CudaTrainer, HostBatch};
use crate::engine::Engine;
use crate::error::Result;
use crate::model::{LinearFormat, ModelConfig};
use crate::spec::{MomentsSpec, QuantSpec};
use crate::train::params::ParamStore;

/// What to run.
#[derive(Debug, Clone)]
pub struct TrainBenchOptions {
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Timed steps (after two warm-up steps).
    pub steps: usize,
    /// Model shapes by name ([`bench_model`]).
    pub models: Vec<String>,
    /// Modes.
    pub quants: Vec<QuantSpec>,
    /// Moments' element type.
    pub moments: MomentsSpec,
    /// Gradient clipping norm (0: off; nvfp4-full then runs one backward pass).
    pub clip: f32,
    /// Fail a row whose plan exceeds this many bytes before allocating (as a job would).
    pub budget: Option<u64>,
    /// Recompute each layer's activations in backward (`--recompute`).
    pub recompute: bool,
    /// The attention forms to run each (model, mode) with: `false` materialized, `true`
    /// flash (where built for the head dim; else the row says materialized).
    pub flash: Vec<bool>,
}

impl Default for TrainBenchOptions {
    fn default() -> Self {
        TrainBenchOptions {
            batch: 8,
            seq: 512,
            steps: 5,
            models: vec!["tiny".into(), "qwen2.5-0.5b".into()],
            quants: vec![QuantSpec::None, QuantSpec::Nvfp4Ste],
            moments: MomentsSpec::F32,
            clip: 1.0,
            budget: None,
            recompute: false,
            flash: vec![false],
        }
    }
}

/// The shapes the benchmark knows ([`crate::shapes::SHAPES`]).
pub use crate::shapes::SHAPES as BENCH_MODELS;

/// The config of benchmark shape `name` ([`crate::shapes::shape`]).
pub fn bench_model(name: &str) -> Result<ModelConfig> {
    crate::shapes::shape(name)
}

/// One (model, mode) result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainBenchRow {
    /// Model name (`tiny`, `qwen2.5-0.5b`).
    pub model: String,
    /// `none` or `nvfp4-ste`.
    pub quant: String,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Median step time, ms.
    pub step_ms: f64,
    /// Tokens per second at the median step.
    pub tok_s: f64,
    /// Moments' element type.
    #[serde(default)]
    pub moments: String,
    /// The attention's form: `materialized` or `flash`.
    #[serde(default)]
    pub attention: String,
    /// Tensor bytes on the GPU (weights, scales, gradients, moments, activations).
    pub gpu_bytes: u64,
    /// What the plan predicted for them.
    #[serde(default)]
    pub planned_bytes: u64,
    /// Seconds to build the random model on the host and upload it.
    #[serde(default)]
    pub load_s: f64,
    /// Device memory the trainer took (cuMemGetInfo's free before it minus after its steps:
    /// its tensors and cuBLAS's workspace; the CUDA context not included). The trainer
    /// allocates nothing after its first step, so this is also its peak.
    #[serde(default)]
    pub device_bytes: u64,
    /// The loss of the last step (random data: about ln(vocab)).
    pub last_loss: f32,
}

/// The PyTorch anchor's numbers (`scripts/anchors/torch_train.py --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainAnchor {
    /// Rows by (model, mode): `none` is fp32 master + bf16 autocast + fused AdamW, `nvfp4-ste`
    /// the same with NVFP4 straight-through fake-quant of the linear weights.
    pub rows: Vec<TrainAnchorRow>,
}

/// One anchor row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainAnchorRow {
    /// Model name, as the bench names it.
    pub model: String,
    /// Mode, as the bench names it.
    pub quant: String,
    /// Tokens per second.
    pub tok_s: f64,
    /// Peak allocated bytes (torch.cuda.max_memory_allocated).
    pub peak_bytes: u64,
}

/// Run the benchmark on GPU `ordinal`.
pub fn run_train_bench(ordinal: usize, opts: &TrainBenchOptions) -> Result<Vec<TrainBenchRow>> {
    let k = Arc::new(CudaKernels::new(ordinal)?);
    let mut rows = Vec::new();
    for name in &opts.models {
        let cfg = bench_model(name)?;
        for &quant in &opts.quants {
            for &flash in &opts.flash {
                rows.push(bench_one(&k, name, &cfg, (quant, flash), opts)?);
            }
        }
    }
    Ok(rows)
}

fn bench_one(
    k: &Arc<CudaKernels>,
    name: &str,
    cfg: &ModelConfig,
    (quant, flash): (QuantSpec, bool),
    opts: &TrainBenchOptions,
) -> Result<TrainBenchRow> {
    let free = |k: &CudaKernels| -> Result<u64> {
        let (f, _) = k
            .context()
            .mem_get_info()
            .map_err(crate::cuda::cuda("cuMemGetInfo"))?;
        Ok(f as u64)
    };
    let (b, t) = (opts.batch, opts.seq.min(cfg.max_position_embeddings));
    CudaTrainer::check_supported(cfg)?;
    let plan = super::TrainPlan::new(cfg, quant, opts.moments, b, t)?
        .with_recompute(cfg, opts.recompute)
        .with_flash_attention(cfg, flash);
    if let Some(budget) = opts.budget {
        plan.check(cfg, budget)?;
    }
    // Frees are stream-ordered: let the previous row's memory go back first.
    k.stream()
        .synchronize()
        .map_err(crate::cuda::cuda("waiting for the GPU"))?;
    let free_before = free(k)?;
    let t_load = Instant::now();
    let engine = Engine::cpu();
    let format = match quant {
        QuantSpec::Nvfp4Full => LinearFormat::Nvfp4,
        _ => LinearFormat::Dense,
    };
    let mut src = engine.random_weights(7, format);
    let store =
        ParamStore::from_source(cfg, &mut src, quant, engine.device())?.with_moments(opts.moments);
    let mut gpu = CudaTrainer::new(k.clone(), cfg, &store)?;
    drop(store);
    gpu.set_recompute(opts.recompute);
    gpu.set_flash_attention(flash);
    gpu.reserve(b, t)?;
    gpu.sync()?;
    let load_s = t_load.elapsed().as_secs_f64();
    tracing::info!(
        model = name,
        quant = quant.name(),
        load_s,
        "train bench: model on the GPU"
    );
    let n = b * t;
    // Seeded random tokens; every position in the loss.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % cfg.vocab_size as u64) as u32
    };
    let ids: Vec<u32> = (0..n).map(|_| next()).collect();
    let target: Vec<u32> = (0..n).map(|_| next()).collect();
    let batch = HostBatch {
        batch: b,
        seq: t,
        ids,
        target,
        weight: vec![1.0 / n as f32; n],
        input_tokens: n,
    };
    let hp = AdamWParams {
        lr: 1e-4,
        ..AdamWParams::default()
    };
    let mut times = Vec::new();
    let mut last_loss = 0.0;
    for step in 1..=(opts.steps + 2) as u64 {
        let t0 = Instant::now();
        let st = gpu.step(std::slice::from_ref(&batch), hp, step, opts.clip)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        last_loss = st.loss;
        if step > 2 {
            times.push(ms);
        }
    }
    times.sort_by(f64::total_cmp);
    let step_ms = times[times.len() / 2];
    let bytes = gpu.bytes();
    gpu.sync()?;
    let device_bytes = free_before.saturating_sub(free(k)?);
    tracing::info!(model = name, quant = quant.name(), step_ms, "train bench");
    Ok(TrainBenchRow {
        model: name.into(),
        quant: if opts.recompute {
            format!("{} +recompute", quant.name())
        } else {
            quant.name().into()
        },
        batch: b,
        seq: t,
        step_ms,
        tok_s: n as f64 / (step_ms / 1e3),
        moments: opts.moments.name().into(),
        attention: gpu.attention().name().into(),
        gpu_bytes: bytes.weights
            + bytes.scales
            + bytes.grads
            + bytes.optimizer_state
            + bytes.activations,
        planned_bytes: plan.tensor_bytes(),
        load_s,
        device_bytes,
        last_loss,
    })
}

/// The results as a table, with the anchor's tokens/s and the ratio where it has the row.
pub fn train_table(device: &str, rows: &[TrainBenchRow], anchor: Option<&TrainAnchor>) -> String {
    let mut t = crate::cuda::bench::table(vec![
        "model",
        "mode",
        "batch × seq",
        "step ms",
        "tok/s",
        "moments",
        "attention",
        "load s",
        "tensor bytes",
        "planned",
        "device used",
        "PyTorch tok/s",
        "ratio",
        "PyTorch peak",
    ]);
    for r in rows {
        let a = anchor.and_then(|a| {
            a.rows
                .iter()
                .find(|x| x.model == r.model && x.quant == r.quant)
        });
        t.add_row(vec![
            r.model.clone(),
            r.quant.clone(),
            format!("{} × {}", r.batch, r.seq),
            format!("{:.1}", r.step_ms),
            format!("{:.0}", r.tok_s),
            r.moments.clone(),
            r.attention.clone(),
            format!("{:.1}", r.load_s),
            kiln_job::units::human_bytes(r.gpu_bytes),
            kiln_job::units::human_bytes(r.planned_bytes),
            kiln_job::units::human_bytes(r.device_bytes),
            a.map_or("-".into(), |a| format!("{:.0}", a.tok_s)),
            a.map_or("-".into(), |a| format!("{:.2}×", r.tok_s / a.tok_s)),
            a.map_or("-".into(), |a| kiln_job::units::human_bytes(a.peak_bytes)),
        ]);
    }
    format!(
        "GPU train step on {device} (random data, one micro-batch per step; device used = \
         cuMemGetInfo before loading minus after the steps, cuBLAS workspace included, CUDA \
         context not)\n{t}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_joins_the_anchor_by_model_and_mode() {
        let rows = vec![TrainBenchRow {
            model: "qwen2.5-0.5b".into(),
            quant: "none".into(),
            batch: 8,
            seq: 512,
            step_ms: 100.0,
            tok_s: 40_960.0,
            moments: "f32".into(),
            attention: "flash".into(),
            gpu_bytes: 10 << 30,
            planned_bytes: 10 << 30,
            load_s: 1.0,
            device_bytes: 11 << 30,
            last_loss: 11.9,
        }];
        let anchor = TrainAnchor {
            rows: vec![TrainAnchorRow {
                model: "qwen2.5-0.5b".into(),
                quant: "none".into(),
                tok_s: 20_480.0,
                peak_bytes: 20 << 30,
            }],
        };
        let t = train_table("test", &rows, Some(&anchor));
        assert!(t.contains("2.00×") && t.contains("20480"), "{t}");
        let t = train_table("test", &rows, None);
        assert!(t.contains("40960") && !t.contains("2.00×"), "{t}");
    }
}
