//! The two NVFP4 checkpoint layouts vLLM and TensorRT-LLM load, for one linear layer `P`
//! (`P.weight` in the original checkpoint):
//!
//! | | ModelOpt (`nvfp4-modelopt`) | compressed-tensors (`nvfp4-compressed-tensors`) |
//! |---|---|---|
//! | codes `[N, K/2]` U8 | `P.weight` | `P.weight_packed` |
//! | block scales `[N, K/16]` F8_E4M3 | `P.weight_scale` | `P.weight_scale` |
//! | tensor scale F32 | `P.weight_scale_2` (scalar, `amax/2688`) | `P.weight_global_scale` (`[1]`, its reciprocal) |
//! | config | `hf_quant_config.json` + `quantization_config` in config.json | `quantization_config` in config.json |
//!
//! Both are weight-only here (no `input_scale`): activation scales need calibration data.

use std::collections::BTreeMap;

use safetensors::Dtype;
use serde_json::{json, Value};

use super::io::TensorData;
use crate::nvfp4::Nvfp4Tensor;
use crate::KernelError;

/// Which NVFP4 layout to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvfpFormat {
    /// NVIDIA ModelOpt: `weight` / `weight_scale` / `weight_scale_2`.
    ModelOpt,
    /// compressed-tensors `nvfp4-pack-quantized`: `weight_packed` / `weight_scale` /
    /// `weight_global_scale`.
    CompressedTensors,
}

impl NvfpFormat {
    /// The CLI name.
    pub fn name(&self) -> &'static str {
        match self {
            NvfpFormat::ModelOpt => "nvfp4-modelopt",
            NvfpFormat::CompressedTensors => "nvfp4-compressed-tensors",
        }
    }
}

/// The tensors that store `t` for the linear layer `prefix` (e.g. `model.layers.0.mlp.up_proj`).
pub fn nvfp4_to_tensors(
    prefix: &str,
    t: &Nvfp4Tensor,
    format: NvfpFormat,
) -> Vec<(String, TensorData)> {
    let codes = TensorData {
        dtype: Dtype::U8,
        shape: vec![t.rows, t.cols / 2],
        data: t.packed.clone(),
    };
    let scales = TensorData {
        dtype: Dtype::F8_E4M3,
        shape: vec![t.rows, t.cols / 16],
        data: t.scales.clone(),
    };
    match format {
        NvfpFormat::ModelOpt => vec![
            (format!("{prefix}.weight"), codes),
            (format!("{prefix}.weight_scale"), scales),
            (
                format!("{prefix}.weight_scale_2"),
                TensorData::from_f32(vec![], &[t.tensor_scale]),
            ),
        ],
        NvfpFormat::CompressedTensors => vec![
            (format!("{prefix}.weight_packed"), codes),
            (format!("{prefix}.weight_scale"), scales),
            (
                format!("{prefix}.weight_global_scale"),
                TensorData::from_f32(vec![1], &[1.0 / t.tensor_scale]),
            ),
        ],
    }
}

/// Read the NVFP4 weight of layer `prefix` back from a tensor map in either layout (which one
/// is detected from the names). `Ok(None)` when the layer is not NVFP4 in this map.
pub fn nvfp4_from_tensors(
    prefix: &str,
    tensors: &BTreeMap<String, TensorData>,
) -> Result<Option<Nvfp4Tensor>, KernelError> {
    let get = |s: &str| tensors.get(&format!("{prefix}.{s}"));
    let (codes, scales, ts) = if let (Some(c), Some(s), Some(t2)) =
        (get("weight"), get("weight_scale"), get("weight_scale_2"))
    {
        (c, s, scalar(t2, prefix, "weight_scale_2")?)
    } else if let (Some(c), Some(s), Some(g)) = (
        get("weight_packed"),
        get("weight_scale"),
        get("weight_global_scale"),
    ) {
        (c, s, 1.0 / scalar(g, prefix, "weight_global_scale")?)
    } else {
        return Ok(None);
    };
    let bad = |m: String| KernelError::InvalidArgument(format!("NVFP4 layer {prefix}: {m}"));
    if codes.dtype != Dtype::U8 || codes.shape.len() != 2 {
        return Err(bad(format!(
            "codes must be U8 [N, K/2], found {:?} {:?}",
            codes.dtype, codes.shape
        )));
    }
    if scales.dtype != Dtype::F8_E4M3 {
        return Err(bad(format!(
            "block scales must be F8_E4M3, found {:?} (a writer that changes the scale dtype breaks the checkpoint)",
            scales.dtype
        )));
    }
    let (rows, cols) = (codes.shape[0], codes.shape[1] * 2);
    if scales.shape != [rows, cols / 16] {
        return Err(bad(format!(
            "block scales have shape {:?}, expected [{rows}, {}]",
            scales.shape,
            cols / 16
        )));
    }
    Nvfp4Tensor::from_parts(rows, cols, codes.data.clone(), scales.data.clone(), ts).map(Some)
}

