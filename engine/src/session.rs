//! Multi-turn sessions: a conversation's token ids and KV cache, continued turn by turn with
//! the delta-prefill protocol — each turn forwards only its new tokens (the rendered user
//! turn and assistant prefix), every accepted token ends up in the cache, and the assistant
//! turn is closed by forwarding the template's closing text (`<|im_end|>\n` for ChatML).
//! The conversation's cache is its engine's (`crate::engine::EngineCache`). Between jobs,
//! sessions live in the session store (`session_store`).

use std::ops::ControlFlow;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::chat::ChatMessage;
use crate::chat_model::ChatModel;
use crate::error::{EngineError, Result};
use crate::generate::{GenerateOptions, Generation, KvMode, Sequence};

/// A conversation in progress.
///
/// Invariants: `seq.tokens` is every token of the conversation, each turn closed; in cache
/// mode `seq.cache.len() == seq.tokens.len()` after a turn.
#[derive(Debug, Clone)]
pub struct Session {
    /// The session id (letters, digits, `-`, `_`, `.`).
    pub id: String,
    /// Fingerprint of the model the cache was computed with.
    pub model_fingerprint: String,
    /// Token ids and KV cache.
    pub seq: Sequence,
    /// The messages so far (user and assistant texts).
    pub messages: Vec<ChatMessage>,
}

/// What one turn did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnReport {
    /// 1-based turn number.
    pub turn: usize,
    /// The assistant's text.
    pub text: String,
    /// The generation (tokens, prefill time of the delta, decode speed).
    pub generation: Generation,
    /// Tokens forwarded before generating (the new turn only).
    pub delta_tokens: usize,
    /// Tokens forwarded to close the assistant turn.
    pub closing_tokens: usize,
    /// Time to forward the closing tokens, ms.
    pub close_ms: f64,
    /// Sequence length before the turn.
    pub seq_len_before: usize,
    /// Sequence length after the turn (closed).
    pub seq_len_after: usize,
}

/// Check a session id: 1–128 characters of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn validate_session_id(id: &str) -> Result<()> {
    kiln_job::sessions::check_session_id(id).map_err(EngineError::InvalidArgument)
}

impl Session {
    /// A new, empty session for `model`.
    pub fn new(id: &str, model: &ChatModel) -> Result<Self> {
        validate_session_id(id)?;
        Ok(Session {
            id: id.to_string(),
            model_fingerprint: model.fingerprint.clone(),
            seq: Sequence::new(&model.model),
            messages: Vec::new(),
        })
    }

    /// Tokens in the conversation.
    pub fn seq_len(&self) -> usize {
        self.seq.len()
    }

    /// Completed turns.
    pub fn turns(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.role == "assistant")
            .count()
    }

    /// Run one turn: forward the new user turn, generate the reply (streaming each token and
    /// its text to `on_token`), forward the reply's last token and the closing text.
    pub fn turn(
        &mut self,
        model: &ChatModel,
        user: &str,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32, &str) -> ControlFlow<()>,
    ) -> Result<TurnReport> {
        if self.model_fingerprint != model.fingerprint {
            return Err(EngineError::Session {
                id: self.id.clone(),
                message: format!(
                    "was built with model {} but this job loaded {}; start a new session for this model",
                    self.model_fingerprint, model.fingerprint
                ),
            });
        }
        let user = ChatMessage::user(user);
        let delta_text = model.template.delta(&self.messages, &user)?;
        let closing_text = model.template.assistant_closing(&self.messages, &user)?;
        let delta = model.tokenizer.encode(&delta_text)?;
        let closing = model.tokenizer.encode(&closing_text)?;
        let seq_len_before = self.seq.len();
        // Room for the delta, at least one reply token and the closing (plus the reply's
        // last token when it is not the stop token the closing starts with); the reply is
        // capped so the closed turn always fits.
        let ctx = model.model.config().max_position_embeddings;
        let fixed = seq_len_before + delta.len() + closing.len();
        if fixed + 1 > ctx {
            return Err(EngineError::PromptTooLong {
                tokens: seq_len_before + delta.len(),
                max_context: ctx,
                reserve: closing.len() + 1,
            });
        }
        let mut opts = opts.clone();
        opts.max_tokens = opts.max_tokens.min(ctx - fixed);

        let out = model.generate_ids(&mut self.seq, &delta, &opts, on_token)?;
        // The last produced token was chosen but not forwarded. If it is the stop token the
        // closing text starts with, the closing forwards it; otherwise forward it first.
        let last = *out
            .generation
            .tokens
            .last()
            .expect("generation produces ≥ 1 token");
        let mut close_ids = Vec::with_capacity(closing.len() + 1);
        if closing.first() != Some(&last) {
            close_ids.push(last);
        }
        close_ids.extend_from_slice(&closing);
        let t = Instant::now();
        self.seq.extend(&model.model, &close_ids, opts.kv)?;
        let close_ms = t.elapsed().as_secs_f64() * 1e3;

        self.messages.push(user);
        self.messages.push(ChatMessage::assistant(out.text.clone()));
        if opts.kv == KvMode::Cache {
            debug_assert_eq!(self.seq.cache.len(), self.seq.tokens.len());
        }
        Ok(TurnReport {
            turn: self.turns(),
            text: out.text,
            generation: out.generation,
            delta_tokens: delta.len(),
            closing_tokens: close_ids.len(),
            close_ms,
            seq_len_before,
            seq_len_after: self.seq.len(),
        })
    }
}
