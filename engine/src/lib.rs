//! Kiln's engine: what a job does once the agent has started its process.
//!
//! - `spec`, `report`, `memory`: the agent ⇄ job contract, from the `kiln-job` crate (job
//!   request on stdin; report lines on stdout and the outcome file; self-readings).
//! - `error`: [`EngineError`], every failure of an engine job (the bottom of the crate).
//! - `memtest`: the memtest job.
//! - `exec`: the job process entry point (`kiln job-exec`): request on stdin, reports on stdout.
//! - `model`: the Qwen2/Qwen3/Llama model core — config, `ModelLayout` (every tensor's name,
//!   shape and role), checkpoints read through `kiln_kernels::checkpoint`, NVFP4 linears,
//!   forward, KV cache, saving. Depends only on `error`.
//! - `engine`: the device seam — `Engine` (`Cpu` in this build), chosen once per job from its
//!   device; `EngineCache`, a sequence's keys and values; `LoadedModel`, a model on its engine.
//!   Generation, sessions and training reach the model through it.
//! - `tokenizer`: `tokenizer.json` loading, encode/decode, incremental decoding.
//! - `chat`: chat messages and Jinja chat templates (minijinja).
//! - `tiny`: the bundled tiny model, its trained tokenizer and files, and the WhoAmI dataset.
//! - `shapes`: model shapes known by name, and random-weight models of them written as model
//!   directories (`kiln random-model`).
//! - `generate`: generation with KV cache or replay, sampling, the cache/replay A/B check, the engine benchmark.
//! - `chat_model`: `ChatModel` — a loaded model + tokenizer + chat template, what
//!   `--model tiny|DIR` names; `model_files` resolves a `--model` value to its tokenizer files.
//! - `session`: multi-turn sessions (delta prefill); `session_store`: sessions kept on disk between jobs (LRU, byte budget).
//! - `train`: the train job (STE / full NVFP4 / f32, assistant-token loss, AdamW, resumable checkpoints).
//! - `export`: the export job (bf16 safetensors, NVFP4 ModelOpt / compressed-tensors, verified by reloading).
//!
//! Layers, each using only those before it: `error`; `model`, `tokenizer`, `chat`; `engine`,
//! `tiny`, `shapes`; `generate` (the loop, sampling, A/B); `chat_model`; `session`, `session_store`; the
//! jobs (`generate::job`, `generate::bench`, `train`, `export`, `memtest`, `exec`).
#![deny(missing_docs)]

pub use error::{EngineError, Result};
pub use kiln_job::{memory, report, spec};

pub mod chat;
pub mod chat_model;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod exec;
pub mod export;
pub mod generate;
pub mod memtest;
pub mod model;
pub mod session;
pub mod session_store;
pub mod shapes;
pub mod tiny;
pub mod tokenizer;
pub mod train;
