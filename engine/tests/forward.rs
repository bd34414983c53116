//! The forward pass itself: the training ops (differentiable, no cache) agree with the
//! inference kernels, a batch equals its sequences run one by one, and a chunked prefill
//! through the cache equals a single prefill.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use kiln_engine::model::{Architecture, LinearFormat, Logits, Pass};

#[test]
fn training_pass_matches_inference_pass() {
    for arch in [
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Llama,
    ] {
        let m = random_model(&small_config(arch), LinearFormat::Dense);
        let ids = prompt(10);
        let t = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
        let train = m
            .forward_batch(&t, None, Logits::All, Pass::Training)
            .unwrap();
        let train = train.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let d = max_diff(&train, &logits(&m, &ids));
        assert!(
            d < 1e-4,
            "{arch:?}: training vs inference ops differ by {d}"
        );
    }
}

#[test]
fn a_batch_equals_its_rows() {
    let m = random_model(&small_config(Architecture::Qwen3), LinearFormat::Nvfp4);
    let a = prompt(8);
    let b: Vec<u32> = prompt(16)[8..].to_vec();
    let both: Vec<u32> = a.iter().chain(&b).copied().collect();
    let t = Tensor::from_vec(both, (2, 8), &Device::Cpu).unwrap();
    let out = m
        .forward_batch(&t, None, Logits::All, Pass::Inference)
        .unwrap();
    let out = out.to_vec3::<f32>().unwrap();
    assert!(max_diff(&out[0], &logits(&m, &a)) < 1e-4);
    assert!(max_diff(&out[1], &logits(&m, &b)) < 1e-4);
}

#[test]
fn chunked_prefill_through_the_cache_equals_one_prefill() {
    let m = random_model(&small_config(Architecture::Llama), LinearFormat::Nvfp4);
    let ids = prompt(20);
    let whole = logits(&m, &ids);
    let mut cache = m.new_cache();
    let mut rows = Vec::new();
    for chunk in ids.chunks(7) {
        let l = m.forward(chunk, &mut cache, Logits::All).unwrap();
        rows.extend(l.to_vec2::<f32>().unwrap());
    }
    assert_eq!(cache.len(), 20);
    assert!(max_diff(&rows, &whole) < 1e-4);
    // The cache holds 2 (k, v) × layers × kv_heads × 20 × head_dim f32 values.
    let c = m.config();
    let expect = 2 * c.num_hidden_layers * c.num_key_value_heads * 20 * c.head_dim * 4;
    assert_eq!(cache.bytes(), expect as u64);
}

#[test]
fn out_of_vocabulary_ids_are_rejected() {
    let m = random_model(&small_config(Architecture::Qwen2), LinearFormat::Nvfp4);
    let v = m.config().vocab_size as u32;
    let err = m
        .forward(&[1, v], &mut m.new_cache(), Logits::Last)
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}
