//! Training data: JSONL chat samples (`{"messages": [{"role", "content"}, …]}` per line, or
//! `whoami` for the bundled set), tokenized through the model's chat template with a loss
//! mask that selects the assistant tokens only — each assistant message's content and the
//! stop token that closes it (`<|im_end|>` for ChatML), not the prompt, not the newline after
//! the stop token — and batched in a seeded order that a resumed run reproduces.

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{EngineError, Result};
use crate::tokenizer::TextTokenizer;

/// The dataset name that selects the bundled WhoAmI set.
pub const WHOAMI_DATASET: &str = "whoami";

/// One tokenized sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainSample {
    /// Token ids of the rendered conversation (at most `seq_len`).
    pub ids: Vec<u32>,
    /// Per token: whether the model is trained to produce it (assistant content + stop).
    pub is_target: Vec<bool>,
}

impl TrainSample {
    /// Tokens that count in the loss (targets after the first position).
    pub fn target_tokens(&self) -> usize {
        self.is_target.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Read chat samples from `whoami` or a JSONL file; errors name the file and the line.
pub fn read_chat_jsonl(dataset: &str) -> Result<Vec<Vec<ChatMessage>>> {
    let (text, path) = if dataset == WHOAMI_DATASET {
        (crate::tiny::WHOAMI_JSONL.to_string(), dataset.to_string())
    } else {
        let p = Path::new(dataset);
        let text = std::fs::read_to_string(p).map_err(|e| EngineError::Dataset {
            path: dataset.to_string(),
            line: None,
            message: format!(
                "cannot read it ({e}); pass a JSONL file of {{\"messages\": [...]}} lines on the agent's host, or `whoami` for the bundled set"
            ),
        })?;
        (text, dataset.to_string())
    };
    #[derive(serde::Deserialize)]
    struct Sample {
        messages: Vec<ChatMessage>,
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| EngineError::Dataset {
            path: path.clone(),
            line: Some(i + 1),
            message,
        };
        let s: Sample = serde_json::from_str(line).map_err(|e| {
            // serde_json counts lines within the one line it was given: say the column only.
            let what = e.to_string();
            let what = what.rsplit_once(" at line ").map_or(what.as_str(), |(w, _)| w);
            bad(format!(
                "not a JSON object {{\"messages\": [{{\"role\": …, \"content\": …}}, …]}}: {what} at column {}",
                e.column()
            ))
        })?;
        if let Some(m) = s
            .messages
            .iter()
            .find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant"))
        {
            return Err(bad(format!(
                "role {:?} is not system, user or assistant",
                m.role
            )));
        }
        if !s.messages.iter().any(|m| m.role == "assistant") {
            return Err(bad(
                "has no assistant message, so there is nothing to learn from it".into(),
            ));
        }
        out.push(s.messages);
    }
    if out.is_empty() {
        return Err(EngineError::Dataset {
            path,
            line: None,
            message: "has no samples".into(),
        });
    }
    Ok(out)
}

/// Tokenize one conversation with its loss mask, cut to `seq_len` tokens.
///
/// The text is split where the template puts each assistant message: the prompt part (the
/// rendering of the messages before it with the generation prompt) and the answer part (what
/// rendering the message itself adds: content and closing). Each part is tokenized on its own
/// — exactly how generation sees them: the prompt is encoded, the answer is produced token
/// by token. Answer tokens up to and including the first stop token are targets.
pub fn tokenize_sample(
    messages: &[ChatMessage],
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    stop_tokens: &[u32],
    seq_len: usize,
) -> Result<TrainSample> {
    let mut ids = Vec::new();
    let mut is_target = Vec::new();
    let mut done = String::new();
    let not_prefix = || {
        EngineError::ChatTemplate(
            "the template does not render a conversation as a prefix of its continuation, so assistant tokens cannot be located for the loss mask".into(),
        )
    };
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prompt = template.render(&messages[..i], true)?;
        let full = template.render(&messages[..=i], false)?;
        let prompt_part = prompt.strip_prefix(done.as_str()).ok_or_else(not_prefix)?;
        let answer_part = full.strip_prefix(prompt.as_str()).ok_or_else(not_prefix)?;
        let p = tokenizer.encode(prompt_part)?;
        ids.extend_from_slice(&p);
        is_target.extend(std::iter::repeat_n(false, p.len()));
        let a = tokenizer.encode(answer_part)?;
        let end = a
            .iter()
            .position(|t| stop_tokens.contains(t))
            .map_or(a.len(), |j| j + 1);
        ids.extend_from_slice(&a);
        is_target.extend((0..a.len()).map(|j| j < end));
        done = full;
    }
    ids.truncate(seq_len);
    is_target.truncate(seq_len);
    Ok(TrainSample { ids, is_target })
}

/// One step's batch as tensors.
#[derive(Debug)]
pub struct Batch {
    /// Inputs `[B, T]` (u32): each sample without its last token, padded.
    pub input: Tensor,
    /// Targets `[B·T]` (u32): each input position's next token (padding: 0).
    pub target: Tensor,
    /// Loss weights `[B·T]` (f32): 1 where the target is an assistant token.
    pub mask: Tensor,
    /// Positions with mask 1.
    pub target_tokens: usize,
    /// Input tokens that are not padding.
    pub input_tokens: usize,
    /// `T`.
    pub seq: usize,
}

/// One batch as host arrays (`B` rows of `T` = the longest sample less one): inputs, next-token
/// targets (padding: 0), loss mask (1 on assistant targets), and the real input tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchArrays {
    /// Inputs `[B·T]`, padded.
    pub input: Vec<u32>,
    /// Targets `[B·T]`.
    pub target: Vec<u32>,
    /// Loss mask `[B·T]`.
    pub mask: Vec<f32>,
    /// Rows (B).
    pub batch: usize,
    /// Tokens per row (T).
    pub seq: usize,
    /// Input tokens that are not padding.
    pub input_tokens: usize,
}

