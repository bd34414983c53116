//! Where a model's weights come from: the `WeightSource` trait the model builder asks for
//! each tensor and linear layer, with two implementations — `CheckpointWeights` (a Hugging
//! Face checkpoint: bf16/f16/f32 quantized at load, or NVFP4 in the ModelOpt or
//! compressed-tensors layout loaded as it is) and `RandomWeights` (deterministic from a seed,
//! for the bundled tiny model and benchmarks).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use kiln_kernels::nvfp4::Nvfp4Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use safetensors::tensor::Dtype;

use super::checkpoint::{Checkpoint, RawTensor};
use super::linear::{Linear, LinearWeight};
use crate::error::{EngineError, Result};

/// How linear layers (all but the LM head) are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinearFormat {
    /// NVFP4: float weights are quantized at load (ModelOpt semantics); NVFP4 checkpoints are
    /// loaded as they are.
    #[default]
    Nvfp4,
    /// Dense f32: float weights as they are; NVFP4 checkpoints are dequantized.
    Dense,
}

impl LinearFormat {
    /// A linear weight `[out, inp]` from f32 values, held in this format.
    pub fn weight(
        self,
        data: Vec<f32>,
        out: usize,
        inp: usize,
        device: &Device,
    ) -> Result<LinearWeight> {
        Ok(match self {
            LinearFormat::Nvfp4 => {
                LinearWeight::Nvfp4(Arc::new(Nvfp4Tensor::quantize(&data, out, inp)?))
            }
            LinearFormat::Dense => LinearWeight::Dense(Tensor::from_vec(data, (out, inp), device)?),
        })
    }
}

/// Supplies the tensors a model needs, by Hugging Face name.
pub trait WeightSource {
    /// Whether the linear layer `prefix` is stored NVFP4-packed (so the LM head, which is
    /// otherwise kept dense, is loaded as a packed linear).
    fn is_packed(&self, _prefix: &str) -> bool {
        false
    }

    /// A dense f32 tensor (embedding, norm weight, bias) of exactly `shape`.
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor>;

    /// The linear layer `{prefix}.weight` `[out, in]` (+ `{prefix}.bias` `[out]` if `bias`).
    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear>;

    /// `{prefix}.bias` `[out]` when the layer has one.
    fn bias(&mut self, prefix: &str, out: usize, has: bool) -> Result<Option<Tensor>> {
        has.then(|| self.tensor(&format!("{prefix}.bias"), &[out]))
            .transpose()
    }
}

/// Weights read from a checkpoint directory.
#[derive(Debug)]
pub struct CheckpointWeights<'a> {
    ckpt: &'a Checkpoint,
    format: LinearFormat,
    device: Device,
}

impl<'a> CheckpointWeights<'a> {
    /// A source over `ckpt` producing linears in `format` on `device`.
    pub fn new(ckpt: &'a Checkpoint, format: LinearFormat, device: Device) -> Self {
        CheckpointWeights {
            ckpt,
            format,
            device,
        }
    }

    fn dense(&self, raw: &RawTensor<'_>) -> Result<Tensor> {
        Ok(Tensor::from_vec(raw.to_f32()?, raw.shape, &self.device)?)
    }

    /// Read an NVFP4 weight stored under `prefix` in either layout, if there is one.
    fn packed(&self, prefix: &str, out: usize, inp: usize) -> Result<Option<Nvfp4Tensor>> {
        let ck = self.ckpt;
        let (codes_name, global_name, reciprocal) =
            if ck.contains(&format!("{prefix}.weight_packed")) {
                // compressed-tensors: weight_global_scale = 1 / tensor_scale
                (
                    format!("{prefix}.weight_packed"),
                    format!("{prefix}.weight_global_scale"),
                    true,
                )
            } else if ck.contains(&format!("{prefix}.weight_scale_2")) {
                (
                    format!("{prefix}.weight"),
                    format!("{prefix}.weight_scale_2"),
                    false,
                )
            } else {
                return Ok(None);
            };
        let codes = ck.get(&codes_name)?;
        codes.expect_dtype(Dtype::U8, "U8 (packed E2M1 pairs)")?;
        codes.expect_shape(&[out, inp / 2])?;
        let scales = ck.get(&format!("{prefix}.weight_scale"))?;
        scales.expect_dtype(Dtype::F8_E4M3, "F8_E4M3 (block scales)")?;
        scales.expect_shape(&[out, inp / 16])?;
        let global = ck.get(&global_name)?;
        global.expect_dtype(Dtype::F32, "F32 (tensor scale)")?;
        if global.numel() != 1 {
            return Err(EngineError::ShapeMismatch {
                name: global_name,
                expected: vec![1],
                got: global.shape.to_vec(),
            });
        }
        let g = global.to_f32()?[0];
        let tensor_scale = if reciprocal { 1.0 / g } else { g };
        Ok(Some(Nvfp4Tensor::from_parts(
            out,
            inp,
            codes.data.to_vec(),
            scales.data.to_vec(),
            tensor_scale,
        )?))
    }
}

