//! The GPU engine benchmark (`kiln bench engine --device cuda`): for the tiny model and
//! random-weight Qwen2.5-0.5B and Qwen2.5-7B shapes — decode tokens/s at batch 1 through the
//! real token loop (captured graph, and plain launches as the in-run baseline), prefill time to
//! first token, the bytes on the GPU, and one decode step timed by kernel class. An anchor
//! measured in the same run (HF transformers, `scripts/anchors/hf_decode.py`) can be joined in
//! for the ratios.

use std::sync::Arc;
use std::time::Instant;

use kiln_kernels::cuda::CudaKernels;
use serde::{Deserialize, Serialize};

use super::forward::{class, decode_fusion_fits, DecodeFusion};
use super::{CudaModel, CudaSequence, GpuWeightBytes};
use crate::error::Result;
use crate::model::ModelConfig;

/// What to run.
#[derive(Debug, Clone)]
pub struct GpuBenchOptions {
    /// Prompt tokens before the decode run.
    pub prompt_tokens: usize,
    /// Tokens decoded.
    pub new_tokens: usize,
    /// Prompt lengths of the prefill rows.
    pub prefill_tokens: Vec<usize>,
    /// Skip the 7B shape.
    pub skip_7b: bool,
    /// Replays per kernel-class timing.
    pub reps: usize,
    /// Slab sizes (MiB of bf16) of the prompt GEMMs' dequantized weights to time the longest
    /// prompt with, besides the default (empty: none).
    pub prefill_slabs_mib: Vec<usize>,
    /// Also decode with the fused GEMVs, each form of [`DecodeFusion`] against the default
    /// in the same run.
    pub fused_decode: bool,
    /// Also decode with the persistent kernel ([`DecodeFusion::Persistent`]) against the
    /// default in the same run (a row of the same table).
    pub persistent_decode: bool,
    /// Short prompt lengths to time both ways: 8 rows at a time through the GEMVs (the path
    /// of short prompts, [`super::plan::short_prompt`]) and through the GEMMs (empty:
    /// none).
    pub short_prompts: Vec<usize>,
}

impl Default for GpuBenchOptions {
    fn default() -> Self {
        GpuBenchOptions {
            prompt_tokens: 128,
            new_tokens: 256,
            prefill_tokens: vec![512, 2048],
            skip_7b: false,
            reps: 200,
            prefill_slabs_mib: Vec::new(),
            fused_decode: false,
            persistent_decode: false,
            short_prompts: Vec::new(),
        }
    }
}

/// One model's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuModelRow {
    /// Model name.
    pub model: String,
    /// Bytes on the GPU: codes, scales, embedding, small tensors.
    pub weights: u64,
    /// Of which E4M3/tensor scales.
    pub scales: u64,
    /// Of which the bf16 embedding.
    pub embeddings: u64,
    /// Decode tokens/s, batch 1, through the token loop with the captured graph.
    pub decode_tok_s: f64,
    /// The same with plain launches (no graph).
    pub decode_tok_s_plain: f64,
    /// Decode tokens/s sampling with temperature 0.7, top-p 0.9 on the GPU (only the token id
    /// comes back).
    pub decode_tok_s_sampled: f64,
    /// The same sampled on the host from the logits read back (the CPU sampler).
    pub decode_tok_s_host_sampled: f64,
    /// Prefill: (prompt tokens, time to first token in ms).
    pub prefill: Vec<(usize, f64)>,
    /// The same prompts with only one kernel class queued: (prompt tokens, linears ms,
    /// attention ms, norms/RoPE/SwiGLU ms) — each includes the head and pick of the last row.
    pub prefill_split: Vec<(usize, f64, f64, f64)>,
    /// The longest prompt with the dequantized-weight slabs of other sizes, each dequantized
    /// serially and overlapped with the GEMMs.
    #[serde(default)]
    pub prefill_slabs: Vec<SlabTiming>,
    /// One decode step by kernel class, µs per replay: whole step, GEMVs, attention,
    /// norms/RoPE/SwiGLU/embedding, pick.
    pub step_us: StepSplit,
    /// Decode with the fused GEMVs, one row per form, when asked for (empty: not asked).
    #[serde(default)]
    pub decode_fused: Vec<FusedDecodeRow>,
    /// Short prompts both ways: (prompt tokens, ms through 8-row GEMV batches, ms through the
    /// GEMMs), time to first token.
    #[serde(default)]
    pub short_prompts: Vec<(usize, f64, f64)>,
    /// Prompts of up to this many tokens take the GEMV batches in jobs
    /// ([`super::plan::short_prompt`] of the model).
    #[serde(default)]
    pub short_prompt: usize,
}

