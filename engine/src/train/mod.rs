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
//! A step may be `grad_accum` micro-batches whose gradients add up (each micro-batch's loss is
//! divided by the whole step's assistant tokens, so the sum is the step's mean); gradients are
//! clipped to a global L2 norm (`clip_grad`, default 1.0) before AdamW. `save_every` writes a
//! checkpoint every N steps; the trainer state records the coordinator job that wrote it, so a
//! retry of that job (a new attempt after LOST) continues from it without `--resume`, while
//! another job finding it is refused.
//!
//! - `dataset` — JSONL chat samples, the assistant-token loss mask, batches.
//! - `params` — [`params::ParamStore`]: the parameters of the model's `ModelLayout` (f32
//!   `Var`s or packed NVFP4) and their moments, the AdamW step.
//! - `moments` — one moment tensor stored as f32 or bf16 (`--moments`).
//! - `gpu` — the steps of a run on the GPU (a job placed on a GPU): plan check, upload, phases.
//! - `checkpoint` — the checkpoint directory (HF layout + optimizer state + trainer state).

pub mod checkpoint;
pub mod dataset;
mod gpu;
pub mod moments;
pub mod params;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, D};
use kiln_kernels::cpu::AdamWParams;

use crate::chat::ChatTemplate;
use crate::chat_model::{model_files, stop_tokens, TINY_MODEL};
use crate::cuda::train::CudaTrainer;
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::model::{Checkpoint, LinearFormat, ModelConfig, ModelFiles};
use crate::report::{PhaseReport, Reporter};
use crate::spec::{DeviceSpec, JobRequest, QuantSpec, TrainSpec};
use crate::tokenizer::TextTokenizer;
use checkpoint::TrainerState;
use params::ParamStore;

/// Default rows per chunk of the packed optimizer step.
pub const DEFAULT_STEP_CHUNK_ROWS: usize = 32;

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
    /// Trained on a GPU: the bytes planned there before allocating (0 on the CPU).
    pub planned_bytes: u64,
    /// Mean wall time of this run's optimizer steps, ms (0 without steps).
    pub step_ms: f64,
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
pub fn load_params(
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

/// Cross-entropy of `logits` `[B, T, V]` against the batch's targets, summed over its
/// assistant tokens and divided by `denom` (the step's assistant tokens, over all its
/// micro-batches, so that accumulated micro-batch gradients add up to the whole step's mean).
fn masked_loss(logits: &Tensor, batch: &dataset::Batch, denom: usize) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let lsm = candle_nn::ops::log_softmax(&logits.reshape((b * t, v))?, D::Minus1)?;
    let picked = lsm.gather(&batch.target.unsqueeze(1)?, 1)?.squeeze(1)?;
    let n = denom.max(1) as f64;
    Ok((picked * &batch.mask)?.sum_all()?.affine(-1.0 / n, 0.0)?)
}

/// The coordinator job a training run belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobIdent {
    /// Job id.
    pub id: u64,
    /// Attempt number (1-based).
    pub attempt: u32,
    /// The job's memory budget in bytes (0: none given); a GPU run checks its plan against it
    /// before allocating.
    pub budget_bytes: u64,
}

/// Run a training job: load, train `spec.steps` steps in all (continuing a checkpoint with
/// `resume`), save the checkpoint. Reports go to `reporter`. The engine is the one the spec
/// asks for (see [`train_on`] for a job the agent placed).
pub fn train(spec: &TrainSpec, reporter: &Reporter) -> Result<TrainOutcome> {
    check_spec(spec)?;
    let engine = Engine::for_job(&spec.device, DeviceSpec::Cpu)?;
    train_checked(&engine, spec, None, reporter)
}

/// [`train`] on the engine chosen for a job that the agent placed on `device`. `job` names the
/// coordinator job: a checkpoint in `out_dir` that an earlier attempt of the same job wrote is
/// continued (a retry after LOST picks up at its last `--save-every` checkpoint).
pub fn train_on(
    spec: &TrainSpec,
    device: DeviceSpec,
    job: Option<JobIdent>,
    reporter: &Reporter,
) -> Result<TrainOutcome> {
    check_spec(spec)?;
    let engine = Engine::for_job(&spec.device, device)?;
    train_checked(&engine, spec, job, reporter)
}

