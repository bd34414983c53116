//! [`CudaModel`]: a model's weights resident on one GPU, laid out for the decode step. The
//! linears stay NVFP4-packed (q/k/v concatenated into one matrix, gate/up into another, each
//! with tensor scale 1 and the parts' own tensor scales kept beside it, so one GEMV runs over
//! all of their rows and the epilogue applies each part's scale); the vocabulary projection is
//! NVFP4 too (for tied embeddings a quantized copy of the embedding); the embedding is bf16;
//! norms, biases and RoPE frequencies are f32 (they are tiny, and f32 keeps the GPU close to
//! the CPU reference). Built from a host [`Model`] (the same bytes the CPU runs) or, for
//! benchmarks of model shapes, from seeded random codes made on the GPU.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use cudarc::driver::CudaSlice;
use half::bf16;
use kiln_kernels::cuda::decode::attention_kernel_for;
use kiln_kernels::cuda::host::{HostInput, QuantizeStaging};
use kiln_kernels::cuda::{CudaKernels, DeviceNvfp4};
use kiln_kernels::nvfp4::tensor::{checked_amax, tensor_scale_for_amax};
use kiln_kernels::nvfp4::Nvfp4Tensor;

use super::cuda;
use crate::error::{EngineError, Result};
use crate::model::rope::Rope;
use crate::model::{LayerParam, Linear, LinearWeight, Model, ModelConfig, ParamKey, ParamRef};

/// Bytes of a model on the GPU by category (what `model_loaded` reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuWeightBytes {
    /// Packed E2M1 codes of every linear (the vocabulary projection included).
    pub weights: u64,
    /// E4M3 block scales and tensor scales.
    pub scales: u64,
    /// The bf16 embedding.
    pub embeddings: u64,
    /// Norm weights, biases, RoPE frequencies (f32).
    pub small: u64,
}

impl GpuWeightBytes {
    /// The GPU bytes a model of shape `cfg` takes (no allocation): what
    /// [`CudaModel::bytes`] will report once loaded.
    pub fn of_config(cfg: &ModelConfig) -> Self {
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let qkv = cfg.q_size() + 2 * cfg.kv_size();
        let nv = |n: usize, k: usize| ((n * k / 2) as u64, (n * k / 16 + 4) as u64);
        let mats = [(qkv, h), (h, cfg.q_size()), (2 * i, h), (h, i)];
        let (mut w, mut s) = (0u64, 0u64);
        for (n, k) in mats {
            let (a, b) = nv(n, k);
            w += a;
            s += b;
        }
        // per-part tensor scales: 3 for q/k/v, 2 for gate/up
        s += 5 * 4;
        let l = cfg.num_hidden_layers as u64;
        let (hw, hs) = nv(v, h);
        let norms = 2 * h + if cfg.qk_norm() { 2 * cfg.head_dim } else { 0 };
        let bias = if cfg.attention_bias { qkv } else { 0 };
        GpuWeightBytes {
            weights: w * l + hw,
            scales: s * l + hs,
            embeddings: (v * h * 2) as u64,
            small: ((norms + bias) as u64 * l + h as u64 + (cfg.head_dim / 2) as u64) * 4,
        }
    }

    /// Everything.
    pub fn total(&self) -> u64 {
        self.weights + self.scales + self.embeddings + self.small
    }
}

/// One decoder layer on the GPU.
pub(crate) struct CudaLayer {
    pub input_norm: CudaSlice<f32>,
    /// q, k, v rows concatenated, tensor scale 1.
    pub qkv: DeviceNvfp4,
    /// The tensor scales of q, k and v.
    pub qkv_scale: CudaSlice<f32>,
    /// q, k, v biases concatenated (Qwen2).
    pub qkv_bias: Option<CudaSlice<f32>>,
    /// Per-head q and k norm weights (Qwen3).
    pub qk_norm: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    pub o: DeviceNvfp4,
    pub post_norm: CudaSlice<f32>,
    /// gate and up rows concatenated, tensor scale 1.
    pub gate_up: DeviceNvfp4,
    /// The tensor scales of gate and up.
    pub gate_up_scale: CudaSlice<f32>,
    pub down: DeviceNvfp4,
}

