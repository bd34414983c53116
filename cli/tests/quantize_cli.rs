//! `kiln quantize` as a user runs it: the real binary on a small Hugging Face directory written
//! in the test — exit status, the summary (table and `--json`), the files it writes, and the
//! errors for bad arguments and bad input (each names the problem and loses nothing).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use kiln_kernels::checkpoint::{read_safetensors_file, write_safetensors_file, TensorData};
use safetensors::Dtype;

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("running kiln")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn f32_tensor(shape: &[usize], salt: u32) -> TensorData {
    let n: usize = shape.iter().product();
    let data = (0..n as u32)
        .flat_map(|i| {
            let v = ((i.wrapping_mul(2_654_435_761).wrapping_add(salt) >> 8) % 2001) as f32;
            ((v - 1000.0) / 700.0).to_le_bytes()
        })
        .collect();
    TensorData::new(Dtype::F32, shape.to_vec(), data).unwrap()
}

/// A one-layer model: an embedding and a norm (kept) and one linear (quantized).
fn write_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut t = BTreeMap::new();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        f32_tensor(&[16, 32], 1),
    );
    t.insert("model.norm.weight".to_string(), f32_tensor(&[32], 2));
    t.insert(
        "model.layers.0.mlp.up_proj.weight".to_string(),
        f32_tensor(&[48, 32], 3),
    );
    write_safetensors_file(&dir.join("model.safetensors"), &t, None).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 32}"#,
    )
    .unwrap();
}

#[test]
fn quantize_writes_a_modelopt_checkpoint_and_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    write_model(&src);
    let o = kiln(&[
        "quantize",
        "--model",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("quantized to NVFP4"), "{stdout}");
    assert!(stdout.contains("format nvfp4-modelopt on cpu"), "{stdout}");
    let (tensors, _) = read_safetensors_file(&out.join("model.safetensors")).unwrap();
    let w = &tensors["model.layers.0.mlp.up_proj.weight"];
    assert_eq!((w.dtype, w.shape.clone()), (Dtype::U8, vec![48, 16]));
    let s = &tensors["model.layers.0.mlp.up_proj.weight_scale"];
    assert_eq!((s.dtype, s.shape.clone()), (Dtype::F8_E4M3, vec![48, 2]));
    assert_eq!(
        tensors["model.layers.0.mlp.up_proj.weight_scale_2"].dtype,
        Dtype::F32
    );
    assert_eq!(tensors["model.embed_tokens.weight"].dtype, Dtype::F32);
    assert_eq!(tensors["model.norm.weight"].dtype, Dtype::F32);
    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("hf_quant_config.json")).unwrap())
            .unwrap();
    assert_eq!(hf["quantization"]["quant_algo"], "NVFP4", "{hf}");
    // the input is untouched
    assert!(src.join("model.safetensors").exists() && !src.join("hf_quant_config.json").exists());
}

#[test]
fn quantize_json_summary_and_compressed_tensors_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    write_model(&src);
    let o = kiln(&[
        "quantize",
        "--model",
        src.join("model.safetensors").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        "nvfp4-compressed-tensors",
        "-o",
        "json",
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("-o json prints JSON");
    assert_eq!(summary["quantized"], 1, "{summary}");
    assert_eq!(summary["device"], "cpu", "{summary}");
    let (tensors, _) = read_safetensors_file(&out.join("model.safetensors")).unwrap();
    assert_eq!(
        tensors["model.layers.0.mlp.up_proj.weight_packed"].shape,
        vec![48, 16]
    );
    assert!(tensors.contains_key("model.layers.0.mlp.up_proj.weight_global_scale"));
}

#[test]
fn quantize_errors_name_the_problem_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model(&src);
    let fail = |args: &[&str]| {
        let o = kiln(args);
        let (stdout, stderr) = text(&o);
        assert!(!o.status.success(), "should fail: {args:?}\n{stdout}");
        stderr
    };
    // a model that does not exist
    let missing = tmp.path().join("no-such-model");
    let e = fail(&[
        "quantize",
        "--model",
        missing.to_str().unwrap(),
        "--out",
        "/tmp/x",
    ]);
    assert!(e.contains("no-such-model"), "{e}");
    // writing into the input directory
    let e = fail(&[
        "quantize",
        "--model",
        src.to_str().unwrap(),
        "--out",
        src.to_str().unwrap(),
    ]);
    assert!(e.contains("input"), "{e}");
    // an unknown layout lists the ones there are
    let e = fail(&[
        "quantize",
        "--model",
        src.to_str().unwrap(),
        "--out",
        tmp.path().join("o").to_str().unwrap(),
        "--format",
        "gguf",
    ]);
    assert!(
        e.contains("nvfp4-modelopt") && e.contains("nvfp4-compressed-tensors"),
        "{e}"
    );
    // a linear whose K is not a multiple of 16 cannot be NVFP4: it is kept, and the summary says so
    let odd = tmp.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    let mut t = BTreeMap::new();
    t.insert(
        "model.layers.0.mlp.up_proj.weight".to_string(),
        f32_tensor(&[8, 24], 4),
    );
    write_safetensors_file(&odd.join("model.safetensors"), &t, None).unwrap();
    let o = kiln(&[
        "quantize",
        "--model",
        odd.to_str().unwrap(),
        "--out",
        tmp.path().join("odd-out").to_str().unwrap(),
        "--json",
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["quantized"], 0, "{summary}");
    // a truncated file: an error naming the file, and no output left behind as if it worked
    let f = src.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 64]).unwrap();
    let out = tmp.path().join("trunc-out");
    let e = fail(&[
        "quantize",
        "--model",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    assert!(!out.join("hf_quant_config.json").exists());
}

#[test]
fn quantize_on_cuda_without_cuda_says_so() {
    if kiln_kernels::cuda::check_cuda_libraries().is_ok() {
        eprintln!("CUDA libraries present: kernels/tests/gpu.rs compares CPU and CUDA output");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model(&src);
    let out = tmp.path().join("out");
    let o = kiln(&[
        "quantize",
        "--model",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cuda",
    ]);
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(stderr.contains("CUDA"), "{stderr}");
    assert!(
        !out.join("model.safetensors").exists(),
        "nothing written on failure"
    );
}
