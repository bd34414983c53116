//! [`Mm`]: a row-major bf16 GEMM with an f32 output (and optional accumulation, batching) on
//! raw device addresses, as the column-major cuBLAS call it is.

use kiln_kernels::cuda::blas::StridedGemm;
use kiln_kernels::cuda::decode::DevAddr;
use kiln_kernels::cuda::CudaKernels;

use crate::error::Result;

/// Row-major GEMM `C[m×n] (+)= op(A)[m×k] · op(B)[k×n]` on bf16 inputs with an f32 output, as
/// cuBLAS's column-major call `Cᵀ = op(B)ᵀ · op(A)ᵀ`. `a_t`: A is stored `[k, m]`; `b_t`: B is
/// stored `[n, k]`. `batch` > 1 strides A, B and C by the given element counts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mm {
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) a: DevAddr,
    pub(super) a_t: bool,
    pub(super) b: DevAddr,
    pub(super) b_t: bool,
    pub(super) c: DevAddr,
    pub(super) alpha: f32,
    pub(super) beta: f32,
    pub(super) batch: usize,
    pub(super) strides: (usize, usize, usize),
}

impl Mm {
    /// `(m, n, k)`, A and whether it is stored transposed, B likewise, C.
    pub(super) fn new(
        (m, n, k): (usize, usize, usize),
        (a, a_t): (DevAddr, bool),
        (b, b_t): (DevAddr, bool),
        c: DevAddr,
    ) -> Self {
        Mm {
            m,
            n,
            k,
            a,
            a_t,
            b,
            b_t,
            c,
            alpha: 1.0,
            beta: 0.0,
            batch: 1,
            strides: (0, 0, 0),
        }
    }

    pub(super) fn accumulate(self) -> Self {
        Mm { beta: 1.0, ..self }
    }

    pub(super) fn batched(self, batch: usize, strides: (usize, usize, usize)) -> Self {
        Mm {
            batch,
            strides,
            ..self
        }
    }

    pub(super) fn run(self, k: &CudaKernels) -> Result<()> {
        let lda = if self.a_t { self.m } else { self.k };
        let ldb = if self.b_t { self.k } else { self.n };
        let g = StridedGemm {
            transa: self.b_t,
            transb: self.a_t,
            m: self.n,
            n: self.m,
            k: self.k,
            alpha: self.alpha,
            beta: self.beta,
            a: (self.b, ldb, self.strides.1),
            b: (self.a, lda, self.strides.0),
            c: (self.c, self.n, self.strides.2),
            c_f32: true,
            batch: self.batch,
        };
        // SAFETY: the trainer sizes every buffer for the shapes it passes (see Workspace).
        unsafe { k.gemm_bf16_strided_batched_async(&g) }?;
        Ok(())
    }
}
