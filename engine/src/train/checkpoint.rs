//! Training checkpoints. A checkpoint directory is a Hugging Face model directory —
//! `config.json`, tokenizer files, `model.safetensors` (f32 master weights for `nvfp4-ste` /
//! `none`; the packed ModelOpt NVFP4 layout plus f32 dense tensors for `nvfp4-full`) — so it
//! is a valid `--model` for generate, train and export, plus the optimizer state
//! (`optimizer/state.safetensors`: `{param}.exp_avg` / `{param}.exp_avg_sq`, f32 or bf16 as the
//! run's `--moments` — in a
//! subdirectory so that loaders reading every `*.safetensors` of the model directory never see
//! it; left out with `--save-only-model`) and `trainer_state.json` (step, losses, settings) for
//! `--resume`.
//!
//! Saving writes every file under a temporary name and renames it into place, the trainer
//! state last; the optimizer file's metadata repeats the step, so a checkpoint whose save was
//! interrupted between renames is detected at resume instead of silently mixing two steps.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use kiln_kernels::checkpoint::{read_safetensors_file, write_safetensors_file};
use serde::{Deserialize, Serialize};

use super::moments::MomentVec;
use super::params::ParamStore;
use crate::error::{EngineError, Result};
use crate::model::{save_model_dir, DenseDtype, ModelFiles, SaveFormat, SaveOptions};
use crate::spec::{MomentsSpec, QuantSpec};

/// The trainer state file.
pub const TRAINER_STATE: &str = "trainer_state.json";
/// The optimizer state file, relative to the checkpoint directory.
pub const OPTIMIZER_STATE: &str = "optimizer/state.safetensors";

/// What `trainer_state.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// Loss of every step so far (index i = step i+1).
    pub losses: Vec<f32>,
    /// The training mode.
    pub quant: QuantSpec,
    /// What the run started from (`tiny` or a directory).
    pub base_model: String,
    /// The dataset.
    pub dataset: String,
    /// Learning rate.
    pub lr: f64,
    /// Seed.
    pub seed: u64,
    /// Samples per step.
    pub batch: u32,
    /// Tokens per sample.
    pub seq_len: u32,
    /// Micro-batches per step (absent in older checkpoints: 1).
    #[serde(default = "one")]
    pub grad_accum: u32,
    /// The moments' element type.
    #[serde(default)]
    pub moments: MomentsSpec,
    /// The coordinator job whose attempt wrote this checkpoint (`None` outside a job). A retry
    /// of that job continues from here without `--resume`.
    #[serde(default)]
    pub job_id: Option<u64>,
    /// Whether the checkpoint holds the AdamW moments (`false`: written with
    /// `--save-only-model`; absent in older checkpoints, which always hold them).
    #[serde(default = "yes")]
    pub optimizer_saved: bool,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