/// Time to first token with the prompt GEMMs' weights dequantized in slabs of one size, both
/// ways ([`CudaSequence::set_prefill_overlap`]).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SlabTiming {
    /// Prompt tokens.
    pub tokens: usize,
    /// Slab size, MiB of bf16.
    pub mib: usize,
    /// Dequantize, GEMM, dequantize, GEMM on one stream (one buffer).
    pub serial_ms: f64,
    /// The next slab dequantized on a side stream while the GEMM reads the last (two buffers).
    pub overlapped_ms: f64,
}

/// Decode with the fused GEMVs in one form ([`CudaSequence::set_decode_fusion`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FusedDecodeRow {
    /// The form ([`DecodeFusion::name`]).
    pub fusion: String,
    /// Whether the model's shapes run fused at all (else the rest is zero).
    pub fits: bool,
    /// Tokens/s through the token loop with the captured graph.
    pub tok_s: f64,
    /// One whole step, µs per replay.
    pub step_us: f64,
    /// Whether the greedy tokens equal the default decode's (they must: same bits).
    pub same_tokens: bool,
    /// The persistent kernel's stages in one traced step (empty for the other forms).
    #[serde(default)]
    pub stages: Vec<StageRow>,
}

/// One stage of the persistent kernel in a traced step, µs, the mean over layers
/// ([`kiln_kernels::cuda::decode_persistent::StageTiming`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRow {
    /// What the stage computes.
    pub stage: String,
    /// First block released before it → last block arrived after it.
    pub span_us: f64,
    /// The same to the median block's arrival.
    pub median_block_us: f64,
    /// The barrier after it: last arrival → last release.
    pub barrier_us: f64,
}

/// A decode step's time by kernel class (each class replayed alone in its own graph).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct StepSplit {
    /// The whole step.
    pub total: f64,
    /// NVFP4 GEMVs.
    pub gemv: f64,
    /// Attention + combine.
    pub attention: f64,
    /// Embedding, norms, q/k/v epilogue (RoPE, KV append), SwiGLU.
    pub small: f64,
    /// The greedy pick.
    pub pick: f64,
}

/// The benchmark's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuBench {
    /// The GPU.
    pub device: String,
    /// Options used.
    pub prompt_tokens: usize,
    /// Tokens decoded per row.
    pub new_tokens: usize,
    /// Rows.
    pub rows: Vec<GpuModelRow>,
    /// With the persistent kernel: one grid barrier alone, µs, by (kind, blocks per SM).
    #[serde(default)]
    pub barrier_probe: Vec<(u32, u32, f64)>,
}

/// Run the benchmark on GPU `ordinal`; `progress` gets a line per stage.
pub fn run_gpu_bench(
    ordinal: usize,
    opts: &GpuBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<GpuBench> {
    let k = Arc::new(CudaKernels::new(ordinal)?);
    if let (true, Some(e)) = (opts.fused_decode, k.fused_gemv_load_error()) {
        return Err(crate::error::EngineError::InvalidArgument(format!(
            "--fused-decode: the fused decode GEMVs did not load on this GPU: {e}"
        )));
    }
    let mut rows = Vec::new();
    progress("tiny model: uploading");
    let tiny = crate::chat_model::ChatModel::tiny(&Default::default())?;
    let m = CudaModel::from_model(k.clone(), tiny.model.model())?;
    rows.push(bench_model("tiny", &m, opts, progress)?);
    drop(m);
    let mut shapes = vec![("qwen2.5-0.5b-shape", ModelConfig::qwen2_5_0_5b())];
    if !opts.skip_7b {
        shapes.push(("qwen2.5-7b-shape", ModelConfig::qwen2_5_7b()));
    }
    for (name, cfg) in shapes {
        progress(&format!("{name}: random NVFP4 weights on the GPU"));
        let m = CudaModel::random(k.clone(), &cfg, 7)?;
        rows.push(bench_model(name, &m, opts, progress)?);
    }
    let mut barrier_probe = Vec::new();
    if opts.persistent_decode {
        progress("grid barriers alone (the persistent kernel's barrier probe)");
        for kind in 0..3 {
            for blocks in [1, 2] {
                match k.grid_barrier_probe_us(kind, blocks, 4000) {
                    Ok(us) => barrier_probe.push((kind, blocks, us)),
                    Err(e) => progress(&format!("barrier probe kind {kind}: FAILED: {e}")),
                }
            }
        }
    }
    Ok(GpuBench {
        device: k.device_name().to_string(),
        prompt_tokens: opts.prompt_tokens,
        new_tokens: opts.new_tokens,
        rows,
        barrier_probe,
    })
}

fn ids(n: usize, vocab: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(salt) >> 7) % vocab as u32)
        .collect()
}

