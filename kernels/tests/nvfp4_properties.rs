//! Property tests on random shapes and values: quantize picks the nearest grid point for its
//! block scale, the scales follow the ModelOpt formula, and the round-trip error is bounded.

use kiln_kernels::nvfp4::{
    block_scale_code, e2m1_to_f32, e4m3_to_f32, Nvfp4Tensor, E2M1_GRID, TENSOR_SCALE_DIVISOR,
};
use proptest::prelude::*;

/// A random `[rows, cols]` matrix whose values span several binades (`exp` shifts them), with
/// some exact zeros and negative zeros sprinkled in, and rows of decreasing magnitude.
fn matrix() -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1usize..6, 1usize..6, -30i32..30).prop_flat_map(|(rows, blocks, exp)| {
        let cols = blocks * 16;
        let scale = 2f32.powi(exp);
        (
            Just(rows),
            Just(cols),
            proptest::collection::vec(
                prop_oneof![
                    8 => (-1.0f32..1.0).prop_map(move |x| x * scale),
                    1 => (-1.0f32..1.0).prop_map(move |x| x * scale * 1e-3),
                    1 => Just(0.0f32),
                    1 => Just(-0.0f32),
                ],
                rows * cols,
            )
            .prop_map(move |mut v| {
                // later rows are 2^-5 smaller each: reaches subnormal and clamped block scales
                for (i, x) in v.iter_mut().enumerate() {
                    *x *= 2f32.powi(-5 * (i / cols) as i32);
                }
                v
            }),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn quantize_follows_the_spec((rows, cols, w) in matrix()) {
        let t = Nvfp4Tensor::quantize(&w, rows, cols).unwrap();
        prop_assert_eq!(t.packed.len(), rows * cols / 2);
        prop_assert_eq!(t.scales.len(), rows * cols / 16);
        let amax = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let ws2 = amax / TENSOR_SCALE_DIVISOR;
        prop_assert_eq!(t.tensor_scale, if ws2 > 0.0 { ws2 } else { 1.0 });
        let d = t.dequantize();
        for r in 0..rows {
            for b in 0..cols / 16 {
                let blk = &w[r * cols + b * 16..r * cols + b * 16 + 16];
                let bamax = blk.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                let sb = t.scales[r * cols / 16 + b];
                prop_assert_eq!(sb, block_scale_code(bamax, t.tensor_scale));
                prop_assert!(sb & 0x80 == 0 && sb != 0 && sb != 0x7F, "scale {sb:#x}");
                let denom = e4m3_to_f32(sb) * t.tensor_scale;
                for (i, &x) in blk.iter().enumerate() {
                    let c = b * 16 + i;
                    let code = t.code(r, c);
                    // sign bit is the sign bit of the input
                    prop_assert_eq!(code & 0x8 != 0, x.is_sign_negative());
                    // the chosen magnitude is a nearest grid point to |x| / denom
                    let q = (x / denom).abs();
                    let chosen = E2M1_GRID[(code & 7) as usize];
                    let best = E2M1_GRID.iter().map(|g| (g - q).abs()).fold(f32::MAX, f32::min);
                    prop_assert!(((chosen - q).abs() - best).abs() <= 1e-6 * q.max(1.0),
                        "r{r} c{c}: q {q} chose {chosen}");
                    // dequantized value = e2m1 · scale · ws2, and the error is bounded by half
                    // the local grid step (1.0 at the top, where saturation may add up to 0.375)
                    let dq = e2m1_to_f32(code) * e4m3_to_f32(sb) * t.tensor_scale;
                    prop_assert_eq!(d[r * cols + c].to_bits(), dq.to_bits());
                    let half_step = if q <= 2.0 { 0.25 } else if q <= 4.0 { 0.5 } else { 1.0 };
                    prop_assert!((dq - x).abs() <= half_step * denom * (1.0 + 1e-6) + f32::MIN_POSITIVE,
                        "r{r} c{c}: {x} → {dq}");
                }
            }
        }
    }

    #[test]
    fn stochastic_codes_are_a_grid_neighbour((rows, cols, w) in matrix(), seed in any::<u64>()) {
        let t = Nvfp4Tensor::quantize(&w, rows, cols).unwrap();
        let s = Nvfp4Tensor::quantize_stochastic(&w, rows, cols, seed).unwrap();
        prop_assert_eq!(&s.scales, &t.scales);
        prop_assert_eq!(s.tensor_scale, t.tensor_scale);
        for r in 0..rows {
            for c in 0..cols {
                let denom = e4m3_to_f32(t.scales[r * cols / 16 + c / 16]) * t.tensor_scale;
                let q = (w[r * cols + c] / denom).abs().min(6.0);
                let got = E2M1_GRID[(s.code(r, c) & 7) as usize];
                let lo = E2M1_GRID.iter().copied().filter(|&g| g <= q).fold(0.0f32, f32::max);
                let hi = E2M1_GRID.iter().copied().filter(|&g| g >= q).fold(6.0f32, f32::min);
                prop_assert!(got == lo || got == hi, "q {q} got {got} (lo {lo} hi {hi})");
            }
        }
        // Same seed → same bytes.
        prop_assert_eq!(s, Nvfp4Tensor::quantize_stochastic(&w, rows, cols, seed).unwrap());
    }
}
