//! `y[M,N] = x[M,K] · W[N,K]ᵀ` with W in NVFP4.
//!
//! - [`matmul_nvfp4`] — the default: the fused decode-and-dot kernel (`fused.rs`) for
//!   M ≤ [`FUSED_MAX_M`] (decode), and for larger M (prefill, training) W dequantized in row
//!   chunks (bounded scratch) fed to a blocked f32 GEMM (the `gemm` crate, as candle uses).
//! - [`matmul_nvfp4_ref`] — the simple reference: dequantize a slab of W's rows exactly as
//!   [`Nvfp4Tensor::dequantize`] does and take f32 dot products. The fast paths are tested
//!   against it; keep it plain.

use rayon::prelude::*;

use super::fused::{matmul_fused, FusedImpl, FUSED_MAX_M};
use crate::nvfp4::Nvfp4Tensor;

/// Rows of W dequantized per task in the reference (scratch = `ROWS_PER_TASK · K · 4` bytes
/// per thread).
const ROWS_PER_TASK: usize = 16;

/// Scratch for one dequantized chunk of W on the large-M path (f32 elements, 2 MB).
const LARGE_M_CHUNK_ELEMS: usize = 1 << 19;

/// `y[M,N] = x[M,K] · Wᵀ` where `W` is `[N, K]` NVFP4 (N = `w.rows`, K = `w.cols`).
/// `x` is row-major `[m, K]`; the result is row-major `[m, N]`, accumulated in f32.
/// Equal to [`matmul_nvfp4_ref`] up to f32 rounding order.
///
/// Panics if `x.len() != m * w.cols` (a caller bug, like a shape mismatch in a matmul).
pub fn matmul_nvfp4(x: &[f32], m: usize, w: &Nvfp4Tensor) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "matmul_nvfp4: x must be [m={m}, K={k}]");
    if m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    if m <= FUSED_MAX_M {
        matmul_fused(x, m, w, FusedImpl::best())
    } else {
        matmul_nvfp4_chunked_gemm(x, m, w)
    }
}

/// The large-M path: dequantize chunks of W's rows (≤ 2 MB of f32 scratch) and multiply each
/// with a blocked, multithreaded f32 GEMM. Same dequantized values as the reference.
pub fn matmul_nvfp4_chunked_gemm(x: &[f32], m: usize, w: &Nvfp4Tensor) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "matmul_nvfp4: x must be [m={m}, K={k}]");
    let mut y = vec![0.0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let chunk_rows = (LARGE_M_CHUNK_ELEMS / k).clamp(1, n);
    let mut scratch = vec![0.0f32; chunk_rows * k];
    let mut r0 = 0;
    while r0 < n {
        let rows = chunk_rows.min(n - r0);
        let buf = &mut scratch[..rows * k];
        w.dequantize_rows_into(r0..r0 + rows, buf);
        // y[:, r0..r0+rows] = x · bufᵀ
        gemm_xwt(
            &mut y[r0..],
            n,
            x,
            m,
            k,
            buf,
            rows,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
        r0 += rows;
    }
    y
}

/// `y[i·ldy + j] = Σ_kk x[i·k + kk] · w[j·k + kk]` for `i < m`, `j < rows` (x · wᵀ into
/// the first `rows` columns of a row-major y with row stride `ldy`), through the `gemm` crate's
/// f32 GEMM — the call candle makes for an f32 linear. Panics if a slice is too short.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_xwt(
    y: &mut [f32],
    ldy: usize,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    rows: usize,
    par: gemm::Parallelism,
) {
    if m == 0 || rows == 0 {
        return;
    }
    assert!(
        x.len() >= m * k && w.len() >= rows * k && rows <= ldy && y.len() >= (m - 1) * ldy + rows,
        "gemm_xwt: slices too short for m = {m}, k = {k}, rows = {rows}, ldy = {ldy}"
    );
    // SAFETY: dst [m, rows] with row stride ldy inside y; lhs x [m, k]; rhs wᵀ [k, rows] with
    // (kk, j) at w[j*k + kk]: every address is inside the slices (checked above).
    unsafe {
        gemm::gemm(
            m,
            rows,
            k,
            y.as_mut_ptr(),
            1,
            ldy as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

/// The reference: dequantize 16 rows of W at a time (as [`Nvfp4Tensor::dequantize`]) and take
/// f32 dot products with every row of x; parallel over N. Simple on purpose.
///
/// Panics if `x.len() != m * w.cols`.
pub fn matmul_nvfp4_ref(x: &[f32], m: usize, w: &Nvfp4Tensor) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "matmul_nvfp4_ref: x must be [m={m}, K={k}]");
    // yt is [N, M] so each task owns a contiguous slab; transposed at the end.
    let mut yt = vec![0.0f32; n * m];
    yt.par_chunks_mut(ROWS_PER_TASK * m.max(1))
        .enumerate()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, (t, out)| {
            let r0 = t * ROWS_PER_TASK;
            let rows = out.len() / m.max(1);
            buf.resize(rows * k, 0.0);
            w.dequantize_rows_into(r0..r0 + rows, buf);
            for (r, wrow) in buf.chunks_exact(k).enumerate() {
                for (i, xrow) in x.chunks_exact(k).enumerate() {
                    out[r * m + i] = dot(xrow, wrow);
                }
            }
        });
    transpose(&yt, n, m)
}

/// Plain f32 matmul `y[M,N] = x[M,K] · w[N,K]ᵀ` on dense weights (reference / STE forward).
pub fn matmul_f32_ref(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "matmul_f32_ref: x must be [m, k]");
    assert_eq!(w.len(), n * k, "matmul_f32_ref: w must be [n, k]");
    let mut yt = vec![0.0f32; n * m];
    yt.par_chunks_mut(m.max(1))
        .zip(w.par_chunks(k))
        .for_each(|(out, wrow)| {
            for (i, xrow) in x.chunks_exact(k).enumerate() {
                out[i] = dot(xrow, wrow);
            }
        });
    transpose(&yt, n, m)
}

/// f32 dot product with 8 independent accumulators (vectorizes well).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for ((s, &xv), &yv) in acc.iter_mut().zip(x).zip(y) {
            *s += xv * yv;
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut dst = vec![0.0f32; src.len()];
    for r in 0..rows {
        for c in 0..cols {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_dense_reference_on_dequantized_weights() {
        let (m, n, k) = (3, 37, 64);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 97) as f32 / 13.0 - 3.5)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31) % 17) as f32 / 7.0 - 1.0)
            .collect();
        let q = Nvfp4Tensor::quantize(&w, n, k).unwrap();
        let wd = q.dequantize();
        for y in [matmul_nvfp4_ref(&x, m, &q), matmul_nvfp4(&x, m, &q)] {
            for i in 0..m {
                for j in 0..n {
                    let r: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * wd[j * k + t] as f64)
                        .sum();
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - r).abs() <= 1e-4 + 1e-5 * r.abs(),
                        "({i},{j}) {got} vs {r}"
                    );
                }
            }
        }
        assert_eq!(matmul_f32_ref(&x, m, &wd, n, k).len(), m * n);
    }
}