/// (prompt, new tokens) of a decode run, shortened to fit the model's context (the tiny
/// model holds 512 positions).
fn fit_context(cfg: &ModelConfig, prompt: usize, new: usize) -> (usize, usize) {
    let ctx = cfg.max_position_embeddings;
    let new = new.min(ctx.saturating_sub(2)).max(2);
    (prompt.min(ctx - new - 1).max(1), new)
}

/// Tokens/s of `new` decode steps sampled (temperature 0.7, top-p 0.9, seeded) on the GPU or
/// on the host, after a prompt of `prompt` tokens.
fn sampled_rate(m: &CudaModel, prompt: usize, new: usize, on_gpu: bool) -> Result<f64> {
    use crate::generate::{Sampler, SamplingParams};
    let cfg = m.config();
    let (prompt, new) = fit_context(cfg, prompt, new);
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 0.7,
        top_k: 0,
        top_p: 0.9,
        seed: 1,
    })?;
    let mut seq = CudaSequence::new(m.kernels().clone(), cfg, prompt + new + 1)?;
    if on_gpu {
        seq.set_sampling(Some(kiln_kernels::cuda::decode::DeviceSampling {
            temperature: 0.7,
            top_k: 0,
            top_p: 0.9,
            seed: 1,
        }));
    }
    let mut next = |seq: &mut CudaSequence, ids: &[u32]| -> Result<u32> {
        if on_gpu {
            Ok(seq.forward(m, ids, true)?.expect("read"))
        } else {
            seq.forward(m, ids, false)?;
            Ok(sampler.sample(&seq.logits()?))
        }
    };
    let mut tok = next(&mut seq, &ids(prompt, cfg.vocab_size, 1))?;
    tok = next(&mut seq, &[tok])?;
    let t = Instant::now();
    for _ in 0..new.saturating_sub(2) {
        tok = next(&mut seq, &[tok])?;
    }
    Ok(new.saturating_sub(2) as f64 / t.elapsed().as_secs_f64())
}

/// Tokens/s of `new` greedy decode steps after a prompt of `prompt` tokens (with the decode
/// fusion `fusion`), and the tokens.
fn decode_rate(
    m: &CudaModel,
    prompt: usize,
    new: usize,
    graph: bool,
    fusion: DecodeFusion,
) -> Result<(f64, Vec<u32>)> {
    let cfg = m.config();
    let (prompt, new) = fit_context(cfg, prompt, new);
    let mut seq = CudaSequence::new(m.kernels().clone(), cfg, prompt + new + 1)?;
    seq.set_use_graph(graph);
    seq.set_decode_fusion(fusion)?;
    let mut tok = seq
        .forward(m, &ids(prompt, cfg.vocab_size, 1), true)?
        .expect("read");
    // warm-up step (captures the graph)
    tok = seq.forward(m, &[tok], true)?.expect("read");
    let mut toks = vec![tok];
    let t = Instant::now();
    for _ in 0..new.saturating_sub(1) {
        tok = seq.forward(m, &[tok], true)?.expect("read");
        toks.push(tok);
    }
    Ok((
        new.saturating_sub(1) as f64 / t.elapsed().as_secs_f64(),
        toks,
    ))
}

