//! Straight-through fake quantization for NVFP4-aware training (`--quant nvfp4-ste`).

use crate::nvfp4::Nvfp4Tensor;
use crate::KernelError;

/// Forward value of the straight-through estimator: `dequantize(quantize(w))` of the master
/// weight `w` (`[rows, cols]`, f32), with ModelOpt round-to-nearest. The result is what the
/// forward pass multiplies by.
///
/// The gradient "passes through": the backward pass treats this function as the identity,
/// `∂L/∂w = ∂L/∂w_q`. How a caller wires it:
/// - with an autograd framework (candle): `w_ste = w + (w_q − w).detach()` — its value is
///   `w_q`, its gradient with respect to `w` is the identity;
/// - by hand: run the forward with `w_q`, compute `∂L/∂w_q` as for a dense weight, and feed
///   that unchanged to the optimizer as the gradient of the f32 master `w`.
///
/// Errors as [`Nvfp4Tensor::quantize`] (NaN/inf, `cols % 16 != 0`).
pub fn fake_quant_ste(w: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, KernelError> {
    Ok(Nvfp4Tensor::quantize(w, rows, cols)?.dequantize())
}
