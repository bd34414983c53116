//! `KernelError`: every way a kernel call, a CUDA set-up or a checkpoint read/write can fail.
//! Each message names the problem and, where there is one, the fix.

use std::path::PathBuf;

/// Errors from the NVFP4 codec, the CPU and CUDA kernels, and the checkpoint reader/writer.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The input holds a NaN or an infinity, which NVFP4 cannot represent.
    #[error("cannot quantize: element {index} (row {row}, column {col}) is {value}; NVFP4 has no NaN or infinity, so clean the input first")]
    NonFinite {
        /// Flat index of the first offending element.
        index: usize,
        /// Its row.
        row: usize,
        /// Its column.
        col: usize,
        /// The value (NaN or ±inf).
        value: f32,
    },
    /// The number of columns (the K / input dimension) is not a multiple of the 16-element block.
    #[error("cannot quantize a [{rows}, {cols}] matrix to NVFP4: the column count (K) must be a multiple of 16, the block size")]
    ColsNotMultipleOf16 {
        /// Rows of the matrix.
        rows: usize,
        /// Columns of the matrix.
        cols: usize,
    },
    /// A buffer's length does not match the shape it is supposed to hold.
    #[error("{what}: expected {expected} elements, got {got}")]
    LengthMismatch {
        /// Which buffer.
        what: &'static str,
        /// Length the shape requires.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// An argument is out of its valid range (chunk size 0, a row range past the end, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A CUDA library (driver, NVRTC, cuBLAS, cuBLASLt) cannot be loaded on this machine.
    #[error("CUDA driver library not found: {0}. Install the NVIDIA driver / CUDA 13 runtime libraries or run on the CPU (--device cpu)")]
    CudaUnavailable(String),
    /// A CUDA driver call failed.
    #[error("CUDA error in {context}: {message}")]
    Cuda {
        /// What Kiln was doing.
        context: String,
        /// The driver's error.
        message: String,
    },
    /// NVRTC could not compile one of Kiln's kernels.
    #[error("NVRTC failed to compile kernel {kernel}: {log}")]
    Nvrtc {
        /// The `.cu` file.
        kernel: &'static str,
        /// The compiler log.
        log: String,
    },
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted ("reading", "writing", …).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint file is malformed, truncated, or not what Kiln expects.
    #[error("bad checkpoint {path}: {message}")]
    Checkpoint {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A split-K GEMV launch found its scratch smaller than it needs. Launches never allocate
    /// (so that they can be captured in a CUDA graph); the scratch is reserved up front.
    #[error("the split-K GEMV with m = {m} on [{n}, {k}] needs {need_partials} partial sums and {need_counters} counters of scratch, but {have_partials} and {have_counters} are reserved: call CudaKernels::reserve_gemv({m}, {n}, {k}) for every shape before launching GEMVs (and before capturing them in a CUDA graph)")]
    GemvScratchNotReserved {
        /// Rows of x of the launch.
        m: usize,
        /// Rows of W (N).
        n: usize,
        /// Columns of W (K).
        k: usize,
        /// Partial-sum floats the launch needs.
        need_partials: usize,
        /// Counters the launch needs.
        need_counters: usize,
        /// Partial-sum floats reserved.
        have_partials: usize,
        /// Counters reserved.
        have_counters: usize,
    },
    /// A tensor's dtype is one Kiln does not handle.
    #[error("tensor {tensor} in {path} has dtype {dtype}, which kiln quantize does not support (supported: F32, F16, BF16 for weights; other tensors are copied as they are)")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Its dtype as safetensors names it.
        dtype: String,
    },
}

impl KernelError {
    /// Wrap an I/O error with the operation and path.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        KernelError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// A checkpoint-format error about `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        KernelError::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}
