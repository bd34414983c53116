//! `Nvfp4Tensor`: a row-major `[rows, cols]` matrix in NVFP4 (packed E2M1 codes, one E4M3
//! scale per 16 columns, one f32 tensor scale), and the block quantize/dequantize routines
//! shared by the tensor methods, the chunked optimizer step and the checkpoint writer.

use std::ops::Range;

use rayon::prelude::*;

use super::codec::{
    e2m1_to_f32, e4m3_to_f32, f32_to_e2m1, f32_to_e2m1_stochastic, f32_to_e4m3, sr_uniform,
    E2M1_MAX, E4M3_MAX, E4M3_MIN_SUBNORMAL,
};
use crate::KernelError;

/// Elements that share one E4M3 scale (consecutive along a row, i.e. along K).
pub const BLOCK: usize = 16;

/// `6 · 448`: the tensor scale is `amax / 2688` (ModelOpt `weight_scale_2`).
pub const TENSOR_SCALE_DIVISOR: f32 = E2M1_MAX * E4M3_MAX;

/// How E2M1 codes are chosen from the scaled values (block scales are always round-to-nearest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// Round to nearest, ties to even (ModelOpt; bit-exact, deterministic).
    Nearest,
    /// Stochastic rounding: unbiased in expectation. The uniform for the element at flat index
    /// `i` of the whole tensor is `sr_uniform(seed, i)`, so the result does not depend on
    /// chunking or thread count.
    Stochastic {
        /// Seed of the counter-based generator.
        seed: u64,
    },
}

/// An NVFP4 matrix `[rows, cols]` (rows = N outputs, cols = K inputs of a linear layer).
///
/// Value of element `(r, c)`: `e2m1(code) · e4m3(scales[r, c/16]) · tensor_scale`, computed in
/// f32 in that order. The layout is the on-disk ModelOpt / compressed-tensors layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Nvfp4Tensor {
    /// Rows (N).
    pub rows: usize,
    /// Columns (K); always a multiple of [`BLOCK`].
    pub cols: usize,
    /// Packed E2M1 codes, `[rows, cols/2]` row-major; column `2j` in the low nibble of byte `j`,
    /// column `2j+1` in the high nibble. Invariant: `packed.len() == rows * cols / 2`.
    pub packed: Vec<u8>,
    /// E4M3 block scales (raw bits), `[rows, cols/16]` row-major.
    /// Invariant: `scales.len() == rows * cols / 16`.
    pub scales: Vec<u8>,
    /// The f32 tensor scale (ModelOpt `weight_scale_2` = `amax / 2688`;
    /// compressed-tensors stores `1 / tensor_scale` as `weight_global_scale`). Always > 0.
    pub tensor_scale: f32,
}

/// Smallest tensor scale used as is (2^-100); below it the tensor scale is 1.0 (see
/// [`tensor_scale_for_amax`]).
pub const MIN_TENSOR_SCALE: f32 = f32::from_bits((127 - 100) << 23);

/// The tensor scale for a tensor whose largest magnitude is `amax`: `amax / 2688` in f32.
/// A tensor that is all zeros, or so tiny (amax < 2688·2^-100 ≈ 2e-27) that the scale products
/// could underflow, gets 1.0 instead, so the scale stays finite, positive and normal (ModelOpt
/// would produce NaN for an all-zero tensor); every code of such a tensor is zero.
pub fn tensor_scale_for_amax(amax: f32) -> f32 {
    let ws2 = amax / TENSOR_SCALE_DIVISOR;
    if ws2 >= MIN_TENSOR_SCALE {
        ws2
    } else {
        1.0
    }
}

/// Largest |x| over `data`, or the first non-finite element as an error (`cols` names it).
pub fn checked_amax(data: &[f32], cols: usize) -> Result<f32, KernelError> {
    checked_amax_by(data, cols, |x| x)
}

