//! The fused small-M NVFP4 matmul (`y[M,N] = x[M,K] · Wᵀ`, M ≤ [`FUSED_MAX_M`]): each packed
//! byte is decoded in registers and multiplied into f32 accumulators straight away, so W is
//! read once, 4.5 bits per weight, and never expanded into a scratch buffer.
//!
//! Arithmetic (the same in both implementations): the codes decode to `2·e2m1` (small
//! integers, exact in f32), the block scale to `e4m3 / 2` (exact), so their product is exactly
//! the reference's `e2m1 · e4m3`; products with x are summed in f32 and the tensor scale is
//! applied once per output. The result differs from [`super::matmul::matmul_nvfp4_ref`] only
//! by f32 rounding order (tested in `matmul.rs`).
//!
//! Two implementations of the same loop, picked at run time:
//! - x86-64 with AVX2 + FMA: 16 bytes of W (32 codes, two scale blocks) per step; nibbles are
//!   split and interleaved with byte shuffles, mapped to `2·e2m1` as i8 with one `vpshufb`
//!   (a 16-entry table in a register), widened to f32, scaled and FMA'd with x.
//! - anything else (and x86 without AVX2): a 256-entry table of two f32 per packed byte and
//!   plain 16-lane loops that LLVM vectorizes for the baseline target (SSE2, NEON); for M > 1
//!   it decodes each row of W once into a row buffer and takes plain dot products.
//!
//! Rows of W run in parallel (rayon); x rows are taken in groups of up to 4 per pass over a
//! row of W (the row stays in L1 between passes).

use rayon::prelude::*;

use crate::nvfp4::codec::e4m3_to_f32;
use crate::nvfp4::tensor::BLOCK;
use crate::nvfp4::Nvfp4Tensor;

/// Largest M the fused kernel takes; larger M dequantizes row chunks and runs an f32 GEMM.
pub const FUSED_MAX_M: usize = 8;

/// x rows per pass over a W row (accumulators must stay in registers).
const GROUP: usize = 4;

/// `2·e2m1(code)` for the 16 codes (sign in bit 3): exact small integers.
const E2M1_X2: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Both codes of a packed byte as f32 `2·e2m1`: `[low nibble (even column), high nibble]`.
static PAIRS: [[f32; 2]; 256] = build_pairs();

const fn build_pairs() -> [[f32; 2]; 256] {
    let mut t = [[0.0f32; 2]; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = [E2M1_X2[b & 15] as f32, E2M1_X2[b >> 4] as f32];
        b += 1;
    }
    t
}

/// Which inner loop [`matmul_fused`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedImpl {
    /// Table of f32 pairs + plain loops (every target).
    Portable,
    /// AVX2 + FMA intrinsics (x86-64, checked at run time).
    Avx2,
}

impl FusedImpl {
    /// The fastest implementation this CPU runs.
    pub fn best() -> FusedImpl {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return FusedImpl::Avx2;
            }
        }
        FusedImpl::Portable
    }

    /// Whether this CPU can run it.
    pub fn available(self) -> bool {
        match self {
            FusedImpl::Portable => true,
            FusedImpl::Avx2 => FusedImpl::best() == FusedImpl::Avx2,
        }
    }
}

