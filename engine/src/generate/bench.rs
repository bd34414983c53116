//! The engine benchmark (`kiln bench engine`): CPU decode speed with the KV cache against
//! replay on the tiny model and on a randomly initialized Qwen2.5-0.5B-shaped NVFP4 model,
//! and a multi-turn session benchmark (turn 2/3 against turn 1 and against replaying the
//! whole conversation). Each run checks the cache/replay agreement before it reports speed,
//! and prints ratios measured in the same run.

use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{ab, GenerateOptions, Sequence};
use crate::chat_model::ChatModel;
use crate::engine::{Engine, LoadedModel};
use crate::error::Result;
use crate::model::{LinearFormat, Model, ModelConfig};
use crate::session::Session;
use crate::session_store::SessionStore;

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchOptions {
    /// Prompt tokens of the decode runs.
    pub prompt_tokens: usize,
    /// Tokens generated on the tiny model.
    pub tiny_new_tokens: usize,
    /// Tokens generated on the 0.5B-shaped model (0 skips it).
    pub big_new_tokens: usize,
    /// Tokens generated per session turn.
    pub turn_new_tokens: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            prompt_tokens: 32,
            tiny_new_tokens: 64,
            big_new_tokens: 8,
            turn_new_tokens: 16,
        }
    }
}

/// One decode measurement (cache and replay on the same prompt).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecodeRow {
    /// Model label.
    pub model: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub new_tokens: usize,
    /// Cache-mode prefill, ms.
    pub cache_prefill_ms: f64,
    /// Cache-mode decode tokens/s.
    pub cache_tokens_per_s: f64,
    /// Replay-mode decode tokens/s.
    pub replay_tokens_per_s: f64,
    /// Greedy tokens identical in both modes.
    pub tokens_identical: bool,
    /// Largest logit difference between the modes.
    pub max_logit_diff: f32,
}

/// One session turn measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TurnRow {
    /// Model label.
    pub model: String,
    /// 1-based turn.
    pub turn: usize,
    /// New tokens forwarded before generating.
    pub delta_tokens: usize,
    /// Sequence length after the turn.
    pub seq_len_after: usize,
    /// Prefill of the delta (turn 1: the whole first prompt), ms.
    pub prefill_ms: f64,
    /// The whole turn (prefill, decode, close), ms.
    pub turn_ms: f64,
    /// Saving the session to the store and loading it back (what the agent does between
    /// jobs), ms.
    pub store_ms: f64,
    /// Prefill of the whole conversation so far from scratch (what a job without a session
    /// would do), ms.
    pub replay_prefill_ms: f64,
}

/// One linear layer shape at batch 1 (a decode step), NVFP4 against f32.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinearRow {
    /// Which projection of the 0.5B shape.
    pub name: String,
    /// Output features (N).
    pub n: usize,
    /// Input features (K).
    pub k: usize,
    /// Layers of the model with this projection.
    pub per_token: usize,
    /// Median time of `x[1,K]·Wᵀ` with W in NVFP4, µs.
    pub nvfp4_us: f64,
    /// Median time with W in f32 (candle matmul), µs.
    pub f32_us: f64,
}

/// All results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineBench {
    /// Per-layer linear timings of the 0.5B shape (empty when it is skipped).
    pub linears: Vec<LinearRow>,
    /// Decode rows.
    pub decode: Vec<DecodeRow>,
    /// Session rows.
    pub turns: Vec<TurnRow>,
    /// Worker threads (rayon) used.
    pub threads: usize,
}

/// The randomly initialized Qwen2.5-0.5B-shaped model (NVFP4 linears, seed 1), context
/// limited to 4096 positions, for `engine`.
pub fn qwen_0_5b_random(engine: &Engine) -> Result<Model> {
    let mut cfg = ModelConfig::qwen2_5_0_5b();
    cfg.max_position_embeddings = 4096;
    engine.build_model(&cfg, &mut engine.random_weights(1, LinearFormat::Nvfp4))
}

/// Deterministic prompt ids in `[3, vocab)`.
fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| 3 + ((i * 7919 + 13) % (vocab - 3)) as u32)
        .collect()
}

fn decode_row(label: &str, model: &LoadedModel, prompt: usize, new: usize) -> Result<DecodeRow> {
    let ids = prompt_ids(prompt, model.config().vocab_size);
    let opts = GenerateOptions {
        max_tokens: new,
        ..Default::default()
    };
    // Prefill time of the cache run (ab_compare reports only speeds).
    let mut seq = Sequence::new(model);
    let g = super::generate(
        model,
        &mut seq,
        &ids,
        &GenerateOptions {
            max_tokens: 1,
            ..opts.clone()
        },
        &mut |_| ControlFlow::Continue(()),
    )?;
    let r = ab::ab_compare(model, &ids, &opts)?;
    Ok(DecodeRow {
        model: label.into(),
        prompt_tokens: prompt,
        new_tokens: r.cache_tokens.len(),
        cache_prefill_ms: g.prefill_ms,
        cache_tokens_per_s: r.cache_tokens_per_s,
        replay_tokens_per_s: r.replay_tokens_per_s,
        tokens_identical: r.tokens_identical,
        max_logit_diff: r.max_logit_diff,
    })
}