/// Where a run starts: the model to load and the trainer state (step 0, or a checkpoint's).
fn starting_point(
    spec: &TrainSpec,
    job: Option<JobIdent>,
    out_dir: &Path,
    reporter: &Reporter,
) -> Result<(String, TrainerState)> {
    let fresh = || TrainerState {
        step: 0,
        losses: Vec::new(),
        quant: spec.quant,
        base_model: spec.model.clone(),
        dataset: spec.dataset.clone(),
        lr: spec.lr,
        seed: spec.seed,
        batch: spec.batch,
        seq_len: spec.seq_len,
        grad_accum: spec.micro_batches(),
        moments: spec.moments,
        job_id: job.map(|j| j.id),
        optimizer_saved: !spec.save_only_model,
    };
    let Some(st) = checkpoint::read_state(out_dir)? else {
        return Ok((spec.model.clone(), fresh()));
    };
    let own_retry = job.filter(|j| st.job_id == Some(j.id));
    if !spec.resume && own_retry.is_none() {
        return Err(EngineError::TrainCheckpoint {
            path: out_dir.to_path_buf(),
            message: format!(
                "already holds a checkpoint at step {}; pass --resume to continue it, or choose another --out",
                st.step
            ),
        });
    }
    if st.quant != spec.quant {
        return Err(EngineError::TrainCheckpoint {
            path: out_dir.to_path_buf(),
            message: format!(
                "was trained with --quant {} but this job asks for {}; resume with the same mode or write to a new --out",
                st.quant.name(),
                spec.quant.name()
            ),
        });
    }
    match own_retry {
        Some(j) if !spec.resume => reporter.log(format!(
            "attempt {} of job {} continues the checkpoint its earlier attempt left in {} at step {} of {}",
            j.attempt,
            j.id,
            out_dir.display(),
            st.step,
            spec.steps
        )),
        _ => reporter.log(format!(
            "resuming {} at step {} of {}",
            out_dir.display(),
            st.step,
            spec.steps
        )),
    }
    let state = TrainerState {
        grad_accum: spec.micro_batches(),
        moments: spec.moments,
        job_id: job.map(|j| j.id).or(st.job_id),
        ..st
    };
    // The checkpoint's own flag says whether it can restore the moments (the run then sets
    // it to what its saves write).
    if !state.optimizer_saved {
        reporter.log(format!(
            "the checkpoint at step {} holds no optimizer state (saved with --save-only-model): the AdamW moments restart from zero",
            state.step
        ));
    }
    Ok((out_dir.display().to_string(), state))
}

/// Save the checkpoint of `store` at `state.step` and report it.
fn save_checkpoint(
    out_dir: &Path,
    store: &mut ParamStore,
    files: &ModelFiles,
    state: &TrainerState,
    reporter: &Reporter,
) -> Result<()> {
    let t_save = Instant::now();
    let written = checkpoint::save(out_dir, store, files, state)?;
    let b = store.bytes();
    reporter.phase(
        PhaseReport::now("checkpoint_saved", state.step as u32)
            .bytes([
                ("weights", b.weights),
                ("scales", b.scales),
                (
                    "optimizer_state",
                    if state.optimizer_saved {
                        b.optimizer_state
                    } else {
                        0
                    },
                ),
            ])
            .metric("files", written.len() as f64),
    );
    reporter.log(format!(
        "checkpoint at step {} written to {} in {:.1} s{}",
        state.step,
        out_dir.display(),
        t_save.elapsed().as_secs_f64(),
        if state.optimizer_saved {
            ""
        } else {
            " (model only)"
        }
    ));
    Ok(())
}

