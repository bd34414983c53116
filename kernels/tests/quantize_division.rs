//! The CUDA round-to-nearest quantizer replaces the per-element IEEE division `v / d` by a
//! reciprocal and two fused multiply-adds (Markstein): `r = 1/d` (correctly rounded),
//! `q1 = v·r`, `q = fma(fma(-q1, d, v), r, q1)`. This test replays that sequence on the CPU
//! and checks that it picks the same E2M1 code as the division the CPU reference uses, on
//! block scales built the way quantize builds them and on values placed within a few ulps of
//! every rounding boundary (the cases a wrong quotient would flip).

use kiln_kernels::nvfp4::{e4m3_to_f32, f32_to_e2m1};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The GPU's quotient (kernels/cuda/nvfp4_common.cuh, `kiln_quantize_block16_rn`).
fn markstein(v: f32, d: f32) -> f32 {
    let r = 1.0 / d;
    let q1 = v * r;
    (-q1).mul_add(d, v).mul_add(r, q1)
}

#[test]
fn division_free_quotient_gives_the_same_codes() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x9e37);
    let bounds = [
        0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    ];
    let (mut checked, mut same_quotient) = (0u64, 0u64);
    for it in 0..1_500_000u32 {
        // d = e4m3 block scale (every finite positive code, subnormals included) · tensor scale
        let sb: u8 = rng.random_range(1..=0x7E);
        let ws2 =
            f32::from_bits(rng.random_range(27u32..227) << 23 | rng.random::<u32>() & 0x7F_FFFF);
        let d = e4m3_to_f32(sb) * ws2;
        if !d.is_normal() || d > 3.4e38 / 6.0 {
            continue;
        }
        let v = if it % 2 == 0 {
            // within 4 ulps of b·d for a rounding boundary (or grid point) b
            let b = bounds[rng.random_range(0..bounds.len())];
            let c = (b * d).to_bits() as i64 + rng.random_range(-4i64..=4);
            f32::from_bits(c as u32)
        } else {
            // anywhere a block's value can be: |v| <= 6.x · d
            rng.random_range(-6.6f32..6.6) * d
        };
        if !v.is_finite() {
            continue;
        }
        let (exact, fast) = (v / d, markstein(v, d));
        assert_eq!(
            f32_to_e2m1(exact),
            f32_to_e2m1(fast),
            "v = {v:e}, d = {d:e}: division {exact:e}, reciprocal + fma {fast:e}"
        );
        checked += 1;
        same_quotient += (exact.to_bits() == fast.to_bits()) as u64;
    }
    assert!(checked > 1_000_000, "only {checked} cases");
    // the quotients themselves agree wherever v is normal (the codes always do)
    eprintln!("{checked} cases; identical quotient bits in {same_quotient}");
}
