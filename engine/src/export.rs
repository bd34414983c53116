//! The export job: a checkpoint (a Kiln training checkpoint, any Hugging Face model
//! directory, or `tiny`) → an output directory in one of three formats, each with
//! `config.json` and the tokenizer files:
//!
//! - `safetensors`: every tensor bf16, Hugging Face names and layout (what `transformers`'
//!   `from_pretrained` loads), `torch_dtype: bfloat16`;
//! - `nvfp4-modelopt` / `nvfp4-compressed-tensors`: linear weights NVFP4 (packed U8 codes,
//!   F8_E4M3 block scales, an F32 tensor scale — ModelOpt-exact quantization of float weights,
//!   packed weights copied as they are); every other tensor keeps the source's float dtype.
//!
//! Writing goes through [`crate::model::save_model_dir`], which checks each tensor's dtype and
//! shape against what `config.json` implies before anything is written. Afterwards the export
//! is verified by loading it back: every tensor's dtype, and every parameter against the
//! source (bit-exact for NVFP4 codes and scales and for f32; within bf16 rounding for bf16).

use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;

use crate::chat_model::{model_files, TINY_MODEL};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::model::layout::EMBED_TOKENS;
use crate::model::{
    save_model_dir, Checkpoint, DenseDtype, LinearFormat, LinearWeight, Model, ModelConfig,
    ParamRef, SaveFormat, SaveOptions,
};
use crate::report::{JobOutput, PhaseReport, Reporter};
use crate::spec::{ExportFormat, ExportSpec};

/// Largest shard written (Hugging Face's default is 5 GB).
pub const MAX_SHARD_BYTES: u64 = 4 << 30;

/// What an export did.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    /// Files written, relative to the output directory, sorted.
    pub files: Vec<String>,
    /// Tensors written.
    pub tensor_count: usize,
    /// Loaded back and matched the source.
    pub verified: bool,
    /// dtype of the tensors that are not NVFP4.
    pub dense_dtype: DenseDtype,
    /// Largest logit difference between the source and the reloaded export on a probe prompt.
    pub probe_max_logit_diff: f32,
}

