//! The train job: forward through straight-through fake-quant NVFP4 linears (`nvfp4-ste`),
//! dequantized packed weights (`nvfp4-full`) or plain f32 (`none`), cross-entropy on the
//! assistant tokens only, backward with candle's autograd, AdamW, and a checkpoint in the
//! output directory that `--resume` continues. Phase samples `model_loaded`, then per step
//! `forward_done`, `backward_done`, `optimizer_done`, and `checkpoint_saved`, each with
//! tensor bytes by category (weights, scales, grads, optimizer_state, activations); the loss
//! of each step goes out as a Progress report and into the result. The job's engine
//! (`crate::engine::Engine`, chosen from its device) holds the batches and parameters and runs
//! the training forward.
//!
//! - `dataset` — JSONL chat samples, the assistant-token loss mask, batches.
//! - `params` — [`params::ParamStore`]: the parameters of the model's `ModelLayout` (f32
//!   `Var`s or packed NVFP4) and their moments, the AdamW step.
//! - `checkpoint` — the checkpoint directory (HF layout + optimizer state + trainer state).

pub mod checkpoint;
pub mod dataset;
pub mod params;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, D};
use kiln_kernels::cpu::AdamWParams;

use crate::chat::ChatTemplate;
use crate::chat_model::{model_files, stop_tokens, TINY_MODEL};
use crate::engine::{Engine, Workload};
use crate::error::{EngineError, Result};
use crate::model::{Checkpoint, LinearFormat, ModelConfig, ModelFiles};
use crate::report::{PhaseReport, Reporter};
use crate::spec::{DeviceSpec, JobRequest, QuantSpec, TrainSpec};
use crate::tokenizer::TextTokenizer;
use checkpoint::TrainerState;
use params::ParamStore;

/// Default rows per chunk of the packed optimizer step.
pub const DEFAULT_STEP_CHUNK_ROWS: usize = 32;
/// Gradients are clipped to this global L2 norm.
pub const MAX_GRAD_NORM: f32 = 1.0;

/// What a training run did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// Loss of each step this run made.
    pub losses: Vec<f32>,
    /// The checkpoint directory.
    pub checkpoint: PathBuf,
    /// Steps done in all (including those before a resume).
    pub step: u64,
    /// Input tokens forwarded per second of training.
    pub tokens_per_s: f64,
}

fn check_spec(spec: &TrainSpec) -> Result<()> {
    let bad = |m: String| Err(EngineError::InvalidArgument(m));
    if spec.model.is_empty() {
        return bad("model is empty; pass `tiny` or a model directory".into());
    }
    if spec.out_dir.is_empty() {
        return bad("out_dir is empty; pass the checkpoint directory to write (--out)".into());
    }
    if spec.steps == 0 || spec.batch == 0 {
        return bad(format!(
            "steps ({}) and batch ({}) must be ≥ 1",
            spec.steps, spec.batch
        ));
    }
    if spec.seq_len < 2 {
        return bad(format!("seq_len must be ≥ 2 (got {})", spec.seq_len));
    }
    if !(spec.lr.is_finite() && spec.lr >= 0.0) {
        return bad(format!("lr must be a finite number ≥ 0 (got {})", spec.lr));
    }
    Ok(())
}

/// The tokenizer and chat template described by `files`.
pub fn tokenizer_and_template(files: &ModelFiles) -> Result<(TextTokenizer, ChatTemplate)> {
    let tok = TextTokenizer::from_json_str(&files.tokenizer_json)?;
    let over = files
        .extra
        .iter()
        .find(|(n, _)| n == "chat_template.jinja")
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned());
    let tmpl = ChatTemplate::from_tokenizer_config(&files.tokenizer_config_json, over)?;
    Ok((tok, tmpl))
}

/// The parameters of `model` (`tiny` or a directory) for training in `quant` mode.
fn load_params(
    engine: &Engine,
    model: &str,
    quant: QuantSpec,
) -> Result<(ModelConfig, ParamStore)> {
    let device = engine.device();
    let format = match quant {
        QuantSpec::Nvfp4Full => LinearFormat::Nvfp4,
        QuantSpec::Nvfp4Ste | QuantSpec::None => LinearFormat::Dense,
    };
    if model == TINY_MODEL {
        let cfg = crate::tiny::config()?;
        let mut src = engine.random_weights(crate::tiny::TINY_SEED, format);
        let store = ParamStore::from_source(&cfg, &mut src, quant, device)?;
        return Ok((cfg, store));
    }
    let dir = Path::new(model);
    if !dir.is_dir() {
        return Err(EngineError::config(
            dir,
            "not a directory; --model takes `tiny`, a Hugging Face model directory or a Kiln checkpoint",
        ));
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let ckpt = Checkpoint::open(dir)?;
    let mut src = engine.checkpoint_weights(&ckpt, format);
    let store = ParamStore::from_source(&cfg, &mut src, quant, device)?;
    Ok((cfg, store))
}

/// Masked mean cross-entropy of `logits` `[B, T, V]` against the batch's targets.
fn masked_loss(logits: &Tensor, batch: &dataset::Batch) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let lsm = candle_nn::ops::log_softmax(&logits.reshape((b * t, v))?, D::Minus1)?;
    let picked = lsm.gather(&batch.target.unsqueeze(1)?, 1)?.squeeze(1)?;
    let n = batch.target_tokens.max(1) as f64;
    Ok((picked * &batch.mask)?.sum_all()?.affine(-1.0 / n, 0.0)?)
}