/// `y[m, N] = x[m, K] · Wᵀ` for `1 ≤ m ≤ FUSED_MAX_M`, with the given implementation.
///
/// Panics if `x.len() != m·K`, `m` is out of range, or `imp` is not available on this CPU
/// (a caller bug: use [`FusedImpl::best`]).
pub fn matmul_fused(x: &[f32], m: usize, w: &Nvfp4Tensor, imp: FusedImpl) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    assert!((1..=FUSED_MAX_M).contains(&m), "matmul_fused: m = {m}");
    assert_eq!(x.len(), m * k, "matmul_fused: x must be [m={m}, K={k}]");
    assert!(
        imp.available(),
        "matmul_fused: {imp:?} is not supported on this CPU"
    );
    let (pb, sb) = (k / 2, k / BLOCK);
    // yt is [N, m]: each task owns a contiguous slab of rows; transposed at the end.
    let mut yt = vec![0.0f32; n * m];
    // ~64 KB of packed weights per task, so small layers still split across the cores.
    let rows_per_task = (65536 / pb.max(1)).clamp(1, 256);
    yt.par_chunks_mut(rows_per_task * m)
        .zip(w.packed.par_chunks(rows_per_task * pb))
        .zip(w.scales.par_chunks(rows_per_task * sb))
        .for_each_init(Vec::new, |row_buf: &mut Vec<f32>, ((out, p), s)| {
            for ((orow, prow), srow) in out
                .chunks_exact_mut(m)
                .zip(p.chunks_exact(pb))
                .zip(s.chunks_exact(sb))
            {
                if imp == FusedImpl::Portable && m > 1 {
                    // without SIMD table lookups, decoding once per row and then taking plain
                    // dot products beats decoding again for every row of x
                    row_buf.resize(k, 0.0);
                    decode_row_portable(prow, srow, row_buf);
                    for (o, xrow) in orow.iter_mut().zip(x.chunks_exact(k)) {
                        *o = dot8(row_buf, xrow) * w.tensor_scale;
                    }
                    continue;
                }
                let mut i0 = 0;
                while i0 < m {
                    let g = (m - i0).min(GROUP);
                    let xs = &x[i0 * k..(i0 + g) * k];
                    let o = &mut orow[i0..i0 + g];
                    match g {
                        1 => row_dot::<1>(prow, srow, xs, w.tensor_scale, o, imp),
                        2 => row_dot::<2>(prow, srow, xs, w.tensor_scale, o, imp),
                        3 => row_dot::<3>(prow, srow, xs, w.tensor_scale, o, imp),
                        _ => row_dot::<4>(prow, srow, xs, w.tensor_scale, o, imp),
                    }
                    i0 += g;
                }
            }
        });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0.0f32; n * m];
    for (r, row) in yt.chunks_exact(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            y[i * n + r] = v;
        }
    }
    y
}

/// One row of W against `G` rows of x (`xs` = `[G, K]`), results into `out[..G]`.
#[inline]
fn row_dot<const G: usize>(
    p: &[u8],
    s: &[u8],
    xs: &[f32],
    tensor_scale: f32,
    out: &mut [f32],
    imp: FusedImpl,
) {
    let r = match imp {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `imp.available()` was asserted by the caller (AVX2 and FMA detected).
        FusedImpl::Avx2 => unsafe { x86::row_dot::<G>(p, s, xs) },
        _ => row_dot_portable::<G>(p, s, xs),
    };
    for (o, v) in out.iter_mut().zip(r) {
        *o = v * tensor_scale;
    }
}

/// One row of W as `2·e2m1 · e4m3/2` (exactly `e2m1 · e4m3`; the tensor scale is applied to
/// the dot products).
fn decode_row_portable(p: &[u8], s: &[u8], out: &mut [f32]) {
    for ((oblk, pblk), &sbyte) in out
        .chunks_exact_mut(BLOCK)
        .zip(p.chunks_exact(BLOCK / 2))
        .zip(s)
    {
        let sf = e4m3_to_f32(sbyte) * 0.5;
        for (pair, &byte) in oblk.chunks_exact_mut(2).zip(pblk) {
            let [lo, hi] = PAIRS[byte as usize];
            pair[0] = lo * sf;
            pair[1] = hi * sf;
        }
    }
}

/// f32 dot product with 8 independent accumulators (vectorizes for the baseline target).
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for ((s, &xv), &yv) in acc.iter_mut().zip(x).zip(y) {
            *s += xv * yv;
        }
    }
    // K is a multiple of 16: no remainder
    acc.iter().sum()
}