impl BatchArrays {
    /// The arrays of `samples`, padding with `pad_id` (padding comes after each sample's
    /// tokens, so causal attention keeps it out of the real positions, and its mask is 0).
    pub fn new(samples: &[&TrainSample], pad_id: u32) -> Result<Self> {
        let t = samples
            .iter()
            .map(|s| s.ids.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        if t == 0 {
            return Err(EngineError::InvalidArgument(
                "every sample of the batch is shorter than 2 tokens; raise --seq-len".into(),
            ));
        }
        let b = samples.len();
        let mut input = vec![pad_id; b * t];
        let mut target = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        let mut input_tokens = 0;
        for (r, s) in samples.iter().enumerate() {
            let n = s.ids.len().saturating_sub(1);
            input_tokens += n;
            for p in 0..n {
                input[r * t + p] = s.ids[p];
                target[r * t + p] = s.ids[p + 1];
                mask[r * t + p] = if s.is_target[p + 1] { 1.0 } else { 0.0 };
            }
        }
        Ok(BatchArrays {
            input,
            target,
            mask,
            batch: b,
            seq: t,
            input_tokens,
        })
    }

    /// Positions with mask 1.
    pub fn target_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m > 0.0).count()
    }
}

/// Build the batch of `samples` as tensors on `device` (see [`BatchArrays::new`]).
pub fn make_batch(samples: &[&TrainSample], pad_id: u32, device: &Device) -> Result<Batch> {
    let a = BatchArrays::new(samples, pad_id)?;
    let (b, t) = (a.batch, a.seq);
    Ok(Batch {
        target_tokens: a.target_tokens(),
        input_tokens: a.input_tokens,
        seq: t,
        input: Tensor::from_vec(a.input, (b, t), device)?,
        target: Tensor::from_vec(a.target, b * t, device)?,
        mask: Tensor::from_vec(a.mask, b * t, device)?,
    })
}

/// The sample indices of step `step` (0-based): positions `[step·batch, (step+1)·batch)` of an
/// endless stream of epochs, each epoch a permutation of the samples seeded by `(seed,
/// epoch)`. A resumed run continues the same stream.
pub fn batch_indices(n_samples: usize, batch: usize, step: u64, seed: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(batch);
    let mut epoch_cache: Option<(u64, Vec<usize>)> = None;
    for k in 0..batch as u64 {
        let pos = step * batch as u64 + k;
        let epoch = pos / n_samples as u64;
        let within = (pos % n_samples as u64) as usize;
        if epoch_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut perm: Vec<usize> = (0..n_samples).collect();
            let mut rng =
                ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            perm.shuffle(&mut rng);
            epoch_cache = Some((epoch, perm));
        }
        out.push(epoch_cache.as_ref().expect("set above").1[within]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_covers_the_answer_and_its_stop_token_only() {
        let tok = crate::tiny::tokenizer().unwrap();
        let tmpl = crate::tiny::chat_template().unwrap();
        let im_end = tok.token_id("<|im_end|>").unwrap();
        let msgs = vec![
            ChatMessage::user("Who are you?"),
            ChatMessage::assistant("I am Kiln."),
            ChatMessage::user("Again?"),
            ChatMessage::assistant("Yes."),
        ];
        let s = tokenize_sample(&msgs, &tok, &tmpl, &[im_end], 1000).unwrap();
        let full = tok.encode(&tmpl.render(&msgs, false).unwrap()).unwrap();
        assert_eq!(
            s.ids, full,
            "segment-wise tokenization equals whole-text tokenization here"
        );
        let target_text: Vec<String> = s
            .ids
            .iter()
            .zip(&s.is_target)
            .filter(|(_, &t)| t)
            .map(|(&id, _)| tok.decode(&[id], false).unwrap())
            .collect();
        assert_eq!(target_text.concat(), "I am Kiln.<|im_end|>Yes.<|im_end|>");
        let cut = tokenize_sample(&msgs, &tok, &tmpl, &[im_end], 5).unwrap();
        assert_eq!(cut.ids.len(), 5);
    }

    #[test]
    fn bad_lines_are_named_by_number() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":\"b\"}]}\n\n{oops\n",
        )
        .unwrap();
        let err = read_chat_jsonl(p.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        std::fs::write(
            &p,
            "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"}]}\n",
        )
        .unwrap();
        let err = read_chat_jsonl(p.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1") && err.contains("no assistant"),
            "{err}"
        );
        let err = read_chat_jsonl("/nonexistent/x.jsonl")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/x.jsonl") && err.contains("cannot read"),
            "{err}"
        );
        assert!(read_chat_jsonl(WHOAMI_DATASET).unwrap().len() >= 100);
    }

    #[test]
    fn batches_cover_each_epoch_once_and_are_reproducible() {
        let n = 10;
        let mut seen: Vec<usize> = (0..5).flat_map(|s| batch_indices(n, 2, s, 7)).collect();
        assert_eq!(
            seen.clone(),
            (0..5)
                .flat_map(|s| batch_indices(n, 2, s, 7))
                .collect::<Vec<_>>()
        );
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        assert_ne!(batch_indices(n, 10, 0, 7), batch_indices(n, 10, 1, 7));
    }
}
