//! Stochastic rounding is unbiased: averaged over many seeds, the dequantized tensor converges
//! to the input (error shrinking like 1/sqrt(draws)), while round-to-nearest stays biased.

use kiln_kernels::nvfp4::{e4m3_to_f32, Nvfp4Tensor};

#[test]
fn stochastic_rounding_is_unbiased_in_expectation() {
    let (rows, cols) = (2, 32);
    // Values deliberately between grid points (e.g. q ≈ 0.3, 2.7, 4.9) after scaling.
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as f32 * 0.61803).fract() - 0.5) * 3.0 + if i % 7 == 0 { 0.013 } else { 0.0 })
        .collect();
    let draws = 4000;
    let mut mean = vec![0.0f64; w.len()];
    for seed in 0..draws {
        let t = Nvfp4Tensor::quantize_stochastic(&w, rows, cols, seed).unwrap();
        for (m, d) in mean.iter_mut().zip(t.dequantize()) {
            *m += d as f64 / draws as f64;
        }
    }
    let rne = Nvfp4Tensor::quantize(&w, rows, cols).unwrap();
    let rne_d = rne.dequantize();
    let (mut worst_z, mut rne_err, mut sr_err) = (0.0f64, 0.0f64, 0.0f64);
    for i in 0..w.len() {
        let denom = e4m3_to_f32(rne.scales[i / 16]) as f64 * rne.tensor_scale as f64;
        // one draw's error is at most the grid gap (≤ 2·denom); the mean's std ≤ gap/2/sqrt(n)
        let sigma = denom / (draws as f64).sqrt();
        let err = (mean[i] - w[i] as f64).abs();
        worst_z = worst_z.max(err / sigma);
        sr_err += err;
        rne_err += (rne_d[i] as f64 - w[i] as f64).abs();
    }
    assert!(
        worst_z < 5.0,
        "SR mean is off by {worst_z:.2} standard errors"
    );
    assert!(
        sr_err * 10.0 < rne_err,
        "SR mean error {sr_err} vs RNE error {rne_err}"
    );
}

/// bf16 stochastic rounding (the AdamW moments' `--moments bf16` storage): unbiased where round
/// to nearest would keep a slowly decaying value in place forever.
#[test]
fn bf16_stochastic_rounding_is_unbiased_and_lets_small_updates_accumulate() {
    use half::bf16;
    use kiln_kernels::nvfp4::codec::{f32_to_bf16_stochastic, sr_uniform};
    let x = 1.0f32 + 1.0 / 1024.0; // a quarter of the way from 1 to the next bf16 (1 + 1/128)
    let n = 20_000u64;
    let mean: f64 = (0..n)
        .map(|i| bf16::from_bits(f32_to_bf16_stochastic(x, sr_uniform(7, i))).to_f64())
        .sum::<f64>()
        / n as f64;
    // One draw is 1 or 1 + 2^-7; the mean's standard deviation is 2^-7·sqrt(p(1−p)/n).
    let sigma = (1.0 / 128.0) * (0.25f64 * 0.75 / n as f64).sqrt();
    assert!((mean - x as f64).abs() < 5.0 * sigma, "mean {mean} vs {x}");
    assert_eq!(
        bf16::from_f32(x).to_f32(),
        1.0,
        "round to nearest drops the quarter step"
    );
    // A second moment decaying by 0.1% a step (AdamW's beta2 with no gradient): round to
    // nearest never moves it; stochastic rounding follows the exact decay.
    let (mut rne, mut sr, mut exact) = (1e-4f32, 1e-4f32, 1e-4f64);
    for step in 0..2000u64 {
        rne = bf16::from_f32(0.999 * rne).to_f32();
        sr = bf16::from_bits(f32_to_bf16_stochastic(0.999 * sr, sr_uniform(3, step))).to_f32();
        exact *= 0.999;
    }
    assert!(rne > 0.9e-4, "round to nearest: {rne}");
    assert!(
        ((sr as f64) - exact).abs() < 0.15 * exact,
        "stochastic {sr} vs exact {exact}"
    );
    // Negative values round away from zero the same way; NaN and infinities pass through.
    let neg = bf16::from_bits(f32_to_bf16_stochastic(-x, 0.99)).to_f32();
    assert_eq!(neg, -(1.0 + 1.0 / 128.0));
    assert!(bf16::from_bits(f32_to_bf16_stochastic(f32::NAN, 0.5)).is_nan());
    assert_eq!(
        bf16::from_bits(f32_to_bf16_stochastic(f32::INFINITY, 0.99)).to_f32(),
        f32::INFINITY
    );
}
