//! Writing a model as a Hugging Face directory: `config.json`, tokenizer files and the
//! weights in f32/bf16 or in the NVFP4 ModelOpt / compressed-tensors layouts, optionally
//! sharded with `model.safetensors.index.json`. Every tensor is written with an explicit
//! dtype (packed codes U8, block scales F8_E4M3, tensor scales F32). The export job builds
//! on this; tests use it to produce checkpoints to load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_kernels::nvfp4::Nvfp4Tensor;
use safetensors::tensor::{Dtype, TensorView};

use super::checkpoint::INDEX_FILE;
use super::config::ModelConfig;
use super::linear::LinearWeight;
use super::transformer::{Model, ParamRef};
use crate::error::{EngineError, Result};

/// How linear weights are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveFormat {
    /// Dense (NVFP4 weights dequantized), in `dense_dtype`.
    Dense,
    /// ModelOpt NVFP4: `weight` U8, `weight_scale` F8_E4M3, `weight_scale_2` F32.
    Nvfp4ModelOpt,
    /// compressed-tensors NVFP4: `weight_packed`, `weight_scale`, `weight_global_scale`
    /// (= 1 / tensor scale).
    Nvfp4CompressedTensors,
}

/// Element type of the tensors that are not NVFP4 (embeddings, norms, biases, dense linears).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseDtype {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
}

/// Options of [`save_model_dir`].
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Linear weight layout.
    pub format: SaveFormat,
    /// dtype of the dense tensors.
    pub dense_dtype: DenseDtype,
    /// Start a new shard when one would pass this many bytes (`None`: one file).
    pub max_shard_bytes: Option<u64>,
}

