//! Known-answer vectors for the NVFP4 codec and quantizer, derived by hand from the spec in
//! docs/ARCHITECTURE.md and ModelOpt (ties, saturation, zero blocks, subnormal scales, negative zero, errors).

use kiln_kernels::nvfp4::{
    e2m1_to_f32, e4m3_to_f32, f32_to_e2m1, f32_to_e4m3, Nvfp4Tensor, TENSOR_SCALE_DIVISOR,
};
use kiln_kernels::KernelError;

#[test]
fn e2m1_ties_go_to_the_even_code() {
    // (input, expected code): boundaries 0.25 .75 1.25 1.75 2.5 3.5 5 round to the even code.
    let cases = [
        (0.0, 0x0),
        (0.25, 0x0),
        (0.2500001, 0x1),
        (0.5, 0x1),
        (0.75, 0x2),
        (0.7499999, 0x1),
        (1.25, 0x2),
        (1.2500001, 0x3),
        (1.75, 0x4),
        (2.5, 0x4),
        (2.5000002, 0x5),
        (3.5, 0x6),
        (5.0, 0x6),
        (5.0000005, 0x7),
        (6.0, 0x7),
        (100.0, 0x7),
        (f32::INFINITY, 0x7),
        (-0.0, 0x8),
        (-0.1, 0x8),
        (-0.75, 0xA),
        (-5.5, 0xF),
    ];
    for (x, code) in cases {
        assert_eq!(f32_to_e2m1(x), code, "e2m1({x})");
    }
    assert_eq!(e2m1_to_f32(0x7), 6.0);
    assert_eq!(e2m1_to_f32(0xB), -1.5);
    let nz = e2m1_to_f32(0x8);
    assert!(nz == 0.0 && nz.is_sign_negative());
}

#[test]
fn e4m3_rounds_to_nearest_even_and_saturates() {
    let cases: [(f32, u8); 16] = [
        (1.0, 0x38),
        (1.0625, 0x38), // halfway 1.0 / 1.125 → even mantissa 0
        (1.1875, 0x3A), // halfway 1.125 / 1.25 → even mantissa 2
        (17.0, 0x58),   // halfway 16 / 18 → 16
        (18.0, 0x59),
        (448.0, 0x7E),
        (449.0, 0x7E), // saturate, never NaN
        (464.0, 0x7E), // a plain cast gives NaN here
        (1.0e9, 0x7E),
        (f32::INFINITY, 0x7E),
        (-500.0, 0xFE),
        (1.0 / 1024.0, 0x00), // half the smallest subnormal: tie → 0
        (3.0 / 1024.0, 0x02), // 1.5 subnormal units: tie → 2
        (1.0 / 512.0, 0x01),  // smallest subnormal
        (0.0146484375, 0x08), // 7.5·2^-9: tie → 8·2^-9 = 2^-6, the smallest normal
        (-0.0, 0x80),
    ];
    for (x, bits) in cases {
        assert_eq!(f32_to_e4m3(x), bits, "e4m3({x})");
    }
    assert_eq!(e4m3_to_f32(0x02), 2.0 / 512.0);
}

/// One row, ws2 = 1: block amax 2688 → scale 448 (0x7E), q = w / 448.
#[test]
fn quantize_block_with_every_tie_and_negative_zero() {
    let q = [
        0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.0, 5.5, 0.5, 1.0, 3.0, 4.0,
    ];
    let w: Vec<f32> = q.iter().map(|v| v * 448.0).collect();
    let t = Nvfp4Tensor::quantize(&w, 1, 16).unwrap();
    assert_eq!(t.tensor_scale, 1.0);
    assert_eq!(t.scales, vec![0x7E]);
    assert_eq!(
        t.packed,
        vec![0x00, 0x22, 0x44, 0x66, 0x87, 0x78, 0x21, 0x65]
    );
    let d = t.dequantize();
    assert_eq!(d[2], 448.0); // 0.75 → 1.0
    assert_eq!(d[11], 2688.0); // 5.5 → 6
    assert!(d[10] == 0.0 && d[10].is_sign_negative());
}

