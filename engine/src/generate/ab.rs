//! The cache-vs-replay A/B check: generate greedily from the same prompt with the KV cache
//! and in replay mode, and report whether the tokens agree and the largest logit difference
//! over the steps where both saw the same sequence.

use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

use super::{generate, GenerateOptions, Generation, KvMode, Sequence};
use crate::engine::LoadedModel;
use crate::error::Result;

/// Result of [`ab_compare`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbReport {
    /// Tokens produced with the cache.
    pub cache_tokens: Vec<u32>,
    /// Tokens produced in replay mode.
    pub replay_tokens: Vec<u32>,
    /// Whether the two token sequences are identical.
    pub tokens_identical: bool,
    /// Index of the first differing token, if any.
    pub first_divergence: Option<usize>,
    /// Largest |logit_cache − logit_replay| over the compared steps.
    pub max_logit_diff: f32,
    /// Steps whose logits were compared (those up to and including the first divergence).
    pub compared_steps: usize,
    /// At the first divergence (greedy): the cache run's logit of its own pick minus its logit
    /// of the replay's pick, ≥ 0 — how close the two candidates were. On the GPU, replays run
    /// through the bf16 prompt GEMMs and cached steps through the f32 GEMVs, so a margin
    /// within the logits' difference is a near-tie that rounding flipped.
    #[serde(default)]
    pub divergence_margin: Option<f32>,
    /// Cache-mode prefill time, ms.
    pub cache_prefill_ms: f64,
    /// Cache-mode decode speed, tokens/s.
    pub cache_tokens_per_s: f64,
    /// Replay-mode decode speed, tokens/s.
    pub replay_tokens_per_s: f64,
}

/// Run greedy generation in both modes from `prompt` and compare (sampling in `opts` is
/// used as given; `kv` and `record_logits` are overridden).
pub fn ab_compare(model: &LoadedModel, prompt: &[u32], opts: &GenerateOptions) -> Result<AbReport> {
    let run = |kv: KvMode| -> Result<Generation> {
        let o = GenerateOptions {
            kv,
            record_logits: true,
            ..opts.clone()
        };
        let mut seq = Sequence::new(model);
        generate(model, &mut seq, prompt, &o, &mut |_| {
            ControlFlow::Continue(())
        })
    };
    let cache = run(KvMode::Cache)?;
    let replay = run(KvMode::Replay)?;
    let first_divergence = cache
        .tokens
        .iter()
        .zip(&replay.tokens)
        .position(|(a, b)| a != b)
        .or(if cache.tokens.len() != replay.tokens.len() {
            Some(cache.tokens.len().min(replay.tokens.len()))
        } else {
            None
        });
    // Step i's logits depend on tokens < i, so steps up to the first divergence saw the
    // same sequence in both modes.
    let compared_steps = first_divergence
        .map_or(cache.step_logits.len(), |d| d + 1)
        .min(cache.step_logits.len())
        .min(replay.step_logits.len());
    let max_logit_diff = cache.step_logits[..compared_steps]
        .iter()
        .zip(&replay.step_logits[..compared_steps])
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0.0f32, f32::max);
    let divergence_margin = first_divergence.and_then(|d| margin_at(&cache, &replay, d));
    Ok(AbReport {
        divergence_margin,
        tokens_identical: first_divergence.is_none(),
        first_divergence,
        max_logit_diff,
        compared_steps,
        cache_prefill_ms: cache.prefill_ms,
        cache_tokens_per_s: cache.decode_tokens_per_s,
        replay_tokens_per_s: replay.decode_tokens_per_s,
        cache_tokens: cache.tokens,
        replay_tokens: replay.tokens,
    })
}

/// Step `d`'s logit of the cache run's token minus its logit of the replay's (None where a run
/// has no token or logits there).
fn margin_at(cache: &Generation, replay: &Generation, d: usize) -> Option<f32> {
    let (a, b) = (*cache.tokens.get(d)?, *replay.tokens.get(d)?);
    let l = cache.step_logits.get(d)?;
    Some(l.get(a as usize)? - l.get(b as usize)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::StopReason;

    fn run(tokens: Vec<u32>, step_logits: Vec<Vec<f32>>) -> Generation {
        Generation {
            prompt_tokens: 1,
            tokens,
            stop: StopReason::MaxTokens,
            prefill_ms: 0.0,
            decode_ms: 0.0,
            decode_steps: 0,
            decode_tokens_per_s: 0.0,
            step_logits,
        }
    }

    #[test]
    fn the_margin_is_the_cache_logits_of_both_picks_apart() {
        let cache = run(vec![2, 0], vec![vec![0.0, 1.0, 3.0], vec![0.5, 0.4, 0.1]]);
        let replay = run(vec![2, 1], Vec::new());
        // step 1: the cache picked 0 (0.5), the replay 1 (0.4 in the cache's logits)
        let m = margin_at(&cache, &replay, 1).unwrap();
        assert!((m - 0.1).abs() < 1e-6, "{m}");
        // no logits recorded at that step, or a run that ended: no margin
        assert_eq!(margin_at(&cache, &replay, 2), None);
        assert_eq!(margin_at(&run(vec![2, 0], Vec::new()), &replay, 1), None);
    }
}
