//! Writing a model as a Hugging Face directory: `config.json`, tokenizer files and the
//! weights in f32/bf16 or in the NVFP4 ModelOpt / compressed-tensors layouts, optionally
//! sharded with `model.safetensors.index.json`. Every tensor is written with an explicit
//! dtype (packed codes U8, block scales F8_E4M3, tensor scales F32). The export job builds
//! on this; tests use it to produce checkpoints to load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_kernels::checkpoint::{nvfp4_to_tensors, NvfpFormat};
use kiln_kernels::nvfp4::Nvfp4Tensor;
use safetensors::tensor::{Dtype, TensorView};

use super::layout::{ModelLayout, ParamSpec};
use super::linear::LinearWeight;
use super::transformer::{Model, ParamRef};
use crate::error::{EngineError, Result};

/// Name of the shard index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

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

impl SaveFormat {
    /// The NVFP4 checkpoint layout, for the NVFP4 formats.
    pub fn nvfp4(self) -> Option<NvfpFormat> {
        match self {
            SaveFormat::Dense => None,
            SaveFormat::Nvfp4ModelOpt => Some(NvfpFormat::ModelOpt),
            SaveFormat::Nvfp4CompressedTensors => Some(NvfpFormat::CompressedTensors),
        }
    }
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
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let (dtype, width) = match dt {
        DenseDtype::F32 => (Dtype::F32, 4),
        DenseDtype::Bf16 => (Dtype::BF16, 2),
    };
    // Little-endian bytes, written on all cores (an 8B model's f32 embeddings are 5 GB).
    let mut data = vec![0u8; values.len() * width];
    data.par_chunks_mut(CHUNK * width)
        .zip(values.par_chunks(CHUNK))
        .for_each(|(dst, src)| {
            for (d, v) in dst.chunks_exact_mut(width).zip(src) {
                match dt {
                    DenseDtype::F32 => d.copy_from_slice(&v.to_le_bytes()),
                    DenseDtype::Bf16 => d.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes()),
                }
            }
        });
    OutTensor {
        name,
        dtype,
        shape,
        data,
    }
}

/// The tensors of `model` in `opts`' layout, walking the model's [`ModelLayout`].
fn collect(model: &Model, opts: &SaveOptions) -> Result<Vec<OutTensor>> {
    let mut out = Vec::new();
    let values = |t: &candle_core::Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
    for (spec, p) in model.parameters() {
        match (spec, p) {
            (_, ParamRef::Tensor(t)) => {
                out.push(dense_out(
                    spec.name().to_string(),
                    &values(t)?,
                    t.dims().to_vec(),
                    opts.dense_dtype,
                ));
            }
            (ParamSpec::Tensor(_), ParamRef::Linear(_)) => {
                unreachable!("the model holds a linear layer where its layout has one")
            }
            (ParamSpec::Linear(ls), ParamRef::Linear(l)) => {
                let quantized = match (opts.format.nvfp4(), l.weight()) {
                    (None, _) => None,
                    (Some(f), LinearWeight::Nvfp4(q)) => Some((f, q.as_ref().clone())),
                    // The head stays dense unless it already is NVFP4 (ModelOpt's default).
                    (Some(_), _) if !ls.nvfp4 => None,
                    (Some(f), LinearWeight::Dense(t) | LinearWeight::Ste(t)) => Some((
                        f,
                        Nvfp4Tensor::quantize(&values(t)?, l.out_features(), l.in_features())?,
                    )),
                };
                match quantized {
                    Some((f, q)) => {
                        out.extend(nvfp4_to_tensors(&ls.prefix, &q, f).into_iter().map(
                            |(name, t)| OutTensor {
                                name,
                                dtype: t.dtype,
                                shape: t.shape,
                                data: t.data,
                            },
                        ))
                    }
                    None => {
                        let w = l.dense_weight(model.device())?;
                        out.push(dense_out(
                            ls.weight().name,
                            &values(&w)?,
                            w.dims().to_vec(),
                            opts.dense_dtype,
                        ));
                    }
                }
                if let (Some(b), Some(spec)) = (l.bias(), ls.bias_tensor()) {
                    out.push(dense_out(
                        spec.name,
                        &values(b)?,
                        b.dims().to_vec(),
                        opts.dense_dtype,
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// Check a tensor against the place the model's layout gives it, and its byte length against
/// its dtype and shape, before anything is written (the seed's export bug — scales written
/// back with the wrong element type — fails here instead of producing a model that prints
/// `!!!!`).
fn check_tensor(layout: &ModelLayout, arch: &str, t: &OutTensor) -> Result<()> {
    let spec = layout.stored_tensor(&t.name, t.dtype).ok_or_else(|| {
        EngineError::InvalidArgument(format!(
            "tensor {} has no known place in a {arch} checkpoint",
            t.name
        ))
    })?;
    if t.shape != spec.shape {
        return Err(EngineError::ShapeMismatch {
            name: t.name.clone(),
            expected: spec.shape,
            got: t.shape.clone(),
        });
    }
    if spec.role.dtype().is_some_and(|d| d != t.dtype) {
        return Err(EngineError::UnsupportedDtype {
            name: t.name.clone(),
            dtype: format!("{:?}", t.dtype),
            expected: spec.role.expected_dtype(),
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
    let arch = model.config().architecture.hf_name();
    for t in &tensors {
        check_tensor(model.layout(), arch, t)?;
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
    use crate::model::ModelConfig;

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
    fn dense_tensors_are_little_endian_f32_or_bf16_across_chunk_edges() {
        let vals: Vec<f32> = (0..150_001).map(|i| (i as f32 - 75_000.0) * 0.37).collect();
        let f = dense_out("a".into(), &vals, vec![vals.len()], DenseDtype::F32);
        let want: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!((f.dtype, f.data), (Dtype::F32, want));
        let b = dense_out("a".into(), &vals, vec![vals.len()], DenseDtype::Bf16);
        let want: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!((b.dtype, b.data), (Dtype::BF16, want));
    }

    #[test]
    fn the_layout_check_catches_wrong_scale_dtypes_and_shapes_before_writing() {
        let layout = ModelLayout::new(&small_config()).unwrap();
        let check_tensor = |t: &OutTensor| check_tensor(&layout, "Qwen2ForCausalLM", t);
        let p = "model.layers.0.mlp.down_proj"; // [128, 384]
        check_tensor(&out(&format!("{p}.weight"), Dtype::U8, vec![128, 192])).unwrap();
        check_tensor(&out(
            &format!("{p}.weight_scale"),
            Dtype::F8_E4M3,
            vec![128, 24],
        ))
        .unwrap();
        check_tensor(&out(&format!("{p}.weight_scale_2"), Dtype::F32, vec![])).unwrap();
        // The seed's bug: block scales written back with another element type.
        let e = check_tensor(&out(
            &format!("{p}.weight_scale"),
            Dtype::F32,
            vec![128, 24],
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("weight_scale") && e.contains("F8_E4M3"), "{e}");
        let e = check_tensor(&out(&format!("{p}.weight_scale_2"), Dtype::BF16, vec![]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("F32"), "{e}");
        let e = check_tensor(&out(&format!("{p}.weight"), Dtype::BF16, vec![384, 128]))
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
        assert!(check_tensor(&bad).is_err());
    }
}
