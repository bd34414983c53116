//! Generation: feed a prompt and pick tokens until a stop token or the token limit, either
//! with the KV cache (prefill once, then one token per step) or in replay mode (recompute the
//! whole sequence every step — the A/B reference). Reports prefill time and decode speed and
//! streams each token to a callback. The model is run through its engine ([`LoadedModel`]),
//! the cache is the engine's ([`EngineCache`]).
//!
//! - `sampling` — [`SamplingParams`], [`Sampler`].
//! - `ab` — run cache and replay side by side and compare tokens and logits.
//! - `bench` — the engine benchmark (`kiln bench engine`).
//! - `job` — the generate job (phases, token stream, sessions from the agent's store).

pub mod ab;
pub mod bench;
pub mod job;
pub mod sampling;

use std::ops::ControlFlow;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::engine::{EngineCache, LoadedModel};
use crate::error::{EngineError, Result};
pub use sampling::{argmax, Sampler, SamplingParams};

/// How the sequence is recomputed between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvMode {
    /// Prefill once, then forward one token per step reusing the KV cache.
    #[default]
    Cache,
    /// Forward the whole sequence every step (no cache): the reference.
    Replay,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop token (e.g. `<|im_end|>`) was produced; it is the last of `tokens`.
    StopToken,
    /// `max_tokens` tokens were produced.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The token callback asked to stop.
    Cancelled,
}

/// Parameters of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    /// Most tokens to produce (≥ 1).
    pub max_tokens: usize,
    /// Token selection.
    pub sampling: SamplingParams,
    /// Cache or replay.
    pub kv: KvMode,
    /// Tokens that end the generation (included in the output when produced).
    pub stop_tokens: Vec<u32>,
    /// Keep every step's logits in [`Generation::step_logits`] (for A/B checks).
    pub record_logits: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 32,
            sampling: SamplingParams::greedy(),
            kv: KvMode::Cache,
            stop_tokens: Vec::new(),
            record_logits: false,
        }
    }
}

/// What one generation produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Tokens of the prompt forwarded by this call (the new tokens only, in a session).
    pub prompt_tokens: usize,
    /// Produced tokens, the stop token included if one ended it.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
    /// Time of the prompt forward (to the first token's logits), ms.
    pub prefill_ms: f64,
    /// Time of the decode steps after the first token, ms.
    pub decode_ms: f64,
    /// Decode steps (forwards after the prefill).
    pub decode_steps: usize,
    /// `decode_steps / decode time` (0 when there were none).
    pub decode_tokens_per_s: f64,
    /// Per produced token, the logits it was chosen from (only with `record_logits`).
    pub step_logits: Vec<Vec<f32>>,
}

/// A sequence being generated: the token ids forwarded so far and, in cache mode, their
/// keys and values. Invariant (cache mode): `cache.len() == tokens.len()` between calls.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// Token ids forwarded into the sequence.
    pub tokens: Vec<u32>,
    /// Their keys and values (empty in replay mode).
    pub cache: EngineCache,
}

impl Sequence {
    /// An empty sequence for `model`.
    pub fn new(model: &LoadedModel) -> Self {
        Sequence {
            tokens: Vec::new(),
            cache: model.new_cache(),
        }
    }

    /// Tokens in the sequence.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Forward `ids` into the sequence without producing a token (cache mode updates the
    /// cache; replay mode only records them). Returns the last position's logits in cache
    /// mode, `None` in replay mode.
    pub fn extend(
        &mut self,
        model: &LoadedModel,
        ids: &[u32],
        kv: KvMode,
    ) -> Result<Option<Vec<f32>>> {
        if ids.is_empty() {
            return Ok(None);
        }
        check_fits(model, self.tokens.len() + ids.len(), 0)?;
        let out = match kv {
            KvMode::Cache => {
                self.sync_cache(model)?;
                Some(model.forward_last(ids, &mut self.cache)?)
            }
            KvMode::Replay => None,
        };
        self.tokens.extend_from_slice(ids);
        Ok(out)
    }

    /// In cache mode, forward any tokens the cache lacks (a session saved in replay mode, or
    /// one whose cache was dropped).
    fn sync_cache(&mut self, model: &LoadedModel) -> Result<()> {
        let have = self.cache.len();
        if have < self.tokens.len() {
            model.forward_last(&self.tokens[have..], &mut self.cache)?;
        }
        debug_assert_eq!(self.cache.len(), self.tokens.len());
        Ok(())
    }
}

fn check_fits(model: &LoadedModel, tokens: usize, reserve: usize) -> Result<()> {
    let max = model.config().max_position_embeddings;
    if tokens + reserve > max {
        return Err(EngineError::PromptTooLong {
            tokens,
            max_context: max,
            reserve,
        });
    }
    Ok(())
}

