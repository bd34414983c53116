//! cuBLAS / cuBLASLt calls: the large-M NVFP4 matmul (dequantize a slab of W to bf16, then a
//! cuBLASLt bf16 GEMM with f32 accumulation) and the cuBLAS bf16 GEMV the benchmark compares
//! the NVFP4 GEMV against.

use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::cublaslt::{Matmul, MatmulConfig};
use cudarc::driver::CudaSlice;
use half::bf16;

use super::context::CudaKernels;
use super::ops::DeviceNvfp4;
use crate::KernelError;

fn blas_err<E: std::fmt::Display>(context: &'static str) -> impl FnOnce(E) -> KernelError {
    move |e| KernelError::Cuda {
        context: context.to_string(),
        message: e.to_string(),
    }
}

impl CudaKernels {
    /// Rows of W dequantized per cuBLASLt call for a scratch buffer of `scratch_len` bf16.
    pub fn large_matmul_chunk_rows(w: &DeviceNvfp4, scratch_len: usize) -> usize {
        (scratch_len / w.cols).min(w.rows)
    }

    /// Queue `y[m, N] = x[m, K] · Wᵀ` for any m through bf16: W is dequantized to bf16 into
    /// `scratch` one slab of rows at a time (scratch bounds the extra memory), then cuBLASLt
    /// multiplies (f32 accumulation, bf16 output). `x` is bf16 `[m, K]`, `y` bf16 `[m, N]`.
    pub fn matmul_nvfp4_large_async(
        &self,
        x: &CudaSlice<bf16>,
        m: usize,
        w: &DeviceNvfp4,
        scratch: &mut CudaSlice<bf16>,
        y: &mut CudaSlice<bf16>,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        if x.len() != m * k || y.len() != m * n || m == 0 {
            return Err(KernelError::InvalidArgument(format!(
                "matmul shapes: x has {} elements (want {m}×{k}), y has {} (want {m}×{n})",
                x.len(),
                y.len()
            )));
        }
        let chunk = Self::large_matmul_chunk_rows(w, scratch.len());
        if chunk == 0 {
            return Err(KernelError::InvalidArgument(format!(
                "scratch of {} bf16 cannot hold one row of {k}",
                scratch.len()
            )));
        }
        for r0 in (0..n).step_by(chunk) {
            let r1 = (r0 + chunk).min(n);
            self.dequantize_bf16_rows_async(w, r0, r1, scratch)?;
            // Column-major view: C[N, m] (ld N) = op(A)[nc, K] · B[K, m], A = the slab stored
            // K × nc (ld K, transposed), B = x stored K × m (ld K).
            let cfg = MatmulConfig {
                transa: true,
                transb: false,
                transc: false,
                m: (r1 - r0) as u64,
                n: m as u64,
                k: k as u64,
                alpha: 1.0,
                lda: k as i64,
                ldb: k as i64,
                beta: 0.0,
                ldc: n as i64,
                stride_a: None,
                stride_b: None,
                stride_c: None,
                stride_bias: None,
                batch_size: None,
            };
            let a = scratch.slice(0..(r1 - r0) * k);
            let b = x.slice(0..m * k);
            let mut c = y.slice_mut(r0..);
            // SAFETY: A covers (r1-r0)·K, B covers m·K, C from row r0 with ld N covers
            // (m-1)·N + (r1-r0) ≤ m·N - r0 elements.
            unsafe { self.blaslt.matmul(cfg, &a, &b, &mut c, None, None) }
                .map_err(blas_err("cuBLASLt bf16 matmul"))?;
        }
        Ok(())
    }

    /// Queue the cuBLAS bf16 GEMV/GEMM baseline `y[m, N] = x[m, K] · W[N, K]ᵀ` on dense bf16
    /// weights (cublasGemmEx, f32 compute) — what PyTorch runs for a bf16 linear layer.
    #[allow(clippy::too_many_arguments)]
    pub fn bf16_gemm_cublas_async(
        &self,
        x: &CudaSlice<bf16>,
        m: usize,
        w: &CudaSlice<bf16>,
        n: usize,
        k: usize,
        y: &mut CudaSlice<bf16>,
    ) -> Result<(), KernelError> {
        if x.len() != m * k || w.len() != n * k || y.len() != m * n {
            return Err(KernelError::InvalidArgument(
                "bf16 GEMM shapes do not match".into(),
            ));
        }
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: bf16::ONE,
            lda: k as i32,
            ldb: k as i32,
            beta: bf16::ZERO,
            ldc: n as i32,
        };
        // SAFETY: A = W (K × N col-major, ld K), B = x (K × m, ld K), C = y (N × m, ld N).
        unsafe { self.blas.gemm(cfg, w, x, y) }.map_err(blas_err("cuBLAS bf16 GEMM"))
    }
}
