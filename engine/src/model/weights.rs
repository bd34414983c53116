//! Where a model's weights come from: the `WeightSource` trait the model builder asks for
//! each tensor and linear layer, with two implementations — `CheckpointWeights` (a Hugging
//! Face checkpoint: bf16/f16/f32 quantized at load, or NVFP4 in the ModelOpt or
//! compressed-tensors layout loaded as it is) and `RandomWeights` (deterministic from a seed,
//! for the bundled tiny model and benchmarks).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use kiln_kernels::checkpoint::nvfp4_from_tensors;
use kiln_kernels::cuda::CudaKernels;
use kiln_kernels::nvfp4::Nvfp4Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::checkpoint::{Checkpoint, RawTensor};
use super::layout::{LinearSpec, TensorRole, TensorSpec};
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

/// Supplies the tensors a model needs, as its [`super::ModelLayout`] describes them.
pub trait WeightSource {
    /// Whether the linear layer is stored NVFP4-packed (so the LM head, which is otherwise
    /// kept dense, is loaded as a packed linear).
    fn is_packed(&self, _linear: &LinearSpec) -> bool {
        false
    }

    /// A dense f32 tensor (embedding, norm weight, bias) of exactly `spec.shape`.
    fn tensor(&mut self, spec: &TensorSpec) -> Result<Tensor>;

    /// The linear layer: its weight `[out, in]` and its bias `[out]` if it has one.
    fn linear(&mut self, spec: &LinearSpec) -> Result<Linear>;

    /// The layer's bias, when it has one.
    fn bias(&mut self, spec: &LinearSpec) -> Result<Option<Tensor>> {
        spec.bias_tensor().map(|b| self.tensor(&b)).transpose()
    }

    /// The layer as a model holds it: [`WeightSource::linear`], except that a layer not held
    /// NVFP4 (the LM head) is its weight as a plain dense tensor unless it is stored packed.
    fn layer(&mut self, spec: &LinearSpec) -> Result<Linear> {
        if spec.nvfp4 || self.is_packed(spec) {
            self.linear(spec)
        } else {
            let w = self.tensor(&spec.weight())?;
            let b = self.bias(spec)?;
            Linear::new(LinearWeight::Dense(w), b)
        }
    }
}

/// The GPU whose quantize kernel turns a loader's float linears into NVFP4 (the bytes the CPU
/// makes, [`Nvfp4Tensor::quantize`]): a model loaded for the GPU engine is quantized there,
/// one tensor at a time through a bounded staging buffer, instead of on the host's cores.
#[derive(Clone)]
pub struct GpuQuantizer(pub Arc<CudaKernels>);

impl std::fmt::Debug for GpuQuantizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuQuantizer({})", self.0.device_name())
    }
}

impl GpuQuantizer {
    /// The checkpoint tensor `raw` (`[out, inp]`) quantized on the GPU; bf16 goes up as it is
    /// stored (half the bytes of f32, no f32 copy on the host).
    fn quantize(&self, raw: &RawTensor<'_>, out: usize, inp: usize) -> Result<Nvfp4Tensor> {
        use kiln_kernels::cuda::host::HostInput;
        if raw.dtype == safetensors::Dtype::BF16 {
            let copied: Vec<half::bf16>;
            let values: &[half::bf16] = match bytemuck::try_cast_slice(raw.data) {
                Ok(v) => v,
                Err(_) => {
                    // not 2-byte aligned in the file: one copy
                    copied = raw
                        .data
                        .chunks_exact(2)
                        .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                        .collect();
                    &copied
                }
            };
            return Ok(self.0.quantize_staged(HostInput::Bf16(values), out, inp)?);
        }
        let data = raw.to_f32()?;
        Ok(self.0.quantize_staged(HostInput::F32(&data), out, inp)?)
    }
}

/// Weights read from a checkpoint directory.
#[derive(Debug)]
pub struct CheckpointWeights<'a> {
    ckpt: &'a Checkpoint,
    format: LinearFormat,
    device: Device,
    quantizer: Option<GpuQuantizer>,
}

impl<'a> CheckpointWeights<'a> {
    /// A source over `ckpt` producing linears in `format` on `device`.
    pub fn new(ckpt: &'a Checkpoint, format: LinearFormat, device: Device) -> Self {
        CheckpointWeights {
            ckpt,
            format,
            device,
            quantizer: None,
        }
    }