/// Run a training job: load, train `spec.steps` steps in all (continuing a checkpoint with
/// `resume`), save the checkpoint. Reports go to `reporter`. The engine is the one the spec
/// asks for (see [`train_on`] for a job the agent placed).
pub fn train(spec: &TrainSpec, reporter: &Reporter) -> Result<TrainOutcome> {
    check_spec(spec)?;
    let engine = Engine::for_job(Workload::Training, &spec.device, DeviceSpec::Cpu)?;
    train_checked(&engine, spec, reporter)
}

/// [`train`] on the engine chosen for a job that the agent placed on `device`.
pub fn train_on(spec: &TrainSpec, device: DeviceSpec, reporter: &Reporter) -> Result<TrainOutcome> {
    check_spec(spec)?;
    let engine = Engine::for_job(Workload::Training, &spec.device, device)?;
    train_checked(&engine, spec, reporter)
}

fn train_checked(engine: &Engine, spec: &TrainSpec, reporter: &Reporter) -> Result<TrainOutcome> {
    let out_dir = PathBuf::from(&spec.out_dir);
    let existing = checkpoint::read_state(&out_dir)?;
    let (base, mut state) = match existing {
        Some(st) if spec.resume => {
            if st.quant != spec.quant {
                return Err(EngineError::TrainCheckpoint {
                    path: out_dir.clone(),
                    message: format!(
                        "was trained with --quant {} but this job asks for {}; resume with the same mode or write to a new --out",
                        st.quant.name(),
                        spec.quant.name()
                    ),
                });
            }
            reporter.log(format!(
                "resuming {} at step {} of {}",
                out_dir.display(),
                st.step,
                spec.steps
            ));
            (out_dir.display().to_string(), st)
        }
        Some(st) => {
            return Err(EngineError::TrainCheckpoint {
                path: out_dir.clone(),
                message: format!(
                    "already holds a checkpoint at step {}; pass --resume to continue it, or choose another --out",
                    st.step
                ),
            })
        }
        None => (
            spec.model.clone(),
            TrainerState {
                step: 0,
                losses: Vec::new(),
                quant: spec.quant,
                base_model: spec.model.clone(),
                dataset: spec.dataset.clone(),
                lr: spec.lr,
                seed: spec.seed,
                batch: spec.batch,
                seq_len: spec.seq_len,
            },
        ),
    };
    let files = model_files(&base)?;
    let (cfg, mut store) = load_params(engine, &base, spec.quant)?;
    if state.step > 0 {
        checkpoint::load_optimizer(&out_dir, &mut store, state.step)?;
    }
    let b = store.bytes();
    reporter.phase(PhaseReport::now("model_loaded", state.step as u32).bytes([
        ("weights", b.weights),
        ("scales", b.scales),
        ("optimizer_state", b.optimizer_state),
        ("grads", 0),
        ("activations", 0),
    ]));

    // Data.
    let (tokenizer, template) = tokenizer_and_template(&files)?;
    let stops = stop_tokens(&cfg, &tokenizer, &template);
    let conversations = dataset::read_chat_jsonl(&spec.dataset)?;
    let seq_len = (spec.seq_len as usize).min(cfg.max_position_embeddings);
    let samples = conversations
        .iter()
        .map(|m| dataset::tokenize_sample(m, &tokenizer, &template, &stops, seq_len))
        .collect::<Result<Vec<_>>>()?;
    let trainable = samples.iter().filter(|s| s.target_tokens() > 0).count();
    if trainable == 0 {
        return Err(EngineError::Dataset {
            path: spec.dataset.clone(),
            line: None,
            message: format!(
                "no sample has an assistant token within --seq-len {seq_len}; raise --seq-len"
            ),
        });
    }
    reporter.log(format!(
        "dataset {}: {} samples, {} with assistant tokens within seq_len {seq_len}, longest {} tokens",
        spec.dataset,
        samples.len(),
        trainable,
        samples.iter().map(|s| s.ids.len()).max().unwrap_or(0)
    ));
    let pad = tokenizer
        .token_id("<|endoftext|>")
        .or_else(|| stops.first().copied())
        .unwrap_or(0);

    let hp = AdamWParams {
        lr: spec.lr as f32,
        ..AdamWParams::default()
    };
    let chunk_rows = match spec.step_chunk_rows {
        0 => DEFAULT_STEP_CHUNK_ROWS,
        n => n as usize,
    };
    let total = spec.steps as u64;
    let mut losses = Vec::new();
    let mut tokens = 0usize;
    let t_train = Instant::now();
    while state.step < total {
        let step = state.step + 1;
        let idx = dataset::batch_indices(samples.len(), spec.batch as usize, state.step, spec.seed);
        let picked: Vec<&dataset::TrainSample> = idx.iter().map(|&i| &samples[i]).collect();
        let batch = dataset::make_batch(&picked, pad, engine.device())?;
        tokens += batch.input_tokens;

        let model = store.model()?;
        let logits = engine.forward_train(&model, &batch.input)?;
        let loss = masked_loss(&logits, &batch)?;
        let loss_v = loss.to_scalar::<f32>()?;
        if !loss_v.is_finite() {
            return Err(EngineError::InvalidArgument(format!(
                "the loss is {loss_v} at step {step}; training diverged — lower the learning rate"
            )));
        }
        let (bsz, t) = (picked.len(), batch.seq);
        let act = (model.activation_bytes(t, t, 0) * cfg.num_hidden_layers as u64
            + 3 * (t * cfg.vocab_size * 4) as u64)
            * bsz as u64
            + store.dequantized_bytes();
        let b = store.bytes();
        let common = [
            ("weights", b.weights),
            ("scales", b.scales),
            ("optimizer_state", b.optimizer_state),
        ];
        reporter.phase(
            PhaseReport::now("forward_done", step as u32)
                .bytes(common)
                .bytes([("grads", 0), ("activations", act)])
                .metric("loss", loss_v as f64)
                .metric("target_tokens", batch.target_tokens as f64),
        );

        let grads = loss.backward()?;
        let grads = store.gradients(&grads)?;
        drop(logits);
        drop(loss);
        drop(model);
        let grad_bytes: u64 = grads.iter().map(|g| 4 * g.len() as u64).sum();
        reporter.phase(
            PhaseReport::now("backward_done", step as u32)
                .bytes(common)
                .bytes([("grads", grad_bytes), ("activations", 0)]),
        );

        let st = store.adamw_step(grads, hp, step, chunk_rows, spec.seed, MAX_GRAD_NORM)?;
        let b = store.bytes();
        reporter.phase(
            PhaseReport::now("optimizer_done", step as u32)
                .bytes([
                    ("weights", b.weights),
                    ("scales", b.scales),
                    ("optimizer_state", b.optimizer_state),
                    ("grads", 0),
                    ("activations", st.peak_chunk_bytes as u64),
                ])
                .metric("loss", loss_v as f64)
                .metric("grad_norm", st.grad_norm as f64),
        );
        state.step = step;
        state.losses.push(loss_v);
        losses.push(loss_v);
        reporter.progress(step, total, "steps", format!("loss {loss_v:.4}"));
        tracing::debug!(step, loss = loss_v, grad_norm = st.grad_norm, "train step");
    }
    let secs = t_train.elapsed().as_secs_f64();

    let written = checkpoint::save(&out_dir, &mut store, &files, &state)?;
    let b = store.bytes();
    reporter.phase(
        PhaseReport::now("checkpoint_saved", state.step as u32)
            .bytes([
                ("weights", b.weights),
                ("scales", b.scales),
                ("optimizer_state", b.optimizer_state),
            ])
            .metric("files", written.len() as f64),
    );
    reporter.log(format!(
        "checkpoint at step {} written to {}",
        state.step,
        out_dir.display()
    ));
    Ok(TrainOutcome {
        losses,
        checkpoint: out_dir,
        step: state.step,
        tokens_per_s: if secs > 0.0 {
            tokens as f64 / secs
        } else {
            0.0
        },
    })
}

/// The train job: [`train_on`] the agent's device, with its outcome as the job's output.
pub fn run_job(
    request: &JobRequest,
    spec: &TrainSpec,
    reporter: &Reporter,
) -> Result<crate::report::JobOutput> {
    let out = train_on(spec, request.device, reporter)?;
    Ok(crate::report::JobOutput::Train {
        loss: out.losses,
        checkpoint: out.checkpoint.display().to_string(),
        tokens_per_s: out.tokens_per_s,
    })
}
