//! Loading Hugging Face directories: dense and NVFP4 (ModelOpt, compressed-tensors) layouts,
//! sharded checkpoints, all three architectures, and the typed errors for broken inputs.

mod common;

use common::*;
use kiln_engine::chat_model::ChatModel;
use kiln_engine::model::{
    Architecture, DenseDtype, EngineError, LinearFormat, LoadOptions, Model, SaveFormat,
    SaveOptions,
};

fn load(dir: &std::path::Path, format: LinearFormat) -> Result<Model, EngineError> {
    Model::load(
        dir,
        &LoadOptions {
            format,
            ..Default::default()
        },
    )
}

#[test]
fn every_architecture_round_trips_through_a_directory() {
    for arch in [
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Llama,
    ] {
        let cfg = small_config(arch);
        let m = random_model(&cfg, LinearFormat::Dense);
        let dir = tempfile::tempdir().unwrap();
        save(&m, dir.path(), &DENSE_F32);
        let back = load(dir.path(), LinearFormat::Dense).unwrap();
        assert_eq!(back.config(), m.config(), "{arch:?}");
        let ids = prompt(9);
        assert_eq!(
            max_diff(&logits(&back, &ids), &logits(&m, &ids)),
            0.0,
            "{arch:?}: exact"
        );
    }
}

#[test]
fn quantize_at_load_equals_quantizing_in_memory() {
    let cfg = small_config(Architecture::Qwen3);
    let dense = random_model(&cfg, LinearFormat::Dense);
    let nvfp4 = random_model(&cfg, LinearFormat::Nvfp4);
    let dir = tempfile::tempdir().unwrap();
    save(&dense, dir.path(), &DENSE_F32);
    let loaded = load(dir.path(), LinearFormat::Nvfp4).unwrap();
    let ids = prompt(7);
    assert_eq!(max_diff(&logits(&loaded, &ids), &logits(&nvfp4, &ids)), 0.0);
    // NVFP4 changes the numbers, but not wildly.
    let d = max_diff(&logits(&loaded, &ids), &logits(&dense, &ids));
    assert!(d > 0.0 && d < 2.0, "nvfp4 vs dense max diff {d}");
    // Packed weights take ~4.5 bits: far fewer bytes than the dense linears.
    let (w, s) = loaded.weight_bytes();
    let (wd, _) = dense.weight_bytes();
    assert!(s > 0 && w + s < wd, "{w} + {s} vs {wd}");
}

#[test]
fn nvfp4_checkpoints_load_as_they_are_in_both_layouts_and_shards() {
    let cfg = small_config(Architecture::Qwen2);
    let m = random_model(&cfg, LinearFormat::Nvfp4);
    let ids = prompt(8);
    let want = logits(&m, &ids);
    for (format, shard) in [
        (SaveFormat::Nvfp4ModelOpt, None),
        (SaveFormat::Nvfp4CompressedTensors, None),
        (SaveFormat::Nvfp4ModelOpt, Some(40_000)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let opts = SaveOptions {
            format,
            dense_dtype: DenseDtype::F32,
            max_shard_bytes: shard,
        };
        save(&m, dir.path(), &opts);
        if shard.is_some() {
            assert!(dir.path().join("model.safetensors.index.json").exists());
            let shards = std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with("model-0")
                })
                .count();
            assert!(shards > 2, "{shards} shards");
        }
        let back = load(dir.path(), LinearFormat::Nvfp4).unwrap();
        // ModelOpt stores the tensor scale itself: bit-exact. compressed-tensors stores its
        // reciprocal, and 1/(1/s) may differ from s in the last bit.
        let d = max_diff(&logits(&back, &ids), &want);
        let tol = if format == SaveFormat::Nvfp4ModelOpt {
            0.0
        } else {
            1e-5
        };
        assert!(d <= tol, "{format:?} shard {shard:?}: max diff {d}");
        // Loaded dense, the packed weights are dequantized: same values, same logits
        // up to summation order.
        let dense = load(dir.path(), LinearFormat::Dense).unwrap();
        assert!(max_diff(&logits(&dense, &ids), &want) < 1e-4);
    }
}

#[test]
fn bf16_checkpoints_load() {
    let cfg = small_config(Architecture::Llama);
    let m = random_model(&cfg, LinearFormat::Dense);
    let dir = tempfile::tempdir().unwrap();
    let opts = SaveOptions {
        dense_dtype: DenseDtype::Bf16,
        ..DENSE_F32
    };
    save(&m, dir.path(), &opts);
    let back = load(dir.path(), LinearFormat::Dense).unwrap();
    let ids = prompt(5);
    let d = max_diff(&logits(&back, &ids), &logits(&m, &ids));
    assert!(d < 0.1, "bf16 rounding only: {d}");
}

