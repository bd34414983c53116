//! The chunked AdamW step on packed NVFP4 weights ("full NVFP4" training): only the packed
//! weights persist; each chunk of `chunk_rows` rows is dequantized → AdamW (f32 moments) →
//! requantized with stochastic rounding. The scratch is one chunk of f32, whatever the
//! tensor's size.
//!
//! Two passes keep the result independent of the chunk size: the new tensor scale
//! (`amax / 2688` of the *updated* weights) must be known before any chunk is requantized, so
//! pass 1 computes the updated values chunk by chunk only to take their amax, and pass 2
//! recomputes them (the arithmetic is deterministic), writes the moments and requantizes.
//! Stochastic rounding draws by the element's index in the whole tensor, so chunked and
//! unchunked steps give identical bytes.

use crate::nvfp4::{
    checked_amax, quantize_rows_into, tensor_scale_for_amax, Nvfp4Tensor, Rounding,
};
use crate::KernelError;

/// AdamW hyper-parameters (decoupled weight decay, as `torch.optim.AdamW`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to `sqrt(v̂)`.
    pub eps: f32,
    /// Decoupled weight decay (multiplies the weight by `1 − lr·wd` each step).
    pub weight_decay: f32,
}

impl Default for AdamWParams {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    fn default() -> Self {
        AdamWParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Mixed into a step's stochastic-rounding seed for the first moment when moments are stored
/// as bf16 (`--moments bf16`): each moment draws its own numbers.
pub const MOMENT1_SR_SALT: u64 = 0x6A09_E667_F3BC_C908;
/// As [`MOMENT1_SR_SALT`], for the second moment.
pub const MOMENT2_SR_SALT: u64 = 0xBB67_AE85_84CA_A73B;

/// The per-step scalars both the CPU and the CUDA update use (computed once on the host, so
/// both paths see the same f32 values).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    /// `beta1`.
    pub beta1: f32,
    /// `beta2`.
    pub beta2: f32,
    /// `eps`.
    pub eps: f32,
    /// `1 − lr·weight_decay`.
    pub decay: f32,
    /// `lr / (1 − beta1^step)`.
    pub step_size: f32,
    /// `sqrt(1 − beta2^step)`.
    pub bc2_sqrt: f32,
    /// The stochastic-rounding seed for this step (the caller's seed mixed with the step, so
    /// successive steps draw independent roundings).
    pub sr_seed: u64,
}

impl AdamWScalars {
    /// Scalars for 1-based `step` with the caller's `seed`.
    pub fn new(hp: AdamWParams, step: u64, seed: u64) -> Self {
        let t = step.max(1) as i32;
        let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
        let bc2 = 1.0 - (hp.beta2 as f64).powi(t);
        AdamWScalars {
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            decay: (1.0 - hp.lr as f64 * hp.weight_decay as f64) as f32,
            step_size: (hp.lr as f64 / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            sr_seed: seed ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03),
        }
    }

    /// One element's update; returns `(w', m', v')`. The CUDA kernel `adamw_nvfp4.cu` does the
    /// same operations in the same order (no fused multiply-add).
    #[inline]
    pub fn update(&self, w: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let m2 = self.beta1 * m + (1.0 - self.beta1) * g;
        let v2 = self.beta2 * v + (1.0 - self.beta2) * (g * g);
        let denom = v2.sqrt() / self.bc2_sqrt + self.eps;
        let w2 = w * self.decay - self.step_size * (m2 / denom);
        (w2, m2, v2)
    }
}

/// What one chunked step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStepStats {
    /// Bytes of scratch the step allocated at its peak: one `[chunk_rows, cols]` f32 buffer.
    /// It depends on `chunk_rows`, never on the tensor's row count (a test measures the
    /// real allocations with a counting allocator).
    pub peak_temp_bytes: usize,
    /// Chunks processed per pass.
    pub chunks: usize,
    /// The tensor scale before the step.
    pub old_tensor_scale: f32,
    /// The tensor scale after (from the updated weights' amax).
    pub new_tensor_scale: f32,
}

/// Checks the arguments every AdamW step implementation (CPU, CUDA) shares: the gradient and
/// both moments hold `n` elements each, and `chunk_rows` is at least 1.
pub(crate) fn check_step_args(
    n: usize,
    [grad, m, v]: [usize; 3],
    chunk_rows: usize,
) -> Result<(), KernelError> {
    for (what, len) in [
        ("gradient", grad),
        ("first moment m", m),
        ("second moment v", v),
    ] {
        if len != n {
            return Err(KernelError::LengthMismatch {
                what,
                expected: n,
                got: len,
            });
        }
    }
    if chunk_rows == 0 {
        return Err(KernelError::InvalidArgument(
            "chunk_rows must be at least 1".into(),
        ));
    }
    Ok(())
}

