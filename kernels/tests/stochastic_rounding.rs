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
