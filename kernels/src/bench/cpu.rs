//! The CPU section of the kernel benchmark (`kiln-kernel-bench --cpu`; needs no GPU): NVFP4
//! matmul on the CPU — the plain reference (dequantize, then dot), the fused kernel in each
//! implementation this CPU runs, and the default dispatch — against a dense f32 matmul through
//! the `gemm` crate (the call candle makes for an f32 linear), all in the same run.
//!
//! Method: every fast path is checked against the reference on the same data before it is
//! timed; each kernel runs over copies of its operands rotated across ≥ 64 MB (so a layer is
//! not timed from a warm cache, as in a real decode step where the whole model streams by);
//! 2 warm-up calls, median of `samples` calls.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::cpu::{matmul_fused, matmul_nvfp4, matmul_nvfp4_ref, FusedImpl, FUSED_MAX_M};
use crate::nvfp4::Nvfp4Tensor;

/// Qwen2.5-0.5B linear shapes `[N, K]` with how many of each one decode step runs (24 layers):
/// q/o, k/v, gate/up, down.
pub const QWEN_0_5B_LINEARS: &[(&str, usize, usize, usize)] = &[
    ("q_proj / o_proj", 896, 896, 48),
    ("k_proj / v_proj", 128, 896, 48),
    ("gate_proj / up_proj", 4864, 896, 48),
    ("down_proj", 896, 4864, 24),
];

/// What the CPU benchmark runs.
#[derive(Clone, Debug)]
pub struct CpuBenchConfig {
    /// Extra shapes `[N, K]` besides the Qwen2.5-0.5B linears.
    pub extra_shapes: Vec<(usize, usize)>,
    /// Rows of x to time (each ≤ 8 runs the fused kernel, larger the chunked GEMM).
    pub ms: Vec<usize>,
    /// Timed calls per kernel (median reported).
    pub samples: usize,
    /// Input seed.
    pub seed: u64,
}

impl Default for CpuBenchConfig {
    fn default() -> Self {
        CpuBenchConfig {
            extra_shapes: Vec::new(),
            ms: vec![1, 4, 8, 64],
            samples: 21,
            seed: 0x6b696c6e,
        }
    }
}

/// One timed kernel.
#[derive(Clone, Debug, Serialize)]
pub struct CpuBenchRow {
    /// `NxK`.
    pub shape: String,
    /// Rows of x.
    pub m: usize,
    /// Which kernel.
    pub kernel: String,
    /// Median µs per call.
    pub median_us: f64,
    /// Weights (N·K) per second, billions.
    pub gweights_per_s: f64,
    /// f32 dense time / this time (> 1: faster than f32).
    pub vs_f32: f64,
    /// Remarks (validation error).
    pub note: String,
}

/// The whole CPU run.
#[derive(Clone, Debug, Serialize)]
pub struct CpuBenchReport {
    /// CPU threads rayon uses.
    pub threads: usize,
    /// The fused implementation the default path uses here.
    pub fused_impl: String,
    /// Timings.
    pub rows: Vec<CpuBenchRow>,
    /// One Qwen2.5-0.5B-shaped decode step's linears (M = 1, per-token counts above), ms:
    /// (reference, default, f32 dense).
    pub decode_step_ms: (f64, f64, f64),
}

