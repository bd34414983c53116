//! The kernel benchmark behind `kiln bench kernels`: for each shape and kernel, validate against
//! the CPU reference first, then time (warm-up, CUDA events, median of many samples, inputs
//! rotated so repeated runs do not just hit L2), and report median µs, effective GB/s, the
//! share of the device-copy bandwidth measured in the same run, and the ratio to the cuBLAS
//! bf16 baseline on the same shape.
//!
//! Every build times the production kernels (the default GEMV of each shape, plain and
//! chained); with the `bench` feature it also times the probe kernels and every other GEMV
//! kernel that can take the shape (the experiments, `cuda::gemv_kernels::experiments`).

pub mod cpu;
mod quantize;
mod report;
mod timing;
mod validate;

pub use cpu::{run_cpu, CpuBenchConfig, CpuBenchReport};
pub use report::parse_shapes;

use std::time::Instant;

use cudarc::driver::CudaSlice;
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::cpu::AdamWParams;
use crate::cuda::driver::drv;
use crate::cuda::{CudaKernels, DeviceNvfp4, GemvKernel, GemvLaunch};
use crate::nvfp4::Nvfp4Tensor;

use crate::KernelError;
use timing::{rotation, stream_read_async, upload, Timer};
use validate::{chained_matches_plain, gemv_rel_error, validate_adamw};

/// The shapes `[N, K]` (out × in): square, Qwen2.5-0.5B MLP up/down, its vocab
/// projection, Qwen2.5-7B MLP up/down.
pub const DEFAULT_SHAPES: &[(usize, usize)] = &[
    (8192, 8192),
    (4864, 896),
    (896, 4864),
    (151936, 896),
    (18944, 3584),
    (3584, 18944),
];

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Shapes `[N, K]`.
    pub shapes: Vec<(usize, usize)>,
    /// Timed samples per kernel (the median is reported).
    pub samples: usize,
    /// Rows of x for the large-M matmul row.
    pub large_m: usize,
    /// RNG seed for the inputs (printed, so a run can be repeated).
    pub seed: u64,
    /// Time only the GEMVs (after the same validation), e.g. under a profiler.
    pub gemv_only: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            shapes: DEFAULT_SHAPES.to_vec(),
            samples: 25,
            large_m: 256,
            seed: 0x6b696c6e,
            gemv_only: false,
        }
    }
}

/// One measured kernel on one shape.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// Kernel name.
    pub kernel: String,
    /// `NxK`.
    pub shape: String,
    /// Median time per call in µs.
    pub median_us: f64,
    /// Bytes the kernel must move (each input read once, each output written once) / time.
    pub gbps: f64,
    /// `gbps` as a percentage of the device-copy bandwidth measured in this run.
    pub pct_of_copy: f64,
    /// Baseline time / this time, where there is a baseline (>1 means faster than it).
    pub speedup_vs_baseline: Option<f64>,
    /// What the baseline is, or other remarks.
    pub note: String,
}

/// A whole run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// The GPU.
    pub device: String,
    /// Device-to-device copy bandwidth (bytes read + written per second), GB/s.
    pub copy_gbps: f64,
    /// Validation results, one line per check.
    pub checks: Vec<String>,
    /// Timings.
    pub rows: Vec<BenchRow>,
    /// Input seed.
    pub seed: u64,
}