/// [`checked_amax`] over values `f` turns into f32 (e.g. bf16 read straight from a checkpoint,
/// without an f32 copy).
pub fn checked_amax_by<T: Copy + Sync>(
    data: &[T],
    cols: usize,
    f: impl Fn(T) -> f32 + Sync,
) -> Result<f32, KernelError> {
    let amax = data
        .par_chunks(1 << 16)
        .map(|c| c.iter().fold(0.0f32, |m, &x| m.max(f(x).abs())))
        .reduce(|| 0.0f32, f32::max);
    // f32::max ignores NaN, so test for it separately (rare path: only when something is off).
    if amax.is_finite() && !data.par_iter().any(|&x| f(x).is_nan()) {
        return Ok(amax);
    }
    let index = data.iter().position(|&x| !f(x).is_finite()).unwrap_or(0);
    let cols = cols.max(1);
    Err(KernelError::NonFinite {
        index,
        row: index / cols,
        col: index % cols,
        value: f(data[index]),
    })
}

/// The E4M3 scale byte for one block (ModelOpt order of operations, all in f32):
/// `s = block_amax / (6·ws2)`; `s == 0 → 1`; `s = max(s, 2^-9)`; `e4m3(s)` RNE, saturating.
#[inline]
pub fn block_scale_code(block_amax: f32, tensor_scale: f32) -> u8 {
    let mut s = block_amax / (E2M1_MAX * tensor_scale);
    if s == 0.0 {
        s = 1.0;
    }
    f32_to_e4m3(s.max(E4M3_MIN_SUBNORMAL))
}

/// Quantize one block of 16 values with a known tensor scale. Returns the scale byte and writes
/// 8 packed bytes. `first_index` is the flat index of `block[0]` in the whole tensor (used by
/// stochastic rounding only).
#[inline]
fn quantize_block(
    block: &[f32],
    tensor_scale: f32,
    rounding: Rounding,
    first_index: u64,
    out: &mut [u8],
) -> u8 {
    debug_assert_eq!(block.len(), BLOCK);
    debug_assert_eq!(out.len(), BLOCK / 2);
    let block_amax = block.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    let sb = block_scale_code(block_amax, tensor_scale);
    let denom = e4m3_to_f32(sb) * tensor_scale;
    let mut codes = [0u8; BLOCK];
    for (i, (&w, code)) in block.iter().zip(codes.iter_mut()).enumerate() {
        let q = w / denom;
        let c = match rounding {
            Rounding::Nearest => f32_to_e2m1(q),
            Rounding::Stochastic { seed } => {
                f32_to_e2m1_stochastic(q, sr_uniform(seed, first_index + i as u64))
            }
        };
        // The sign always comes from w (w / denom keeps it except for a 0/0 underflow case).
        *code = (c & 0x7) | if w.is_sign_negative() { 0x8 } else { 0 };
    }
    for (j, byte) in out.iter_mut().enumerate() {
        *byte = codes[2 * j] | (codes[2 * j + 1] << 4);
    }
    sb
}

/// Quantize the rows in `data` (`[n, cols]`, row-major) with the given tensor scale, writing
/// `packed` (`[n, cols/2]`) and `scales` (`[n, cols/16]`). `first_row` is the row of `data[0]`
/// in the whole tensor (stochastic rounding indexes by the whole tensor). Runs in parallel
/// over rows. The caller checks shapes and finiteness.
pub fn quantize_rows_into(
    data: &[f32],
    cols: usize,
    tensor_scale: f32,
    rounding: Rounding,
    first_row: usize,
    packed: &mut [u8],
    scales: &mut [u8],
) {
    debug_assert_eq!(cols % BLOCK, 0);
    let n = data.len() / cols;
    debug_assert_eq!(packed.len(), n * cols / 2);
    debug_assert_eq!(scales.len(), n * cols / BLOCK);
    data.par_chunks(cols)
        .zip(packed.par_chunks_mut(cols / 2))
        .zip(scales.par_chunks_mut(cols / BLOCK))
        .enumerate()
        .for_each(|(r, ((row, prow), srow))| {
            let base = ((first_row + r) * cols) as u64;
            for (b, ((blk, pout), sout)) in row
                .chunks_exact(BLOCK)
                .zip(prow.chunks_exact_mut(BLOCK / 2))
                .zip(srow.iter_mut())
                .enumerate()
            {
                *sout =
                    quantize_block(blk, tensor_scale, rounding, base + (b * BLOCK) as u64, pout);
            }
        });
}

