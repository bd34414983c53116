//! Kiln's engine: what a job does once the agent has started its process.
//!
//! - `spec`, `report`, `memory`: the agent ⇄ job contract, from the `kiln-job` crate (job
//!   request on stdin; report lines on stdout and the outcome file; self-readings).
//! - `error`: [`EngineError`], every failure of an engine job (the bottom of the crate).
//! - `memtest`: the memtest job.
//! - `exec`: the job process entry point (`kiln job-exec`): request on stdin, reports on stdout.
//! - `model`: the Qwen2/Qwen3/Llama model core (config, checkpoints, NVFP4 linears, forward, KV cache).
//! - `tokenizer`: `tokenizer.json` loading, encode/decode, incremental decoding.
//! - `chat`: chat messages and Jinja chat templates (minijinja).
//! - `chat_model`: `ChatModel` — model + tokenizer + chat template, what `--model tiny|DIR` names.
//! - `tiny`: the bundled tiny model, its trained tokenizer and the WhoAmI dataset.
//! - `generate`: generation with KV cache or replay, sampling, the cache/replay A/B check, the engine benchmark.
//! - `session`: multi-turn sessions (delta prefill); `session_store`: sessions kept on disk between jobs (LRU, byte budget).
//! - `train`: the train job (STE / full NVFP4 / f32, assistant-token loss, AdamW, resumable checkpoints).
//! - `export`: the export job (bf16 safetensors, NVFP4 ModelOpt / compressed-tensors, verified by reloading).
#![deny(missing_docs)]

pub use error::{EngineError, Result};
pub use kiln_job::{memory, report, spec};

pub mod chat;
pub mod chat_model;
pub mod engine;
pub mod error;
pub mod exec;
pub mod export;
pub mod generate;
pub mod memtest;
pub mod model;
pub mod session;
pub mod session_store;
pub mod tiny;
pub mod tokenizer;
pub mod train;
