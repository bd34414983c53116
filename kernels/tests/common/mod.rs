//! Shared test fixtures: a tiny Hugging Face checkpoint written with the crate's own writer.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use kiln_kernels::checkpoint::{write_safetensors_file, TensorData};
use safetensors::Dtype;

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(n: usize, salt: u64) -> Vec<f32> {
    let mut z = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn tensor(dtype: Dtype, shape: &[usize], salt: u64) -> TensorData {
    let n: usize = shape.iter().product();
    let v = values(n, salt);
    let data: Vec<u8> = match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        _ => panic!("fixture dtype"),
    };
    TensorData::new(dtype, shape.to_vec(), data).unwrap()
}

/// The tensors of a one-layer Qwen2-like model (names as in HF checkpoints).
pub fn tiny_model_tensors() -> BTreeMap<String, TensorData> {
    let mut m = BTreeMap::new();
    let mut add = |n: &str, t| {
        m.insert(n.to_string(), t);
    };
    add(
        "model.embed_tokens.weight",
        tensor(Dtype::BF16, &[64, 32], 1),
    );
    add(
        "model.layers.0.input_layernorm.weight",
        tensor(Dtype::F32, &[32], 2),
    );
    add(
        "model.layers.0.self_attn.q_proj.weight",
        tensor(Dtype::BF16, &[32, 32], 3),
    );
    add(
        "model.layers.0.self_attn.q_proj.bias",
        tensor(Dtype::BF16, &[32], 4),
    );
    add(
        "model.layers.0.mlp.down_proj.weight",
        tensor(Dtype::F16, &[32, 48], 5),
    );
    add(
        "model.layers.0.mlp.up_proj.weight",
        tensor(Dtype::F32, &[48, 32], 6),
    );
    add(
        "model.layers.0.odd_proj.weight",
        tensor(Dtype::F32, &[8, 20], 7),
    );
    add("model.norm.weight", tensor(Dtype::BF16, &[32], 8));
    add("lm_head.weight", tensor(Dtype::BF16, &[64, 32], 9));
    m
}

/// Write the tiny model into `dir` as one file or as two shards with an index.
pub fn write_tiny_model(dir: &Path, sharded: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let all = tiny_model_tensors();
    if sharded {
        let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) = all
            .into_iter()
            .partition(|(n, _)| n.starts_with("model.layers"));
        write_safetensors_file(&dir.join("model-00001-of-00002.safetensors"), &a, None).unwrap();
        write_safetensors_file(&dir.join("model-00002-of-00002.safetensors"), &b, None).unwrap();
        let mut wm = serde_json::Map::new();
        for n in a.keys() {
            wm.insert(n.clone(), "model-00001-of-00002.safetensors".into());
        }
        for n in b.keys() {
            wm.insert(n.clone(), "model-00002-of-00002.safetensors".into());
        }
        let idx = serde_json::json!({ "metadata": {}, "weight_map": wm });
        std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).unwrap();
    } else {
        write_safetensors_file(&dir.join("model.safetensors"), &all, None).unwrap();
    }
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "qwen2", "hidden_size": 32}"#,
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), r#"{"version": "1.0"}"#).unwrap();
}
