//! `kiln quantize` logic on small checkpoints made in the test: what is quantized and what is
//! kept, both layouts, sharded input, config files, and the errors for bad input.

mod common;

use std::collections::BTreeMap;

use kiln_kernels::checkpoint::{
    nvfp4_from_tensors, quantize_checkpoint, read_safetensors_file, NvfpFormat, QuantDevice,
    QuantizeOptions, TensorData,
};
use kiln_kernels::{KernelError, Nvfp4Tensor};
use safetensors::Dtype;

fn run(
    input: &std::path::Path,
    out: &std::path::Path,
    format: NvfpFormat,
) -> Result<kiln_kernels::checkpoint::QuantizeSummary, KernelError> {
    quantize_checkpoint(
        input,
        out,
        &QuantizeOptions {
            format,
            device: QuantDevice::Cpu,
        },
        &mut |_| {},
    )
}

fn read_all(dir: &std::path::Path) -> BTreeMap<String, TensorData> {
    let mut all = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            all.extend(read_safetensors_file(&p).unwrap().0);
        }
    }
    all
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn modelopt_export_quantizes_linears_and_keeps_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    common::write_tiny_model(&src, false);
    let s = run(&src, &out, NvfpFormat::ModelOpt).unwrap();
    assert_eq!(s.quantized, 3, "q_proj, down_proj, up_proj");
    let got = read_all(&out);
    let orig = common::tiny_model_tensors();
    // quantized layers: U8 codes, F8_E4M3 scales, F32 scalar tensor scale, equal to the codec
    for (layer, dtype) in [
        ("model.layers.0.self_attn.q_proj", Dtype::BF16),
        ("model.layers.0.mlp.down_proj", Dtype::F16),
        ("model.layers.0.mlp.up_proj", Dtype::F32),
    ] {
        let w = &orig[&format!("{layer}.weight")];
        assert_eq!(w.dtype, dtype);
        let codes = &got[&format!("{layer}.weight")];
        assert_eq!(
            (codes.dtype, codes.shape.clone()),
            (Dtype::U8, vec![w.shape[0], w.shape[1] / 2])
        );
        assert_eq!(got[&format!("{layer}.weight_scale")].dtype, Dtype::F8_E4M3);
        let ts = &got[&format!("{layer}.weight_scale_2")];
        assert_eq!(
            (ts.dtype, ts.shape.len()),
            (Dtype::F32, 0),
            "weight_scale_2 is an F32 scalar"
        );
        let want = Nvfp4Tensor::quantize(&w.to_f32().unwrap(), w.shape[0], w.shape[1]).unwrap();
        assert_eq!(nvfp4_from_tensors(layer, &got).unwrap().unwrap(), want);
    }
    // kept exactly as they were, in their own dtype
    for n in [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.odd_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        assert_eq!(got[n], orig[n], "{n} must be copied unchanged");
    }
    let hq = json(&out.join("hf_quant_config.json"));
    assert_eq!(hq["quantization"]["quant_algo"], "NVFP4");
    assert_eq!(hq["quantization"]["group_size"], 16);
    let excl: Vec<&str> = hq["quantization"]["exclude_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(excl, ["lm_head", "model.layers.0.odd_proj"]);
    let cfg = json(&out.join("config.json"));
    assert_eq!(
        cfg["model_type"], "qwen2",
        "config.json keeps the model's own fields"
    );
    assert_eq!(cfg["quantization_config"]["quant_method"], "modelopt");
    assert!(out.join("tokenizer.json").exists());
    assert!(s.kept.keys().any(|r| r.starts_with("lm_head")));
}

#[test]
fn compressed_tensors_export_uses_its_names_and_a_reciprocal_global_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    common::write_tiny_model(&src, false);
    run(&src, &out, NvfpFormat::CompressedTensors).unwrap();
    let got = read_all(&out);
    let l = "model.layers.0.mlp.up_proj";
    assert!(!got.contains_key(&format!("{l}.weight")));
    assert_eq!(got[&format!("{l}.weight_packed")].dtype, Dtype::U8);
    let g = got[&format!("{l}.weight_global_scale")].to_f32().unwrap();
    let w = &common::tiny_model_tensors()[&format!("{l}.weight")];
    let want = Nvfp4Tensor::quantize(&w.to_f32().unwrap(), 48, 32).unwrap();
    assert_eq!(g, vec![1.0 / want.tensor_scale]);
    let cfg = json(&out.join("config.json"));
    let qc = &cfg["quantization_config"];
    assert_eq!(qc["quant_method"], "compressed-tensors");
    assert_eq!(qc["format"], "nvfp4-pack-quantized");
    assert_eq!(qc["config_groups"]["group_0"]["weights"]["group_size"], 16);
    assert_eq!(qc["ignore"][0], "lm_head");
    assert!(!out.join("hf_quant_config.json").exists());
}