#[test]
fn chat_model_loads_a_directory_with_tokenizer_and_template() {
    let tiny = ChatModel::tiny(&LoadOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save(
        tiny.model.model(),
        dir.path(),
        &SaveOptions {
            format: SaveFormat::Nvfp4ModelOpt,
            ..DENSE_F32
        },
    );
    let cm = ChatModel::load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(cm.stop_tokens, tiny.stop_tokens);
    let msgs = [kiln_engine::chat::ChatMessage::user("Who are you?")];
    assert_eq!(
        cm.encode_chat(&msgs, true).unwrap(),
        tiny.encode_chat(&msgs, true).unwrap()
    );
    assert_ne!(cm.fingerprint, tiny.fingerprint);
}

// ---- errors ----

fn saved_tiny() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let m = random_model(&small_config(Architecture::Qwen2), LinearFormat::Dense);
    save(&m, dir.path(), &DENSE_F32);
    dir
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let dir = saved_tiny();
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(dir.path(), LinearFormat::Nvfp4).unwrap_err();
    assert!(
        matches!(err, EngineError::CorruptSafetensors { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated or corrupt"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = saved_tiny();
    // Rewrite the file without one tensor.
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let gone = "model.layers.1.mlp.up_proj.weight";
    let keep: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != gone)
        .collect();
    let out = safetensors::serialize(keep, None).unwrap();
    std::fs::write(&p, out).unwrap();
    let err = load(dir.path(), LinearFormat::Nvfp4).unwrap_err();
    assert!(matches!(err, EngineError::MissingTensor { .. }), "{err}");
    assert!(err.to_string().contains(gone), "{err}");
}

#[test]
fn shape_mismatch_names_the_tensor_and_both_shapes() {
    let dir = saved_tiny();
    let p = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    cfg["intermediate_size"] = 400.into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let err = load(dir.path(), LinearFormat::Nvfp4).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EngineError::ShapeMismatch { .. }), "{msg}");
    assert!(msg.contains("model.layers.0.mlp.gate_proj.weight"), "{msg}");
    assert!(
        msg.contains("[384, 128]") && msg.contains("[400, 128]"),
        "{msg}"
    );
}

#[test]
fn unknown_architecture_lists_the_supported_ones() {
    let dir = saved_tiny();
    let p = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["MambaForCausalLM"]);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let msg = load(dir.path(), LinearFormat::Nvfp4)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("MambaForCausalLM")
            && msg.contains("Qwen2ForCausalLM")
            && msg.contains("LlamaForCausalLM"),
        "{msg}"
    );
}

#[test]
fn a_directory_without_weights_or_a_missing_directory_says_so() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        small_config(Architecture::Qwen2).to_hf_json().to_string(),
    )
    .unwrap();
    let msg = load(dir.path(), LinearFormat::Nvfp4)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no .safetensors weights"), "{msg}");
    let msg = ChatModel::load("/nonexistent/model", &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("tiny") && msg.contains("directory"), "{msg}");
}

#[test]
fn a_checkpoint_holds_exactly_the_tensors_its_layout_lists() {
    use kiln_engine::model::{Checkpoint, ModelLayout};
    use kiln_kernels::checkpoint::NvfpFormat;
    for (arch, format, nvfp4) in [
        (Architecture::Qwen3, SaveFormat::Dense, None),
        (
            Architecture::Qwen2,
            SaveFormat::Nvfp4ModelOpt,
            Some(NvfpFormat::ModelOpt),
        ),
        (
            Architecture::Llama,
            SaveFormat::Nvfp4CompressedTensors,
            Some(NvfpFormat::CompressedTensors),
        ),
    ] {
        let cfg = small_config(arch);
        let m = random_model(&cfg, LinearFormat::Nvfp4);
        let dir = tempfile::tempdir().unwrap();
        save(
            &m,
            dir.path(),
            &SaveOptions {
                format,
                ..DENSE_F32
            },
        );
        let ck = Checkpoint::open(dir.path()).unwrap();
        let mut want: Vec<(String, Vec<usize>)> = ModelLayout::new(&cfg)
            .unwrap()
            .checkpoint_tensors(nvfp4)
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect();
        want.sort();
        let got: Vec<(String, Vec<usize>)> = ck
            .names()
            .into_iter()
            .map(|n| (n.to_string(), ck.get(n).unwrap().shape.to_vec()))
            .collect();
        assert_eq!(got, want, "{arch:?} {format:?}");
    }
}

/// A NaN in a float checkpoint's linear weight fails the load with the tensor's name, the
/// element and the fix, instead of a model with garbage codes.
#[test]
fn a_nan_in_a_float_checkpoint_names_the_tensor() {
    use kiln_kernels::checkpoint::{read_safetensors_file, write_safetensors_file};
    let cfg = small_config(Architecture::Llama);
    let dir = tempfile::tempdir().unwrap();
    save(
        &random_model(&cfg, LinearFormat::Dense),
        dir.path(),
        &DENSE_F32,
    );
    let file = dir.path().join("model.safetensors");
    let (mut tensors, meta) = read_safetensors_file(&file).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    let t = tensors.get_mut(name).expect("a down projection");
    // element 3 (row 0, column 3) becomes NaN
    t.data[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
    write_safetensors_file(&file, &tensors, meta).unwrap();
    let e = load(dir.path(), LinearFormat::Nvfp4)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(name) && e.contains("row 0, column 3") && e.contains("NaN"),
        "{e}"
    );
}
