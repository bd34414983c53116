//! The NVFP4 format: scalar codecs (`codec`) and the packed matrix type with ModelOpt-exact
//! quantization, stochastic rounding and dequantization (`tensor`).
//!
//! Facts (docs/ARCHITECTURE.md, "NVFP4"): E2M1 elements {0, 0.5, 1, 1.5, 2, 3, 4, 6} with a sign bit;
//! 16 consecutive elements along K share one E4M3 scale; one f32 tensor scale
//! `amax / 2688`; value = `e2m1 · e4m3_scale · tensor_scale`.

pub mod codec;
pub mod tensor;

pub use codec::{
    e2m1_to_f32, e4m3_to_f32, f32_to_e2m1, f32_to_e2m1_stochastic, f32_to_e4m3, sr_uniform,
    E2M1_GRID, E2M1_MAX, E4M3_MAX, E4M3_MIN_SUBNORMAL,
};
pub use tensor::{
    block_scale_code, checked_amax, dequantize_rows_into, quantize_rows_into,
    tensor_scale_for_amax, Nvfp4Tensor, Rounding, BLOCK, MIN_TENSOR_SCALE, TENSOR_SCALE_DIVISOR,
};