/// Dequantize packed rows (`[n, cols/2]` codes, `[n, cols/16]` scales) into `out` (`[n, cols]`).
pub fn dequantize_rows_into(
    packed: &[u8],
    scales: &[u8],
    cols: usize,
    tensor_scale: f32,
    out: &mut [f32],
) {
    debug_assert_eq!(out.len(), packed.len() * 2);
    debug_assert_eq!(scales.len() * BLOCK, out.len());
    out.par_chunks_mut(cols * 8)
        .zip(packed.par_chunks(cols * 4))
        .zip(scales.par_chunks(cols / 2))
        .for_each(|((o, p), s)| dequantize_span(p, s, tensor_scale, o));
}

/// Dequantize whole blocks sequentially (`p`: 8 bytes per block, `s`: 1 byte per block).
#[inline]
fn dequantize_span(p: &[u8], s: &[u8], tensor_scale: f32, out: &mut [f32]) {
    for ((ob, pb), &sb) in out
        .chunks_exact_mut(BLOCK)
        .zip(p.chunks_exact(BLOCK / 2))
        .zip(s.iter())
    {
        let scale = e4m3_to_f32(sb);
        for (j, &byte) in pb.iter().enumerate() {
            ob[2 * j] = e2m1_to_f32(byte & 0xF) * scale * tensor_scale;
            ob[2 * j + 1] = e2m1_to_f32(byte >> 4) * scale * tensor_scale;
        }
    }
}

fn check_shape(len: usize, rows: usize, cols: usize) -> Result<(), KernelError> {
    if !cols.is_multiple_of(BLOCK) || cols == 0 {
        return Err(KernelError::ColsNotMultipleOf16 { rows, cols });
    }
    let expected = rows
        .checked_mul(cols)
        .ok_or_else(|| KernelError::InvalidArgument(format!("shape [{rows}, {cols}] overflows")))?;
    if len != expected {
        return Err(KernelError::LengthMismatch {
            what: "input data for [rows, cols]",
            expected,
            got: len,
        });
    }
    Ok(())
}

impl Nvfp4Tensor {
    /// Quantize `data` (`[rows, cols]`, row-major) with ModelOpt semantics, round to nearest
    /// even (bit-exact with ModelOpt and with the CUDA kernel).
    /// Errors: `cols % 16 != 0`, a length mismatch, or any NaN/±inf element.
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> Result<Self, KernelError> {
        Self::quantize_with(data, rows, cols, Rounding::Nearest)
    }

