//! `y[M,N] = x[M,K] · W[N,K]ᵀ` with W in NVFP4: dequantize a slab of W's rows at a time
//! (bounded scratch) and take f32 dot products; parallel over N.

use rayon::prelude::*;

use crate::nvfp4::Nvfp4Tensor;

/// Rows of W dequantized per task (scratch = `ROWS_PER_TASK · K · 4` bytes per thread).
const ROWS_PER_TASK: usize = 16;

/// `y[M,N] = x[M,K] · Wᵀ` where `W` is `[N, K]` NVFP4 (N = `w.rows`, K = `w.cols`).
/// `x` is row-major `[m, K]`; the result is row-major `[m, N]`, accumulated in f32.
///
/// Panics if `x.len() != m * w.cols` (a caller bug, like a shape mismatch in a matmul).
pub fn matmul_nvfp4(x: &[f32], m: usize, w: &Nvfp4Tensor) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "matmul_nvfp4: x must be [m={m}, K={k}]");
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
        let y = matmul_nvfp4(&x, m, &q);
        let wd = q.dequantize();
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
        assert_eq!(matmul_f32_ref(&x, m, &wd, n, k).len(), m * n);
    }
}