/// The source with linears in `format`, and the float dtype of its dense tensors: `tiny` is
/// f32; a directory's is that of its embedding (bf16 stays bf16; f32 and f16 are written as
/// f32, which holds them exactly).
fn load(engine: &Engine, checkpoint: &str, format: LinearFormat) -> Result<(Model, DenseDtype)> {
    if checkpoint == TINY_MODEL {
        return Ok((
            crate::tiny::model(format, engine.device())?,
            DenseDtype::F32,
        ));
    }
    let dir = Path::new(checkpoint);
    if !dir.is_dir() {
        return Err(EngineError::config(
            dir,
            "not a directory; export takes a checkpoint or model directory (or `tiny`)",
        ));
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let ck = Checkpoint::open(dir)?;
    let dense = match ck.get(EMBED_TOKENS)?.dtype {
        Dtype::BF16 => DenseDtype::Bf16,
        _ => DenseDtype::F32,
    };
    let model = Model::from_checkpoint(&cfg, &ck, &engine.load_options(format))?;
    Ok((model, dense))
}

/// Export `checkpoint` to `out_dir` in `format`, then verify it by loading it back.
pub fn export(
    checkpoint: &str,
    format: ExportFormat,
    out_dir: &Path,
    reporter: &Reporter,
) -> Result<ExportReport> {
    if out_dir.as_os_str().is_empty() {
        return Err(EngineError::InvalidArgument(
            "out_dir is empty; pass the directory to write (--out)".into(),
        ));
    }
    if checkpoint != TINY_MODEL
        && Path::new(checkpoint).canonicalize().ok() == out_dir.canonicalize().ok()
    {
        return Err(EngineError::InvalidArgument(format!(
            "the output directory {} is the checkpoint itself; choose another --out",
            out_dir.display()
        )));
    }
    if let Ok(rd) = std::fs::read_dir(out_dir) {
        if rd
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        {
            return Err(EngineError::InvalidArgument(format!(
                "{} already holds .safetensors files; export into an empty or new directory",
                out_dir.display()
            )));
        }
    }
    // `None`: the dense tensors keep the source's dtype.
    let (save_format, load_format, dense_dtype) = match format {
        ExportFormat::Safetensors => (
            SaveFormat::Dense,
            LinearFormat::Dense,
            Some(DenseDtype::Bf16),
        ),
        ExportFormat::Nvfp4ModelOpt => (SaveFormat::Nvfp4ModelOpt, LinearFormat::Nvfp4, None),
        ExportFormat::Nvfp4CompressedTensors => (
            SaveFormat::Nvfp4CompressedTensors,
            LinearFormat::Nvfp4,
            None,
        ),
    };
    let engine = Engine::cpu();
    let (source, source_dtype) = load(&engine, checkpoint, load_format)?;
    let dense_dtype = dense_dtype.unwrap_or(source_dtype);
    let files = model_files(checkpoint)?;
    let (w, s) = source.weight_bytes();
    reporter.phase(PhaseReport::now("model_loaded", 0).bytes([("weights", w), ("scales", s)]));

    let mut written = save_model_dir(
        &source,
        &files.tokenizer_json,
        &files.tokenizer_config_json,
        out_dir,
        &SaveOptions {
            format: save_format,
            dense_dtype,
            max_shard_bytes: Some(MAX_SHARD_BYTES),
        },
    )?;
    written.extend(files.write_extra(out_dir)?);
    let bytes: u64 = written
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    reporter.phase(
        PhaseReport::now("export_written", 0)
            .bytes([("weights", w), ("scales", s)])
            .metric("files", written.len() as f64)
            .metric("bytes_written", bytes as f64),
    );

    let (tensor_count, probe_max_logit_diff) = verify(
        &engine,
        out_dir,
        &source,
        save_format,
        load_format,
        dense_dtype,
    )?;
    reporter.log(format!(
        "export verified: {tensor_count} tensors reloaded from {} match the source (probe max |Δlogit| {probe_max_logit_diff:.3e})",
        out_dir.display()
    ));
    let mut names: Vec<String> = written
        .iter()
        .filter_map(|p| p.strip_prefix(out_dir).ok())
        .map(|p| p.display().to_string())
        .collect();
    names.sort();
    names.dedup();
    Ok(ExportReport {
        files: names,
        tensor_count,
        verified: true,
        dense_dtype,
        probe_max_logit_diff,
    })
}

/// Load the export back and compare it with `source`; returns the tensor count and the
/// probe logit difference.
fn verify(
    engine: &Engine,
    out_dir: &Path,
    source: &Model,
    save_format: SaveFormat,
    load_format: LinearFormat,
    dense_dtype: DenseDtype,
) -> Result<(usize, f32)> {
    let ck = Checkpoint::open(out_dir)?;
    let names = ck.names();
    let dense_st = match dense_dtype {
        DenseDtype::F32 => Dtype::F32,
        DenseDtype::Bf16 => Dtype::BF16,
    };
    let layout = source.layout();
    for name in &names {
        let t = ck.get(name)?;
        // A linear's tensors: NVFP4 in the requested layout where the file packed the linear,
        // dense otherwise.
        let want = name
            .rsplit_once('.')
            .and_then(|(prefix, _)| layout.linear(prefix))
            .and_then(|l| {
                let packed = l.stored_format(|n| ck.contains(n)).is_some();
                l.stored_tensors(save_format.nvfp4().filter(|_| packed))
                    .into_iter()
                    .find(|s| s.name == *name)
            })
            .and_then(|s| s.role.dtype())
            .unwrap_or(dense_st);
        if t.dtype != want {
            return Err(EngineError::ExportMismatch {
                name: name.to_string(),
                message: format!("written as {:?}, expected {want:?}", t.dtype),
            });
        }
    }
    let back = engine.load_model(out_dir, load_format)?;
    if back.config() != source.config() {
        return Err(EngineError::ExportMismatch {
            name: "config.json".into(),
            message: "the written config differs from the source's".into(),
        });
    }
    let rel_tol = match dense_dtype {
        DenseDtype::F32 => 0.0,
        // bf16 keeps 8 significant bits: round-to-nearest is within 2^-9 relative.
        DenseDtype::Bf16 => 1.0 / 256.0,
    };
    for ((spec, a), (_, b)) in source.parameters().into_iter().zip(back.parameters()) {
        compare_param(engine.device(), spec.name(), a, b, rel_tol)?;
    }
    let probe: Vec<u32> = (0..8u32)
        .map(|i| 3 + (i * 37 + 5) % (source.config().vocab_size as u32 - 3))
        .collect();
    let la = engine.forward_last(source, &probe, &mut engine.new_cache(source))?;
    let lb = engine.forward_last(&back, &probe, &mut engine.new_cache(&back))?;
    let diff = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    if !diff.is_finite() {
        return Err(EngineError::ExportMismatch {
            name: "<probe logits>".into(),
            message: format!("the reloaded model's logits are not finite ({diff})"),
        });
    }
    Ok((names.len(), diff))
}

fn compare_values(name: &str, a: &[f32], b: &[f32], rel_tol: f32) -> Result<()> {
    if a.len() != b.len() {
        return Err(EngineError::ExportMismatch {
            name: name.to_string(),
            message: format!("{} elements written, {} in the source", b.len(), a.len()),
        });
    }
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let ok = if rel_tol == 0.0 {
            x.to_bits() == y.to_bits() || x == y
        } else {
            (x - y).abs() <= rel_tol * x.abs()
        };
        if !ok {
            return Err(EngineError::ExportMismatch {
                name: name.to_string(),
                message: format!("element {i} reads back as {y}, the source has {x}"),
            });
        }
    }
    Ok(())
}