/// Portable inner loop: `Σ_k (2·e2m1 · e4m3/2) · x[g, k]` for each of the G rows of x.
#[inline]
fn row_dot_portable<const G: usize>(p: &[u8], s: &[u8], xs: &[f32]) -> [f32; G] {
    let k = p.len() * 2;
    let mut acc = [[0.0f32; BLOCK]; G];
    for (b, (pblk, &sbyte)) in p.chunks_exact(BLOCK / 2).zip(s).enumerate() {
        let sf = e4m3_to_f32(sbyte) * 0.5;
        let mut wv = [0.0f32; BLOCK];
        for (pair, &byte) in wv.chunks_exact_mut(2).zip(pblk) {
            let [lo, hi] = PAIRS[byte as usize];
            pair[0] = lo * sf;
            pair[1] = hi * sf;
        }
        for (g, a) in acc.iter_mut().enumerate() {
            let xb = &xs[g * k + b * BLOCK..g * k + (b + 1) * BLOCK];
            for ((av, &wv), &xv) in a.iter_mut().zip(&wv).zip(xb) {
                *av += wv * xv;
            }
        }
    }
    acc.map(|a| a.iter().sum())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX2 + FMA inner loop.

    use std::arch::x86_64::*;

    use super::E2M1_X2;
    use crate::nvfp4::codec::e4m3_to_f32;

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// 16 codes (one per byte lane) → two 8-lane f32 vectors of `2·e2m1`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn widen(table: __m128i, codes: __m128i) -> (__m256, __m256) {
        let v = _mm_shuffle_epi8(table, codes);
        let a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        let b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)));
        (a, b)
    }

    /// See `row_dot_portable`; `p.len() * 2 == K`, `xs.len() == G * K`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_dot<const G: usize>(p: &[u8], s: &[u8], xs: &[f32]) -> [f32; G] {
        let k = p.len() * 2;
        assert!(xs.len() >= G * k && s.len() * 16 == k);
        // Four accumulators per x row when they fit in the 16 registers, else two.
        let nacc = if G <= 2 { 4 } else { 2 };
        let mut acc = [[_mm256_setzero_ps(); 4]; G];
        // SAFETY (all loads below): unaligned loads within `p`, `s` and `xs`, whose lengths
        // were checked above (16 packed bytes = 32 x values per row per step).
        let table = unsafe { _mm_loadu_si128(E2M1_X2.as_ptr().cast()) };
        let low4 = _mm_set1_epi8(0x0F);
        let pairs = k / 32;
        for i in 0..pairs {
            let v = unsafe { _mm_loadu_si128(p.as_ptr().add(16 * i).cast()) };
            let lo = _mm_and_si128(v, low4);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), low4);
            // codes in column order: byte j -> columns 2j (low nibble), 2j+1 (high nibble)
            let (w0, w1) = widen(table, _mm_unpacklo_epi8(lo, hi));
            let (w2, w3) = widen(table, _mm_unpackhi_epi8(lo, hi));
            let s0 = _mm256_set1_ps(e4m3_to_f32(s[2 * i]) * 0.5);
            let s1 = _mm256_set1_ps(e4m3_to_f32(s[2 * i + 1]) * 0.5);
            let w = [
                _mm256_mul_ps(w0, s0),
                _mm256_mul_ps(w1, s0),
                _mm256_mul_ps(w2, s1),
                _mm256_mul_ps(w3, s1),
            ];
            for (g, a) in acc.iter_mut().enumerate() {
                let xp = unsafe { xs.as_ptr().add(g * k + 32 * i) };
                for (h, &wh) in w.iter().enumerate() {
                    let xv = unsafe { _mm256_loadu_ps(xp.add(8 * h)) };
                    a[h % nacc] = _mm256_fmadd_ps(wh, xv, a[h % nacc]);
                }
            }
        }
        if !k.is_multiple_of(32) {
            // one last 16-element block
            let b = k / 16 - 1;
            let mut buf = [0u8; 16];
            buf[..8].copy_from_slice(&p[8 * b..8 * b + 8]);
            let v = unsafe { _mm_loadu_si128(buf.as_ptr().cast()) };
            let lo = _mm_and_si128(v, low4);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), low4);
            let (w0, w1) = widen(table, _mm_unpacklo_epi8(lo, hi));
            let sc = _mm256_set1_ps(e4m3_to_f32(s[b]) * 0.5);
            let w = [_mm256_mul_ps(w0, sc), _mm256_mul_ps(w1, sc)];
            for (g, a) in acc.iter_mut().enumerate() {
                let xp = unsafe { xs.as_ptr().add(g * k + 16 * b) };
                for (h, &wh) in w.iter().enumerate() {
                    let xv = unsafe { _mm256_loadu_ps(xp.add(8 * h)) };
                    a[h] = _mm256_fmadd_ps(wh, xv, a[h]);
                }
            }
        }
        let mut out = [0.0f32; G];
        for (o, a) in out.iter_mut().zip(acc) {
            let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            *o = hsum(s);
        }
        out
    }
}