/// Two rows of two blocks: zero block, subnormal scales, the 2^-9 clamp, scale ties.
#[test]
fn quantize_zero_blocks_subnormal_scales_and_scale_ties() {
    let mut w = vec![0.0f32; 64];
    // row 0 block 0: amax 2688 makes ws2 = 2688/2688 = 1 exactly.
    w[0] = 2688.0;
    w[1] = -1344.0; // q = -3 → 0xD
                    // row 0 block 1: all zeros → s = 0 → 1.0 → 0x38, codes 0.
                    // row 1 block 0: block amax 6·2^-8 → s = 2^-8 → subnormal scale 0x02; q = w / 2^-8.
    w[32] = 6.0 / 256.0; // q = 6 → 7
    w[33] = 3.0 / 256.0; // q = 3 → 5
    w[34] = -1.5 / 256.0; // q = -1.5 → 0xB
                          // row 1 block 1: block amax 6·2^-11 → s = 2^-11 → clamped to 2^-9 → 0x01; q = w / 2^-9.
    w[48] = 6.0 / 2048.0; // q = 1.5 → 3
    w[49] = 1.0 / 2048.0; // q = 0.25 → tie → 0
    let t = Nvfp4Tensor::quantize(&w, 2, 32).unwrap();
    assert_eq!(t.tensor_scale, 1.0);
    assert_eq!(t.scales, vec![0x7E, 0x38, 0x02, 0x01]);
    let mut expect = vec![0u8; 32];
    expect[0] = 0x7 | (0xD << 4);
    expect[16] = 0x7 | (0x5 << 4);
    expect[17] = 0xB;
    expect[24] = 0x3;
    assert_eq!(t.packed, expect);
    let d = t.dequantize();
    assert_eq!(d[32], 6.0 / 256.0);
    assert_eq!(d[48], 1.5 / 512.0);
    assert_eq!(d[49], 0.0);
}

#[test]
fn scale_ties_round_to_even() {
    // ws2 = 1 from row 0; row 1 block amax 6.375 → s = 1.0625 → tie → 1.0 (0x38):
    // 6.375 / 1.0 = 6.375 > 5 → code 7 (saturates at 6).
    // row 1 block 1 amax 7.125 → s = 1.1875 → tie → 1.25 (0x3A): 7.125/1.25 = 5.7 → 7.
    let mut w = vec![0.0f32; 64];
    w[0] = 2688.0;
    w[32] = 6.375;
    w[48] = -7.125;
    w[49] = 3.125; // 3.125 / 1.25 = 2.5 → tie → 2.0 (code 4)
    let t = Nvfp4Tensor::quantize(&w, 2, 32).unwrap();
    assert_eq!(t.scales[2..], [0x38, 0x3A]);
    assert_eq!(t.code(1, 0), 0x7);
    assert_eq!(t.code(1, 16), 0xF);
    assert_eq!(t.code(1, 17), 0x4);
}

#[test]
fn tensor_scale_is_amax_over_2688_in_f32() {
    let w: Vec<f32> = (0..32).map(|i| (i as f32 - 11.3) * 0.37).collect();
    let amax = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let t = Nvfp4Tensor::quantize(&w, 2, 16).unwrap();
    assert_eq!(t.tensor_scale, amax / TENSOR_SCALE_DIVISOR);
    // The block holding amax gets scale 448 (s = amax / (6 · amax/2688) ≈ 448, saturating).
    let row_of_amax = w.iter().position(|x| x.abs() == amax).unwrap() / 16;
    assert_eq!(t.scales[row_of_amax], 0x7E);
}

#[test]
fn all_zero_tensor_gets_unit_tensor_scale_and_zero_codes() {
    let mut w = vec![0.0f32; 32];
    w[5] = -0.0;
    let t = Nvfp4Tensor::quantize(&w, 1, 32).unwrap();
    assert_eq!(t.tensor_scale, 1.0);
    assert_eq!(t.scales, vec![0x38, 0x38]);
    assert_eq!(t.code(0, 5), 0x8);
    assert!(t.dequantize().iter().all(|&x| x == 0.0));
}

#[test]
fn bad_inputs_give_clear_errors() {
    let mut w = vec![1.0f32; 32];
    w[21] = f32::NAN;
    let e = Nvfp4Tensor::quantize(&w, 2, 16).unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::NonFinite {
                index: 21,
                row: 1,
                col: 5,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("NaN"), "{e}");
    w[21] = f32::NEG_INFINITY;
    let e = Nvfp4Tensor::quantize(&w, 2, 16).unwrap_err();
    assert!(e.to_string().contains("-inf"), "{e}");
    let e = Nvfp4Tensor::quantize(&[1.0; 24], 1, 24).unwrap_err();
    assert!(matches!(
        e,
        KernelError::ColsNotMultipleOf16 { cols: 24, .. }
    ));
    assert!(e.to_string().contains("multiple of 16"));
    let e = Nvfp4Tensor::quantize(&[1.0; 30], 2, 16).unwrap_err();
    assert!(matches!(
        e,
        KernelError::LengthMismatch {
            expected: 32,
            got: 30,
            ..
        }
    ));
    assert!(Nvfp4Tensor::from_parts(1, 16, vec![0; 8], vec![0x38], 0.0).is_err());
    assert!(Nvfp4Tensor::from_parts(1, 16, vec![0; 7], vec![0x38], 1.0).is_err());
}

#[test]
fn byte_size_is_four_and_a_half_bits_per_weight_plus_scale() {
    let w: Vec<f32> = (0..4 * 64).map(|i| (i % 13) as f32 - 6.0).collect();
    let t = Nvfp4Tensor::quantize(&w, 4, 64).unwrap();
    assert_eq!(t.byte_size(), 4 * 64 / 2 + 4 * 64 / 16 + 4);
    assert_eq!(t.dequantize_rows(1..3), t.dequantize()[64..192].to_vec());
}