fn turn_rows(label: &str, cm: &ChatModel, new_tokens: usize) -> Result<Vec<TurnRow>> {
    let users = [
        "Hello! Who are you and what can you do for me today?",
        "Tell me more about how you were trained.",
        "Thanks. One last question: what should I call you?",
    ];
    let store_dir = tempfile_dir()?;
    let store = SessionStore::open(&store_dir, 1 << 30)?;
    let opts = GenerateOptions {
        max_tokens: new_tokens,
        ..Default::default()
    };
    let mut session = Session::new("bench", cm)?;
    let mut rows = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let t = Instant::now();
        let rep = session.turn(cm, u, &opts, &mut |_, _| ControlFlow::Continue(()))?;
        let turn_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        store.save(&session)?;
        session = store.load("bench", cm.model.engine())?.expect("just saved");
        let store_ms = t.elapsed().as_secs_f64() * 1e3;
        // What a sessionless job forwards for the same turn: the whole conversation.
        let whole = &session.seq.tokens[..rep.seq_len_before + rep.delta_tokens];
        let t = Instant::now();
        super::replay_logits(&cm.model, whole)?;
        let replay_prefill_ms = t.elapsed().as_secs_f64() * 1e3;
        rows.push(TurnRow {
            model: label.into(),
            turn: i + 1,
            delta_tokens: rep.delta_tokens,
            seq_len_after: rep.seq_len_after,
            prefill_ms: rep.generation.prefill_ms,
            turn_ms,
            store_ms,
            replay_prefill_ms,
        });
    }
    let _ = std::fs::remove_dir_all(&store_dir);
    Ok(rows)
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| crate::error::EngineError::io("creating", &d, e))?;
    Ok(d)
}

