//! Scalar codecs: E2M1 (the 4-bit NVFP4 element) and E4M3 (the FP8 block scale), both
//! round-to-nearest-even and saturating, plus the counter-based uniform used by stochastic
//! rounding. The CUDA kernels in `kernels/cuda/` implement exactly these functions.

/// The 8 E2M1 magnitudes, indexed by the low 3 bits of a code.
pub const E2M1_GRID: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// Largest E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;

/// Largest finite E4M3 (`E4M3FN`) value: `S.1111.110`.
pub const E4M3_MAX: f32 = 448.0;

/// Smallest positive E4M3 value (the smallest subnormal, `0x01`): 2^-9.
pub const E4M3_MIN_SUBNORMAL: f32 = 1.0 / 512.0;

/// Decode a 4-bit E2M1 code (bit 3 = sign, bits 0..3 = index into [`E2M1_GRID`]).
/// Only the low nibble of `code` is read. Code `0x8` is negative zero.
#[inline]
pub fn e2m1_to_f32(code: u8) -> f32 {
    let mag = E2M1_GRID[(code & 0x7) as usize];
    // the sign bit (bit 3) moved to the f32 sign: no branch (random signs would mispredict)
    f32::from_bits(mag.to_bits() | (u32::from(code & 0x8) << 28))
}

/// Encode `x` as E2M1: round to nearest on the grid, ties to the even code, |x| > 5 → 6
/// (saturating; infinities become ±6). The sign bit is the sign bit of `x`, so `-0.0` and
/// negatives that round to zero give code `0x8`. NaN gives a zero code (with NaN's sign bit);
/// quantize rejects NaN inputs before they get here.
///
/// The decision boundaries are ModelOpt's `e2m1_bounds` = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5]:
/// a value exactly on a boundary goes to the neighbour with the even code (0.25→0, 0.75→1.0,
/// 1.25→1.0, 1.75→2.0, 2.5→2.0, 3.5→4.0, 5→4.0).
#[inline]
pub fn f32_to_e2m1(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x8 } else { 0x0 };
    let a = x.abs();
    let mag = if a.is_nan() || a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    sign | mag
}

/// Decode an E4M3 (`float8_e4m3fn`) byte: bias 7, subnormals `m·2^-9`, `0x7F`/`0xFF` are NaN,
/// no infinities.
#[inline]
pub fn e4m3_to_f32(bits: u8) -> f32 {
    E4M3_TABLE[bits as usize]
}

/// All 256 E4M3 values, built at compile time.
static E4M3_TABLE: [f32; 256] = build_e4m3_table();

const fn build_e4m3_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u32;
        let exp = (b >> 3) & 0xF;
        let man = b & 0x7;
        let mag = if exp == 0xF && man == 0x7 {
            f32::NAN
        } else if exp == 0 {
            // subnormal: man · 2^-9, exactly representable in f32
            (man as f32) / 512.0
        } else {
            // normal: (1 + man/8) · 2^(exp-7): build the f32 bits directly
            f32::from_bits(((exp + 127 - 7) << 23) | (man << 20))
        };
        t[i] = if b & 0x80 != 0 { -mag } else { mag };
        i += 1;
    }
    t
}

/// Encode `x` as E4M3 with round-to-nearest-even, **saturating** at ±448 (a plain cast would
/// give NaN above 464). Subnormals are produced for |x| < 2^-6; values below 2^-10 round to
/// (signed) zero. NaN gives `0x7F` (with the sign bit of the NaN).
#[inline]
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return sign | 0x7F;
    }
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    if a < 1.0 / 64.0 {
        // Subnormal range: value = m · 2^-9 with m in 0..=8 (m = 8 is 2^-6, code 0x08, the
        // smallest normal, so the code is m either way). a·512 is exact (power-of-two scale).
        let m = (a * 512.0).round_ties_even() as u8;
        return sign | m;
    }
    let bits = a.to_bits();
    let exp = (bits >> 23) as i32 - 127; // in [-6, 8]
    let mant = bits & 0x7F_FFFF;
    let mut m3 = mant >> 20;
    let rem = mant & 0xF_FFFF;
    const HALF: u32 = 0x8_0000;
    if rem > HALF || (rem == HALF && (m3 & 1) == 1) {
        m3 += 1;
    }
    let mut e = exp + 7;
    if m3 == 8 {
        m3 = 0;
        e += 1;
    }
    if e > 15 || (e == 15 && m3 == 7) {
        return sign | 0x7E;
    }
    sign | ((e as u8) << 3) | m3 as u8
}

/// A uniform in `[0, 1)` with 24 random bits, a pure function of `(seed, index)`
/// (SplitMix64 finaliser). Stochastic rounding uses the element's flat index in the whole
/// tensor, so results do not depend on chunking or threading, and the CUDA kernels draw the
/// same numbers.
#[inline]
pub fn sr_uniform(seed: u64, index: u64) -> f32 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32) * (1.0 / 16_777_216.0)
}