/// One tensor ready to write.
struct OutTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn dense_out(name: String, values: &[f32], shape: Vec<usize>, dt: DenseDtype) -> OutTensor {
    let (dtype, data) = match dt {
        DenseDtype::F32 => (
            Dtype::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        DenseDtype::Bf16 => (
            Dtype::BF16,
            values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
    };
    OutTensor {
        name,
        dtype,
        shape,
        data,
    }
}

fn packed_out(prefix: &str, q: &Nvfp4Tensor, format: SaveFormat) -> Vec<OutTensor> {
    let (codes, global, gval, gshape) = match format {
        SaveFormat::Nvfp4CompressedTensors => (
            "weight_packed",
            "weight_global_scale",
            1.0 / q.tensor_scale,
            vec![1],
        ),
        _ => ("weight", "weight_scale_2", q.tensor_scale, vec![]),
    };
    vec![
        OutTensor {
            name: format!("{prefix}.{codes}"),
            dtype: Dtype::U8,
            shape: vec![q.rows, q.cols / 2],
            data: q.packed.clone(),
        },
        OutTensor {
            name: format!("{prefix}.weight_scale"),
            dtype: Dtype::F8_E4M3,
            shape: vec![q.rows, q.cols / 16],
            data: q.scales.clone(),
        },
        OutTensor {
            name: format!("{prefix}.{global}"),
            dtype: Dtype::F32,
            shape: gshape,
            data: gval.to_le_bytes().to_vec(),
        },
    ]
}

/// The tensors of `model` in `opts`' layout.
fn collect(model: &Model, opts: &SaveOptions) -> Result<Vec<OutTensor>> {
    let mut out = Vec::new();
    for (name, p) in model.parameters() {
        match p {
            ParamRef::Tensor(t) => {
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                out.push(dense_out(name, &v, t.dims().to_vec(), opts.dense_dtype));
            }
            ParamRef::Linear(l) => {
                let is_head = name == "lm_head";
                let quantized = match (opts.format, l.weight()) {
                    (SaveFormat::Dense, _) => None,
                    (_, LinearWeight::Nvfp4(q)) => Some(q.as_ref().clone()),
                    // The head stays dense unless it already is NVFP4 (ModelOpt's default).
                    (_, _) if is_head => None,
                    (_, w) => {
                        let t = match w {
                            LinearWeight::Dense(t) | LinearWeight::Ste(t) => t,
                            LinearWeight::Nvfp4(_) => unreachable!("matched above"),
                        };
                        let v = t.flatten_all()?.to_vec1::<f32>()?;
                        Some(Nvfp4Tensor::quantize(
                            &v,
                            l.out_features(),
                            l.in_features(),
                        )?)
                    }
                };
                match quantized {
                    Some(q) => out.extend(packed_out(&name, &q, opts.format)),
                    None => {
                        let w = l.dense_weight()?;
                        let v = w.flatten_all()?.to_vec1::<f32>()?;
                        out.push(dense_out(
                            format!("{name}.weight"),
                            &v,
                            w.dims().to_vec(),
                            opts.dense_dtype,
                        ));
                    }
                }
                if let Some(b) = l.bias() {
                    let v = b.flatten_all()?.to_vec1::<f32>()?;
                    out.push(dense_out(
                        format!("{name}.bias"),
                        &v,
                        b.dims().to_vec(),
                        opts.dense_dtype,
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// `(out, in)` of the linear layer `prefix` in a model of shape `cfg`.
fn linear_dims(cfg: &ModelConfig, prefix: &str) -> Option<(usize, usize)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    Some(match prefix.rsplit('.').next()? {
        "q_proj" => (cfg.q_size(), h),
        "k_proj" | "v_proj" => (cfg.kv_size(), h),
        "o_proj" => (h, cfg.q_size()),
        "gate_proj" | "up_proj" => (i, h),
        "down_proj" => (h, i),
        "lm_head" => (cfg.vocab_size, h),
        _ => return None,
    })
}

/// The dtype (when it is fixed) and shape `config.json` implies for a tensor written as
/// `dtype`; `None` for a name this writer never produces.
pub fn expected_layout(
    cfg: &ModelConfig,
    name: &str,
    dtype: Dtype,
) -> Option<(Option<Dtype>, Vec<usize>)> {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    if name == "model.embed_tokens.weight" {
        return Some((None, vec![cfg.vocab_size, h]));
    }
    if name == "model.norm.weight" || name.ends_with("layernorm.weight") {
        return Some((None, vec![h]));
    }
    if name.ends_with("q_norm.weight") || name.ends_with("k_norm.weight") {
        return Some((None, vec![hd]));
    }
    let (prefix, suffix) = name.rsplit_once('.')?;
    let (o, i) = linear_dims(cfg, prefix)?;
    Some(match suffix {
        "weight" if dtype == Dtype::U8 => (Some(Dtype::U8), vec![o, i / 2]),
        "weight" => (None, vec![o, i]),
        "weight_packed" => (Some(Dtype::U8), vec![o, i / 2]),
        "weight_scale" => (Some(Dtype::F8_E4M3), vec![o, i / 16]),
        "weight_scale_2" => (Some(Dtype::F32), vec![]),
        "weight_global_scale" => (Some(Dtype::F32), vec![1]),
        "bias" => (None, vec![o]),
        _ => return None,
    })
}

/// Check a tensor against the layout the config implies, and its byte length against its
/// dtype and shape, before anything is written (the seed's export bug — scales written back
/// with the wrong element type — fails here instead of producing a model that prints `!!!!`).
fn check_tensor(cfg: &ModelConfig, t: &OutTensor) -> Result<()> {
    let (dtype, shape) = expected_layout(cfg, &t.name, t.dtype).ok_or_else(|| {
        EngineError::InvalidArgument(format!(
            "tensor {} has no known place in a {} checkpoint",
            t.name,
            cfg.architecture.hf_name()
        ))
    })?;
    if t.shape != shape {
        return Err(EngineError::ShapeMismatch {
            name: t.name.clone(),
            expected: shape,
            got: t.shape.clone(),
        });
    }
    if let Some(d) = dtype.filter(|&d| d != t.dtype) {
        return Err(EngineError::UnsupportedDtype {
            name: t.name.clone(),
            dtype: format!("{:?}", t.dtype),
            expected: match d {
                Dtype::U8 => "U8 (packed E2M1 pairs)",
                Dtype::F8_E4M3 => "F8_E4M3 (block scales)",
                _ => "F32 (tensor scale)",
            },
        });
    }
    let numel: usize = t.shape.iter().product();
    if t.data.len() * 8 != numel * t.dtype.bitsize() {
        return Err(EngineError::InvalidArgument(format!(
            "tensor {}: {} bytes do not hold {numel} elements of {:?}",
            t.name,
            t.data.len(),
            t.dtype
        )));
    }
    Ok(())
}

/// Write `model` (with the given tokenizer files) to `dir` as a Hugging Face directory.
/// Returns the files written.
pub fn save_model_dir(
    model: &Model,
    tokenizer_json: &str,
    tokenizer_config_json: &str,
    dir: &Path,
    opts: &SaveOptions,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io("creating", dir, e))?;
    let mut written = Vec::new();
    let mut write = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| EngineError::io("writing", &p, e))?;
        written.push(p);
        Ok(())
    };
    let mut config = model.config().to_hf_json();
    config["torch_dtype"] = match opts.dense_dtype {
        DenseDtype::F32 => "float32".into(),
        DenseDtype::Bf16 => "bfloat16".into(),
    };
    match opts.format {
        SaveFormat::Dense => {}
        SaveFormat::Nvfp4ModelOpt => {
            let q = serde_json::json!({
                "producer": {"name": "modelopt", "version": "0.29.0"},
                "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": null,
                                 "group_size": 16, "exclude_modules": ["lm_head"]}
            });
            write(
                "hf_quant_config.json",
                serde_json::to_string_pretty(&q).expect("json").as_bytes(),
            )?;
        }
        SaveFormat::Nvfp4CompressedTensors => {
            config["quantization_config"] = serde_json::json!({
                "quant_method": "compressed-tensors",
                "format": "nvfp4-pack-quantized",
                "quantization_status": "compressed",
                "ignore": ["lm_head"],
                "config_groups": {"group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group",
                                "group_size": 16, "symmetric": true, "dynamic": false},
                    "input_activations": null
                }}
            });
        }
    }
    write(
        "config.json",
        serde_json::to_string_pretty(&config)
            .expect("json")
            .as_bytes(),
    )?;
    write("tokenizer.json", tokenizer_json.as_bytes())?;
    write("tokenizer_config.json", tokenizer_config_json.as_bytes())?;

    let tensors = collect(model, opts)?;
    for t in &tensors {
        check_tensor(model.config(), t)?;
    }
    let limit = opts.max_shard_bytes.unwrap_or(u64::MAX);
    let mut shards: Vec<Vec<&OutTensor>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in &tensors {
        let b = t.data.len() as u64;
        if size + b > limit && !shards.last().expect("non-empty").is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("non-empty").push(t);
        size += b;
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let views = shard
            .iter()
            .map(|t| {
                weight_map.insert(t.name.clone(), fname.clone());
                TensorView::new(t.dtype, t.shape.clone(), &t.data)
                    .map(|v| (t.name.clone(), v))
                    .map_err(|e| EngineError::InvalidArgument(format!("tensor {}: {e}", t.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        let p = dir.join(&fname);
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        safetensors::serialize_to_file(views, Some(meta), &p)
            .map_err(|e| EngineError::InvalidArgument(format!("writing {}: {e}", p.display())))?;
        // The safetensors writer goes through a private (0600) temporary file; give the
        // weights the permissions of the other files so a server running as another user
        // (vLLM, TensorRT-LLM) can read them.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| EngineError::io("setting permissions of", &p, e))?;
        }
        written.push(p);
    }
    if n > 1 {
        let total: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let p = dir.join(INDEX_FILE);
        std::fs::write(&p, serde_json::to_string_pretty(&index).expect("json"))
            .map_err(|e| EngineError::io("writing", &p, e))?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(name: &str, dtype: Dtype, shape: Vec<usize>) -> OutTensor {
        let n: usize = shape.iter().product();
        OutTensor {
            name: name.into(),
            dtype,
            data: vec![0; n * dtype.bitsize() / 8],
            shape,
        }
    }

    /// The tiny model's shape (hidden 128, intermediate 384).
    fn small_config() -> ModelConfig {
        let mut cfg = ModelConfig::qwen2_5_0_5b();
        cfg.hidden_size = 128;
        cfg.intermediate_size = 384;
        cfg.num_hidden_layers = 4;
        cfg.num_attention_heads = 4;
        cfg.num_key_value_heads = 2;
        cfg.head_dim = 32;
        cfg.vocab_size = 512;
        cfg
    }

    #[test]
    fn the_layout_check_catches_wrong_scale_dtypes_and_shapes_before_writing() {
        let cfg = small_config();
        let p = "model.layers.0.mlp.down_proj"; // [128, 384]
        check_tensor(
            &cfg,
            &out(&format!("{p}.weight"), Dtype::U8, vec![128, 192]),
        )
        .unwrap();
        check_tensor(
            &cfg,
            &out(&format!("{p}.weight_scale"), Dtype::F8_E4M3, vec![128, 24]),
        )
        .unwrap();
        check_tensor(
            &cfg,
            &out(&format!("{p}.weight_scale_2"), Dtype::F32, vec![]),
        )
        .unwrap();
        // The seed's bug: block scales written back with another element type.
        let e = check_tensor(
            &cfg,
            &out(&format!("{p}.weight_scale"), Dtype::F32, vec![128, 24]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("weight_scale") && e.contains("F8_E4M3"), "{e}");
        let e = check_tensor(
            &cfg,
            &out(&format!("{p}.weight_scale_2"), Dtype::BF16, vec![]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("F32"), "{e}");
        let e = check_tensor(
            &cfg,
            &out(&format!("{p}.weight"), Dtype::BF16, vec![384, 128]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!("{p}.weight"))
                && e.contains("[384, 128]")
                && e.contains("[128, 384]"),
            "{e}"
        );
        let mut bad = out("model.norm.weight", Dtype::F32, vec![128]);
        bad.data.pop();
        assert!(check_tensor(&cfg, &bad).is_err());
    }
}