/// One AdamW step on packed NVFP4 weights, `chunk_rows` rows at a time.
///
/// - `w`: the packed weights `[rows, cols]`, updated in place (requantized with stochastic
///   rounding seeded by `seed` and `step`, so small updates survive in expectation);
/// - `grad`: `[rows, cols]` f32 gradient of the dequantized weights;
/// - `m`, `v`: f32 first/second moments `[rows, cols]`, updated in place (zeros at step 1);
/// - `step`: 1-based step number (bias correction); `chunk_rows` ≥ 1.
///
/// The result does not depend on `chunk_rows` (bit-identical bytes). Errors: length
/// mismatches, `chunk_rows == 0`, a NaN/inf in `grad`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_nvfp4(
    w: &mut Nvfp4Tensor,
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: AdamWParams,
    step: u64,
    chunk_rows: usize,
    seed: u64,
) -> Result<AdamWStepStats, KernelError> {
    let (rows, cols) = (w.rows, w.cols);
    let n = rows * cols;
    check_step_args(n, [grad.len(), m.len(), v.len()], chunk_rows)?;
    checked_amax(grad, cols)?;
    let sc = AdamWScalars::new(hp, step, seed);
    let chunk_rows = chunk_rows.min(rows.max(1));
    let mut buf = vec![0.0f32; chunk_rows * cols];
    let peak_temp_bytes = buf.len() * std::mem::size_of::<f32>();

    // Pass 1: amax of the updated weights.
    let mut amax = 0.0f32;
    let mut chunks = 0;
    for r0 in (0..rows).step_by(chunk_rows) {
        let r1 = (r0 + chunk_rows).min(rows);
        let b = &mut buf[..(r1 - r0) * cols];
        w.dequantize_rows_into(r0..r1, b);
        let base = r0 * cols;
        for (i, &wv) in b.iter().enumerate() {
            let (w2, _, _) = sc.update(wv, grad[base + i], m[base + i], v[base + i]);
            // f32::max ignores NaN, so a non-finite update is recorded as an infinite amax
            amax = if w2.is_finite() {
                amax.max(w2.abs())
            } else {
                f32::INFINITY
            };
        }
        chunks += 1;
    }
    if !amax.is_finite() {
        return Err(KernelError::InvalidArgument(format!(
            "AdamW step produced a non-finite weight (amax {amax}); lower the learning rate"
        )));
    }
    let old_tensor_scale = w.tensor_scale;
    let new_tensor_scale = tensor_scale_for_amax(amax);

    // Pass 2: write the moments and requantize each chunk with the new tensor scale.
    let rounding = Rounding::Stochastic { seed: sc.sr_seed };
    for r0 in (0..rows).step_by(chunk_rows) {
        let r1 = (r0 + chunk_rows).min(rows);
        let b = &mut buf[..(r1 - r0) * cols];
        w.dequantize_rows_into(r0..r1, b);
        let base = r0 * cols;
        for (i, wv) in b.iter_mut().enumerate() {
            let (w2, m2, v2) = sc.update(*wv, grad[base + i], m[base + i], v[base + i]);
            *wv = w2;
            m[base + i] = m2;
            v[base + i] = v2;
        }
        let pc = cols / 2;
        let scc = cols / crate::nvfp4::BLOCK;
        quantize_rows_into(
            b,
            cols,
            new_tensor_scale,
            rounding,
            r0,
            &mut w.packed[r0 * pc..r1 * pc],
            &mut w.scales[r0 * scc..r1 * scc],
        );
    }
    w.tensor_scale = new_tensor_scale;
    Ok(AdamWStepStats {
        peak_temp_bytes,
        chunks,
        old_tensor_scale,
        new_tensor_scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(rows: usize, cols: usize) -> (Nvfp4Tensor, Vec<f32>) {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let g: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 40503) % 777) as f32 / 777.0 - 0.5)
            .collect();
        (Nvfp4Tensor::quantize(&w, rows, cols).unwrap(), g)
    }

    #[test]
    fn chunked_step_is_bit_identical_to_unchunked() {
        let (rows, cols) = (37, 48);
        let (w0, g) = setup(rows, cols);
        let hp = AdamWParams {
            lr: 1e-2,
            ..AdamWParams::default()
        };
        let mut results = Vec::new();
        for chunk in [1, 5, 32, 37, 1000] {
            let mut w = w0.clone();
            let (mut m, mut v) = (vec![0.0; rows * cols], vec![0.0; rows * cols]);
            for step in 1..=3 {
                let st = adamw_step_nvfp4(&mut w, &g, &mut m, &mut v, hp, step, chunk, 9).unwrap();
                assert_eq!(st.peak_temp_bytes, chunk.min(rows) * cols * 4);
            }
            results.push((w, m, v));
        }
        for r in &results[1..] {
            assert_eq!(r, &results[0]);
        }
        assert_ne!(results[0].0, w0, "the step changed nothing");
    }

    #[test]
    fn rejects_bad_arguments() {
        let (mut w, g) = setup(4, 16);
        let (mut m, mut v) = (vec![0.0; 64], vec![0.0; 64]);
        let hp = AdamWParams::default();
        assert!(adamw_step_nvfp4(&mut w, &g, &mut m, &mut v, hp, 1, 0, 0).is_err());
        assert!(adamw_step_nvfp4(&mut w, &g[..63], &mut m, &mut v, hp, 1, 2, 0).is_err());
        let mut bad = g.clone();
        bad[3] = f32::NAN;
        assert!(adamw_step_nvfp4(&mut w, &bad, &mut m, &mut v, hp, 1, 2, 0).is_err());
    }
}