impl WeightSource for CheckpointWeights<'_> {
    fn is_packed(&self, prefix: &str) -> bool {
        self.ckpt.contains(&format!("{prefix}.weight_packed"))
            || self.ckpt.contains(&format!("{prefix}.weight_scale_2"))
    }

    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let raw = self.ckpt.get(name)?;
        raw.expect_shape(shape)?;
        self.dense(&raw)
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let weight = match self.packed(prefix, out, inp)? {
            Some(q) => match self.format {
                LinearFormat::Nvfp4 => LinearWeight::Nvfp4(Arc::new(q)),
                LinearFormat::Dense => {
                    LinearWeight::Dense(Tensor::from_vec(q.dequantize(), (out, inp), &self.device)?)
                }
            },
            None => {
                let raw = self.ckpt.get(&format!("{prefix}.weight"))?;
                raw.expect_shape(&[out, inp])?;
                self.format.weight(raw.to_f32()?, out, inp, &self.device)?
            }
        };
        let bias = self.bias(prefix, out, bias)?;
        Linear::new(weight, bias)
    }
}

/// Weights drawn deterministically from a seed: each tensor from its own stream (seeded by
/// the seed and the tensor's name), so a tensor does not depend on the order of construction.
///
/// Distribution: norm weights are 1; linear weights uniform with std `1/sqrt(in)`; biases
/// and embeddings uniform with std `embed_std`.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    seed: u64,
    format: LinearFormat,
    device: Device,
    /// Std of embeddings and biases.
    pub embed_std: f32,
}

impl RandomWeights {
    /// A seeded source producing linears in `format`.
    pub fn new(seed: u64, format: LinearFormat, device: Device) -> Self {
        RandomWeights {
            seed,
            format,
            device,
            embed_std: 0.1,
        }
    }

    /// `rows × cols` values uniform in `[-a, a]` with `a = std·√3`, generated in parallel
    /// row blocks each seeded from (seed, name, block) — deterministic for any thread count.
    pub fn uniform(&self, name: &str, rows: usize, cols: usize, std: f32) -> Vec<f32> {
        const ROWS_PER_BLOCK: usize = 64;
        let a = std * 3f32.sqrt();
        let base = self.seed ^ fnv1a(name);
        let mut out = vec![0.0f32; rows * cols];
        out.par_chunks_mut((ROWS_PER_BLOCK * cols).max(1))
            .enumerate()
            .for_each(|(b, chunk)| {
                let mut rng = ChaCha8Rng::seed_from_u64(base.wrapping_add(b as u64));
                for v in chunk {
                    *v = (rng.random::<f32>() * 2.0 - 1.0) * a;
                }
            });
        out
    }
}

impl WeightSource for RandomWeights {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else {
            let cols = *shape.last().unwrap_or(&1);
            self.uniform(name, n / cols.max(1), cols, self.embed_std)
        };
        Ok(Tensor::from_vec(data, shape, &self.device)?)
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let data = self.uniform(&name, out, inp, 1.0 / (inp as f32).sqrt());
        let weight = self.format.weight(data, out, inp, &self.device)?;
        let bias = self.bias(prefix, out, bias)?;
        Linear::new(weight, bias)
    }
}

/// FNV-1a hash of a string (stable across runs and platforms).
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_are_deterministic_and_name_dependent() {
        let a = RandomWeights::new(7, LinearFormat::Dense, Device::Cpu);
        let x = a.uniform("w", 100, 32, 0.5);
        assert_eq!(x, a.uniform("w", 100, 32, 0.5));
        assert_ne!(x, a.uniform("v", 100, 32, 0.5));
        let mean = x.iter().sum::<f32>() / x.len() as f32;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / x.len() as f32;
        assert!(
            mean.abs() < 0.05 && (var.sqrt() - 0.5).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
