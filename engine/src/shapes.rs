//! Model shapes known by name — the tiny model and the Qwen2.5 / Qwen3 shapes the benchmarks
//! use — and writing a random-weight model of one as a Hugging Face directory
//! ([`write_random_model`], `kiln random-model`): a model to rehearse memory budgets, the guard
//! and the benchmarks with, without downloading one. It carries the tiny model's tokenizer and
//! chat template (its ids are a prefix of any of these vocabularies), so train and generate
//! jobs take it as `--model DIR` like any other checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{EngineError, Result};
use crate::model::{
    save_model_dir, DenseDtype, LinearFormat, Model, ModelConfig, ParamSpec, RandomWeights,
    SaveFormat, SaveOptions,
};

/// The shapes known by name.
pub const SHAPES: &[&str] = &[
    "tiny",
    "qwen2.5-0.5b",
    "qwen2.5-7b",
    "qwen2.5-14b",
    "qwen3-8b",
];

/// The config of shape `name` (one of [`SHAPES`]).
pub fn shape(name: &str) -> Result<ModelConfig> {
    Ok(match name {
        "tiny" => crate::tiny::config()?,
        "qwen2.5-0.5b" => ModelConfig::qwen2_5_0_5b(),
        "qwen2.5-7b" => ModelConfig::qwen2_5_7b(),
        "qwen2.5-14b" => ModelConfig::qwen2_5_14b(),
        "qwen3-8b" => ModelConfig::qwen3_8b(),
        other => {
            return Err(EngineError::InvalidArgument(format!(
                "no model shape {other:?}; choose from {}",
                SHAPES.join(", ")
            )))
        }
    })
}

/// What [`write_random_model`] wrote.
#[derive(Debug, Clone)]
pub struct RandomModelSummary {
    /// Parameters of the model.
    pub params: u64,
    /// Files written.
    pub files: Vec<PathBuf>,
    /// Bytes written.
    pub bytes: u64,
    /// Seconds spent drawing (and quantizing) the weights.
    pub build_s: f64,
    /// Seconds spent writing them.
    pub write_s: f64,
}

/// Write a model of shape `name` with weights drawn from `seed` into `dir`: linears in
/// `format` (NVFP4 layouts are quantized on the host), everything else bf16, shards of at most
/// 4 GiB, the tiny tokenizer's files. Refuses a `dir` that already holds a `config.json`.
pub fn write_random_model(
    name: &str,
    dir: &Path,
    format: SaveFormat,
    seed: u64,
) -> Result<RandomModelSummary> {
    let mut cfg = shape(name)?;
    if dir.join("config.json").exists() {
        return Err(EngineError::InvalidArgument(format!(
            "{} already holds a model (config.json); choose an empty --out",
            dir.display()
        )));
    }
    let tok = crate::tiny::tokenizer()?;
    // The tiny tokenizer's end-of-turn token ends generation in this model too.
    cfg.eos_token_ids = tok.token_id("<|im_end|>").into_iter().collect();
    let layout = crate::model::ModelLayout::new(&cfg)?;
    let params: u64 = layout
        .params()
        .iter()
        .map(|(_, p)| match p {
            ParamSpec::Tensor(t) => t.shape.iter().product::<usize>() as u64,
            ParamSpec::Linear(l) => {
                (l.out_features * l.in_features) as u64
                    + l.bias_tensor()
                        .map_or(0, |b| b.shape.iter().product::<usize>() as u64)
            }
        })
        .sum();
    let t = Instant::now();
    let linear = match format {
        SaveFormat::Dense => LinearFormat::Dense,
        _ => LinearFormat::Nvfp4,
    };
    let device = candle_core::Device::Cpu;
    let mut src = RandomWeights::new(seed, linear, device.clone());
    let model = Model::build(&cfg, &mut src, &device)?;
    let build_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let files = crate::tiny::files();
    let mut written = save_model_dir(
        &model,
        &files.tokenizer_json,
        &files.tokenizer_config_json,
        dir,
        &SaveOptions {
            format,
            dense_dtype: DenseDtype::Bf16,
            max_shard_bytes: Some(4 << 30),
        },
    )?;
    written.extend(files.write_extra(dir)?);
    let bytes = written
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    Ok(RandomModelSummary {
        params,
        files: written,
        bytes,
        build_s,
        write_s: t.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Checkpoint;

    #[test]
    fn every_shape_has_a_config_and_an_unknown_one_lists_them() {
        for s in SHAPES {
            shape(s).unwrap().validate().unwrap();
        }
        let e = shape("gpt2").unwrap_err().to_string();
        assert!(e.contains("qwen3-8b"), "{e}");
    }

    #[test]
    fn a_random_tiny_model_loads_back_and_a_second_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m");
        let s = write_random_model("tiny", &out, SaveFormat::Nvfp4ModelOpt, 3).unwrap();
        assert!(s.params > 0 && s.bytes > 0);
        let ck = Checkpoint::open(&out).unwrap();
        assert!(ck
            .names()
            .iter()
            .any(|n| n.ends_with("q_proj.weight_scale")));
        // A model like any other: it loads and generates.
        let cm = crate::chat_model::ChatModel::load(
            out.to_str().unwrap(),
            &crate::model::LoadOptions::default(),
        )
        .unwrap();
        let opts = crate::generate::GenerateOptions {
            max_tokens: 4,
            ..Default::default()
        };
        let g = cm
            .generate_chat(
                &[crate::chat::ChatMessage::user("hi")],
                &opts,
                &mut |_, _| std::ops::ControlFlow::Continue(()),
            )
            .unwrap();
        assert!(!g.generation.tokens.is_empty());
        let e = write_random_model("tiny", &out, SaveFormat::Dense, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("choose an empty --out"), "{e}");
    }
}