fn train_checked(
    engine: &Engine,
    spec: &TrainSpec,
    job: Option<JobIdent>,
    reporter: &Reporter,
) -> Result<TrainOutcome> {
    let out_dir = PathBuf::from(&spec.out_dir);
    let (base, mut state) = starting_point(spec, job, &out_dir, reporter)?;
    let files = model_files(&base)?;
    let t_read = Instant::now();
    let (cfg, store) = load_params(engine, &base, spec.quant)?;
    reporter.log(format!(
        "model {base} read in {:.1} s",
        t_read.elapsed().as_secs_f64()
    ));
    let cpu;
    let engine = match engine {
        // Placed on a GPU without asking: the GPU trainer where it takes this model and
        // mode, otherwise the CPU, saying why.
        Engine::Cuda(_) if spec.device.is_empty() => match CudaTrainer::check_supported(&cfg) {
            Ok(()) => engine,
            Err(why) => {
                reporter.log(format!("{why}; training on the CPU"));
                cpu = Engine::cpu();
                &cpu
            }
        },
        _ => engine,
    };
    let mut store = store.with_moments(spec.moments);
    if state.step > 0 && state.optimizer_saved {
        checkpoint::load_optimizer(&out_dir, &mut store, state.step)?;
    }
    state.optimizer_saved = !spec.save_only_model;
    let data = TrainData::load(spec, &files, &cfg, reporter)?;
    let mut planned_bytes = 0;
    let mut gpu = match engine {
        Engine::Cuda(e) => {
            let longest = data.samples.iter().map(|s| s.ids.len()).max().unwrap_or(2);
            let budget = job.map_or(0, |j| j.budget_bytes);
            let (trainer, plan) =
                gpu::start(e, &cfg, &store, spec, longest, budget, state.step, reporter)?;
            planned_bytes = plan.total();
            Some(trainer)
        }
        Engine::Cpu(_) => {
            if spec.recompute {
                reporter.log(
                    "--recompute applies to the GPU trainer; the CPU trainer keeps its activations"
                        .to_string(),
                );
            }
            let b = store.bytes();
            reporter.phase(PhaseReport::now("model_loaded", state.step as u32).bytes([
                ("weights", b.weights),
                ("scales", b.scales),
                ("optimizer_state", b.optimizer_state),
                ("grads", 0),
                ("activations", 0),
            ]));
            None
        }
    };
    let hp = AdamWParams {
        lr: spec.lr as f32,
        ..AdamWParams::default()
    };
    let total = spec.steps as u64;
    let mut losses = Vec::new();
    let mut tokens = 0usize;
    let t_train = Instant::now();
    let mut step_secs = 0.0;
    while state.step < total {
        let step = state.step + 1;
        let t_step = Instant::now();
        let out = match &mut gpu {
            Some(g) => gpu::step(g, &data, spec, hp, step, reporter)?,
            None => cpu_step(engine, &cfg, &mut store, &data, spec, hp, step, reporter)?,
        };
        step_secs += t_step.elapsed().as_secs_f64();
        tokens += out.input_tokens;
        let loss_v = out.loss;
        state.step = step;
        state.losses.push(loss_v);
        losses.push(loss_v);
        reporter.progress(step, total, "steps", format!("loss {loss_v:.4}"));
        tracing::debug!(step, loss = loss_v, grad_norm = out.grad_norm, "train step");
        if spec.save_every > 0 && step % spec.save_every as u64 == 0 && step < total {
            if let Some(g) = &gpu {
                g.download_into(&mut store, state.optimizer_saved)?;
            }
            save_checkpoint(&out_dir, &mut store, &files, &state, reporter)?;
        }
    }
    let secs = t_train.elapsed().as_secs_f64();

    if let Some(g) = &gpu {
        g.download_into(&mut store, state.optimizer_saved)?;
    }
    save_checkpoint(&out_dir, &mut store, &files, &state, reporter)?;
    let step_ms = step_secs * 1e3 / losses.len().max(1) as f64;
    Ok(TrainOutcome {
        losses,
        checkpoint: out_dir,
        step: state.step,
        tokens_per_s: if secs > 0.0 {
            tokens as f64 / secs
        } else {
            0.0
        },
        planned_bytes,
        step_ms,
    })
}

/// A run's training data: the tokenized samples and the padding id.
#[derive(Debug)]
pub struct TrainData {
    /// Every sample of the dataset, cut to the run's sequence length.
    pub samples: Vec<dataset::TrainSample>,
    /// The id padding fills batches with.
    pub pad: u32,
}

impl TrainData {
    /// Read and tokenize `spec.dataset` with the model's tokenizer and chat template; fails
    /// when no sample has an assistant token within the sequence length.
    pub fn load(
        spec: &TrainSpec,
        files: &ModelFiles,
        cfg: &ModelConfig,
        reporter: &Reporter,
    ) -> Result<Self> {
        let (tokenizer, template) = tokenizer_and_template(files)?;
        let stops = stop_tokens(cfg, &tokenizer, &template);
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
        Ok(TrainData { samples, pad })
    }

    /// The micro-batches of 1-based `step` (`spec.grad_accum` of `spec.batch` samples each, in
    /// the run's seeded order) and the step's assistant-token count (every micro-batch's loss
    /// divides by it).
    pub fn step_samples(
        &self,
        spec: &TrainSpec,
        step: u64,
    ) -> (Vec<Vec<&dataset::TrainSample>>, usize) {
        let per_micro = spec.batch as usize;
        let micro = spec.micro_batches() as usize;
        let idx =
            dataset::batch_indices(self.samples.len(), per_micro * micro, step - 1, spec.seed);
        let picked: Vec<&dataset::TrainSample> = idx.iter().map(|&i| &self.samples[i]).collect();
        let denom = picked.iter().map(|s| s.target_tokens()).sum();
        (
            picked.chunks(per_micro).map(|c| c.to_vec()).collect(),
            denom,
        )
    }
}

/// `p` tagged with its micro-batch index when a step has several.
fn tag_micro(p: PhaseReport, micro: usize, mb: usize) -> PhaseReport {
    if micro > 1 {
        p.metric("micro_batch", mb as f64)
    } else {
        p
    }
}