/// Generate after `prompt` (new tokens appended to `seq`), calling `on_token` with each
/// produced token; the callback may return `ControlFlow::Break` to stop.
///
/// On return, `seq` holds every forwarded token: the prompt and every produced token except
/// the last one (it was chosen but not yet forwarded; a session forwards it when it closes
/// the turn). Errors with `PromptTooLong` if the prompt leaves no room for one token.
pub fn generate(
    model: &LoadedModel,
    seq: &mut Sequence,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
) -> Result<Generation> {
    if opts.max_tokens == 0 {
        return Err(EngineError::InvalidArgument(
            "max_tokens must be ≥ 1".into(),
        ));
    }
    if prompt.is_empty() && seq.is_empty() {
        return Err(EngineError::InvalidArgument("empty prompt".into()));
    }
    check_fits(model, seq.len() + prompt.len(), 1)?;
    let mut sampler = Sampler::new(opts.sampling)?;
    let ctx = model.config().max_position_embeddings;

    // Greedy without recorded logits needs only the pick: on the GPU it is made there and
    // only the token id comes back.
    let greedy = opts.sampling.is_greedy();
    // On the GPU, sampling (temperature, top-k, top-p) happens there too, unless the logits
    // are recorded (then the host sampler picks from them, as on the CPU).
    let gpu_samples =
        !greedy && !opts.record_logits && opts.kv == KvMode::Cache && model.gpu().is_some();
    let host_samples = !greedy && !gpu_samples;
    let want_logits = host_samples || opts.record_logits;
    let t0 = Instant::now();
    let mut cur = match opts.kv {
        KvMode::Cache => {
            if prompt.is_empty() {
                return Err(EngineError::InvalidArgument(
                    "cache mode needs at least one new prompt token".into(),
                ));
            }
            seq.cache
                .reserve((seq.len() + prompt.len() + opts.max_tokens).min(ctx))?;
            if model.gpu().is_some() {
                model.set_gpu_sampling(&mut seq.cache, gpu_samples.then_some(&opts.sampling))?;
            }
            seq.sync_cache(model)?;
            let c = model.forward_pick(prompt, &mut seq.cache, want_logits)?;
            seq.tokens.extend_from_slice(prompt);
            c
        }
        KvMode::Replay => {
            seq.tokens.extend_from_slice(prompt);
            replay_pick(model, &seq.tokens)?
        }
    };
    let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;

    let mut tokens = Vec::new();
    let mut step_logits = Vec::new();
    let mut decode_steps = 0usize;
    let t1 = Instant::now();
    let stop = loop {
        let (pick, logits) = cur;
        let tok = match &logits {
            Some(l) if host_samples => sampler.sample(l),
            _ => pick,
        };
        tokens.push(tok);
        if opts.record_logits {
            step_logits.push(logits.unwrap_or_default());
        }
        if on_token(tok).is_break() {
            break StopReason::Cancelled;
        }
        if opts.stop_tokens.contains(&tok) {
            break StopReason::StopToken;
        }
        if tokens.len() >= opts.max_tokens {
            break StopReason::MaxTokens;
        }
        if seq.len() + 1 >= ctx {
            break StopReason::ContextFull;
        }
        // Forward the chosen token.
        cur = match opts.kv {
            KvMode::Cache => {
                let c = model.forward_pick(&[tok], &mut seq.cache, want_logits)?;
                seq.tokens.push(tok);
                c
            }
            KvMode::Replay => {
                seq.tokens.push(tok);
                replay_pick(model, &seq.tokens)?
            }
        };
        decode_steps += 1;
    };
    let decode_s = t1.elapsed().as_secs_f64();
    Ok(Generation {
        prompt_tokens: prompt.len(),
        tokens,
        stop,
        prefill_ms,
        decode_ms: decode_s * 1e3,
        decode_steps,
        decode_tokens_per_s: if decode_steps > 0 {
            decode_steps as f64 / decode_s
        } else {
            0.0
        },
        step_logits,
    })
}

/// Last-position logits of a full forward of `tokens` with a fresh cache.
pub fn replay_logits(model: &LoadedModel, tokens: &[u32]) -> Result<Vec<f32>> {
    model.forward_last(tokens, &mut model.new_cache())
}

/// The greedy pick and the logits of a full forward of `tokens` with a fresh cache.
fn replay_pick(model: &LoadedModel, tokens: &[u32]) -> Result<(u32, Option<Vec<f32>>)> {
    let l = replay_logits(model, tokens)?;
    Ok((argmax(&l), Some(l)))
}