#[test]
fn sharded_input_gives_sharded_output_with_an_index() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    common::write_tiny_model(&src, true);
    let s = run(&src, &out, NvfpFormat::ModelOpt).unwrap();
    assert_eq!(s.quantized, 3);
    let idx = json(&out.join("model.safetensors.index.json"));
    let wm = idx["weight_map"].as_object().unwrap();
    let got = read_all(&out);
    assert_eq!(wm.len(), got.len());
    for (name, file) in wm {
        let (t, _) = read_safetensors_file(&out.join(file.as_str().unwrap())).unwrap();
        assert!(t.contains_key(name), "{name} not in {file}");
    }
    assert_eq!(
        idx["metadata"]["total_size"].as_u64().unwrap(),
        got.values().map(|t| t.data.len() as u64).sum::<u64>()
    );
}

#[test]
fn a_single_file_input_works_without_config() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    common::write_tiny_model(&src, false);
    run(&src.join("model.safetensors"), &out, NvfpFormat::ModelOpt).unwrap();
    assert_eq!(
        read_all(&out).len(),
        common::tiny_model_tensors().len() + 2 * 3
    );
    assert!(out.join("config.json").exists() && out.join("hf_quant_config.json").exists());
}

#[test]
fn bad_inputs_give_errors_that_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // missing
    let e = run(&tmp.path().join("nope"), &out, NvfpFormat::ModelOpt).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    // truncated
    let src = tmp.path().join("trunc");
    common::write_tiny_model(&src, false);
    let f = src.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let e = run(&src, &out, NvfpFormat::ModelOpt).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    // corrupt header
    std::fs::write(&f, [16u8, 0, 0, 0, 0, 0, 0, 0, b'{', b'x']).unwrap();
    let e = run(&src, &out, NvfpFormat::ModelOpt).unwrap_err();
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    // an index naming a missing shard
    let src = tmp.path().join("sharded");
    common::write_tiny_model(&src, true);
    std::fs::remove_file(src.join("model-00002-of-00002.safetensors")).unwrap();
    let e = run(&src, &out, NvfpFormat::ModelOpt).unwrap_err();
    assert!(
        e.to_string().contains("model-00002-of-00002.safetensors")
            && e.to_string().contains("does not exist"),
        "{e}"
    );
    // already quantized
    let src = tmp.path().join("q");
    let q = tmp.path().join("q-out");
    common::write_tiny_model(&src, false);
    run(&src, &q, NvfpFormat::ModelOpt).unwrap();
    let e = run(&q, &out, NvfpFormat::ModelOpt).unwrap_err();
    assert!(e.to_string().contains("already quantized"), "{e}");
    // NaN in a weight
    let src = tmp.path().join("nan");
    std::fs::create_dir_all(&src).unwrap();
    let mut t = common::tiny_model_tensors();
    let w = t.get_mut("model.layers.0.mlp.up_proj.weight").unwrap();
    w.data[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    kiln_kernels::checkpoint::write_safetensors_file(&src.join("model.safetensors"), &t, None)
        .unwrap();
    let e = run(&src, &out, NvfpFormat::ModelOpt).unwrap_err();
    assert!(
        e.to_string().contains("up_proj") && e.to_string().contains("NaN"),
        "{e}"
    );
    // empty directory
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = run(&empty, &out, NvfpFormat::ModelOpt).unwrap_err();
    assert!(e.to_string().contains("no .safetensors"), "{e}");
}

#[test]
fn asking_for_cuda_without_cuda_fails_clearly() {
    if kiln_kernels::cuda::check_cuda_libraries().is_ok() {
        eprintln!("CUDA libraries present: the GPU test compares CPU and CUDA bytes instead");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    common::write_tiny_model(&src, false);
    let opts = QuantizeOptions {
        format: NvfpFormat::ModelOpt,
        device: QuantDevice::Cuda,
    };
    let e = quantize_checkpoint(&src, &tmp.path().join("o"), &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(e, KernelError::CudaUnavailable(_)), "{e}");
    assert!(
        e.to_string().contains("CUDA driver library not found"),
        "{e}"
    );
}