/// A model resident on one GPU.
pub struct CudaModel {
    pub(crate) k: Arc<CudaKernels>,
    pub(crate) cfg: ModelConfig,
    /// `[vocab, hidden]` bf16.
    pub(crate) embed: CudaSlice<bf16>,
    pub(crate) layers: Vec<CudaLayer>,
    pub(crate) norm: CudaSlice<f32>,
    /// The vocabulary projection (`[vocab, hidden]` NVFP4).
    pub(crate) lm_head: DeviceNvfp4,
    /// `head_dim / 2` RoPE inverse frequencies.
    pub(crate) inv_freq: CudaSlice<f32>,
    bytes: GpuWeightBytes,
}

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModel")
            .field("device", &self.k.device_name())
            .field("layers", &self.layers.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// Whether the GPU engine can run a model of shape `cfg`; the error says why not.
pub fn check_supported(cfg: &ModelConfig) -> Result<()> {
    let rep = cfg.num_attention_heads / cfg.num_key_value_heads.max(1);
    let bad = |m: String| Err(EngineError::InvalidArgument(m));
    if attention_kernel_for(cfg.head_dim, rep).is_none() {
        return bad(format!(
            "the GPU engine has no attention kernel for head_dim {} with {rep} query heads per \
             KV head (it runs head_dim 64 and 128 with up to 16, 32 and 256 with up to 8); run this \
             model with --device cpu",
            cfg.head_dim
        ));
    }
    for (what, k) in [
        ("hidden_size", cfg.hidden_size),
        ("intermediate_size", cfg.intermediate_size),
        ("num_attention_heads × head_dim", cfg.q_size()),
    ] {
        if !k.is_multiple_of(32) {
            return bad(format!(
                "the GPU engine needs {what} to be a multiple of 32 (got {k}); run this model \
                 with --device cpu"
            ));
        }
    }
    Ok(())
}

fn f32_host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// One matrix of a stacked GPU linear: packed NVFP4 (uploaded byte for byte) or dense f32
/// (quantized on the GPU).
enum Part<'a> {
    Packed(&'a Nvfp4Tensor),
    Dense {
        what: String,
        data: Vec<f32>,
        rows: usize,
    },
}

impl<'a> Part<'a> {
    /// The weight of linear `key` of `model`.
    fn of(l: &'a Linear, key: ParamKey) -> Result<Self> {
        Ok(match l.weight() {
            LinearWeight::Nvfp4(q) => Part::Packed(q),
            LinearWeight::Dense(w) | LinearWeight::Ste(w) => Part::Dense {
                what: format!("{key:?}"),
                data: f32_host(w)?,
                rows: w.dims2()?.0,
            },
        })
    }

    fn rows(&self) -> usize {
        match self {
            Part::Packed(q) => q.rows,
            Part::Dense { rows, .. } => *rows,
        }
    }
}

/// Rows of several matrices of one width stacked into one NVFP4 tensor on the GPU, tensor
/// scale 1; the parts' own tensor scales are returned beside it. Packed parts are copied in as
/// they are; dense ones are quantized on the GPU (round to nearest, tensor scale from their
/// amax: the bytes [`Nvfp4Tensor::quantize`] makes on the CPU) through one staging buffer of at
/// most 64 MiB, so a dense weight never needs more than that beside the weights. A non-finite
/// value in a dense weight is an error naming the parameter, the row and the column.
fn stack(k: &CudaKernels, cols: usize, parts: &[Part]) -> Result<(DeviceNvfp4, Vec<f32>)> {
    let rows: usize = parts.iter().map(Part::rows).sum();
    let mut out = k.alloc_nvfp4(rows, cols)?;
    let mut staging = QuantizeStaging::default();
    let mut scales = Vec::with_capacity(parts.len());
    let mut first = 0;
    for p in parts {
        match p {
            Part::Packed(q) => {
                if q.cols != cols {
                    return Err(EngineError::InvalidArgument(format!(
                        "stacking a [{}, {}] NVFP4 matrix into one of width {cols}",
                        q.rows, q.cols
                    )));
                }
                let (a, b) = (first * cols, (first + q.rows) * cols);
                let s = k.stream();
                s.memcpy_htod(&q.packed, &mut out.packed.slice_mut(a / 2..b / 2))
                    .map_err(cuda("uploading packed codes"))?;
                s.memcpy_htod(&q.scales, &mut out.scales.slice_mut(a / 16..b / 16))
                    .map_err(cuda("uploading block scales"))?;
                scales.push(q.tensor_scale);
                first += q.rows;
            }
            Part::Dense { what, data, rows } => {
                if data.len() != rows * cols {
                    return Err(EngineError::InvalidArgument(format!(
                        "stacking {what} ({} values) as {rows} rows into a matrix of width {cols}",
                        data.len()
                    )));
                }
                let amax = checked_amax(data, cols)
                    .map_err(|e| EngineError::InvalidArgument(format!("weight {what}: {e}")))?;
                let ts = tensor_scale_for_amax(amax);
                k.quantize_rows_from_host(HostInput::F32(data), ts, &mut out, first, &mut staging)?;
                scales.push(ts);
                first += rows;
            }
        }
    }
    k.stream()
        .memcpy_htod(&[1.0f32], &mut out.tensor_scale)
        .map_err(cuda("setting a tensor scale"))?;
    if staging.in_use() {
        // the queued quantizes read the staging buffer: let them finish before it is freed
        k.synchronize()?;
    }
    Ok((out, scales))
}

/// One linear on the GPU with its own tensor scale.
fn single(k: &CudaKernels, cols: usize, part: Part) -> Result<DeviceNvfp4> {
    let (mut w, ts) = stack(k, cols, &[part])?;
    k.stream()
        .memcpy_htod(&ts, &mut w.tensor_scale)
        .map_err(cuda("setting a tensor scale"))?;
    Ok(w)
}

fn upload_f32(k: &CudaKernels, v: &[f32]) -> Result<CudaSlice<f32>> {
    k.stream().clone_htod(v).map_err(cuda("uploading weights"))
}

impl CudaModel {
    /// Upload `model` (its NVFP4 linears byte for byte; dense ones quantized first) to the
    /// GPU of `k`. A tied head becomes an NVFP4 copy of the embedding
    /// ([`Model::gpu_reference`] makes the same tensor on the host).
    pub fn from_model(k: Arc<CudaKernels>, model: &Model) -> Result<Self> {
        let cfg = model.config().clone();
        check_supported(&cfg)?;
        let tensor = |key: ParamKey| -> Result<Vec<f32>> {
            match model.param_ref(key) {
                ParamRef::Tensor(t) => f32_host(t),
                ParamRef::Linear(_) => unreachable!("{key:?} is a tensor"),
            }
        };
        let linear = |key: ParamKey| -> Result<(&Linear, Part)> {
            match model.param_ref(key) {
                ParamRef::Linear(l) => Ok((l, Part::of(l, key)?)),
                ParamRef::Tensor(_) => unreachable!("{key:?} is a linear"),
            }
        };
        let (h, i_size) = (cfg.hidden_size, cfg.intermediate_size);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = |lp| ParamKey::Layer(i, lp);
            use LayerParam as L;
            let ((q, qp), (kk, kp), (v, vp)) = (
                linear(p(L::QProj))?,
                linear(p(L::KProj))?,
                linear(p(L::VProj))?,
            );
            let qkv_bias = match (q.bias(), kk.bias(), v.bias()) {
                (Some(a), Some(b), Some(c)) => {
                    let mut all = f32_host(a)?;
                    all.extend(f32_host(b)?);
                    all.extend(f32_host(c)?);
                    Some(upload_f32(&k, &all)?)
                }
                _ => None,
            };
            let (qkv, qkv_scale) = stack(&k, h, &[qp, kp, vp])?;
            let qk_norm = if cfg.qk_norm() {
                Some((
                    upload_f32(&k, &tensor(p(L::QNorm))?)?,
                    upload_f32(&k, &tensor(p(L::KNorm))?)?,
                ))
            } else {
                None
            };
            let (gate_up, gate_up_scale) =
                stack(&k, h, &[linear(p(L::GateProj))?.1, linear(p(L::UpProj))?.1])?;
            layers.push(CudaLayer {
                input_norm: upload_f32(&k, &tensor(p(L::InputNorm))?)?,
                qkv,
                qkv_scale: upload_f32(&k, &qkv_scale)?,
                qkv_bias,
                qk_norm,
                o: single(&k, cfg.q_size(), linear(p(L::OProj))?.1)?,
                post_norm: upload_f32(&k, &tensor(p(L::PostAttentionNorm))?)?,
                gate_up,
                gate_up_scale: upload_f32(&k, &gate_up_scale)?,
                down: single(&k, i_size, linear(p(L::DownProj))?.1)?,
            });
        }
        let embed_f32 = tensor(ParamKey::Embed)?;
        let embed_bf16: Vec<bf16> = {
            use rayon::prelude::*;
            embed_f32.par_iter().map(|&x| bf16::from_f32(x)).collect()
        };
        let embed = k
            .stream()
            .clone_htod(&embed_bf16)
            .map_err(cuda("uploading the embedding"))?;
        let lm_head = if cfg.tie_word_embeddings {
            let rows = cfg.vocab_size;
            let what = "the tied vocabulary projection (the embedding)".to_string();
            single(
                &k,
                h,
                Part::Dense {
                    what,
                    data: embed_f32,
                    rows,
                },
            )?
        } else {
            single(&k, h, linear(ParamKey::LmHead)?.1)?
        };
        let norm = upload_f32(&k, &tensor(ParamKey::Norm)?)?;
        let inv_freq = upload_f32(&k, Rope::new(&cfg).inv_freq())?;
        Self::finish(k, cfg, embed, layers, norm, lm_head, inv_freq)
    }

    /// A model of shape `cfg` with seeded random weights made on the GPU (benchmarks): codes
    /// over all E2M1 values, block scales near 1, tensor scales giving weights of about 0.02
    /// RMS, norms 1, biases small.
    pub fn random(k: Arc<CudaKernels>, cfg: &ModelConfig, seed: u64) -> Result<Self> {
        check_supported(cfg)?;
        let mut next = seed;
        let mut rand_nvfp4 = |rows: usize, cols: usize, ts: f32| -> Result<DeviceNvfp4> {
            let mut w = k.alloc_nvfp4(rows, cols)?;
            next = next.wrapping_add(0x9E37_79B9);
            // E4M3 0x30..0x40: 0.5 .. 2.0
            k.random_nvfp4_async(&mut w, next, (0x30, 0x40))?;
            k.stream()
                .memcpy_htod(&[ts], &mut w.tensor_scale)
                .map_err(cuda("setting a tensor scale"))?;
            Ok(w)
        };
        // E2M1 codes uniform over ±{0, .5, 1, 1.5, 2, 3, 4, 6}: RMS ≈ 2.9; block scale ≈ 1.1
        let ts = 0.02 / 3.2;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let qkv_rows = cfg.q_size() + 2 * cfg.kv_size();
        let ones = |n: usize| upload_f32(&k, &vec![1.0f32; n]);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            layers.push(CudaLayer {
                input_norm: ones(h)?,
                qkv: rand_nvfp4(qkv_rows, h, 1.0)?,
                qkv_scale: upload_f32(&k, &[ts; 3])?,
                qkv_bias: if cfg.attention_bias {
                    Some(upload_f32(&k, &vec![0.01f32; qkv_rows])?)
                } else {
                    None
                },
                qk_norm: if cfg.qk_norm() {
                    Some((ones(cfg.head_dim)?, ones(cfg.head_dim)?))
                } else {
                    None
                },
                o: rand_nvfp4(h, cfg.q_size(), ts)?,
                post_norm: ones(h)?,
                gate_up: rand_nvfp4(2 * i, h, 1.0)?,
                gate_up_scale: upload_f32(&k, &[ts; 2])?,
                down: rand_nvfp4(h, i, ts)?,
            });
        }
        let mut embed = k
            .stream()
            .alloc_zeros::<bf16>(cfg.vocab_size * h)
            .map_err(cuda("allocating the embedding"))?;
        k.random_bf16_async(&mut embed, seed ^ 0xE3BE_D000, 0.05)?;
        let lm_head = rand_nvfp4(cfg.vocab_size, h, ts)?;
        let norm = ones(h)?;
        let inv_freq = upload_f32(&k, Rope::new(cfg).inv_freq())?;
        Self::finish(k, cfg.clone(), embed, layers, norm, lm_head, inv_freq)
    }

    fn finish(
        k: Arc<CudaKernels>,
        cfg: ModelConfig,
        embed: CudaSlice<bf16>,
        layers: Vec<CudaLayer>,
        norm: CudaSlice<f32>,
        lm_head: DeviceNvfp4,
        inv_freq: CudaSlice<f32>,
    ) -> Result<Self> {
        // every GEMV shape of a decode step and of short prompts (up to 8 rows), before any
        // launch (a launch never allocates)
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let shapes = [
            (cfg.q_size() + 2 * cfg.kv_size(), h),
            (h, cfg.q_size()),
            (2 * i, h),
            (h, i),
            (cfg.vocab_size, h),
        ];
        for (n, kk) in shapes {
            k.reserve_gemv(8, n, kk)?;
        }
        k.synchronize()?;
        let bytes = GpuWeightBytes::of_config(&cfg);
        Ok(CudaModel {
            k,
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            bytes,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The kernels (device, stream) the model lives on.
    pub fn kernels(&self) -> &Arc<CudaKernels> {
        &self.k
    }

    /// Bytes on the GPU by category.
    pub fn bytes(&self) -> GpuWeightBytes {
        self.bytes
    }

    /// Every packed matrix as the GPU holds it, copied back (synchronises): per layer `qkv`,
    /// `o`, `gate_up`, `down`, then `lm_head`, each with the tensor scales of its parts (the
    /// stacked ones hold tensor scale 1 and their parts' scales beside them). For checks
    /// against the host's quantize.
    pub fn download_linears(&self) -> Result<Vec<(String, Nvfp4Tensor, Vec<f32>)>> {
        let k = &self.k;
        let scales = |s: &CudaSlice<f32>| -> Result<Vec<f32>> {
            k.stream()
                .clone_dtoh(s)
                .map_err(cuda("reading tensor scales"))
        };
        let own = |w: &DeviceNvfp4| -> Result<(Nvfp4Tensor, Vec<f32>)> {
            let t = k.download_nvfp4(w)?;
            let ts = vec![t.tensor_scale];
            Ok((t, ts))
        };
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let qkv = (k.download_nvfp4(&l.qkv)?, scales(&l.qkv_scale)?);
            let gate_up = (k.download_nvfp4(&l.gate_up)?, scales(&l.gate_up_scale)?);
            for (name, (t, s)) in [
                ("qkv", qkv),
                ("o", own(&l.o)?),
                ("gate_up", gate_up),
                ("down", own(&l.down)?),
            ] {
                out.push((format!("layer {i} {name}"), t, s));
            }
        }
        let (t, s) = own(&self.lm_head)?;
        out.push(("lm_head".into(), t, s));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_bytes_of_the_7b_shape_fit_the_target() {
        let b = GpuWeightBytes::of_config(&ModelConfig::qwen2_5_0_5b());
        // 0.5B: 358M linear weights + a 136M-weight NVFP4 head → ~247 MB codes
        assert!(b.weights > 240_000_000 && b.weights < 250_000_000, "{b:?}");
        assert_eq!(b.embeddings, 151_936 * 896 * 2);
        let b = GpuWeightBytes::of_config(&ModelConfig::qwen2_5_7b());
        assert!(b.total() < 5_500_000_000, "{b:?} = {}", b.total());
    }

    #[test]
    fn unsupported_shapes_are_named() {
        let mut cfg = ModelConfig::qwen2_5_0_5b();
        cfg.head_dim = 96;
        let e = check_supported(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("head_dim 96") && e.contains("--device cpu"),
            "{e}"
        );
    }
}
