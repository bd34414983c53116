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

/// A strided batched bf16 GEMM on raw device addresses, column-major as cuBLAS sees it:
/// `C_b[m × n] = alpha · op(A_b)[m × k] · op(B_b)[k × n] + beta · C_b` for `b < batch`, A and B
/// bf16, C f32 or bf16, f32 accumulation ([`CudaKernels::gemm_bf16_strided_batched_async`]).
#[derive(Debug, Clone, Copy)]
pub struct StridedGemm {
    /// A transposed.
    pub transa: bool,
    /// B transposed.
    pub transb: bool,
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The shared dimension.
    pub k: usize,
    /// The product's scale.
    pub alpha: f32,
    /// C's scale before the product is added (0: C is overwritten; 1: accumulated into).
    pub beta: f32,
    /// A (bf16) and its leading dimension and batch stride, in elements.
    pub a: (u64, usize, usize),
    /// B (bf16), leading dimension, batch stride.
    pub b: (u64, usize, usize),
    /// C, leading dimension, batch stride.
    pub c: (u64, usize, usize),
    /// C is f32 (else bf16).
    pub c_f32: bool,
    /// Batch count.
    pub batch: usize,
}

impl CudaKernels {
    /// Queue the strided batched GEMM `g` (cublasGemmStridedBatchedEx, f32 compute).
    ///
    /// # Safety
    /// Every address covers what its leading dimension, batch stride and the shape imply.
    pub unsafe fn gemm_bf16_strided_batched_async(
        &self,
        g: &StridedGemm,
    ) -> Result<(), KernelError> {
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasGemmStridedBatchedEx, cublasStatus_t,
            cudaDataType,
        };
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let dims = [g.m, g.n, g.k, g.a.1, g.b.1, g.c.1, g.batch];
        if dims.iter().any(|&d| d > i32::MAX as usize) {
            return Err(KernelError::InvalidArgument(format!(
                "a GEMM dimension exceeds cuBLAS's 32-bit limit: {g:?}"
            )));
        }
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| KernelError::Cuda {
                context: "binding the CUDA context for cuBLAS".into(),
                message: e.to_string(),
            })?;
        let (alpha, beta) = (g.alpha, g.beta);
        let ctype = if g.c_f32 {
            cudaDataType::CUDA_R_32F
        } else {
            cudaDataType::CUDA_R_16BF
        };
        // SAFETY: the caller's contract covers the addresses; alpha and beta outlive the call
        // (host pointer mode: cuBLAS reads them before returning).
        let status = unsafe {
            cublasGemmStridedBatchedEx(
                *self.blas.handle(),
                op(g.transa),
                op(g.transb),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                &alpha as *const f32 as *const _,
                g.a.0 as *const _,
                cudaDataType::CUDA_R_16BF,
                g.a.1 as i32,
                g.a.2 as i64,
                g.b.0 as *const _,
                cudaDataType::CUDA_R_16BF,
                g.b.1 as i32,
                g.b.2 as i64,
                &beta as *const f32 as *const _,
                g.c.0 as *mut _,
                ctype,
                g.c.1 as i32,
                g.c.2 as i64,
                g.batch as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if status != cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(KernelError::Cuda {
                context: "cublasGemmStridedBatchedEx".into(),
                message: format!("{status:?} for {g:?}"),
            });
        }
        Ok(())
    }
}