fn compare_param(
    device: &candle_core::Device,
    name: &str,
    a: ParamRef<'_>,
    b: ParamRef<'_>,
    rel_tol: f32,
) -> Result<()> {
    let vals = |t: &candle_core::Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
    match (a, b) {
        (ParamRef::Tensor(x), ParamRef::Tensor(y)) => {
            compare_values(name, &vals(x)?, &vals(y)?, rel_tol)
        }
        (ParamRef::Linear(x), ParamRef::Linear(y)) => {
            match (x.weight(), y.weight()) {
                (LinearWeight::Nvfp4(p), LinearWeight::Nvfp4(q)) => {
                    // compressed-tensors stores 1 / tensor_scale, whose reciprocal may come
                    // back one ulp off; ModelOpt stores it as is (exact).
                    let ts_ok =
                        (p.tensor_scale - q.tensor_scale).abs() <= p.tensor_scale * f32::EPSILON;
                    if p.packed != q.packed || p.scales != q.scales || !ts_ok {
                        return Err(EngineError::ExportMismatch {
                            name: format!("{name}.weight"),
                            message: "the NVFP4 codes or scales read back differ from the source's"
                                .into(),
                        });
                    }
                }
                _ => compare_values(
                    &format!("{name}.weight"),
                    &vals(&x.dense_weight(device)?)?,
                    &vals(&y.dense_weight(device)?)?,
                    rel_tol,
                )?,
            }
            match (x.bias(), y.bias()) {
                (Some(p), Some(q)) => {
                    compare_values(&format!("{name}.bias"), &vals(p)?, &vals(q)?, rel_tol)
                }
                (None, None) => Ok(()),
                _ => Err(EngineError::ExportMismatch {
                    name: format!("{name}.bias"),
                    message: "present on one side only".into(),
                }),
            }
        }
        _ => Err(EngineError::ExportMismatch {
            name: name.to_string(),
            message: "a linear layer on one side, a plain tensor on the other".into(),
        }),
    }
}

/// The export job.
pub fn run_job(spec: &ExportSpec, reporter: &Reporter) -> Result<JobOutput> {
    let out = PathBuf::from(&spec.out_dir);
    let r = export(&spec.checkpoint, spec.format, &out, reporter)?;
    Ok(JobOutput::Export {
        files: r.files,
        tensor_count: r.tensor_count as u32,
        verified: r.verified,
    })
}