fn bench_model(
    name: &str,
    m: &CudaModel,
    opts: &GpuBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<GpuModelRow> {
    let cfg = m.config();
    let b: GpuWeightBytes = m.bytes();
    progress(&format!("{name}: decode (graph, then plain launches)"));
    let off = DecodeFusion::Off;
    let (decode_tok_s, tokens) = decode_rate(m, opts.prompt_tokens, opts.new_tokens, true, off)?;
    let decode_tok_s_plain = decode_rate(m, opts.prompt_tokens, opts.new_tokens, false, off)?.0;
    progress(&format!("{name}: decode sampled (GPU, then host)"));
    let decode_tok_s_sampled = sampled_rate(m, opts.prompt_tokens, opts.new_tokens, true)?;
    let decode_tok_s_host_sampled = sampled_rate(m, opts.prompt_tokens, opts.new_tokens, false)?;
    let mut prefill = Vec::new();
    let mut prefill_split = Vec::new();
    let mut prefill_slabs = Vec::new();
    for &n in &opts.prefill_tokens {
        if n + 1 > cfg.max_position_embeddings {
            continue;
        }
        progress(&format!("{name}: prefill of {n} tokens"));
        let mut seq = CudaSequence::new(m.kernels().clone(), cfg, n + 1)?;
        let p = ids(n, cfg.vocab_size, 3);
        // warm-up (allocates the prompt buffers), then the best of 3
        seq.forward(m, &p, true)?;
        let ttft = |seq: &mut CudaSequence| -> Result<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                seq.truncate(0);
                let t = Instant::now();
                seq.forward(m, &p, true)?;
                best = best.min(t.elapsed().as_secs_f64() * 1e3);
            }
            Ok(best)
        };
        prefill.push((n, ttft(&mut seq)?));
        let mut by_class = [0.0; 3];
        for (slot, mask) in [class::GEMV, class::ATTENTION, class::SMALL]
            .into_iter()
            .enumerate()
        {
            seq.set_prefill_classes(mask);
            by_class[slot] = ttft(&mut seq)?;
        }
        seq.set_prefill_classes(class::ALL);
        prefill_split.push((n, by_class[0], by_class[1], by_class[2]));
        if Some(&n) == opts.prefill_tokens.iter().max() && !opts.prefill_slabs_mib.is_empty() {
            // each size both ways, the default size too (the forms' difference at the jobs'
            // size); the sequence goes back to the jobs' settings after
            let default_mib = (super::plan::prefill_scratch_elems(cfg) * 2) >> 20;
            let mut sizes = opts.prefill_slabs_mib.clone();
            if !sizes.contains(&default_mib) {
                sizes.push(default_mib);
            }
            for &mib in &sizes {
                progress(&format!(
                    "{name}: prefill of {n} tokens, {mib} MiB weight slabs, serial and overlapped"
                ));
                seq.set_prefill_scratch_elems((mib << 20) / 2);
                let mut ms = [0.0; 2];
                for (slot, overlap) in [false, true].into_iter().enumerate() {
                    seq.set_prefill_overlap(overlap);
                    seq.truncate(0);
                    seq.forward(m, &p, true)?; // allocates the slabs
                    ms[slot] = ttft(&mut seq)?;
                }
                prefill_slabs.push(SlabTiming {
                    tokens: n,
                    mib,
                    serial_ms: ms[0],
                    overlapped_ms: ms[1],
                });
            }
            seq.set_prefill_scratch_elems(super::plan::prefill_scratch_elems(cfg));
            seq.set_prefill_overlap(super::slabs::PREFILL_OVERLAP);
        }
    }
    let mut short_prompts = Vec::new();
    for &n in &opts.short_prompts {
        if n < 2 || n + 1 > cfg.max_position_embeddings {
            continue;
        }
        progress(&format!(
            "{name}: prompt of {n} tokens, GEMV batches and GEMMs"
        ));
        let p = ids(n, cfg.vocab_size, 9);
        let time = |limit: usize| -> Result<f64> {
            let mut seq = CudaSequence::new(m.kernels().clone(), cfg, n + 1)?;
            seq.set_short_prompt(limit);
            seq.forward(m, &p, true)?; // warm-up: allocates the prompt buffers
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                seq.truncate(0);
                let t = Instant::now();
                seq.forward(m, &p, true)?;
                best = best.min(t.elapsed().as_secs_f64() * 1e3);
            }
            Ok(best)
        };
        // (a failure here is reported and skipped: the rest of the benchmark still counts)
        match time(usize::MAX).and_then(|gemv| Ok((gemv, time(0)?))) {
            Ok((gemv, gemm)) => short_prompts.push((n, gemv, gemm)),
            Err(e) => progress(&format!("{name}: prompt of {n} tokens FAILED: {e}")),
        }
    }
    progress(&format!("{name}: one decode step by kernel class"));
    let prompt = opts
        .prompt_tokens
        .min(cfg.max_position_embeddings / 2)
        .max(1);
    let mut seq = CudaSequence::new(m.kernels().clone(), cfg, prompt + opts.reps + 2)?;
    seq.forward(m, &ids(prompt, cfg.vocab_size, 5), false)?;
    let times = seq.time_step_classes(m, opts.reps)?;
    let get = |c: u8| times.iter().find(|(k, _)| *k == c).map_or(0.0, |t| t.1);
    let mut decode_fused = Vec::new();
    let forms = [
        (DecodeFusion::All, opts.fused_decode),
        (DecodeFusion::AllButSwiglu, opts.fused_decode),
        (DecodeFusion::Persistent, opts.persistent_decode),
    ];
    for fusion in forms.into_iter().filter(|f| f.1).map(|f| f.0) {
        if let Err(e) = decode_fusion_fits(m.kernels(), cfg, fusion) {
            progress(&format!("{name}: no {} decode: {e}", fusion.name()));
            decode_fused.push(FusedDecodeRow {
                fusion: fusion.name().into(),
                fits: false,
                tok_s: 0.0,
                step_us: 0.0,
                same_tokens: false,
                stages: Vec::new(),
            });
            continue;
        }
        progress(&format!("{name}: decode, {}", fusion.name()));
        let (tok_s, fused_tokens) =
            decode_rate(m, opts.prompt_tokens, opts.new_tokens, true, fusion)?;
        seq.set_decode_fusion(fusion)?;
        let step = seq.time_step_classes(m, opts.reps)?;
        let mut stages = Vec::new();
        if fusion == DecodeFusion::Persistent {
            match seq.trace_persistent_step(m) {
                Ok(t) => {
                    stages = t
                        .into_iter()
                        .map(|s| StageRow {
                            stage: s.stage.into(),
                            span_us: s.span_us,
                            median_block_us: s.median_block_us,
                            barrier_us: s.barrier_us,
                        })
                        .collect()
                }
                Err(e) => progress(&format!(
                    "{name}: tracing the persistent kernel FAILED: {e}"
                )),
            }
        }
        decode_fused.push(FusedDecodeRow {
            fusion: fusion.name().into(),
            fits: true,
            tok_s,
            step_us: step
                .iter()
                .find(|(k, _)| *k == class::ALL)
                .map_or(0.0, |t| t.1),
            same_tokens: fused_tokens == tokens,
            stages,
        });
    }
    Ok(GpuModelRow {
        model: name.to_string(),
        weights: b.total(),
        scales: b.scales,
        embeddings: b.embeddings,
        decode_tok_s,
        decode_tok_s_plain,
        decode_tok_s_sampled,
        decode_tok_s_host_sampled,
        prefill,
        prefill_split,
        prefill_slabs,
        step_us: StepSplit {
            total: get(class::ALL),
            gemv: get(class::GEMV),
            attention: get(class::ATTENTION),
            small: get(class::SMALL),
            pick: get(class::PICK),
        },
        decode_fused,
        short_prompts,
        short_prompt: super::plan::short_prompt(cfg),
    })
}