fn scalar(t: &TensorData, prefix: &str, what: &str) -> Result<f32, KernelError> {
    match (t.dtype, t.to_f32()) {
        (Dtype::F32 | Dtype::BF16 | Dtype::F16, Some(v)) if v.len() == 1 => Ok(v[0]),
        _ => Err(KernelError::InvalidArgument(format!(
            "NVFP4 layer {prefix}: {what} must hold one float, found {:?} {:?}",
            t.dtype, t.shape
        ))),
    }
}

/// `hf_quant_config.json` for a ModelOpt export (`exclude_modules`: layers kept unquantized).
pub fn modelopt_hf_quant_config(exclude_modules: &[String]) -> Value {
    json!({
        "producer": { "name": "kiln", "version": env!("CARGO_PKG_VERSION") },
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": null,
            "group_size": 16,
            "exclude_modules": exclude_modules,
        }
    })
}

/// The `quantization_config` entry of config.json for each layout.
pub fn quantization_config(format: NvfpFormat, exclude_modules: &[String]) -> Value {
    match format {
        NvfpFormat::ModelOpt => json!({
            "quant_method": "modelopt",
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": null,
            "group_size": 16,
            "exclude_modules": exclude_modules,
        }),
        NvfpFormat::CompressedTensors => json!({
            "quant_method": "compressed-tensors",
            "format": "nvfp4-pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 4,
                        "type": "float",
                        "strategy": "tensor_group",
                        "group_size": 16,
                        "symmetric": true,
                        "dynamic": false,
                        "scale_dtype": "float8_e4m3fn",
                        "zp_dtype": "float8_e4m3fn",
                        "observer": "minmax",
                    },
                    "input_activations": null,
                    "output_activations": null,
                    "format": "nvfp4-pack-quantized",
                }
            },
            "ignore": exclude_modules,
            "kv_cache_scheme": null,
            "sparsity_config": {},
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_layouts_round_trip() {
        let w: Vec<f32> = (0..4 * 32).map(|i| (i as f32 * 0.37).sin()).collect();
        let t = Nvfp4Tensor::quantize(&w, 4, 32).unwrap();
        for f in [NvfpFormat::ModelOpt, NvfpFormat::CompressedTensors] {
            let map: BTreeMap<_, _> = nvfp4_to_tensors("m.l", &t, f).into_iter().collect();
            let back = nvfp4_from_tensors("m.l", &map).unwrap().unwrap();
            assert_eq!(back.packed, t.packed);
            assert_eq!(back.scales, t.scales);
            // the reciprocal may round: equal within one ulp
            assert!((back.tensor_scale - t.tensor_scale).abs() <= t.tensor_scale * 1.2e-7);
        }
    }

    #[test]
    fn a_scale_written_with_the_wrong_dtype_is_rejected() {
        let w: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let t = Nvfp4Tensor::quantize(&w, 1, 32).unwrap();
        let mut map: BTreeMap<_, _> = nvfp4_to_tensors("p", &t, NvfpFormat::ModelOpt)
            .into_iter()
            .collect();
        map.get_mut("p.weight_scale").unwrap().dtype = Dtype::U8;
        let e = nvfp4_from_tensors("p", &map).unwrap_err();
        assert!(e.to_string().contains("F8_E4M3"), "{e}");
    }
}