    /// Quantize with stochastic rounding of the E2M1 codes (block and tensor scales as in
    /// [`Nvfp4Tensor::quantize`]): `E[dequantize(quantize_stochastic(x))] = x` element-wise for
    /// every element whose scaled magnitude is within the grid (all but saturated ones).
    pub fn quantize_stochastic(
        data: &[f32],
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> Result<Self, KernelError> {
        Self::quantize_with(data, rows, cols, Rounding::Stochastic { seed })
    }

    /// Quantize with the chosen rounding; the tensor scale comes from the data's amax.
    pub fn quantize_with(
        data: &[f32],
        rows: usize,
        cols: usize,
        rounding: Rounding,
    ) -> Result<Self, KernelError> {
        check_shape(data.len(), rows, cols)?;
        let amax = checked_amax(data, cols)?;
        let tensor_scale = tensor_scale_for_amax(amax);
        let mut packed = vec![0u8; rows * cols / 2];
        let mut scales = vec![0u8; rows * cols / BLOCK];
        quantize_rows_into(
            data,
            cols,
            tensor_scale,
            rounding,
            0,
            &mut packed,
            &mut scales,
        );
        Ok(Nvfp4Tensor {
            rows,
            cols,
            packed,
            scales,
            tensor_scale,
        })
    }

    /// Build a tensor from its stored parts (e.g. read from a checkpoint), checking lengths.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        packed: Vec<u8>,
        scales: Vec<u8>,
        tensor_scale: f32,
    ) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(BLOCK) || cols == 0 {
            return Err(KernelError::ColsNotMultipleOf16 { rows, cols });
        }
        if packed.len() != rows * cols / 2 {
            return Err(KernelError::LengthMismatch {
                what: "packed NVFP4 codes [rows, cols/2]",
                expected: rows * cols / 2,
                got: packed.len(),
            });
        }
        if scales.len() != rows * cols / BLOCK {
            return Err(KernelError::LengthMismatch {
                what: "E4M3 block scales [rows, cols/16]",
                expected: rows * cols / BLOCK,
                got: scales.len(),
            });
        }
        if !(tensor_scale.is_finite() && tensor_scale > 0.0) {
            return Err(KernelError::InvalidArgument(format!(
                "tensor scale must be finite and > 0, got {tensor_scale}"
            )));
        }
        Ok(Nvfp4Tensor {
            rows,
            cols,
            packed,
            scales,
            tensor_scale,
        })
    }

    /// The whole matrix in f32, `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_rows(0..self.rows)
    }

    /// Rows `range` in f32, `[range.len(), cols]`. Panics if the range is past `rows`.
    pub fn dequantize_rows(&self, range: Range<usize>) -> Vec<f32> {
        let mut out = vec![0.0f32; range.len() * self.cols];
        self.dequantize_rows_into(range, &mut out);
        out
    }

    /// Rows `range` in f32 into `out` (length `range.len() * cols`), allocating nothing.
    /// Panics if the range is past `rows` or `out` has the wrong length.
    pub fn dequantize_rows_into(&self, range: Range<usize>, out: &mut [f32]) {
        assert!(
            range.end <= self.rows,
            "row range {range:?} past {} rows",
            self.rows
        );
        assert_eq!(out.len(), range.len() * self.cols, "output buffer length");
        let (p, s) = self.row_parts(range);
        dequantize_rows_into(p, s, self.cols, self.tensor_scale, out);
    }

    /// The packed codes and scales of rows `range`.
    pub fn row_parts(&self, range: Range<usize>) -> (&[u8], &[u8]) {
        let pc = self.cols / 2;
        let sc = self.cols / BLOCK;
        (
            &self.packed[range.start * pc..range.end * pc],
            &self.scales[range.start * sc..range.end * sc],
        )
    }

    /// The 4-bit code of element `(row, col)`.
    pub fn code(&self, row: usize, col: usize) -> u8 {
        let byte = self.packed[row * self.cols / 2 + col / 2];
        if col.is_multiple_of(2) {
            byte & 0xF
        } else {
            byte >> 4
        }
    }

    /// Bytes held: packed codes + scales + the 4-byte tensor scale (≈ 4.5 bits per weight).
    pub fn byte_size(&self) -> usize {
        self.packed.len() + self.scales.len() + 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn checked_amax_over_bf16_equals_the_f32_pass_and_names_the_first_bad_value() {
        let f: Vec<f32> = (0..70_000)
            .map(|i| ((i as f32) * 0.37).sin() * 3.0)
            .collect();
        let b: Vec<bf16> = f.iter().map(|&x| bf16::from_f32(x)).collect();
        let widened: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
        let want = checked_amax(&widened, 100).unwrap();
        assert_eq!(checked_amax_by(&b, 100, |x| x.to_f32()).unwrap(), want);
        let mut bad = b.clone();
        bad[65_603] = bf16::NAN;
        bad[65_700] = bf16::INFINITY;
        match checked_amax_by(&bad, 100, |x| x.to_f32()) {
            Err(KernelError::NonFinite {
                index, row, col, ..
            }) => {
                assert_eq!((index, row, col), (65_603, 656, 3))
            }
            other => panic!("{other:?}"),
        }
    }
}