/// HF transformers numbers for the same shapes (`scripts/anchors/hf_decode.py --json`):
/// model name → (decode tok/s, prefill ms by prompt length).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Anchor {
    /// Rows by model name (the bench's names).
    pub rows: Vec<AnchorRow>,
}

/// One anchor row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnchorRow {
    /// Model name, as the bench names it.
    pub model: String,
    /// Decode tokens/s at batch 1.
    pub decode_tok_s: f64,
    /// (prompt tokens, prefill ms).
    pub prefill_ms: Vec<(usize, f64)>,
    /// Bytes of the model's parameters.
    pub param_bytes: u64,
}

/// A benchmark table in the style every GPU benchmark prints (UTF-8 borders) with `header`.
pub(crate) fn table(header: Vec<&str>) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL);
    t.set_header(header);
    t
}

impl GpuBench {
    /// The tables, with the anchor's ratios where it has the model.
    pub fn to_table(&self, anchor: Option<&Anchor>) -> String {
        let find = |m: &str| anchor.and_then(|a| a.rows.iter().find(|r| r.model == m));
        let mut out = format!(
            "GPU engine on {} — batch 1, {} prompt tokens then {} greedy tokens\n",
            self.device, self.prompt_tokens, self.new_tokens
        );
        let mut t = table(vec![
            "model",
            "decode tok/s (graph)",
            "plain launches",
            "graph gain",
            "sampled on GPU (T 0.7, top-p 0.9) tok/s",
            "sampled on host tok/s",
            "HF bf16 anchor tok/s",
            "× anchor",
            "on GPU",
            "HF bf16 params",
        ]);
        for r in &self.rows {
            let a = find(&r.model);
            t.add_row(vec![
                r.model.clone(),
                format!("{:.1}", r.decode_tok_s),
                format!("{:.1}", r.decode_tok_s_plain),
                format!("{:.2}×", r.decode_tok_s / r.decode_tok_s_plain.max(1e-9)),
                format!("{:.1}", r.decode_tok_s_sampled),
                format!("{:.1}", r.decode_tok_s_host_sampled),
                a.map_or("—".into(), |a| format!("{:.1}", a.decode_tok_s)),
                a.map_or("—".into(), |a| {
                    format!("{:.2}×", r.decode_tok_s / a.decode_tok_s.max(1e-9))
                }),
                kiln_job::units::human_bytes(r.weights),
                a.map_or("—".into(), |a| {
                    kiln_job::units::human_bytes(a.param_bytes)
                }),
            ]);
        }
        out += &format!("{t}\n");
        let mut t = table(vec![
            "model",
            "prompt tokens",
            "time to first token ms",
            "prefill tok/s",
            "HF bf16 ms",
            "× HF time",
            "linears only ms",
            "attention only ms",
            "norms etc. only ms",
        ]);
        for r in &self.rows {
            for &(n, ms) in &r.prefill {
                let a = find(&r.model)
                    .and_then(|a| a.prefill_ms.iter().find(|p| p.0 == n))
                    .map(|p| p.1);
                t.add_row(
                    vec![
                        r.model.clone(),
                        n.to_string(),
                        format!("{ms:.2}"),
                        format!("{:.0}", n as f64 / (ms / 1e3)),
                        a.map_or("—".into(), |a| format!("{a:.2}")),
                        a.map_or("—".into(), |a| format!("{:.2}", ms / a)),
                    ]
                    .into_iter()
                    .chain(r.prefill_split.iter().find(|p| p.0 == n).map_or(
                        vec!["—".to_string(); 3],
                        |p| {
                            vec![
                                format!("{:.2}", p.1),
                                format!("{:.2}", p.2),
                                format!("{:.2}", p.3),
                            ]
                        },
                    ))
                    .collect::<Vec<_>>(),
                );
            }
        }
        out += &format!("{t}\n");
        if self.rows.iter().any(|r| !r.prefill_slabs.is_empty()) {
            let mut t = table(vec![
                "model",
                "prompt tokens",
                "weight slab MiB",
                "serial ms",
                "overlapped ms",
                "overlapped × serial",
                "× jobs' default",
            ]);
            for r in &self.rows {
                for s in &r.prefill_slabs {
                    let base = r.prefill.iter().find(|p| p.0 == s.tokens).map(|p| p.1);
                    let best = s.serial_ms.min(s.overlapped_ms);
                    t.add_row(vec![
                        r.model.clone(),
                        s.tokens.to_string(),
                        s.mib.to_string(),
                        format!("{:.2}", s.serial_ms),
                        format!("{:.2}", s.overlapped_ms),
                        format!("{:.3}", s.overlapped_ms / s.serial_ms.max(1e-9)),
                        base.map_or("—".into(), |b| format!("{:.3}", best / b)),
                    ]);
                }
            }
            out += &format!(
                "{t}\n(time to first token with the prompt GEMMs' weights dequantized to bf16 in \
                 slabs of this size — serially, or the next slab on a side stream while the GEMM \
                 reads the last; \"× jobs' default\": the faster form against the time to first \
                 token above — jobs use {} MiB, at most the largest matrix, {})\n",
                (super::plan::PREFILL_SCRATCH_ELEMS * 2) >> 20,
                if super::slabs::PREFILL_OVERLAP {
                    "overlapped"
                } else {
                    "serially"
                }
            );
        }
        let mut t = table(vec![
            "model",
            "step µs",
            "GEMVs",
            "attention",
            "norms/rope/swiglu",
            "pick",
            "rest (graph, gaps)",
        ]);
        for r in &self.rows {
            let s = r.step_us;
            t.add_row(vec![
                r.model.clone(),
                format!("{:.1}", s.total),
                format!("{:.1}", s.gemv),
                format!("{:.1}", s.attention),
                format!("{:.1}", s.small),
                format!("{:.1}", s.pick),
                format!(
                    "{:.1}",
                    (s.total - s.gemv - s.attention - s.small - s.pick).max(0.0)
                ),
            ]);
        }
        out += &format!(
            "{t}\n(each class replayed alone in its own graph; \"rest\" = the whole step minus the \
             classes: launch gaps the classes overlap or add)\n"
        );
        if self.rows.iter().any(|r| !r.decode_fused.is_empty()) {
            out += &self.fused_table();
        }
        if self
            .rows
            .iter()
            .any(|r| r.decode_fused.iter().any(|f| !f.stages.is_empty()))
        {
            out += &self.stage_table();
        }
        if !self.barrier_probe.is_empty() {
            out += &self.barrier_table();
        }
        if self.rows.iter().any(|r| !r.short_prompts.is_empty()) {
            out += &self.short_prompt_table();
        }
        out
    }