/// Run the benchmark. `progress` receives one line per step (for a progress display).
pub fn run(cfg: &BenchConfig, mut progress: impl FnMut(&str)) -> Result<BenchReport, KernelError> {
    let k = CudaKernels::new(0)?;
    let timer = Timer {
        k: &k,
        samples: cfg.samples.max(3),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut checks = vec![format!(
        "tensor-core GEMV kernels: {}; benchmark experiments: {}",
        if k.tensor_core_gemv() {
            "on (default GEMV where the shape fits)"
        } else {
            "off (CUDA-core GEMV used)"
        },
        if cfg!(feature = "bench") {
            "on (variant and probe rows)"
        } else {
            "off (build with the `bench` feature for variant and probe rows)"
        }
    )];
    let mut rows = Vec::new();

    // Device copy bandwidth: 1 GiB device-to-device, bytes read + written.
    progress("device copy bandwidth");
    let copy_bytes = 1usize << 30;
    let src = upload(&k, &vec![0x5au8; copy_bytes])?;
    let mut dst = k
        .stream()
        .alloc_zeros::<u8>(copy_bytes)
        .map_err(drv("allocating"))?;
    let t_copy = timer.time(|_| {
        k.stream()
            .memcpy_dtod(&src, &mut dst)
            .map_err(drv("copying"))
    })?;
    drop((src, dst));
    let copy_gbps = 2.0 * copy_bytes as f64 / t_copy / 1e9;
    rows.push(BenchRow {
        kernel: "device copy (D2D, 1 GiB)".into(),
        shape: "-".into(),
        median_us: t_copy * 1e6,
        gbps: copy_gbps,
        pct_of_copy: 100.0,
        speedup_vs_baseline: None,
        note: "bytes read + written; the ceiling for memory-bound kernels".into(),
    });
    let mut push =
        |kernel: &str, n: usize, kk: usize, t: f64, bytes: f64, base: Option<f64>, note: String| {
            let gbps = bytes / t / 1e9;
            rows.push(BenchRow {
                kernel: kernel.to_string(),
                shape: format!("{n}x{kk}"),
                median_us: t * 1e6,
                gbps,
                pct_of_copy: 100.0 * gbps / copy_gbps,
                speedup_vs_baseline: base.map(|b| b / t),
                note,
            });
        };

    for &(n, kk) in &cfg.shapes {
        let ne = n * kk;
        progress(&format!("[{n}, {kk}]: generating and validating"));
        let t0 = Instant::now();
        let w: Vec<f32> = (0..ne)
            .map(|_| rng.random_range(-1.0f32..1.0) * rng.random_range(0.0f32..0.06))
            .collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let wbf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        drop(w);
        // validate: quantize bit-exact (bf16 input), dequantize exact, GEMV vs f64, AdamW vs CPU
        let cpu_q = Nvfp4Tensor::quantize(&wbf, n, kk)?;
        let gpu_q = k.quantize_bf16(&wb, n, kk)?;
        let exact = cpu_q == gpu_q;
        let deq_exact = k
            .dequantize(&cpu_q)?
            .iter()
            .zip(cpu_q.dequantize())
            .all(|(a, b)| a.to_bits() == b.to_bits());
        let x: Vec<f32> = (0..8 * kk)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let y1 = k.matmul_nvfp4(&x[..kk], 1, &cpu_q)?;
        let rel1 = gemv_rel_error(&y1, &x[..kk], &cpu_q);
        let (adam_ok, adam_note) = validate_adamw(&k, &cpu_q, &mut rng)?;
        let line = format!(
            "[{n}, {kk}]: quantize bit-identical to CPU: {exact}; dequantize bit-identical: {deq_exact}; \
             GEMV M=1 rel. error vs f64 {rel1:.2e}; AdamW vs CPU: {adam_note} ({:.1} s)",
            t0.elapsed().as_secs_f64()
        );
        progress(&line);
        checks.push(line);
        if !(exact && deq_exact && rel1 <= 1e-3 && adam_ok) {
            return Err(KernelError::InvalidArgument(format!(
                "validation failed, not timing: {}",
                checks.last().unwrap()
            )));
        }

        progress(&format!("[{n}, {kk}]: timing"));
        let packed_bytes = ne / 2 + ne / 16;
        if !cfg.gemv_only {
            quantize::time_quantize(&k, &timer, &wb, n, kk, cpu_q.tensor_scale, &mut push)?;
        }
        // --- dequantize NVFP4 -> bf16 ---
        let sets = rotation(packed_bytes + ne * 2);
        let ws: Vec<DeviceNvfp4> = (0..rotation(packed_bytes))
            .map(|_| k.upload_nvfp4(&cpu_q))
            .collect::<Result<_, _>>()?;
        let nws = ws.len();
        // the split-K GEMV's scratch for every M timed below (launches never allocate)
        k.reserve_gemv(8, n, kk)?;
        if !cfg.gemv_only {
            let mut outs: Vec<CudaSlice<bf16>> = (0..sets.min(4))
                .map(|_| {
                    k.stream()
                        .alloc_zeros::<bf16>(ne)
                        .map_err(drv("allocating"))
                })
                .collect::<Result<_, _>>()?;
            let no = outs.len();
            let t_d = timer
                .time(|i| k.dequantize_bf16_rows_async(&ws[i % nws], 0, n, &mut outs[i % no]))?;
            push(
                "dequantize nvfp4->bf16",
                n,
                kk,
                t_d,
                (packed_bytes + ne * 2) as f64,
                None,
                String::new(),
            );
        }

        // --- GEMV: NVFP4 fused vs cuBLAS bf16, M = 1 and 8 ---
        let wsb: Vec<CudaSlice<bf16>> = (0..rotation(ne * 2))
            .map(|_| upload(&k, &wb))
            .collect::<Result<_, _>>()?;
        let nwb = wsb.len();
        // the read-bandwidth ceiling for the GEMV's bytes: a pure read of as many bytes
        {
            let rb = packed_bytes.div_ceil(16) * 16;
            let host: Vec<u8> = (0..rb)
                .map(|i| (i as u32).wrapping_mul(2654435761) as u8 | 1)
                .collect();
            let bufs: Vec<CudaSlice<u8>> = (0..rotation(rb))
                .map(|_| upload(&k, &host))
                .collect::<Result<_, _>>()?;
            let nb = bufs.len();
            let mut out = k
                .stream()
                .alloc_zeros::<u32>(4 * k.sm_count() as usize)
                .map_err(drv("allocating"))?;
            let t_r = timer.time(|i| stream_read_async(&k, &bufs[i % nb], &mut out, false))?;
            push(
                "read-only stream of the packed bytes (ceiling)",
                n,
                kk,
                t_r,
                rb as f64,
                None,
                "a pure read kernel, same bytes as the GEMV's W".into(),
            );
            let t_rc = timer.time(|i| stream_read_async(&k, &bufs[i % nb], &mut out, true))?;
            push(
                "read-only stream, chained (ceiling for a chain)",
                n,
                kk,
                t_rc,
                rb as f64,
                None,
                "the same read as programmatic dependent launches, back to back".into(),
            );
        }
        for m in [1usize, 4, 8] {
            let dx = upload(&k, &x[..m * kk])?;
            let xb: Vec<bf16> = x[..m * kk].iter().map(|&v| bf16::from_f32(v)).collect();
            let dxb = upload(&k, &xb)?;
            let mut dy = k
                .stream()
                .alloc_zeros::<f32>(m * n)
                .map_err(drv("allocating"))?;
            let mut dyb = k
                .stream()
                .alloc_zeros::<bf16>(m * n)
                .map_err(drv("allocating"))?;
            let t_base = timer
                .time(|i| k.bf16_gemm_cublas_async(&dxb, m, &wsb[i % nwb], n, kk, &mut dyb))?;
            let t_g = timer.time(|i| k.gemv_async(&dx, m, &ws[i % nws], &mut dy))?;
            let g_bytes = (packed_bytes + m * kk * 4 + m * n * 4) as f64;
            let b_bytes = (ne * 2 + m * kk * 2 + m * n * 2) as f64;
            push(
                &format!("cuBLAS bf16 GEMV M={m} (baseline)"),
                n,
                kk,
                t_base,
                b_bytes,
                None,
                "cublasGemmEx, dense bf16 weights".into(),
            );
            push(
                &format!("NVFP4 fused GEMV M={m}"),
                n,
                kk,
                t_g,
                g_bytes,
                Some(t_base),
                format!(
                    "default kernel ({:?}); speed-up vs cuBLAS bf16 on the same shape",
                    k.default_gemv_kernel(m, n, kk)
                ),
            );
            // (kernel, row label) to time again as chained launches after the plain rows
            let default = k.default_gemv_kernel(m, n, kk);
            let mut to_chain = Vec::new();
            if matches!(
                default,
                GemvKernel::TensorCoreSplitK { .. } | GemvKernel::CudaCore { .. }
            ) {
                to_chain.push((default, format!("NVFP4 fused GEMV M={m}")));
            }
            #[cfg(feature = "bench")]
            if m == 1 && k.gemv_fits(GemvKernel::TensorCore { tiles: 2, depth: 3 }, 1, n, kk) {
                for (p, what) in [
                    (1, "probe: v2 without staging x"),
                    (2, "probe: v2 loads + x staging, no decode/MMA"),
                    (3, "probe: v2 loads only"),
                ] {
                    let t_p = timer.time(|i| k.gemv_probe_async(p, &dx, &ws[i % nws], &mut dy))?;
                    push(
                        &format!("  {what}"),
                        n,
                        kk,
                        t_p,
                        g_bytes,
                        Some(t_base),
                        "diagnostic, not a GEMV (output not used)".into(),
                    );
                }
            }
            #[cfg(feature = "bench")]
            {
                let mut variants = k.gemv_kernels_for(m, n, kk);
                variants.retain(|v| *v != default);
                for v in variants {
                    // validate this variant before timing it
                    let yv = k.gemv_with(&x[..m * kk], m, &cpu_q, v)?;
                    let rel = gemv_rel_error(&yv[..n], &x[..kk], &cpu_q);
                    let label = format!("  variant {v:?}, M={m}");
                    if rel.is_nan() || rel > 1e-3 {
                        checks.push(format!(
                            "[{n}, {kk}]: GEMV {v:?} M={m} FAILED validation: rel. error {rel:e}"
                        ));
                        progress(checks.last().unwrap());
                        continue;
                    }
                    let t_v =
                        timer.time(|i| k.gemv_with_async(&dx, m, &ws[i % nws], &mut dy, v))?;
                    push(
                        &label,
                        n,
                        kk,
                        t_v,
                        g_bytes,
                        Some(t_base),
                        format!("validated: rel. error {rel:.1e} (row 0 of x)"),
                    );
                    if m == 1 && matches!(v, GemvKernel::TensorCoreSplitK { .. }) {
                        to_chain.push((v, label));
                    }
                }
            }
            for (v, label) in to_chain {
                for (launch, what) in [
                    (GemvLaunch::CHAINED, "chained"),
                    (GemvLaunch::CHAINED_PREFETCH, "chained + L2 prefetch"),
                ] {
                    if launch.l2_prefetch && !matches!(v, GemvKernel::TensorCoreSplitK { .. }) {
                        continue; // only the split-K kernel has the prefetch
                    }
                    if !chained_matches_plain(&k, &dx, m, &ws[0], v, launch)? {
                        checks.push(format!(
                            "[{n}, {kk}]: GEMV {v:?} M={m} {what} FAILED: differs from the plain \
                             launch"
                        ));
                        progress(checks.last().unwrap());
                        continue;
                    }
                    let t_c = timer.time(|i| {
                        k.gemv_with_launch_async(&dx, m, &ws[i % nws], &mut dy, v, launch)
                    })?;
                    push(
                        &format!("{label}, {what}"),
                        n,
                        kk,
                        t_c,
                        g_bytes,
                        Some(t_base),
                        "back-to-back programmatic dependent launches (a decode chain); output \
                         bit-identical to a plain launch"
                            .into(),
                    );
                }
            }
        }

        // --- large M: dequantize to bf16 + cuBLASLt vs cuBLAS bf16 ---
        if !cfg.gemv_only {
            let m = cfg.large_m;
            let xb: Vec<bf16> = (0..m * kk)
                .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)))
                .collect();
            let dxb = upload(&k, &xb)?;
            let mut dyb = k
                .stream()
                .alloc_zeros::<bf16>(m * n)
                .map_err(drv("allocating"))?;
            let scratch_len = n * kk; // one slab: a single cuBLASLt call
            let mut scratch = k
                .stream()
                .alloc_zeros::<bf16>(scratch_len)
                .map_err(drv("allocating"))?;
            let t_base = timer
                .time(|i| k.bf16_gemm_cublas_async(&dxb, m, &wsb[i % nwb], n, kk, &mut dyb))?;
            let t_l = timer.time(|i| {
                k.matmul_nvfp4_large_async(&dxb, m, &ws[i % nws], &mut scratch, &mut dyb)
            })?;
            let tflops = 2.0 * (m * n * kk) as f64 / t_l / 1e12;
            push(
                &format!("NVFP4 dequant+cuBLASLt M={m}"),
                n,
                kk,
                t_l,
                (packed_bytes + m * kk * 2 + m * n * 2) as f64,
                Some(t_base),
                format!(
                    "{tflops:.0} TFLOP/s; baseline cuBLAS bf16 GEMM M={m} {:.1} us",
                    t_base * 1e6
                ),
            );
        }
        drop(wsb);

        // --- AdamW step on packed weights (fused, chunk 32 rows) ---
        if !cfg.gemv_only {
            let g: Vec<f32> = (0..ne).map(|_| rng.random_range(-1e-3f32..1e-3)).collect();
            let dg = upload(&k, &g)?;
            let mut dm = k
                .stream()
                .alloc_zeros::<f32>(ne)
                .map_err(drv("allocating"))?;
            let mut dv = k
                .stream()
                .alloc_zeros::<f32>(ne)
                .map_err(drv("allocating"))?;
            let mut dw = k.upload_nvfp4(&cpu_q)?;
            let mut st = k.alloc_status()?;
            let hp = AdamWParams {
                lr: 1e-5,
                ..AdamWParams::default()
            };
            let mut step = 0u64;
            let t_a = timer.time(|_| {
                step += 1;
                k.adamw_step_async(&mut dw, &dg, &mut dm, &mut dv, hp, step, 32, 7, &mut st)
                    .map(|_| ())
            })?;
            // minimum traffic: packed+scales read and written, grad read, m and v read and written
            let a_bytes = (2 * packed_bytes + ne * 4 + 4 * ne * 4) as f64;
            push(
                "AdamW step on packed weights (fused, 2 passes)",
                n,
                kk,
                t_a,
                a_bytes,
                None,
                "two passes (amax of the update, then apply): ≈1.5x the minimum bytes".into(),
            );
        }
        drop(ws);
    }
    Ok(BenchReport {
        device: k.device_name().to_string(),
        copy_gbps,
        checks,
        rows,
        seed: cfg.seed,
    })
}