/// Median µs of `samples` calls of `f(i)` (i = call index, for rotating operands).
fn median_us(samples: usize, mut f: impl FnMut(usize)) -> f64 {
    f(0);
    f(1);
    let mut v: Vec<f64> = (0..samples.max(3))
        .map(|i| {
            let t = Instant::now();
            f(i + 2);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Copies needed so that rotating over them touches ≥ 64 MB (at most 64).
fn copies(bytes: usize) -> usize {
    (64usize << 20).div_ceil(bytes.max(1)).clamp(1, 64)
}

/// `y[m, N] = x[m, K] · wᵀ` in f32 through the `gemm` crate, as candle does for a linear.
pub fn f32_linear(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    let mut y = vec![0.0f32; m * n];
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    crate::cpu::matmul::gemm_xwt(&mut y, n, x, m, k, w, n, par);
    y
}

/// ‖a − b‖ / ‖b‖ in f64.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

/// Run the CPU benchmark; `progress` gets a line per shape.
pub fn run_cpu(cfg: &CpuBenchConfig, mut progress: impl FnMut(&str)) -> CpuBenchReport {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let best = FusedImpl::best();
    let mut rows = Vec::new();
    let mut step = (0.0, 0.0, 0.0);
    let shapes: Vec<(String, usize, usize, usize)> = QWEN_0_5B_LINEARS
        .iter()
        .map(|&(name, n, k, per)| (name.to_string(), n, k, per))
        .chain(
            cfg.extra_shapes
                .iter()
                .map(|&(n, k)| (format!("{n}x{k}"), n, k, 0)),
        )
        .collect();
    for (name, n, k, per_token) in shapes {
        progress(&format!("CPU [{n}, {k}] ({name})"));
        let w: Vec<f32> = (0..n * k)
            .map(|_| rng.random_range(-1.0f32..1.0) * rng.random_range(0.0f32..0.06))
            .collect();
        let q = Nvfp4Tensor::quantize(&w, n, k).expect("finite random weights");
        // the f32 baseline multiplies the same (dequantized) weights
        let wd = q.dequantize();
        drop(w);
        let qs: Vec<Nvfp4Tensor> = vec![q.clone(); copies(q.byte_size())];
        let ws: Vec<Vec<f32>> = vec![wd.clone(); copies(wd.len() * 4)];
        let shape = format!("{n}x{k}");
        for &m in &cfg.ms {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let want = matmul_nvfp4_ref(&x, m, &q);
            let t_f32 = median_us(cfg.samples, |i| {
                std::hint::black_box(f32_linear(&x, m, &ws[i % ws.len()], n, k));
            });
            let xr: &[f32] = &x;
            type Kernel<'a> = Box<dyn Fn(&Nvfp4Tensor) -> Vec<f32> + 'a>;
            let mut kernels: Vec<(String, Kernel)> = vec![(
                "nvfp4 reference (dequantize + dot)".into(),
                Box::new(move |w: &Nvfp4Tensor| matmul_nvfp4_ref(xr, m, w)),
            )];
            if m <= FUSED_MAX_M {
                for imp in [FusedImpl::Portable, FusedImpl::Avx2] {
                    if imp.available() {
                        let label = if imp == best {
                            format!("nvfp4 fused {imp:?} (default)")
                        } else {
                            format!("nvfp4 fused {imp:?}")
                        };
                        kernels.push((
                            label,
                            Box::new(move |w: &Nvfp4Tensor| matmul_fused(xr, m, w, imp)),
                        ));
                    }
                }
            } else {
                kernels.push((
                    "nvfp4 chunked dequant + f32 GEMM (default)".into(),
                    Box::new(move |w: &Nvfp4Tensor| matmul_nvfp4(xr, m, w)),
                ));
            }
            let ne = (n * k) as f64;
            rows.push(CpuBenchRow {
                shape: shape.clone(),
                m,
                kernel: "f32 dense (gemm crate, as candle) — baseline".into(),
                median_us: t_f32,
                gweights_per_s: ne / t_f32 / 1e3,
                vs_f32: 1.0,
                note: format!("{:.1} MB of weights", wd.len() as f64 * 4e-6),
            });
            let mut t_ref = 0.0;
            for (label, f) in &kernels {
                let err = rel_l2(&f(&q), &want);
                let t = median_us(cfg.samples, |i| {
                    std::hint::black_box(f(&qs[i % qs.len()]));
                });
                if label.starts_with("nvfp4 reference") {
                    t_ref = t;
                }
                if m == 1 && per_token > 0 {
                    let ms = t * per_token as f64 / 1e3;
                    if label.starts_with("nvfp4 reference") {
                        step.0 += ms;
                    } else if label.ends_with("(default)") {
                        step.1 += ms;
                    }
                }
                rows.push(CpuBenchRow {
                    shape: shape.clone(),
                    m,
                    kernel: label.clone(),
                    median_us: t,
                    gweights_per_s: ne / t / 1e3,
                    vs_f32: t_f32 / t,
                    note: if label.starts_with("nvfp4 reference") {
                        format!("{:.1} MB packed", q.byte_size() as f64 * 1e-6)
                    } else {
                        format!(
                            "rel. L2 error vs reference {err:.1e}; {:.1}x the reference",
                            t_ref / t
                        )
                    },
                });
                assert!(
                    err <= 1e-5,
                    "{label} disagrees with the reference on [{n}, {k}], M={m}: rel. error {err:e}"
                );
            }
            if m == 1 && per_token > 0 {
                step.2 += t_f32 * per_token as f64 / 1e3;
            }
        }
    }
    CpuBenchReport {
        threads: rayon::current_num_threads(),
        fused_impl: format!("{best:?}"),
        rows,
        decode_step_ms: step,
    }
}

impl CpuBenchReport {
    /// A plain-text table.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "CPU: {} threads; fused implementation: {}; operands rotated over >= 64 MB\n\n",
            self.threads, self.fused_impl
        );
        s.push_str(&format!(
            "{:<11} {:>3} {:<46} {:>11} {:>9} {:>8}  {}\n",
            "shape", "M", "kernel", "median us", "Gw/s", "vs f32", "note"
        ));
        for r in &self.rows {
            s.push_str(&format!(
                "{:<11} {:>3} {:<46} {:>11.1} {:>9.2} {:>7.2}x  {}\n",
                r.shape, r.m, r.kernel, r.median_us, r.gweights_per_s, r.vs_f32, r.note
            ));
        }
        let (a, b, c) = self.decode_step_ms;
        s.push_str(&format!(
            "\nQwen2.5-0.5B-shaped decode step, linears only (24 layers, M = 1): \
             reference {a:.1} ms, default {b:.1} ms, f32 dense {c:.1} ms\n"
        ));
        s
    }
}