    /// The persistent kernel's stages in a traced step.
    fn stage_table(&self) -> String {
        let mut t = table(vec![
            "model",
            "persistent stage",
            "span µs",
            "median block µs",
            "barrier after µs",
        ]);
        for r in &self.rows {
            for f in &r.decode_fused {
                for s in &f.stages {
                    t.add_row(vec![
                        r.model.clone(),
                        s.stage.clone(),
                        format!("{:.2}", s.span_us),
                        format!("{:.2}", s.median_block_us),
                        format!("{:.2}", s.barrier_us),
                    ]);
                }
            }
        }
        format!(
            "{t}\n(one decode step with a global-timer stamp at every grid barrier, mean over \
             layers: span = first block released before the stage → last block arrived after \
             it; median block = the same to the median block's arrival; barrier = last arrival \
             → last release)\n"
        )
    }

    /// Grid barriers alone, by implementation and blocks per SM.
    fn barrier_table(&self) -> String {
        let mut t = table(vec!["barrier kind", "blocks per SM", "µs per barrier"]);
        let base = self.barrier_probe.first().map_or(1.0, |b| b.2);
        for &(kind, blocks, us) in &self.barrier_probe {
            t.add_row(vec![
                kind.to_string(),
                blocks.to_string(),
                format!("{us:.2} ({:.2}× kind 0, 1 block/SM)", us / base.max(1e-9)),
            ]);
        }
        format!(
            "{t}\n(4,000 barriers in one cooperative launch of 256-thread blocks, median of 5; \
             kind 0 fences + polls the counter, 1 release/acquire on the counter, 2 the last \
             block releases a flag the others poll; KILN_PERSISTENT=barrier=K picks one)\n"
        )
    }

