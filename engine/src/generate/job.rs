//! The generate job: load only what inference needs (NVFP4 linears, no optimizer state or
//! master weights), render the prompt, generate with the KV cache, in replay mode or both
//! (`ab`), streaming every token as a Token report, with phase samples `model_loaded`,
//! `prefill_done` and `decode_done`. With a session id, the turn continues a conversation
//! kept in the agent's session store (delta prefill) and the result carries the session's
//! sequence length after the turn.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use super::{ab, GenerateOptions, Generation, KvMode, SamplingParams, Sequence};
use crate::chat::ChatMessage;
use crate::chat_model::{ChatModel, TINY_MODEL};
use crate::cuda::GpuPlan;
use crate::engine::{Engine, LoadedModel};
use crate::error::{EngineError, Result};
use crate::model::ModelConfig;
use crate::report::{JobOutput, PhaseReport, Report, Reporter};
use crate::session::Session as StoredSession;
use crate::session::Session;
use crate::session_store::SessionStore;
use crate::spec::{DeviceSpec, GenerateSpec, JobRequest, KvSpec, SamplingSpec};
use crate::tokenizer::TokenTextStream;
use kiln_job::units::human_bytes;

/// The sampler parameters of a spec (`top_p` 0 means off, as in the proto).
pub fn sampling_params(s: &SamplingSpec) -> Result<SamplingParams> {
    let p = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
        seed: s.seed,
    };
    p.validate()?;
    Ok(p)
}

/// Check the spec; the engine the job runs on.
fn check_spec(spec: &GenerateSpec, device: DeviceSpec) -> Result<Engine> {
    let bad = |m: &str| Err(EngineError::InvalidArgument(m.to_string()));
    if spec.model.is_empty() {
        return bad("model is empty; pass `tiny` or a model directory");
    }
    if spec.max_tokens == 0 {
        return bad("max_tokens must be ≥ 1");
    }
    match (spec.prompt.is_empty(), spec.messages.is_empty()) {
        (true, true) => return bad("no prompt: pass a prompt or chat messages"),
        (false, false) => return bad("pass either a raw prompt or chat messages, not both"),
        _ => {}
    }
    Engine::for_job(&spec.device, device)
}

/// Before any weight is read: fail a GPU generation whose budget cannot hold even the model,
/// a cache for its new tokens and the decode workspace (seconds of loading a model that
/// cannot fit saved). The prompt's tokens are counted by the full check after the load.
/// A model directory without a readable config.json passes here; the load names the problem.
fn check_budget_before_load(model: &str, max_tokens: usize, budget: u64) -> Result<()> {
    if budget == 0 {
        return Ok(());
    }
    let cfg = if model == TINY_MODEL {
        crate::tiny::config()?
    } else {
        match ModelConfig::from_file(&Path::new(model).join("config.json")) {
            Ok(cfg) => cfg,
            Err(_) => return Ok(()),
        }
    };
    GpuPlan::new(&cfg, max_tokens, 1).check(budget)
}

/// What a generate job forwards.
enum Work {
    /// A fresh generation after `prompt`.
    Fresh { prompt: Vec<u32> },
    /// A session's next turn.
    Turn {
        store: SessionStore,
        /// The session as stored (`None`: a new conversation).
        stored: Option<StoredSession>,
        /// The user's text.
        user: String,
        /// Time to read the stored session, ms.
        read_ms: f64,
    },
}

/// Per-job state for streaming: the first token marks the end of the prefill.
struct Stream<'a> {
    reporter: &'a Reporter,
    /// KV-cache bytes per position.
    kv_bytes_per_token: u64,
    weights: (u64, u64),
    /// Positions in the sequence once the prompt is forwarded.
    prefill_len: usize,
    started: Instant,
    first: bool,
}

impl Stream<'_> {
    fn on_token(&mut self, id: u32, text: &str) {
        if self.first {
            self.first = false;
            self.reporter.phase(
                PhaseReport::now("prefill_done", 0)
                    .bytes([
                        ("weights", self.weights.0),
                        ("scales", self.weights.1),
                        (
                            "kv_cache",
                            self.kv_bytes_per_token * self.prefill_len as u64,
                        ),
                    ])
                    .metric("prompt_tokens", self.prefill_len as f64)
                    .metric("ms", self.started.elapsed().as_secs_f64() * 1e3),
            );
        }
        self.reporter.send(&Report::Token {
            id,
            text: text.to_string(),
        });
    }
}