/// Stochastic rounding of `x` to bf16 bits: between the two neighbouring bf16 values, the one
/// away from zero with probability (the dropped 16 bits) / 2^16, so `E[bf16] = x`. The 16
/// random bits are the top 16 of `u` (a [`sr_uniform`] draw, whose 24 bits make the scaled
/// value exact on the CPU and the GPU alike). NaN and ±inf round to nearest.
#[inline]
pub fn f32_to_bf16_stochastic(x: f32, u: f32) -> u16 {
    if !x.is_finite() {
        return half::bf16::from_f32(x).to_bits();
    }
    let r = (u * 65536.0) as u32;
    ((x.to_bits() + r) >> 16) as u16
}

/// Stochastically round `q` (already divided by its block and tensor scales) onto the E2M1
/// grid: between the two neighbouring grid magnitudes `lo ≤ |q| < hi`, pick `hi` with
/// probability `(|q| − lo)/(hi − lo)`, so `E[decoded] = q` for |q| ≤ 6. |q| > 6 saturates to 6.
/// `u` is a uniform in `[0, 1)` (see [`sr_uniform`]).
#[inline]
pub fn f32_to_e2m1_stochastic(q: f32, u: f32) -> u8 {
    let sign = if q.is_sign_negative() { 0x8 } else { 0x0 };
    let a = q.abs();
    if a.is_nan() {
        return sign;
    }
    if a >= E2M1_MAX {
        return sign | 7;
    }
    // index of the largest grid point <= a
    let lo_idx: u8 = if a < 0.5 {
        0
    } else if a < 1.0 {
        1
    } else if a < 1.5 {
        2
    } else if a < 2.0 {
        3
    } else if a < 3.0 {
        4
    } else if a < 4.0 {
        5
    } else {
        6
    };
    let lo = E2M1_GRID[lo_idx as usize];
    let hi = E2M1_GRID[lo_idx as usize + 1];
    let p = (a - lo) / (hi - lo);
    let idx = if u < p { lo_idx + 1 } else { lo_idx };
    sign | idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_decode_known_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert!(e4m3_to_f32(0x80).is_sign_negative() && e4m3_to_f32(0x80) == 0.0);
        assert_eq!(e4m3_to_f32(0x01), 1.0 / 512.0);
        assert_eq!(e4m3_to_f32(0x07), 7.0 / 512.0);
        assert_eq!(e4m3_to_f32(0x08), 1.0 / 64.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x3C), 1.5);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert!(e4m3_to_f32(0x7F).is_nan());
        assert!(e4m3_to_f32(0xFF).is_nan());
    }

    #[test]
    fn e4m3_encode_roundtrips_every_finite_code() {
        for b in 0u8..=255 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                continue;
            }
            assert_eq!(f32_to_e4m3(v), b, "code {b:#04x} value {v}");
        }
    }

    #[test]
    fn e2m1_roundtrips_every_code() {
        for c in 0u8..16 {
            assert_eq!(f32_to_e2m1(e2m1_to_f32(c)), c);
        }
    }

    #[test]
    fn sr_uniform_is_in_range_and_varies() {
        let mut seen_low = false;
        let mut seen_high = false;
        for i in 0..10_000 {
            let u = sr_uniform(7, i);
            assert!((0.0..1.0).contains(&u));
            seen_low |= u < 0.1;
            seen_high |= u > 0.9;
        }
        assert!(seen_low && seen_high);
        assert_ne!(sr_uniform(1, 5), sr_uniform(2, 5));
    }

    /// The CUDA encoder (`kiln_e2m1_mag` in nvfp4_common.cuh) rounds with bit arithmetic
    /// instead of the boundary chain; check they agree around every boundary and on a dense
    /// sample of [0, 8].
    #[test]
    fn cuda_bit_trick_e2m1_encoder_matches_the_boundary_chain() {
        fn mag_bits(a: f32) -> u8 {
            if a < 1.0 {
                return (a + a).round_ties_even() as u8;
            }
            let mut b = a.to_bits();
            b = b.wrapping_add(0x1F_FFFF + ((b >> 22) & 1));
            ((b >> 22).wrapping_sub(252)).min(7) as u8
        }
        let check = |a: f32| {
            assert_eq!(
                mag_bits(a),
                f32_to_e2m1(a) & 7,
                "a = {a:e} ({:#x})",
                a.to_bits()
            )
        };
        for t in [
            0.0f32, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0,
            8.0,
        ] {
            let b = t.to_bits() as i64;
            for d in -64i64..=64 {
                let bits = (b + d).max(0) as u32;
                check(f32::from_bits(bits));
            }
        }
        let mut bits = 0u32;
        while bits < 0x4100_0000 {
            check(f32::from_bits(bits));
            bits += 997;
        }
        check(f32::INFINITY);
        check(1.0e30);
    }

    /// The GEMV's decodes: an E2M1 code placed in f16 bits is the value · 2^-14, an E4M3 byte's
    /// low 7 bits placed in f16 bits are the value · 2^-8 (subnormals included).
    #[test]
    fn cuda_f16_decode_tricks_are_exact() {
        for c in 0u16..16 {
            let h = ((c & 8) << 12) | ((c & 7) << 9);
            let v = half::f16::from_bits(h).to_f32() * 16384.0;
            assert_eq!(v.to_bits(), e2m1_to_f32(c as u8).to_bits(), "e2m1 code {c}");
        }
        for b in 0u16..0x7F {
            let v = half::f16::from_bits(b << 7).to_f32() * 256.0;
            assert_eq!(v, e4m3_to_f32(b as u8), "e4m3 {b:#x}");
        }
    }
}