fn ckpt_err(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::TrainCheckpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Read `trainer_state.json` of `dir`; `None` when `dir` holds no checkpoint.
pub fn read_state(dir: &Path) -> Result<Option<TrainerState>> {
    let p = dir.join(TRAINER_STATE);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(EngineError::io("reading", &p, e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        ckpt_err(
            dir,
            format!("{TRAINER_STATE} is not valid ({e}); remove the directory to start over"),
        )
    })
}

/// Write the checkpoint of `store` at `state.step` into `dir`; returns the files written.
pub fn save(
    dir: &Path,
    store: &mut ParamStore,
    files: &ModelFiles,
    state: &TrainerState,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io("creating", dir, e))?;
    let staging = dir.join(format!(".partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let format = match store.quant() {
        QuantSpec::Nvfp4Full => SaveFormat::Nvfp4ModelOpt,
        QuantSpec::Nvfp4Ste | QuantSpec::None => SaveFormat::Dense,
    };
    let model = store.export_model()?;
    let mut staged = save_model_dir(
        &model,
        &files.tokenizer_json,
        &files.tokenizer_config_json,
        &staging,
        &SaveOptions {
            format,
            dense_dtype: DenseDtype::F32,
            max_shard_bytes: None,
        },
    )?;
    staged.extend(files.write_extra(&staging)?);
    if state.optimizer_saved {
        staged.push(write_optimizer(&staging, store, state)?);
    }
    let state_path = staging.join(TRAINER_STATE);
    std::fs::write(
        &state_path,
        serde_json::to_string_pretty(state).expect("serializable"),
    )
    .map_err(|e| EngineError::io("writing", &state_path, e))?;

    // Rename into place, the trainer state last (it marks the checkpoint complete).
    staged.push(state_path);
    let mut written = Vec::new();
    for src in staged {
        let name = src.file_name().expect("files have names").to_owned();
        let dst = dir.join(&name);
        if src.is_dir() && dst.is_dir() {
            std::fs::remove_dir_all(&dst).map_err(|e| EngineError::io("replacing", &dst, e))?;
        }
        std::fs::rename(&src, &dst).map_err(|e| EngineError::io("renaming into", &dst, e))?;
        written.push(dst);
    }
    let _ = std::fs::remove_dir_all(&staging);
    if !state.optimizer_saved {
        // Moments an earlier save of this directory left belong to another step.
        let old = dir.join(OPTIMIZER_STATE);
        let old_dir = old.parent().expect("has a parent");
        if old_dir.is_dir() {
            std::fs::remove_dir_all(old_dir)
                .map_err(|e| EngineError::io("removing", old_dir, e))?;
        }
    }
    Ok(written)
}

/// Write the AdamW moments of `store` under `staging`; returns the optimizer directory.
fn write_optimizer(staging: &Path, store: &ParamStore, state: &TrainerState) -> Result<PathBuf> {
    let mut tensors = BTreeMap::new();
    for p in store.params() {
        tensors.insert(
            format!("{}.exp_avg", p.name),
            p.exp_avg.to_tensor(p.shape.clone()),
        );
        tensors.insert(
            format!("{}.exp_avg_sq", p.name),
            p.exp_avg_sq.to_tensor(p.shape.clone()),
        );
    }
    let meta = HashMap::from([
        ("step".to_string(), state.step.to_string()),
        ("quant".to_string(), state.quant.name().to_string()),
    ]);
    let opt_path = staging.join(OPTIMIZER_STATE);
    let opt_dir = opt_path.parent().expect("has a parent").to_path_buf();
    std::fs::create_dir_all(&opt_dir).map_err(|e| EngineError::io("creating", &opt_dir, e))?;
    write_safetensors_file(&opt_path, &tensors, Some(meta))?;
    Ok(opt_dir)
}

/// Restore the optimizer moments of `store` from `dir`, checking that they belong to `step`.
pub fn load_optimizer(dir: &Path, store: &mut ParamStore, step: u64) -> Result<()> {
    let path = dir.join(OPTIMIZER_STATE);
    let (tensors, meta) = read_safetensors_file(&path)?;
    let saved_step = meta
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse::<u64>().ok());
    if saved_step != Some(step) {
        return Err(ckpt_err(
            dir,
            format!(
                "{OPTIMIZER_STATE} is from step {saved_step:?} but {TRAINER_STATE} says step {step} (an interrupted save?); remove the directory to start over"
            ),
        ));
    }
    let names: Vec<(String, Vec<usize>)> = store
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();
    for (name, shape) in names {
        let get = |suffix: &str| -> Result<Vec<f32>> {
            let key = format!("{name}.{suffix}");
            let t = tensors
                .get(&key)
                .ok_or_else(|| ckpt_err(dir, format!("{OPTIMIZER_STATE} has no tensor {key}")))?;
            if t.shape != shape {
                return Err(EngineError::ShapeMismatch {
                    name: key,
                    expected: shape.clone(),
                    got: t.shape.clone(),
                });
            }
            t.to_f32().ok_or_else(|| {
                ckpt_err(dir, format!("{key} is {:?}, expected F32 or BF16", t.dtype))
            })
        };
        let (m, v) = (get("exp_avg")?, get("exp_avg_sq")?);
        // Stored in this run's moment type (a run may resume with another --moments).
        let kind = store.moments();
        let p = store.param_mut(&name).expect("listed above");
        p.exp_avg = MomentVec::from_f32(m, kind);
        p.exp_avg_sq = MomentVec::from_f32(v, kind);
    }
    Ok(())
}
