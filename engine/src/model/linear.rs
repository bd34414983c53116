//! `Linear`: a linear layer `y = x·Wᵀ + b` whose weight is dense f32, NVFP4-packed
//! (inference), or an f32 master weight seen through straight-through NVFP4 fake-quantization
//! (training, `--quant nvfp4-ste`). This is the one place the model touches the NVFP4
//! kernels (`kiln_kernels`). It works on the device of the tensors it is given; the device
//! itself is chosen by the engine (the `engine` module, above `model`).

use std::sync::Arc;

use candle_core::{Device, Tensor, D};
use kiln_kernels::nvfp4::Nvfp4Tensor;

use crate::error::Result;

/// How a linear layer's weight is held.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// Dense f32 `[out, in]` (no quantization; also lm_head and embeddings).
    Dense(Tensor),
    /// NVFP4 `[out, in]`: packed E2M1 codes, E4M3 block scales, one f32 tensor scale.
    Nvfp4(Arc<Nvfp4Tensor>),
    /// An f32 master weight `[out, in]` (usually a `candle_core::Var`'s tensor); the forward
    /// uses `dequantize(quantize(W))` and the gradient passes straight through to `W`.
    Ste(Tensor),
}

impl LinearWeight {
    /// The weight as dense f32 `[out, in]` (dequantized onto `device` if packed; a dense
    /// weight stays where it is).
    pub fn dense(&self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            LinearWeight::Dense(w) | LinearWeight::Ste(w) => w.clone(),
            LinearWeight::Nvfp4(q) => Tensor::from_vec(q.dequantize(), (q.rows, q.cols), device)?,
        })
    }
}

/// A linear layer. Invariant: the weight is `[out_features, in_features]` and the bias, if
/// any, is `[out_features]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
}

impl Linear {
    /// A layer from its weight and optional bias (shapes checked by the caller's loader).
    pub fn new(weight: LinearWeight, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = match &weight {
            LinearWeight::Dense(w) | LinearWeight::Ste(w) => w.dims2()?,
            LinearWeight::Nvfp4(q) => (q.rows, q.cols),
        };
        if let Some(b) = &bias {
            debug_assert_eq!(b.dims(), &[out_features]);
        }
        Ok(Linear {
            weight,
            bias,
            out_features,
            in_features,
        })
    }

    /// Output width (N).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input width (K).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The weight.
    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// The bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The weight and the bias, taken apart.
    pub fn into_parts(self) -> (LinearWeight, Option<Tensor>) {
        (self.weight, self.bias)
    }

    /// `x[..., in] → y[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let k = *out_dims.last().expect("linear input has at least one dim");
        let m: usize = x.elem_count() / k.max(1);
        let x2 = x.reshape((m, k))?;
        let y = match &self.weight {
            LinearWeight::Dense(w) => x2.matmul(&w.t()?)?,
            LinearWeight::Nvfp4(q) => nvfp4_matmul(&x2, m, q, x.device())?,
            LinearWeight::Ste(w) => {
                let (rows, cols) = w.dims2()?;
                let wv = w.flatten_all()?.to_vec1::<f32>()?;
                let fq = kiln_kernels::cpu::fake_quant_ste(&wv, rows, cols)?;
                let fq = Tensor::from_vec(fq, (rows, cols), w.device())?;
                // Straight-through: the value is fq, the gradient flows to w unchanged.
                let w_ste = (w + (fq - w)?.detach())?;
                x2.matmul(&w_ste.t()?)?
            }
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        *out_dims.last_mut().expect("non-empty") = self.out_features;
        Ok(y.reshape(out_dims)?)
    }

    /// Bytes held, as (weights, scales): packed codes count as weights, E4M3 block scales and
    /// the tensor scale as scales; dense weights and biases as weights.
    pub fn bytes(&self) -> (u64, u64) {
        let bias = self.bias.as_ref().map_or(0, tensor_bytes);
        match &self.weight {
            LinearWeight::Dense(w) | LinearWeight::Ste(w) => (tensor_bytes(w) + bias, 0),
            LinearWeight::Nvfp4(q) => (q.packed.len() as u64 + bias, q.scales.len() as u64 + 4),
        }
    }

    /// The weight as dense f32 `[out, in]` (dequantized onto `device` if packed; a dense
    /// weight stays where it is).
    pub fn dense_weight(&self, device: &Device) -> Result<Tensor> {
        self.weight.dense(device)
    }
}

/// `x[m, K] · Wᵀ` with W in NVFP4, through the kernels crate's CPU path.
fn nvfp4_matmul(x: &Tensor, m: usize, q: &Nvfp4Tensor, device: &Device) -> Result<Tensor> {
    let xv = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let y = kiln_kernels::cpu::matmul_nvfp4(&xv, m, q);
    Ok(Tensor::from_vec(y, (m, q.rows), device)?)
}

/// Bytes of a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) · w`. `differentiable` picks
/// candle's composite version (with a backward pass) over the fused inference kernel.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        let n = x.dim(D::Minus1)? as f64;
        let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / n)?;
        Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?)
    } else {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvfp4_forward_matches_dense_forward_on_the_dequantized_weight() {
        let (n, k) = (24, 32);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37) % 23) as f32 / 11.0 - 1.0)
            .collect();
        let q = Arc::new(Nvfp4Tensor::quantize(&w, n, k).unwrap());
        let b =
            Tensor::from_vec((0..n).map(|i| i as f32 * 0.1).collect(), n, &Device::Cpu).unwrap();
        let packed = Linear::new(LinearWeight::Nvfp4(q.clone()), Some(b.clone())).unwrap();
        let dense_w = packed.dense_weight(&Device::Cpu).unwrap();
        let dense = Linear::new(LinearWeight::Dense(dense_w), Some(b)).unwrap();
        let x = Tensor::from_vec(
            (0..2 * 3 * k)
                .map(|i| ((i * 13) % 7) as f32 / 3.0 - 1.0)
                .collect(),
            (2, 3, k),
            &Device::Cpu,
        )
        .unwrap();
        let a = packed.forward(&x).unwrap();
        let d = dense.forward(&x).unwrap();
        assert_eq!(a.dims(), &[2, 3, n]);
        let diff = (a - d).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        let (wb, sb) = packed.bytes();
        assert_eq!(wb, (n * k / 2 + n * 4) as u64);
        assert_eq!(sb, (n * k / 16 + 4) as u64);
    }

    #[test]
    fn ste_forward_uses_quantized_values_and_passes_gradients_through() {
        let (n, k) = (4, 16);
        let wv: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let var = candle_core::Var::from_vec(wv.clone(), (n, k), &Device::Cpu).unwrap();
        let lin = Linear::new(LinearWeight::Ste(var.as_tensor().clone()), None).unwrap();
        let x = Tensor::ones((1, k), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = lin.forward(&x).unwrap();
        let fq = kiln_kernels::cpu::fake_quant_ste(&wv, n, k).unwrap();
        let expect: Vec<f32> = fq.chunks(k).map(|r| r.iter().sum()).collect();
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (g, e) in got.iter().zip(&expect) {
            assert!((g - e).abs() < 1e-5, "{g} vs {e}");
        }
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(var.as_tensor()).unwrap();
        // d(sum(x·Wᵀ))/dW = 1 everywhere (x = 1), unchanged by the fake quantization.
        assert!(g
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == 1.0));
    }
}