/// Median of `reps` timings of `f`, µs (one warm-up call first).
fn median_us(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Batch-1 timings of the Qwen2.5-0.5B linear shapes, NVFP4 vs f32: where decode time goes.
fn linear_rows(engine: &Engine) -> Result<Vec<LinearRow>> {
    let c = ModelConfig::qwen2_5_0_5b();
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let shapes = [
        ("q_proj / o_proj", h, h, 2 * c.num_hidden_layers),
        ("k_proj / v_proj", c.kv_size(), h, 2 * c.num_hidden_layers),
        ("gate_proj / up_proj", i, h, 2 * c.num_hidden_layers),
        ("down_proj", h, i, c.num_hidden_layers),
    ];
    let src = engine.random_weights(2, LinearFormat::Dense);
    let device = engine.device();
    let mut rows = Vec::new();
    for (name, n, k, per_token) in shapes {
        let w = src.uniform(name, n, k, 0.05);
        let q = kiln_kernels::nvfp4::Nvfp4Tensor::quantize(&w, n, k)?;
        let wt = candle_core::Tensor::from_vec(w, (n, k), device)?;
        let x: Vec<f32> = (0..k).map(|j| (j as f32 * 0.01).sin()).collect();
        let xt = candle_core::Tensor::from_vec(x.clone(), (1, k), device)?;
        let nvfp4_us = median_us(15, || {
            std::hint::black_box(kiln_kernels::cpu::matmul_nvfp4(&x, 1, &q));
        });
        let f32_us = median_us(15, || {
            std::hint::black_box(xt.matmul(&wt.t().expect("2-D")).expect("matmul"));
        });
        rows.push(LinearRow {
            name: name.into(),
            n,
            k,
            per_token,
            nvfp4_us,
            f32_us,
        });
    }
    Ok(rows)
}

/// Run the benchmark; `progress` gets a line before each part.
pub fn run_engine_bench(
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<EngineBench> {
    let mut decode = Vec::new();
    let mut turns = Vec::new();
    let mut linears = Vec::new();
    // The CPU engine: this benchmark measures the CPU path.
    let engine = Engine::cpu();
    progress("tiny model: decode with cache vs replay");
    let tiny = ChatModel::load_on(&engine, crate::chat_model::TINY_MODEL, LinearFormat::Nvfp4)?;
    decode.push(decode_row(
        "tiny",
        &tiny.model,
        opts.prompt_tokens,
        opts.tiny_new_tokens,
    )?);
    // The same weights with f32 linears: separates the NVFP4 dequantization cost (paid per
    // forward, whatever its length) from the cost the cache saves.
    let dense = LoadedModel::new(
        engine.clone(),
        crate::tiny::model(LinearFormat::Dense, engine.device())?,
    )?;
    decode.push(decode_row(
        "tiny (f32 linears)",
        &dense,
        opts.prompt_tokens,
        opts.tiny_new_tokens,
    )?);
    progress("tiny model: 3-turn session");
    turns.extend(turn_rows("tiny", &tiny, opts.turn_new_tokens)?);
    if opts.big_new_tokens > 0 {
        progress("Qwen2.5-0.5B shape: batch-1 linear layers, NVFP4 vs f32");
        linears = linear_rows(&engine)?;
        progress("Qwen2.5-0.5B shape (random NVFP4 weights): building");
        let big = LoadedModel::new(engine.clone(), qwen_0_5b_random(&engine)?)?;
        progress("Qwen2.5-0.5B shape: decode with cache vs replay");
        decode.push(decode_row(
            "qwen2.5-0.5b-shape",
            &big,
            opts.prompt_tokens,
            opts.big_new_tokens,
        )?);
        // A 0.5B-shaped chat model with the tiny tokenizer (ids fit its vocabulary).
        let cm = ChatModel::assemble(
            "qwen2.5-0.5b-shape".into(),
            big,
            crate::tiny::tokenizer()?,
            crate::tiny::chat_template()?,
            "bench-0.5b".into(),
        );
        progress("Qwen2.5-0.5B shape: 3-turn session");
        turns.extend(turn_rows("qwen2.5-0.5b-shape", &cm, opts.big_new_tokens)?);
    }
    Ok(EngineBench {
        linears,
        decode,
        turns,
        threads: rayon::current_num_threads(),
    })
}

impl EngineBench {
    /// The results as printable tables with ratios.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        if !self.linears.is_empty() {
            let _ = writeln!(
                s,
                "Batch-1 linear layers of the Qwen2.5-0.5B shape (median of 15)"
            );
            let _ = writeln!(
                s,
                "{:<20} {:>6} {:>6} {:>9} {:>10} {:>9} {:>8} {:>12} {:>12}",
                "layer",
                "N",
                "K",
                "per token",
                "nvfp4 µs",
                "f32 µs",
                "f32/fp4",
                "nvfp4 GW/s",
                "per-token ms"
            );
            let mut total = (0.0, 0.0);
            for r in &self.linears {
                total.0 += r.nvfp4_us * r.per_token as f64 / 1e3;
                total.1 += r.f32_us * r.per_token as f64 / 1e3;
                let _ = writeln!(
                    s,
                    "{:<20} {:>6} {:>6} {:>9} {:>10.0} {:>9.0} {:>7.2}x {:>12.2} {:>12.1}",
                    r.name,
                    r.n,
                    r.k,
                    r.per_token,
                    r.nvfp4_us,
                    r.f32_us,
                    r.f32_us / r.nvfp4_us.max(1e-9),
                    (r.n * r.k) as f64 / r.nvfp4_us / 1e3,
                    r.nvfp4_us * r.per_token as f64 / 1e3
                );
            }
            let _ = writeln!(
                s,
                "all linears of one decode step: NVFP4 {:.0} ms, f32 {:.0} ms (GW/s = 10^9 weights per second)\n",
                total.0, total.1
            );
        }
        let _ = writeln!(s, "Decode (CPU, {} threads, greedy, batch 1)", self.threads);
        let _ = writeln!(
            s,
            "{:<20} {:>6} {:>6} {:>11} {:>12} {:>13} {:>8} {:>7} {:>12}",
            "model",
            "prompt",
            "new",
            "prefill ms",
            "cache tok/s",
            "replay tok/s",
            "ratio",
            "agree",
            "max |Δlogit|"
        );
        for r in &self.decode {
            let _ = writeln!(
                s,
                "{:<20} {:>6} {:>6} {:>11.1} {:>12.1} {:>13.1} {:>7.2}x {:>7} {:>12.2e}",
                r.model,
                r.prompt_tokens,
                r.new_tokens,
                r.cache_prefill_ms,
                r.cache_tokens_per_s,
                r.replay_tokens_per_s,
                r.cache_tokens_per_s / r.replay_tokens_per_s.max(1e-9),
                if r.tokens_identical { "yes" } else { "NO" },
                r.max_logit_diff
            );
        }
        let _ = writeln!(
            s,
            "\nSessions (delta prefill; store = save + load between jobs)"
        );
        let _ = writeln!(
            s,
            "{:<20} {:>4} {:>6} {:>7} {:>11} {:>9} {:>9} {:>12} {:>11} {:>11}",
            "model",
            "turn",
            "delta",
            "seq",
            "prefill ms",
            "turn ms",
            "store ms",
            "replay ms",
            "vs turn 1",
            "vs replay"
        );
        for r in &self.turns {
            let first = self
                .turns
                .iter()
                .find(|t| t.model == r.model && t.turn == 1)
                .map_or(r.prefill_ms, |t| t.prefill_ms);
            let _ = writeln!(
                s,
                "{:<20} {:>4} {:>6} {:>7} {:>11.2} {:>9.1} {:>9.2} {:>12.2} {:>10.2}x {:>10.2}x",
                r.model,
                r.turn,
                r.delta_tokens,
                r.seq_len_after,
                r.prefill_ms,
                r.turn_ms,
                r.store_ms,
                r.replay_prefill_ms,
                first / r.prefill_ms.max(1e-9),
                r.replay_prefill_ms / r.prefill_ms.max(1e-9),
            );
        }
        let _ = writeln!(
            s,
            "\n'vs turn 1' = turn-1 prefill / this turn's prefill; 'vs replay' = prefill of the whole conversation from scratch / this turn's delta prefill."
        );
        s
    }
}