/// Bytes of the gradients summed so far in a step (f32).
fn grad_bytes(grads: &Option<Vec<Vec<f32>>>) -> u64 {
    grads
        .as_ref()
        .map_or(0, |g| g.iter().map(|g| 4 * g.len() as u64).sum())
}

/// What one step did (on either engine).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// The step's loss.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Input tokens forwarded (padding excluded).
    pub input_tokens: usize,
}

/// The gradients of 1-based `step` on the CPU engine, before clipping: forward and backward of
/// each of its micro-batches, summed, in `store`'s parameter order; phases `forward_done` /
/// `backward_done` per micro-batch go to `reporter`. Also the step's loss and input tokens.
pub fn cpu_gradients(
    engine: &Engine,
    cfg: &ModelConfig,
    store: &mut ParamStore,
    data: &TrainData,
    spec: &TrainSpec,
    step: u64,
    reporter: &Reporter,
) -> Result<(Vec<Vec<f32>>, f32, usize)> {
    let micro = spec.micro_batches() as usize;
    let (parts, denom) = data.step_samples(spec, step);
    let model = store.model()?;
    let mut grads: Option<Vec<Vec<f32>>> = None;
    let mut loss_v = 0.0f32;
    let mut tokens = 0usize;
    for (mb, part) in parts.iter().enumerate() {
        let batch = dataset::make_batch(part, data.pad, engine.device())?;
        tokens += batch.input_tokens;
        let logits = engine.forward_train(&model, &batch.input)?;
        let loss = masked_loss(&logits, &batch, denom)?;
        let part_loss = loss.to_scalar::<f32>()?;
        if !part_loss.is_finite() {
            return Err(EngineError::InvalidArgument(format!(
                "the loss is {part_loss} at step {step}; training diverged — lower the learning rate"
            )));
        }
        loss_v += part_loss;
        let (bsz, t) = (part.len(), batch.seq);
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
        let held = grad_bytes(&grads);
        let fwd = PhaseReport::now("forward_done", step as u32)
            .bytes(common)
            .bytes([("grads", held), ("activations", act)])
            .metric("loss", part_loss as f64)
            .metric("target_tokens", batch.target_tokens as f64);
        reporter.phase(tag_micro(fwd, micro, mb));

        let g = store.gradients(&loss.backward()?)?;
        drop(logits);
        drop(loss);
        match &mut grads {
            None => grads = Some(g),
            Some(sum) => {
                for (s, g) in sum.iter_mut().zip(g) {
                    s.iter_mut().zip(g).for_each(|(a, b)| *a += b);
                }
            }
        }
        let bwd = PhaseReport::now("backward_done", step as u32)
            .bytes(common)
            .bytes([("grads", grad_bytes(&grads)), ("activations", 0)]);
        reporter.phase(tag_micro(bwd, micro, mb));
    }
    drop(model);
    let grads = grads.expect("a step has at least one micro-batch");
    Ok((grads, loss_v, tokens))
}

/// One optimizer step on the CPU engine: [`cpu_gradients`], clipping, AdamW; phases
/// `forward_done` / `backward_done` per micro-batch and `optimizer_done` go to `reporter`.
#[allow(clippy::too_many_arguments)]
pub fn cpu_step(
    engine: &Engine,
    cfg: &ModelConfig,
    store: &mut ParamStore,
    data: &TrainData,
    spec: &TrainSpec,
    hp: AdamWParams,
    step: u64,
    reporter: &Reporter,
) -> Result<StepOutcome> {
    let chunk_rows = match spec.step_chunk_rows {
        0 => DEFAULT_STEP_CHUNK_ROWS,
        n => n as usize,
    };
    let (grads, loss_v, tokens) = cpu_gradients(engine, cfg, store, data, spec, step, reporter)?;
    let clip = spec.clip_grad() as f32;
    let st = store.adamw_step(grads, hp, step, chunk_rows, spec.seed, clip)?;
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
    Ok(StepOutcome {
        loss: loss_v,
        grad_norm: st.grad_norm,
        input_tokens: tokens,
    })
}

/// The train job: [`train_on`] the agent's device, with its outcome as the job's output.
pub fn run_job(
    request: &JobRequest,
    spec: &TrainSpec,
    reporter: &Reporter,
) -> Result<crate::report::JobOutput> {
    let job = JobIdent {
        id: request.job_id,
        attempt: request.attempt,
        budget_bytes: request.budget_bytes,
    };
    let out = train_on(spec, request.device, Some(job), reporter)?;
    Ok(crate::report::JobOutput::Train {
        loss: out.losses,
        checkpoint: out.checkpoint.display().to_string(),
        tokens_per_s: out.tokens_per_s,
        planned_bytes: out.planned_bytes,
        step_ms: out.step_ms,
    })
}
