//! The fast CPU matmul paths (fused small-M kernel in each implementation this CPU runs, the
//! chunked-GEMM large-M path, and the `matmul_nvfp4` dispatch) against the plain reference
//! `matmul_nvfp4_ref`, on random packed bytes (every E2M1 code, negative zero included) and
//! random E4M3 scales (every finite value, subnormals included).

use kiln_kernels::cpu::{
    matmul_fused, matmul_nvfp4, matmul_nvfp4_chunked_gemm, matmul_nvfp4_ref, FusedImpl,
};
use kiln_kernels::nvfp4::{e2m1_to_f32, e4m3_to_f32, Nvfp4Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A random NVFP4 matrix: uniform random packed bytes, finite scale bytes (not 0x7F/0xFF).
fn random_tensor(rng: &mut ChaCha8Rng, n: usize, k: usize) -> Nvfp4Tensor {
    let packed: Vec<u8> = (0..n * k / 2).map(|_| rng.random()).collect();
    let scales: Vec<u8> = (0..n * k / 16)
        .map(|_| loop {
            let b: u8 = rng.random();
            if b & 0x7F != 0x7F {
                break b;
            }
        })
        .collect();
    let ts = rng.random_range(1e-4f32..10.0);
    Nvfp4Tensor::from_parts(n, k, packed, scales, ts).unwrap()
}

/// Per-element bound: |got − ref| ≤ 2e-6 · Σ_k |x·w| (f32 summation-order differences only).
fn assert_close(got: &[f32], want: &[f32], x: &[f32], m: usize, w: &Nvfp4Tensor, what: &str) {
    if let Err(e) = check_close(got, want, x, m, w, what) {
        panic!("{e}");
    }
}

fn check_close(
    got: &[f32],
    want: &[f32],
    x: &[f32],
    m: usize,
    w: &Nvfp4Tensor,
    what: &str,
) -> Result<(), String> {
    let (n, k) = (w.rows, w.cols);
    if got.len() != m * n {
        return Err(format!("{what}: length {} != {}", got.len(), m * n));
    }
    for i in 0..m {
        for j in 0..n {
            let mag: f64 = (0..k)
                .map(|t| {
                    let c = w.code(j, t);
                    let s = e4m3_to_f32(w.scales[j * k / 16 + t / 16]);
                    (x[i * k + t] as f64 * e2m1_to_f32(c) as f64 * s as f64).abs()
                })
                .sum::<f64>()
                * w.tensor_scale as f64;
            let (g, r) = (got[i * n + j] as f64, want[i * n + j] as f64);
            if !(g.is_finite() && (g - r).abs() <= 2e-6 * mag + 1e-30) {
                return Err(format!(
                    "{what}: y[{i},{j}] = {g} vs reference {r} (Σ|x·w| = {mag}) [M={m} N={n} K={k}]"
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn fused_kernel_matches_reference_for_every_small_m() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let imps: Vec<FusedImpl> = [FusedImpl::Portable, FusedImpl::Avx2]
        .into_iter()
        .filter(|i| i.available())
        .collect();
    eprintln!("fused implementations on this CPU: {imps:?}");
    // K multiple of 32 and not (odd block count), tiny and mid-sized, N below and above a task
    for &(n, k) in &[(1, 16), (3, 48), (37, 64), (130, 272), (300, 1024)] {
        let w = random_tensor(&mut rng, n, k);
        for m in 1..=8 {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let want = matmul_nvfp4_ref(&x, m, &w);
            for &imp in &imps {
                let got = matmul_fused(&x, m, &w, imp);
                assert_close(&got, &want, &x, m, &w, &format!("fused {imp:?}"));
            }
            let got = matmul_nvfp4(&x, m, &w);
            assert_close(&got, &want, &x, m, &w, "matmul_nvfp4 (default)");
        }
    }
}

#[test]
fn chunked_gemm_path_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    // the chunk is 2^19 f32: K = 4096 gives 128-row chunks, so N = 300 spans three
    for &(m, n, k) in &[(9, 45, 96), (33, 300, 4096), (1, 5, 32), (3, 7, 16)] {
        let w = random_tensor(&mut rng, n, k);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let want = matmul_nvfp4_ref(&x, m, &w);
        assert_close(
            &matmul_nvfp4_chunked_gemm(&x, m, &w),
            &want,
            &x,
            m,
            &w,
            "chunked GEMM",
        );
        assert_close(&matmul_nvfp4(&x, m, &w), &want, &x, m, &w, "matmul_nvfp4");
    }
}

#[test]
fn a_broken_fused_kernel_would_fail_the_check() {
    // The comparison must be able to fail: flipping one weight's sign moves the output by far
    // more than the tolerance.
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (m, n, k) = (1, 4, 64);
    let mut w = random_tensor(&mut rng, n, k);
    w.packed[0] = 0x77;
    w.scales[0] = 0x38; // 1.0
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(0.5f32..1.0)).collect();
    let want = matmul_nvfp4_ref(&x, m, &w);
    let mut w2 = w.clone();
    w2.packed[0] = 0x7F; // column 0: +6 -> -6
    let got = matmul_fused(&x, m, &w2, FusedImpl::best());
    assert!(
        check_close(&got, &want, &x, m, &w, "flipped").is_err(),
        "a flipped weight went unnoticed"
    );
}

#[test]
fn empty_shapes() {
    let w = Nvfp4Tensor::quantize(&[0.5f32; 32], 2, 16).unwrap();
    assert!(matmul_nvfp4(&[], 0, &w).is_empty());
}