/// Run a generate job.
pub fn run_job(
    request: &JobRequest,
    spec: &GenerateSpec,
    reporter: &Reporter,
) -> Result<JobOutput> {
    // the job process's start-up before this point (exec, dynamic loading, reading the request)
    let started_ms = kiln_job::memory::process_age_ms();
    let t_engine = Instant::now();
    let engine = check_spec(spec, request.device)?;
    // on a GPU: the CUDA context, the kernels (PTX from the cache or NVRTC), cuBLAS handles
    let engine_ms = t_engine.elapsed().as_secs_f64() * 1e3;
    let sampling = sampling_params(&spec.sampling)?;
    if matches!(engine, Engine::Cuda(_)) {
        check_budget_before_load(&spec.model, spec.max_tokens as usize, request.budget_bytes)?;
    }
    let t = Instant::now();
    // Built on the host first (the GPU engine uploads it below, once the budget is checked);
    // float linears are quantized by the GPU's kernel on a GPU.
    let mut cm = ChatModel::load_host_for(&engine, &spec.model)?;
    // What the generation will forward: the prompt, or the session and its new turn.
    let mut work = if spec.session_id.is_empty() {
        let prompt = if spec.messages.is_empty() {
            cm.tokenizer.encode(&spec.prompt)?
        } else {
            cm.encode_chat(&spec.messages, true)?
        };
        Work::Fresh { prompt }
    } else {
        if spec.kv == KvSpec::Ab {
            return Err(EngineError::InvalidArgument(
                "kv = ab compares two fresh generations and cannot continue a session; use cache or replay with --session".into(),
            ));
        }
        let user = session_user_message(spec)?;
        let sessions_dir = request.sessions_dir();
        if sessions_dir.is_relative() {
            return Err(EngineError::InvalidArgument(format!(
                "the session store directory {} is relative: it would resolve inside this job's scratch directory and be lost with it; the agent must pass an absolute path",
                sessions_dir.display()
            )));
        }
        let store = SessionStore::open(&sessions_dir, request.sessions_budget())?;
        let t_read = Instant::now();
        let stored = store.load(&spec.session_id, &engine)?;
        Work::Turn {
            store,
            stored,
            user,
            read_ms: t_read.elapsed().as_secs_f64() * 1e3,
        }
    };
    let weights = cm.model.weight_bytes();
    let mut loaded = PhaseReport::now("model_loaded", 0);
    if let Engine::Cuda(gpu) = &engine {
        let positions = match &work {
            Work::Fresh { prompt } => prompt.len(),
            Work::Turn { stored, user, .. } => {
                let (len, messages) = stored
                    .as_ref()
                    .map_or((0, &[][..]), |s| (s.seq_len(), &s.messages[..]));
                let delta = cm
                    .template
                    .delta(messages, &ChatMessage::user(user.clone()))?;
                // + the closing text of the assistant turn
                len + cm.tokenizer.encode(&delta)?.len() + 16
            }
        } + spec.max_tokens as usize;
        let plan = GpuPlan::new(cm.model.config(), positions, positions);
        plan.check(request.budget_bytes)?;
        let host = cm.model.model().clone();
        cm.model = LoadedModel::new(engine.clone(), host)?;
        let b = cm.model.gpu().expect("uploaded").bytes();
        let (free, total) = gpu
            .kernels()
            .context()
            .mem_get_info()
            .map_err(|e| EngineError::GpuUnavailable(format!("cuMemGetInfo: {e}")))?;
        reporter.log(format!(
            "generating on {}: model {} on the GPU ({} codes, {} scales, {} embedding); planned KV cache {} for {positions} positions, workspace {}; device memory free {} of {}",
            engine.describe(),
            human_bytes(b.total()),
            human_bytes(b.weights),
            human_bytes(b.scales),
            human_bytes(b.embeddings),
            human_bytes(plan.kv_cache),
            human_bytes(plan.workspace),
            human_bytes(free as u64),
            human_bytes(total as u64),
        ));
        loaded = loaded
            .bytes([
                ("weights", b.weights + b.small),
                ("scales", b.scales),
                ("embeddings", b.embeddings),
                ("kv_cache", plan.kv_cache),
                ("workspace", plan.workspace),
            ])
            .metric("gpu_free_bytes", free as f64)
            .metric("gpu_total_bytes", total as f64);
    } else {
        loaded = loaded.bytes([
            ("weights", weights.0),
            ("scales", weights.1),
            ("kv_cache", 0),
            ("activations", 0),
        ]);
    }
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    reporter.phase(loaded.metric("load_ms", load_ms));
    // where a session turn's time goes (logged at the end of a turn)
    let mut turn_times: Vec<(&str, f64)> = started_ms
        .map(|ms| ("process start", ms))
        .into_iter()
        .chain([("engine start", engine_ms), ("model load", load_ms)])
        .collect();
    let opts = GenerateOptions {
        max_tokens: spec.max_tokens as usize,
        sampling,
        kv: match spec.kv {
            KvSpec::Replay => KvMode::Replay,
            KvSpec::Cache | KvSpec::Ab => KvMode::Cache,
        },
        ..Default::default()
    };
    let mut stream = Stream {
        reporter,
        kv_bytes_per_token: cm.model.kv_bytes_per_token(),
        weights,
        prefill_len: 0,
        started: Instant::now(),
        first: true,
    };
    let (text, generation, kv_len, session_seq_len, ab) = if let Work::Fresh { prompt } = &mut work
    {
        let prompt = std::mem::take(prompt);
        stream.prefill_len = prompt.len();
        if spec.kv == KvSpec::Ab {
            let mut o = opts.clone();
            o.stop_tokens = cm.stop_tokens.clone();
            stream.started = Instant::now();
            let r = ab::ab_compare(&cm.model, &prompt, &o)?;
            let mut ts = TokenTextStream::new(&cm.tokenizer, true);
            for &id in &r.cache_tokens {
                let piece = ts.push(id)?;
                stream.on_token(id, &piece);
            }
            let text = cm.tokenizer.decode(&r.cache_tokens, true)?;
            reporter.log(format!(
                "A/B: cache and replay tokens {}, max |Δlogit| {:.3e} over {} steps; cache {:.1} tok/s, replay {:.1} tok/s",
                match (r.first_divergence, r.divergence_margin) {
                    _ if r.tokens_identical => "identical".to_string(),
                    (Some(step), Some(m)) => format!(
                        "DIFFER from step {step} (there the cache's logits of the two tokens \
                         {m:.3e} apart)"
                    ),
                    (Some(step), None) => format!("DIFFER from step {step}"),
                    (None, _) => "DIFFER".to_string(),
                },
                r.max_logit_diff,
                r.compared_steps,
                r.cache_tokens_per_s,
                r.replay_tokens_per_s
            ));
            let g = Generation {
                prompt_tokens: prompt.len(),
                tokens: r.cache_tokens.clone(),
                stop: super::StopReason::MaxTokens,
                prefill_ms: r.cache_prefill_ms,
                decode_ms: 0.0,
                decode_steps: r.cache_tokens.len().saturating_sub(1),
                decode_tokens_per_s: r.cache_tokens_per_s,
                step_logits: Vec::new(),
            };
            let len = prompt.len() + r.cache_tokens.len();
            (
                text,
                g,
                len,
                0,
                Some((r.tokens_identical, r.max_logit_diff)),
            )
        } else {
            let mut seq = Sequence::new(&cm.model);
            stream.started = Instant::now();
            let out = cm.generate_ids(&mut seq, &prompt, &opts, &mut |id, piece| {
                stream.on_token(id, piece);
                ControlFlow::Continue(())
            })?;
            (out.text, out.generation, seq.len(), 0, None)
        }
    } else {
        let Work::Turn {
            store,
            stored,
            user,
            read_ms,
        } = work
        else {
            unreachable!("not fresh")
        };
        let sessions_dir = store.dir().to_path_buf();
        let mut session = match stored {
            Some(s) => s,
            None => {
                reporter.log(format!(
                    "session {}: not in this agent's session store ({}); starting a new conversation (a session is new, was evicted to keep the store within its budget, or was kept by another agent)",
                    spec.session_id,
                    sessions_dir.display()
                ));
                Session::new(&spec.session_id, &cm)?
            }
        };
        // The turn forwards the rendered user turn after what the session holds.
        let delta = cm
            .template
            .delta(&session.messages, &ChatMessage::user(user.clone()))?;
        let delta_len = cm.tokenizer.encode(&delta)?.len();
        stream.prefill_len = session.seq_len() + delta_len;
        if session.seq_len() > 0 {
            // the stored keys and values onto the engine (the GPU: allocate and upload)
            let t_up = Instant::now();
            let held = session.seq_len();
            let kv = cm.model.prepare_cache(
                &mut session.seq.cache,
                held + delta_len + spec.max_tokens as usize + 16,
            )?;
            let upload_ms = t_up.elapsed().as_secs_f64() * 1e3;
            reporter.phase(
                PhaseReport::now("session_restored", 0)
                    .bytes([
                        ("weights", weights.0),
                        ("scales", weights.1),
                        ("kv_cache", kv),
                    ])
                    .metric("seq_len", held as f64)
                    .metric("read_ms", read_ms)
                    .metric("upload_ms", upload_ms),
            );
            turn_times.push(("session read", read_ms));
            turn_times.push(("KV upload", upload_ms));
        }
        stream.started = Instant::now();
        let rep = session.turn(&cm, &user, &opts, &mut |id, piece| {
            stream.on_token(id, piece);
            ControlFlow::Continue(())
        })?;
        turn_times.push(("delta prefill", rep.generation.prefill_ms));
        turn_times.push(("decode", rep.generation.decode_ms));
        turn_times.push(("closing", rep.close_ms));
        let saved = store.save(&session)?;
        reporter.log(format!(
            "session {}: turn {} forwarded {} new tokens (delta prefill {:.1} ms), sequence {} → {} tokens; stored {} bytes{}",
            session.id,
            rep.turn,
            rep.delta_tokens,
            rep.generation.prefill_ms,
            rep.seq_len_before,
            rep.seq_len_after,
            saved.bytes,
            if saved.evicted.is_empty() {
                String::new()
            } else {
                format!(", evicted {:?}", saved.evicted)
            }
        ));
        reporter.log(format!(
            "session {}: turn {} time on {}: {}",
            session.id,
            rep.turn,
            cm.model.engine().describe(),
            turn_times
                .iter()
                .map(|(what, ms)| match (*what, *ms) {
                    // /proc's clock ticks are 10 ms
                    ("process start", ms) if ms < 10.0 => "process start < 10 ms".to_string(),
                    (what, ms) => format!("{what} {ms:.1} ms"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let len = rep.seq_len_after;
        (rep.text, rep.generation, len, len as u32, None)
    };
    reporter.phase(
        PhaseReport::now("decode_done", generation.tokens.len() as u32)
            .bytes([
                ("weights", weights.0),
                ("scales", weights.1),
                ("kv_cache", cm.model.kv_bytes_per_token() * kv_len as u64),
            ])
            .metric("tokens", generation.tokens.len() as f64)
            .metric("prefill_ms", generation.prefill_ms)
            .metric("decode_tokens_per_s", generation.decode_tokens_per_s)
            .metric("seq_len", kv_len as f64),
    );
    let (ab_tokens_agree, ab_max_logit_diff) = ab.unwrap_or((false, 0.0));
    Ok(JobOutput::Generate {
        text,
        token_ids: generation.tokens,
        prefill_ms: generation.prefill_ms,
        decode_tokens_per_s: generation.decode_tokens_per_s,
        session_seq_len,
        ab_tokens_agree,
        ab_max_logit_diff,
    })
}

/// The user text of a session turn: one user message (or a raw prompt, taken as the user's
/// text); the session holds the history.
fn session_user_message(spec: &GenerateSpec) -> Result<String> {
    if !spec.prompt.is_empty() {
        return Ok(spec.prompt.clone());
    }
    match spec.messages.as_slice() {
        [ChatMessage { role, content }] if role == "user" => Ok(content.clone()),
        _ => Err(EngineError::InvalidArgument(
            "a session turn takes exactly one user message (the session keeps the history; system messages are not supported in sessions)".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_budget_that_cannot_hold_the_model_fails_before_the_load() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::qwen2_5_7b();
        std::fs::write(dir.path().join("config.json"), cfg.to_hf_json().to_string()).unwrap();
        let model = dir.path().to_str().unwrap();
        let e = check_budget_before_load(model, 256, 2 << 30)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("budget is 2.00 GiB") && e.contains("--budget-gb"),
            "{e}"
        );
        check_budget_before_load(model, 256, 64 << 30).unwrap();
        check_budget_before_load(model, 256, 0).unwrap();
        let e = check_budget_before_load(TINY_MODEL, 16, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("budget is 1.0 MiB"), "{e}");
        // no config.json: the load reports the directory's problem
        check_budget_before_load("/nonexistent/model", 16, 1 << 20).unwrap();
    }
}