    /// Float linears loaded as NVFP4 are quantized by `quantizer`'s GPU (None: on the CPU).
    pub fn with_quantizer(mut self, quantizer: Option<GpuQuantizer>) -> Self {
        self.quantizer = quantizer;
        self
    }

    fn dense(&self, raw: &RawTensor<'_>) -> Result<Tensor> {
        Ok(Tensor::from_vec(raw.to_f32()?, raw.shape, &self.device)?)
    }

    /// Read the layer's NVFP4 weight (through `kiln_kernels::checkpoint::nvfp4_from_tensors`)
    /// in the layout the checkpoint stores it in, if it is stored NVFP4.
    fn packed(&self, spec: &LinearSpec) -> Result<Option<Nvfp4Tensor>> {
        let ck = self.ckpt;
        let Some(format) = spec.stored_format(|n| ck.contains(n)) else {
            return Ok(None);
        };
        let parts = spec.nvfp4_tensors(format);
        for t in &parts {
            ck.get(&t.name)?; // a missing one is named
        }
        let q = nvfp4_from_tensors(&spec.prefix, ck.tensors())?
            .expect("every tensor of the layout is present");
        let codes = &parts[0];
        let got = vec![q.rows, q.cols / 2];
        if got != codes.shape {
            return Err(EngineError::ShapeMismatch {
                name: codes.name.clone(),
                expected: codes.shape.clone(),
                got,
            });
        }
        Ok(Some(q))
    }
}

impl WeightSource for CheckpointWeights<'_> {
    fn is_packed(&self, spec: &LinearSpec) -> bool {
        spec.stored_format(|n| self.ckpt.contains(n)).is_some()
    }

    fn tensor(&mut self, spec: &TensorSpec) -> Result<Tensor> {
        let raw = self.ckpt.get(&spec.name)?;
        raw.expect_shape(&spec.shape)?;
        self.dense(&raw)
    }

    fn linear(&mut self, spec: &LinearSpec) -> Result<Linear> {
        let (out, inp) = (spec.out_features, spec.in_features);
        let weight = match self.packed(spec)? {
            Some(q) => match self.format {
                LinearFormat::Nvfp4 => LinearWeight::Nvfp4(Arc::new(q)),
                LinearFormat::Dense => {
                    LinearWeight::Dense(Tensor::from_vec(q.dequantize(), (out, inp), &self.device)?)
                }
            },
            None => {
                let w = spec.weight();
                let raw = self.ckpt.get(&w.name)?;
                raw.expect_shape(&w.shape)?;
                let weight = match (&self.quantizer, self.format) {
                    (Some(q), LinearFormat::Nvfp4) => q
                        .quantize(&raw, out, inp)
                        .map(|t| LinearWeight::Nvfp4(Arc::new(t))),
                    _ => raw
                        .to_f32()
                        .and_then(|v| self.format.weight(v, out, inp, &self.device)),
                };
                // a NaN or infinity in a float checkpoint: say which tensor holds it
                weight.map_err(|e| match e {
                    EngineError::Kernel(k @ kiln_kernels::KernelError::NonFinite { .. }) => {
                        EngineError::InvalidArgument(format!(
                            "checkpoint tensor {} in {}: {k}",
                            w.name,
                            self.ckpt.dir().display()
                        ))
                    }
                    e => e,
                })?
            }
        };
        let bias = self.bias(spec)?;
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
    fn tensor(&mut self, spec: &TensorSpec) -> Result<Tensor> {
        let shape = spec.shape.as_slice();
        let n: usize = shape.iter().product();
        let data = if spec.role == TensorRole::Norm {
            vec![1.0; n]
        } else {
            let cols = *shape.last().unwrap_or(&1);
            self.uniform(&spec.name, n / cols.max(1), cols, self.embed_std)
        };
        Ok(Tensor::from_vec(data, shape, &self.device)?)
    }

    fn linear(&mut self, spec: &LinearSpec) -> Result<Linear> {
        let (out, inp) = (spec.out_features, spec.in_features);
        let data = self.uniform(&spec.weight().name, out, inp, 1.0 / (inp as f32).sqrt());
        let weight = self.format.weight(data, out, inp, &self.device)?;
        let bias = self.bias(spec)?;
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
