//! GPU checks of every CUDA kernel against the CPU reference, on fresh random inputs (the seed
//! is printed). They are ignored by a plain `cargo test` (reported as ignored, not passed);
//! `scripts/gpu-kernels.sh` runs them with `--ignored` on the GPU machine, built with the
//! `bench` feature so that the benchmark's experimental GEMV kernels are checked too. (One
//! test, the check of the tensor-core probe's data, needs no GPU and runs everywhere.)

mod common;

use half::bf16;
use kiln_kernels::cpu::{adamw_step_nvfp4, matmul_nvfp4, AdamWParams};
use kiln_kernels::cuda::{CudaKernels, GemvKernel};
use kiln_kernels::{KernelError, Nvfp4Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The GPU. These tests are `#[ignore]`d, so `cargo test` lists them as ignored where they did
/// not run; `--ignored` on a machine without CUDA fails them with the reason, never passes them.
fn gpu() -> CudaKernels {
    match CudaKernels::new(0) {
        Ok(k) => k,
        Err(e @ KernelError::CudaUnavailable(_)) => {
            panic!("GPU test run where CUDA is not usable: {e}")
        }
        Err(e) => panic!("CUDA is present but the kernels failed to start: {e}"),
    }
}

fn rng(test: &str) -> ChaCha8Rng {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("{test}: seed {seed}");
    ChaCha8Rng::seed_from_u64(seed)
}

/// Random weights: normal-ish values, a few outliers, exact zeros, negative zeros, and rows
/// scaled down by up to 2^-24 so subnormal and clamped block scales occur.
fn weights(r: &mut ChaCha8Rng, rows: usize, cols: usize) -> Vec<f32> {
    let mut w = Vec::with_capacity(rows * cols);
    for i in 0..rows * cols {
        let row_scale = 2f32.powi(-(((i / cols) % 25) as i32));
        let v: f32 = match r.random_range(0..100) {
            0 => 0.0,
            1 => -0.0,
            2 => r.random_range(-40.0..40.0),
            _ => r.random_range(-1.0f32..1.0) * r.random_range(0.0f32..1.0),
        };
        w.push(v * row_scale * 0.05);
    }
    w
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn quantize_and_dequantize_are_bit_identical_to_the_cpu() {
    let k = gpu();
    let mut r = rng("quantize");
    for &(rows, cols) in &[
        (1, 16),
        (3, 48),
        (37, 160),
        (256, 1024),
        (1000, 4864),
        (129, 896),
    ] {
        let w = weights(&mut r, rows, cols);
        let cpu = Nvfp4Tensor::quantize(&w, rows, cols).unwrap();
        let gpu = k.quantize(&w, rows, cols).unwrap();
        assert_same(&cpu, &gpu, &format!("f32 [{rows}, {cols}]"));
        let wb: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
        let wbf: Vec<f32> = wb.iter().map(|x| x.to_f32()).collect();
        assert_same(
            &Nvfp4Tensor::quantize(&wbf, rows, cols).unwrap(),
            &k.quantize_bf16(&wb, rows, cols).unwrap(),
            &format!("bf16 [{rows}, {cols}]"),
        );
        let seed = r.random();
        assert_same(
            &Nvfp4Tensor::quantize_stochastic(&w, rows, cols, seed).unwrap(),
            &k.quantize_stochastic(&w, rows, cols, seed).unwrap(),
            &format!("stochastic [{rows}, {cols}]"),
        );
        let d_cpu = cpu.dequantize();
        let d_gpu = k.dequantize(&cpu).unwrap();
        let diff = d_cpu
            .iter()
            .zip(&d_gpu)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            diff.is_none(),
            "dequantize [{rows}, {cols}] differs at {diff:?}"
        );
    }
}

/// Two matrices of one width, quantized row range by row range through a staging buffer
/// smaller than either into one stacked tensor (what the GPU model loader does), equal the
/// CPU's quantize of each, byte for byte, with each part's own tensor scale.
#[test]
#[ignore = "needs a CUDA GPU"]
fn quantize_rows_into_stacks_matrices_bit_identically() {
    use kiln_kernels::cuda::DeviceInput;
    use kiln_kernels::nvfp4::tensor::{checked_amax, tensor_scale_for_amax};
    let k = gpu();
    let mut r = rng("quantize_rows_into");
    let cols = 896;
    let parts = [weights(&mut r, 300, cols), weights(&mut r, 77, cols)];
    let rows: usize = parts.iter().map(|p| p.len() / cols).sum();
    let mut out = k.alloc_nvfp4(rows, cols).unwrap();
    let chunk_rows = 64;
    let mut staging = k.stream().alloc_zeros::<f32>(chunk_rows * cols).unwrap();
    let mut first = 0;
    for p in &parts {
        let ts = tensor_scale_for_amax(checked_amax(p, cols).unwrap());
        for c in p.chunks(chunk_rows * cols) {
            let mut view = staging.slice_mut(0..c.len());
            k.stream().memcpy_htod(c, &mut view).unwrap();
            let n = c.len() / cols;
            k.quantize_rows_into_async(DeviceInput::F32(&staging), n, ts, &mut out, first)
                .unwrap();
            first += n;
        }
    }
    // the stacked tensor's own scale (the parts keep theirs beside it)
    k.stream()
        .memcpy_htod(&[1.0f32], &mut out.tensor_scale)
        .unwrap();
    let all = k.download_nvfp4(&out).unwrap();
    let mut row = 0;
    for (i, p) in parts.iter().enumerate() {
        let n = p.len() / cols;
        let cpu = Nvfp4Tensor::quantize(p, n, cols).unwrap();
        let (a, b) = (row * cols, (row + n) * cols);
        let gpu = Nvfp4Tensor::from_parts(
            n,
            cols,
            all.packed[a / 2..b / 2].to_vec(),
            all.scales[a / 16..b / 16].to_vec(),
            cpu.tensor_scale,
        )
        .unwrap();
        assert_same(&cpu, &gpu, &format!("part {i}"));
        row += n;
    }
    let too_many = k.quantize_rows_into_async(DeviceInput::F32(&staging), 64, 1.0, &mut out, 340);
    assert!(too_many.is_err(), "rows past the end must be refused");
}

fn assert_same(cpu: &Nvfp4Tensor, gpu: &Nvfp4Tensor, what: &str) {
    assert_eq!(
        cpu.tensor_scale.to_bits(),
        gpu.tensor_scale.to_bits(),
        "{what}: tensor scale"
    );
    if let Some(i) = cpu.scales.iter().zip(&gpu.scales).position(|(a, b)| a != b) {
        panic!(
            "{what}: scale {i} differs: cpu {:#04x} gpu {:#04x}",
            cpu.scales[i], gpu.scales[i]
        );
    }
    if let Some(i) = cpu.packed.iter().zip(&gpu.packed).position(|(a, b)| a != b) {
        panic!(
            "{what}: packed byte {i} differs: cpu {:#04x} gpu {:#04x}",
            cpu.packed[i], gpu.packed[i]
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn quantize_reports_non_finite_input() {
    let k = gpu();
    let mut w = vec![0.5f32; 64];
    w[37] = f32::NAN;
    w[50] = f32::INFINITY;
    let e = k.quantize(&w, 2, 32).unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::NonFinite {
                index: 37,
                row: 1,
                col: 5,
                ..
            }
        ),
        "{e}"
    );
}

/// ‖y − ref‖ / ‖ref‖ with ref in f64 on the dequantized weights; prints the worst element.
fn rel_error(y: &[f32], x: &[f32], m: usize, wd: &[f32], n: usize, k: usize) -> f64 {
    let (mut num, mut den, mut worst) = (0.0f64, 0.0f64, (0.0f64, 0usize));
    for i in 0..m {
        for j in 0..n {
            let r: f64 = (0..k)
                .map(|t| x[i * k + t] as f64 * wd[j * k + t] as f64)
                .sum();
            let d = (y[i * n + j] as f64 - r).abs();
            assert!(
                y[i * n + j].is_finite(),
                "y[{i},{j}] = {} (unwritten or overflow)",
                y[i * n + j]
            );
            num += d * d;
            den += r * r;
            if d > worst.0 {
                worst = (d, i * n + j);
            }
        }
    }
    let rel = (num / den).sqrt();
    eprintln!(
        "  rel error {rel:.2e}, worst |diff| {:.3e} at {}",
        worst.0, worst.1
    );
    rel
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemv_matches_an_f64_reference_within_1e_3() {
    let k = gpu();
    eprintln!("tensor-core GEMV kernels on: {}", k.tensor_core_gemv());
    let mut r = rng("gemv");
    for &(n, kk) in &[
        (96, 32),
        (1000, 896),
        (300, 4864),
        (64, 8192),
        (37, 384),
        (530, 1152),
        (530, 1280),
        (2000, 3584),
    ] {
        let w = weights(&mut r, n, kk);
        let q = Nvfp4Tensor::quantize(&w, n, kk).unwrap();
        let wd = q.dequantize();
        for m in 1..=8 {
            let x: Vec<f32> = (0..m * kk).map(|_| r.random_range(-2.0f32..2.0)).collect();
            let y = k.matmul_nvfp4(&x, m, &q).unwrap();
            eprintln!("GEMV m={m} [{n}, {kk}]");
            let rel = rel_error(&y, &x, m, &wd, n, kk);
            assert!(
                rel <= 1e-3,
                "GEMV m={m} [{n}, {kk}]: relative error {rel:e} > 1e-3"
            );
            // and it agrees with the CPU path
            let yc = matmul_nvfp4(&x, m, &q);
            assert!(rel_error(&yc, &x, m, &wd, n, kk) <= 1e-5);
            // every kernel (the experiments too with `bench`) that can take this shape
            let variants = k.gemv_kernels_for(m, n, kk);
            for v in variants {
                let y = k.gemv_with(&x, m, &q, v).unwrap();
                eprintln!("  variant {v:?}");
                let rel = rel_error(&y, &x, m, &wd, n, kk);
                assert!(
                    rel <= 1e-3,
                    "GEMV {v:?} m={m} [{n}, {kk}]: relative error {rel:e} > 1e-3"
                );
                // a second launch gives the same bits (the split-K kernel's counters were
                // reset by the first; every kernel sums in a fixed order)
                let again = k.gemv_with(&x, m, &q, v).unwrap();
                assert!(
                    y.iter()
                        .zip(&again)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "GEMV {v:?} m={m} [{n}, {kk}]: a second launch differs"
                );
            }
        }
    }
}

/// A decode-like chain — each GEMV's x is the previous one's y — queued as chained launches
/// (programmatic dependent launch) gives the same bits as plain launches: a chained kernel that
/// read x before the previous kernel had written it would differ.
#[test]
#[ignore = "needs a CUDA GPU"]
fn chained_gemvs_equal_plain_launches() {
    let k = gpu();
    let mut r = rng("chained gemv");
    // square, so y feeds the next x: 4096² (16M weights) runs the split-K kernel, 896² the
    // CUDA-core kernel at m = 1 and the tensor-core kernel (a plain launch inside the chain) at
    // m = 4, 8
    for n in [4096usize, 896] {
        chain_case(&k, &mut r, n);
    }
}

fn chain_case(k: &CudaKernels, r: &mut ChaCha8Rng, n: usize) {
    let ws: Vec<_> = (0..2)
        .map(|_| {
            let w: Vec<f32> = (0..n * n)
                .map(|_| r.random_range(-1.0f32..1.0) * 0.03)
                .collect();
            k.upload_nvfp4(&Nvfp4Tensor::quantize(&w, n, n).unwrap())
                .unwrap()
        })
        .collect();
    for m in [1usize, 4, 8] {
        // the split-K kernel's scratch, before any launch (launches never allocate)
        k.reserve_gemv(m, n, n).unwrap();
        eprintln!(
            "chain [{n}²] m={m}: default {:?}",
            k.default_gemv_kernel(m, n, n)
        );
        let x0: Vec<f32> = (0..m * n).map(|_| r.random_range(-1.0f32..1.0)).collect();
        let run = |chained: bool| -> Vec<Vec<f32>> {
            let mut bufs: Vec<_> = (0..7)
                .map(|i| {
                    if i == 0 {
                        k.stream().clone_htod(&x0).unwrap()
                    } else {
                        k.stream().alloc_zeros::<f32>(m * n).unwrap()
                    }
                })
                .collect();
            for i in 0..6 {
                let (a, b) = bufs.split_at_mut(i + 1);
                let w = &ws[i % 2];
                if chained {
                    k.gemv_chained_async(&a[i], m, w, &mut b[0]).unwrap();
                } else {
                    k.gemv_async(&a[i], m, w, &mut b[0]).unwrap();
                }
            }
            let out = bufs
                .iter()
                .map(|b| k.stream().clone_dtoh(b).unwrap())
                .collect();
            k.synchronize().unwrap();
            out
        };
        let (plain, chained) = (run(false), run(true));
        for (i, (p, c)) in plain.iter().zip(&chained).enumerate().skip(1) {
            assert!(p.iter().all(|v| v.is_finite()) && p.iter().any(|&v| v != 0.0));
            let diff = p
                .iter()
                .zip(c)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                diff,
                0,
                "chain [{n}²] m={m}: GEMV {i} differs in {diff} of {} outputs",
                p.len()
            );
        }
    }
}

/// Split-K GEMV launches never allocate (so that they can be captured in a CUDA graph): one
/// before `reserve_gemv` fails with `GemvScratchNotReserved`, and after it runs and is right.
#[test]
#[ignore = "needs a CUDA GPU"]
fn split_k_gemv_needs_its_scratch_reserved() {
    let k = gpu();
    let mut r = rng("split-k scratch");
    let (m, n, kk) = (1usize, 4096usize, 4096usize); // 16M weights: the split-K kernel
    let kernel = k.default_gemv_kernel(m, n, kk);
    assert!(
        matches!(kernel, GemvKernel::TensorCoreSplitK { .. }),
        "{kernel:?}"
    );
    let q = Nvfp4Tensor::quantize(&weights(&mut r, n, kk), n, kk).unwrap();
    let w = k.upload_nvfp4(&q).unwrap();
    let xs: Vec<f32> = (0..m * kk).map(|_| r.random_range(-2.0f32..2.0)).collect();
    let x = k.stream().clone_htod(&xs).unwrap();
    let mut y = k.stream().alloc_zeros::<f32>(m * n).unwrap();
    assert_eq!(k.gemv_scratch_reserved().unwrap(), (0, 0));
    let e = k.gemv_async(&x, m, &w, &mut y).unwrap_err();
    assert!(
        matches!(e, KernelError::GemvScratchNotReserved { .. }),
        "{e}"
    );
    eprintln!("unreserved launch: {e}");
    k.reserve_gemv(m, n, kk).unwrap();
    let (partials, counters) = k.gemv_scratch_reserved().unwrap();
    assert!(partials >= m * n && counters >= 1);
    k.gemv_async(&x, m, &w, &mut y).unwrap();
    let got = k.stream().clone_dtoh(&y).unwrap();
    k.synchronize().unwrap();
    let rel = rel_error(&got, &xs, m, &q.dequantize(), n, kk);
    assert!(rel <= 1e-3, "relative error {rel:e} > 1e-3");
    // reserving again for the same shape allocates nothing
    k.reserve_gemv(m, n, kk).unwrap();
    assert_eq!(k.gemv_scratch_reserved().unwrap(), (partials, counters));
}

/// The inputs of what `CudaKernels::new` used to check at every start-up: a small matrix with
/// every E2M1 code, including 0.5 (a bf16 subnormal in the tensor-core decode), and subnormal
/// E4M3 block scales.
fn half_codes_and_subnormal_scales() -> (Nvfp4Tensor, Vec<f32>) {
    let (n, k) = (32usize, 256usize);
    let w: Vec<f32> = (0..n * k)
        .map(|i| {
            // every 4th row 1e-5 smaller: subnormal E4M3 block scales; quarter steps: the
            // 0.5 code (a bf16 subnormal in the decode) appears
            let row_scale = if (i / k) % 4 == 3 { 1e-5 } else { 1.0 };
            ((i * 7 % 25) as f32 - 12.0) * 0.25 * row_scale
        })
        .collect();
    let q = Nvfp4Tensor::quantize(&w, n, k).unwrap();
    let x: Vec<f32> = (0..k).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.37).collect();
    (q, x)
}

/// No GPU needed: the data above does cover the 0.5 codes and subnormal scales.
#[test]
fn the_probe_covers_half_codes_and_subnormal_scales() {
    let (q, x) = half_codes_and_subnormal_scales();
    assert_eq!(x.len(), q.cols);
    let codes: std::collections::BTreeSet<u8> = (0..q.rows * q.cols)
        .map(|i| q.code(i / q.cols, i % q.cols))
        .collect();
    assert!(codes.contains(&1) && codes.contains(&9), "{codes:?}");
    assert!(
        q.scales.iter().any(|&s| s > 0 && s < 0x08),
        "no subnormal scale"
    );
}

/// Every GEMV kernel this build has agrees with the CPU on E2M1 0.5 codes and subnormal block
/// scales, which pass through bf16 subnormals in the tensor-core decode: a driver or chip that
/// flushed them would fail here. `CudaKernels::new` used to run this check at every start-up
/// (the tensor-core kernels at m = 1) and fall back to the CUDA-core GEMV on a mismatch; now
/// the defaults take the tensor-core kernels on compute capability 8.0+, and a device that
/// fails here needs `CudaKernels::set_tensor_core_gemv(false)`, which this test also checks.
#[test]
#[ignore = "needs a CUDA GPU"]
fn tensor_core_gemv_is_exact_on_half_codes_and_subnormal_scales() {
    let mut k = gpu();
    assert!(
        k.tensor_core_gemv(),
        "compute capability {:?}: the tensor-core GEMV needs 8.0+",
        k.compute_capability()
    );
    let (q, x1) = half_codes_and_subnormal_scales();
    let check = |k: &CudaKernels, m: usize, kernel: GemvKernel| {
        // row r of x: the probe's x scaled by 1 + r/4 (row 0 is the old start-up check's)
        let x: Vec<f32> = (0..m)
            .flat_map(|r| x1.iter().map(move |v| v * (1.0 + r as f32 * 0.25)))
            .collect();
        let want = kiln_kernels::cpu::matmul_nvfp4_ref(&x, m, &q);
        let got = k.gemv_with(&x, m, &q, kernel).unwrap();
        let num: f64 = want
            .iter()
            .zip(&got)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = want.iter().map(|a| (*a as f64).powi(2)).sum();
        let rel = (num / den).sqrt();
        eprintln!("  {kernel:?} m={m}: rel error {rel:.2e}");
        assert!(
            got.iter().all(|v| v.is_finite()) && rel <= 1e-4,
            "{kernel:?} m={m}: relative error {rel:e} vs the CPU on 0.5 codes / subnormal scales"
        );
    };
    for m in 1..=8 {
        let kernels = k.gemv_kernels_for(m, q.rows, q.cols);
        assert!(
            kernels
                .iter()
                .any(|v| !matches!(v, GemvKernel::CudaCore { .. })),
            "m={m}: no tensor-core GEMV takes [{}, {}]",
            q.rows,
            q.cols
        );
        for kernel in kernels {
            check(&k, m, kernel);
        }
        check(&k, m, k.default_gemv_kernel(m, q.rows, q.cols));
    }
    // the fallback: tensor cores off, every default is the CUDA-core kernel
    k.set_tensor_core_gemv(false);
    for m in 1..=8 {
        assert_eq!(k.default_gemv_kernel(m, 8192, 8192), GemvKernel::CUDA_CORE);
        check(&k, m, k.default_gemv_kernel(m, q.rows, q.cols));
    }
    k.set_tensor_core_gemv(true);
    assert!(k.tensor_core_gemv());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn large_m_matmul_through_cublaslt_matches_within_bf16_tolerance() {
    let k = gpu();
    let mut r = rng("large-m matmul");
    for &(m, n, kk) in &[(37, 200, 896), (64, 130, 48)] {
        let w = weights(&mut r, n, kk);
        let q = Nvfp4Tensor::quantize(&w, n, kk).unwrap();
        let x: Vec<f32> = (0..m * kk).map(|_| r.random_range(-2.0f32..2.0)).collect();
        let y = k.matmul_nvfp4(&x, m, &q).unwrap();
        eprintln!("matmul m={m} [{n}, {kk}]");
        let rel = rel_error(&y, &x, m, &q.dequantize(), n, kk);
        assert!(
            rel <= 1e-2,
            "large-M matmul relative error {rel:e} > 1e-2 (bf16 operands)"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn adamw_step_matches_the_cpu() {
    let k = gpu();
    let mut r = rng("adamw");
    let (rows, cols) = (300, 896);
    let w0 = Nvfp4Tensor::quantize(&weights(&mut r, rows, cols), rows, cols).unwrap();
    let hp = AdamWParams {
        lr: 1e-3,
        ..AdamWParams::default()
    };
    let (mut wc, mut wg) = (w0.clone(), w0.clone());
    let n = rows * cols;
    let (mut mc, mut vc) = (vec![0.0f32; n], vec![0.0f32; n]);
    let (mut mg, mut vg) = (vec![0.0f32; n], vec![0.0f32; n]);
    let seed = r.random();
    for step in 1..=3 {
        let g: Vec<f32> = (0..n).map(|_| r.random_range(-0.01f32..0.01)).collect();
        adamw_step_nvfp4(&mut wc, &g, &mut mc, &mut vc, hp, step, 32, seed).unwrap();
        let st = k
            .adamw_step_nvfp4(&mut wg, &g, &mut mg, &mut vg, hp, step, 7, seed)
            .unwrap();
        assert!(
            st.peak_temp_bytes <= 16,
            "the fused GPU step should need no f32 scratch"
        );
    }
    let moment_diff = mc
        .iter()
        .zip(&mg)
        .chain(vc.iter().zip(&vg))
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let code_diff = (0..rows * cols)
        .filter(|&i| wc.code(i / cols, i % cols) != wg.code(i / cols, i % cols))
        .count();
    let scale_diff = wc
        .scales
        .iter()
        .zip(&wg.scales)
        .filter(|(a, b)| a != b)
        .count();
    eprintln!(
        "adamw: tensor scale cpu {:e} gpu {:e}; differing moments {moment_diff}, codes {code_diff}/{n}, scales {scale_diff}",
        wc.tensor_scale, wg.tensor_scale
    );
    // Same f32 operations in the same order: expected identical. Allow a handful of last-bit
    // differences, which would flip a stochastic rounding rarely.
    assert!(moment_diff <= n / 10_000, "{moment_diff} moments differ");
    assert!(
        code_diff <= n / 10_000 && scale_diff <= n / 160_000,
        "{code_diff} codes / {scale_diff} scales differ"
    );
    let rel = (wc.tensor_scale - wg.tensor_scale).abs() / wc.tensor_scale;
    assert!(rel <= 1e-6, "tensor scale differs by {rel:e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn quantize_checkpoint_writes_the_same_bytes_on_cpu_and_cuda() {
    use kiln_kernels::checkpoint::{quantize_checkpoint, NvfpFormat, QuantDevice, QuantizeOptions};
    gpu();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    common::write_tiny_model(&src, true);
    for format in [NvfpFormat::ModelOpt, NvfpFormat::CompressedTensors] {
        let mut outs = Vec::new();
        for (name, device) in [("cpu", QuantDevice::Cpu), ("cuda", QuantDevice::Cuda)] {
            let out = tmp.path().join(format!("{}-{name}", format.name()));
            let s =
                quantize_checkpoint(&src, &out, &QuantizeOptions { format, device }, &mut |_| {})
                    .unwrap();
            assert_eq!(s.quantized, 3);
            outs.push(out);
        }
        let mut files: Vec<_> = std::fs::read_dir(&outs[0])
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        files.sort();
        for f in files {
            let a = std::fs::read(outs[0].join(&f)).unwrap();
            let b = std::fs::read(outs[1].join(&f)).unwrap();
            assert!(
                a == b,
                "{}: {:?} differs between cpu and cuda",
                format.name(),
                f
            );
        }
        eprintln!("{}: cpu and cuda outputs are byte-identical", format.name());
    }
}

/// Exact ties of the E2M1 grid (and their f32 neighbours) under many block scales: the GPU's
/// division-free rounding must agree with the CPU's exact division on every one.
#[test]
#[ignore = "needs a CUDA GPU"]
fn quantize_matches_the_cpu_on_exact_ties() {
    use kiln_kernels::nvfp4::e4m3_to_f32;
    let k = gpu();
    let mut r = rng("ties");
    let (rows, cols) = (512, 256);
    let mut w = vec![0.0f32; rows * cols];
    w[0] = 2688.0; // tensor scale exactly 1
    let ties = [0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 3.0, 6.0];
    for b in 1..rows * cols / 16 {
        let d = e4m3_to_f32(r.random_range(1u8..0x7F));
        let blk = &mut w[b * 16..b * 16 + 16];
        blk[0] = 6.0 * d; // block amax → block scale exactly d
        for x in blk[1..].iter_mut() {
            let t = ties[r.random_range(0..ties.len())] * d;
            let v = match r.random_range(0..3) {
                0 => t,
                1 => f32::from_bits(t.to_bits() + 1),
                _ => f32::from_bits(t.to_bits() - 1),
            };
            *x = if r.random() { v } else { -v };
        }
    }
    assert_same(
        &Nvfp4Tensor::quantize(&w, rows, cols).unwrap(),
        &k.quantize(&w, rows, cols).unwrap(),
        "ties",
    );
}