    /// Short prompts through 8-row GEMV batches against the GEMMs.
    fn short_prompt_table(&self) -> String {
        let mut t = table(vec![
            "model",
            "prompt tokens",
            "8-row GEMV batches ms",
            "GEMMs ms",
            "GEMMs × GEMV batches",
            "jobs take",
        ]);
        for r in &self.rows {
            for &(n, gemv, gemm) in &r.short_prompts {
                t.add_row(vec![
                    r.model.clone(),
                    n.to_string(),
                    format!("{gemv:.2}"),
                    format!("{gemm:.2}"),
                    format!("{:.2}", gemm / gemv.max(1e-9)),
                    if n <= r.short_prompt {
                        "GEMV batches".into()
                    } else {
                        "GEMMs".into()
                    },
                ]);
            }
        }
        format!(
            "{t}\n(time to first token, warm; \"jobs take\": the path a prompt of that length \
             takes once the process has run the GEMMs (`plan::short_prompt`); before that, up \
             to {} tokens take the GEMV batches, since the first GEMMs of a process cost \
             ~160 ms once)\n",
            super::plan::COLD_SHORT_PROMPT
        )
    }

    /// The fused decode GEMVs against the default decode of the same run.
    fn fused_table(&self) -> String {
        let mut t = table(vec![
            "model",
            "fused",
            "decode tok/s (default)",
            "form's tok/s",
            "× default",
            "step µs (default)",
            "form's step µs",
            "same tokens",
        ]);
        for (r, f) in self
            .rows
            .iter()
            .flat_map(|r| r.decode_fused.iter().map(move |f| (r, f)))
        {
            if !f.fits {
                t.add_row(vec![
                    r.model.clone(),
                    f.fusion.clone(),
                    format!("{:.1}", r.decode_tok_s),
                    "— (the model's shapes do not run this form; the log says why)".into(),
                ]);
                continue;
            }
            t.add_row(vec![
                r.model.clone(),
                f.fusion.clone(),
                format!("{:.1}", r.decode_tok_s),
                format!("{:.1}", f.tok_s),
                format!("{:.3}×", f.tok_s / r.decode_tok_s.max(1e-9)),
                format!("{:.1}", r.step_us.total),
                format!("{:.1}", f.step_us),
                if f.same_tokens {
                    "yes".into()
                } else {
                    "NO — a defect: the fused step must give the same bits".into()
                },
            ]);
        }
        format!(
            "{t}\n(\"all\": the norms, SwiGLU and the attention's combine folded into the GEMVs' x \
             load, the residual adds into their stores — six launches a layer instead of ten; \
             \"all but SwiGLU\": SwiGLU its own launch, seven; \"persistent kernel\": the embedding, \
             every layer and the final norm as one kernel with grid barriers between its stages)\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(slabs: Vec<SlabTiming>) -> GpuModelRow {
        GpuModelRow {
            model: "qwen2.5-7b".into(),
            weights: 5 << 30,
            scales: 1 << 29,
            embeddings: 1 << 30,
            decode_tok_s: 360.0,
            decode_tok_s_plain: 300.0,
            decode_tok_s_sampled: 355.0,
            decode_tok_s_host_sampled: 200.0,
            prefill: vec![(2048, 60.0)],
            prefill_split: vec![(2048, 46.0, 5.5, 9.0)],
            prefill_slabs: slabs,
            step_us: StepSplit {
                total: 2700.0,
                ..StepSplit::default()
            },
            decode_fused: Vec::new(),
            short_prompts: Vec::new(),
            short_prompt: 8,
        }
    }

    #[test]
    fn the_short_prompt_table_compares_both_paths() {
        let bench = GpuBench {
            device: "test".into(),
            prompt_tokens: 128,
            new_tokens: 256,
            barrier_probe: Vec::new(),
            rows: vec![GpuModelRow {
                short_prompts: vec![(16, 8.0, 12.0), (128, 40.0, 10.0)],
                short_prompt: 16,
                ..row(Vec::new())
            }],
        };
        let t = bench.to_table(None);
        assert!(
            t.contains("8-row GEMV batches ms") && t.contains("1.50"),
            "{t}"
        );
        assert!(
            t.contains("0.25") && t.contains("GEMV batches") && t.contains("GEMMs"),
            "{t}"
        );
        assert!(!GpuBench {
            rows: vec![row(Vec::new())],
            ..bench
        }
        .to_table(None)
        .contains("8-row GEMV batches ms"));
    }

    #[test]
    fn the_fused_table_compares_with_the_default_and_flags_other_tokens() {
        let bench = |f: Option<FusedDecodeRow>| GpuBench {
            device: "test".into(),
            prompt_tokens: 128,
            new_tokens: 256,
            barrier_probe: Vec::new(),
            rows: vec![GpuModelRow {
                decode_fused: f.into_iter().collect(),
                ..row(Vec::new())
            }],
        };
        let fused = |same_tokens| FusedDecodeRow {
            fusion: "all but SwiGLU".into(),
            fits: true,
            tok_s: 450.0,
            step_us: 2160.0,
            same_tokens,
            stages: Vec::new(),
        };
        let t = bench(Some(fused(true))).to_table(None);
        assert!(t.contains("form's tok/s") && t.contains("1.250×"), "{t}");
        assert!(t.contains("2160.0") && t.contains("yes"), "{t}");
        assert!(t.contains("all but SwiGLU"), "{t}");
        let t = bench(Some(fused(false))).to_table(None);
        assert!(t.contains("NO — a defect"), "{t}");
        let t = bench(Some(FusedDecodeRow {
            fits: false,
            ..fused(true)
        }))
        .to_table(None);
        assert!(t.contains("do not run this form"), "{t}");
        assert!(!bench(None).to_table(None).contains("form's tok/s"));
    }

    #[test]
    fn the_persistent_kernel_gets_a_stage_and_a_barrier_table() {
        let stage = |stage: &str, span_us| StageRow {
            stage: stage.into(),
            span_us,
            median_block_us: 1.25,
            barrier_us: 2.5,
        };
        let bench = GpuBench {
            device: "test".into(),
            prompt_tokens: 128,
            new_tokens: 256,
            barrier_probe: vec![(0, 1, 4.0), (2, 2, 1.0)],
            rows: vec![GpuModelRow {
                decode_fused: vec![FusedDecodeRow {
                    fusion: "persistent kernel".into(),
                    fits: true,
                    tok_s: 900.0,
                    step_us: 1100.0,
                    same_tokens: true,
                    stages: vec![stage("q/k/v", 3.5), stage("down", 7.75)],
                }],
                ..row(Vec::new())
            }],
        };
        let t = bench.to_table(None);
        assert!(t.contains("persistent stage") && t.contains("q/k/v"), "{t}");
        assert!(
            t.contains("7.75") && t.contains("1.25") && t.contains("2.50"),
            "{t}"
        );
        assert!(
            t.contains("µs per barrier") && t.contains("0.25× kind 0"),
            "{t}"
        );
        let plain = GpuBench {
            barrier_probe: Vec::new(),
            rows: vec![row(Vec::new())],
            ..bench
        }
        .to_table(None);
        assert!(!plain.contains("persistent stage") && !plain.contains("µs per barrier"));
    }

    #[test]
    fn the_slab_table_gives_each_size_both_ways_against_the_default() {
        let bench = |slabs| GpuBench {
            device: "test".into(),
            prompt_tokens: 128,
            new_tokens: 256,
            barrier_probe: Vec::new(),
            rows: vec![row(slabs)],
        };
        let slab = |mib, serial_ms, overlapped_ms| SlabTiming {
            tokens: 2048,
            mib,
            serial_ms,
            overlapped_ms,
        };
        let t = bench(vec![slab(16, 54.0, 60.0), slab(64, 62.0, 55.8)]).to_table(None);
        assert!(
            t.contains("weight slab MiB") && t.contains("jobs use 64 MiB"),
            "{t}"
        );
        // 16 MiB: overlapped 60 / serial 54 = 1.111, the faster (54) / the default's 60 =
        // 0.900; 64 MiB: 55.8 / 62 = 0.900, 55.8 / 60 = 0.930
        assert!(t.contains("1.111") && t.contains("0.900"), "{t}");
        assert!(t.contains("0.930"), "{t}");
        let t = bench(Vec::new()).to_table(None);
        assert!(!t.contains("weight slab MiB"), "{t}");
    }
}
