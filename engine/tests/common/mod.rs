//! Helpers shared by the engine's integration tests: small random models of each
//! architecture, writing them as Hugging Face directories, logit comparisons, and the phase
//! names a job reported.

#![allow(dead_code)]

use candle_core::Device;
use kiln_engine::model::{
    save_model_dir, Architecture, DenseDtype, LinearFormat, Logits, Model, ModelConfig,
    RandomWeights, SaveFormat, SaveOptions,
};

/// A small config of `arch` (vocab of the bundled tokenizer).
pub fn small_config(arch: Architecture) -> ModelConfig {
    let mut c = kiln_engine::tiny::config().unwrap();
    c.architecture = arch;
    c.num_hidden_layers = 2;
    c.attention_bias = arch == Architecture::Qwen2;
    c.tie_word_embeddings = arch != Architecture::Llama;
    c.rope_theta = if arch == Architecture::Llama {
        500_000.0
    } else {
        10_000.0
    };
    c
}

/// A dense f32 Hugging Face directory, one file.
pub const DENSE_F32: SaveOptions = SaveOptions {
    format: SaveFormat::Dense,
    dense_dtype: DenseDtype::F32,
    max_shard_bytes: None,
};

/// A seeded random model of `cfg`.
pub fn random_model(cfg: &ModelConfig, format: LinearFormat) -> Model {
    let mut src = RandomWeights::new(11, format, Device::Cpu);
    Model::build(cfg, &mut src, &Device::Cpu).unwrap()
}

/// Write `model` with the bundled tokenizer files into `dir`.
pub fn save(model: &Model, dir: &std::path::Path, opts: &SaveOptions) {
    save_model_dir(
        model,
        kiln_engine::tiny::TOKENIZER_JSON,
        kiln_engine::tiny::TOKENIZER_CONFIG_JSON,
        dir,
        opts,
    )
    .unwrap();
}

/// All-position logits of `ids` as nested vectors.
pub fn logits(model: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    model
        .forward(ids, &mut cache, Logits::All)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// Largest absolute difference between two logit matrices of equal shape.
pub fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// A fixed prompt of ids from the bundled tokenizer's range.
pub fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 3 + (i * 37 + 5) % 500).collect()
}

/// The phase names among a job's reports, in order.
pub fn phase_names(reports: &[kiln_engine::report::Report]) -> Vec<String> {
    reports
        .iter()
        .filter_map(|r| match r {
            kiln_engine::report::Report::Phase(p) => Some(p.phase.clone()),
            _ => None,
        })
        .collect()
}
