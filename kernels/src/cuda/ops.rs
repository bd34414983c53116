//! Device-resident NVFP4 operations: tensors live in GPU memory ([`DeviceNvfp4`]), every call
//! only queues work on the stream (no host synchronisation), so the engine can chain them and
//! the benchmark can time them. Non-finite inputs are found by the amax pass and reported
//! through [`DeviceStatus`] when the caller reads it.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::{drv, CudaKernels};
use crate::cpu::{AdamWParams, AdamWScalars, AdamWStepStats};
use crate::nvfp4::{Nvfp4Tensor, Rounding, BLOCK};
use crate::KernelError;

/// Threads per CUDA block for the element-wise kernels.
const THREADS: u32 = 256;

/// An NVFP4 matrix in device memory, same layout as [`Nvfp4Tensor`]; the tensor scale is a
/// one-element device buffer so kernels can produce and consume it without a host round trip.
pub struct DeviceNvfp4 {
    /// Rows (N).
    pub rows: usize,
    /// Columns (K), a multiple of 16.
    pub cols: usize,
    /// `[rows, cols/2]` packed E2M1 codes.
    pub packed: CudaSlice<u8>,
    /// `[rows, cols/16]` E4M3 scales.
    pub scales: CudaSlice<u8>,
    /// One f32: the tensor scale.
    pub tensor_scale: CudaSlice<f32>,
}

impl DeviceNvfp4 {
    /// Number of 16-element blocks.
    pub fn nblocks(&self) -> usize {
        self.rows * self.cols / BLOCK
    }
}

/// Scratch written by the amax pass: the f32 bits of max |x| and (inverted, so that zero means
/// "none") the flat index of the first NaN/inf.
pub struct DeviceStatus {
    amax_bits: CudaSlice<u32>,
    first_bad_inv: CudaSlice<u64>,
}

/// An input matrix on the device, f32 or bf16.
#[derive(Clone, Copy)]
pub enum DeviceInput<'a> {
    /// f32 elements.
    F32(&'a CudaSlice<f32>),
    /// bf16 elements.
    Bf16(&'a CudaSlice<bf16>),
}

impl DeviceInput<'_> {
    fn len(&self) -> usize {
        match self {
            DeviceInput::F32(x) => x.len(),
            DeviceInput::Bf16(x) => x.len(),
        }
    }
}

/// AdamW scalars as the kernel's `KilnAdamW` struct (passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
struct KilnAdamW {
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
}
// SAFETY: plain-old-data with the same layout as the CUDA struct.
unsafe impl DeviceRepr for KilnAdamW {}

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u64).div_ceil(THREADS as u64).max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_cols(rows: usize, cols: usize) -> Result<(), KernelError> {
    if cols == 0 || !cols.is_multiple_of(BLOCK) {
        return Err(KernelError::ColsNotMultipleOf16 { rows, cols });
    }
    Ok(())
}

impl CudaKernels {
    /// Allocate an (uninitialised-content) NVFP4 tensor on the device.
    pub fn alloc_nvfp4(&self, rows: usize, cols: usize) -> Result<DeviceNvfp4, KernelError> {
        check_cols(rows, cols)?;
        let s = &self.stream;
        Ok(DeviceNvfp4 {
            rows,
            cols,
            packed: s
                .alloc_zeros(rows * cols / 2)
                .map_err(drv("allocating packed codes"))?,
            scales: s
                .alloc_zeros(rows * cols / BLOCK)
                .map_err(drv("allocating scales"))?,
            tensor_scale: s
                .alloc_zeros(1)
                .map_err(drv("allocating the tensor scale"))?,
        })
    }

    /// Allocate the amax/non-finite scratch.
    pub fn alloc_status(&self) -> Result<DeviceStatus, KernelError> {
        Ok(DeviceStatus {
            amax_bits: self
                .stream
                .alloc_zeros(1)
                .map_err(drv("allocating status"))?,
            first_bad_inv: self
                .stream
                .alloc_zeros(1)
                .map_err(drv("allocating status"))?,
        })
    }

    /// Copy a host NVFP4 tensor to the device.
    pub fn upload_nvfp4(&self, t: &Nvfp4Tensor) -> Result<DeviceNvfp4, KernelError> {
        let s = &self.stream;
        Ok(DeviceNvfp4 {
            rows: t.rows,
            cols: t.cols,
            packed: s
                .clone_htod(&t.packed)
                .map_err(drv("uploading packed codes"))?,
            scales: s.clone_htod(&t.scales).map_err(drv("uploading scales"))?,
            tensor_scale: s
                .clone_htod(&[t.tensor_scale])
                .map_err(drv("uploading the tensor scale"))?,
        })
    }

    /// Copy a device NVFP4 tensor back to the host (synchronises).
    pub fn download_nvfp4(&self, d: &DeviceNvfp4) -> Result<Nvfp4Tensor, KernelError> {
        let s = &self.stream;
        let packed = s
            .clone_dtoh(&d.packed)
            .map_err(drv("downloading packed codes"))?;
        let scales = s.clone_dtoh(&d.scales).map_err(drv("downloading scales"))?;
        let ts = s
            .clone_dtoh(&d.tensor_scale)
            .map_err(drv("downloading the tensor scale"))?;
        Nvfp4Tensor::from_parts(d.rows, d.cols, packed, scales, ts[0])
    }

    /// Queue: reset `status`, then scan `x` for its amax and first non-finite element.
    pub fn amax_async(
        &self,
        x: DeviceInput<'_>,
        status: &mut DeviceStatus,
    ) -> Result<(), KernelError> {
        let s = &self.stream;
        s.memset_zeros(&mut status.amax_bits)
            .map_err(drv("resetting amax"))?;
        s.memset_zeros(&mut status.first_bad_inv)
            .map_err(drv("resetting amax"))?;
        let n = x.len() as u64;
        let per_thread = match x {
            DeviceInput::F32(_) => 4,
            DeviceInput::Bf16(_) => 8,
        };
        let blocks = (n.div_ceil(per_thread * THREADS as u64)).clamp(1, self.sm_count as u64 * 8);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let r = match x {
            DeviceInput::F32(x) => {
                let mut b = s.launch_builder(&self.f.amax_f32);
                b.arg(x)
                    .arg(&n)
                    .arg(&mut status.amax_bits)
                    .arg(&mut status.first_bad_inv);
                // SAFETY: argument list matches kiln_amax_f32; buffers hold n elements.
                unsafe { b.launch(cfg) }
            }
            DeviceInput::Bf16(x) => {
                let mut b = s.launch_builder(&self.f.amax_bf16);
                b.arg(x)
                    .arg(&n)
                    .arg(&mut status.amax_bits)
                    .arg(&mut status.first_bad_inv);
                // SAFETY: as above, for kiln_amax_bf16.
                unsafe { b.launch(cfg) }
            }
        };
        r.map(|_| ()).map_err(drv("launching kiln_amax"))
    }

    /// Read the status written by the last amax pass (synchronises): `(amax, first bad index)`.
    pub fn read_status(&self, status: &DeviceStatus) -> Result<(f32, Option<u64>), KernelError> {
        let a = self
            .stream
            .clone_dtoh(&status.amax_bits)
            .map_err(drv("reading amax"))?;
        let b = self
            .stream
            .clone_dtoh(&status.first_bad_inv)
            .map_err(drv("reading amax"))?;
        Ok((f32::from_bits(a[0]), (b[0] != 0).then_some(!b[0])))
    }

    /// Queue the full quantize of `x` (`[rows, cols]`) into `out`: amax pass, then one thread per
    /// block of 16 (walking backwards so the tail of `x` is still in L2). Bit-identical to
    /// [`Nvfp4Tensor::quantize_with`]. Non-finite inputs: see [`CudaKernels::read_status`].
    pub fn quantize_async(
        &self,
        x: DeviceInput<'_>,
        rows: usize,
        cols: usize,
        rounding: Rounding,
        status: &mut DeviceStatus,
        out: &mut DeviceNvfp4,
    ) -> Result<(), KernelError> {
        self.check_quant_shapes(&x, rows, cols, out)?;
        self.amax_async(x, status)?;
        self.launch_quantize(x, out, Some(&status.amax_bits), 1.0, rounding)
    }

    /// Queue a quantize with a known tensor scale (one pass over `x`; what a calibrated
    /// checkpoint or the optimizer's requantize does). `tensor_scale` must be > 0.
    pub fn quantize_with_scale_async(
        &self,
        x: DeviceInput<'_>,
        rows: usize,
        cols: usize,
        tensor_scale: f32,
        rounding: Rounding,
        out: &mut DeviceNvfp4,
    ) -> Result<(), KernelError> {
        self.check_quant_shapes(&x, rows, cols, out)?;
        if !(tensor_scale.is_finite() && tensor_scale > 0.0) {
            return Err(KernelError::InvalidArgument(format!(
                "tensor scale must be > 0, got {tensor_scale}"
            )));
        }
        self.launch_quantize(x, out, None, tensor_scale, rounding)
    }

    fn check_quant_shapes(
        &self,
        x: &DeviceInput<'_>,
        rows: usize,
        cols: usize,
        out: &DeviceNvfp4,
    ) -> Result<(), KernelError> {
        check_cols(rows, cols)?;
        if x.len() != rows * cols {
            return Err(KernelError::LengthMismatch {
                what: "device input [rows, cols]",
                expected: rows * cols,
                got: x.len(),
            });
        }
        if out.rows != rows || out.cols != cols {
            return Err(KernelError::InvalidArgument(format!(
                "output tensor is [{}, {}], input is [{rows}, {cols}]",
                out.rows, out.cols
            )));
        }
        Ok(())
    }

    fn launch_quantize(
        &self,
        x: DeviceInput<'_>,
        out: &mut DeviceNvfp4,
        amax_bits: Option<&CudaSlice<u32>>,
        fixed_ws2: f32,
        rounding: Rounding,
    ) -> Result<(), KernelError> {
        let nblocks = out.nblocks() as u64;
        // round to nearest: a thread per block of 16; stochastic: 8 (bf16) or 4 (f32) elements
        let per_thread = match (x, rounding) {
            (_, Rounding::Nearest) => 16,
            (DeviceInput::F32(_), _) => 4,
            (DeviceInput::Bf16(_), _) => 8,
        };
        let (func, seed) = match (x, rounding) {
            (DeviceInput::F32(_), Rounding::Nearest) => (&self.f.quantize_f32, 0u64),
            (DeviceInput::Bf16(_), Rounding::Nearest) => (&self.f.quantize_bf16, 0),
            (DeviceInput::F32(_), Rounding::Stochastic { seed }) => (&self.f.quantize_sr_f32, seed),
            (DeviceInput::Bf16(_), Rounding::Stochastic { seed }) => {
                (&self.f.quantize_sr_bf16, seed)
            }
        };
        let null: u64 = 0;
        let reverse: i32 = amax_bits.is_some() as i32;
        let first_block: u64 = 0;
        let mut b = self.stream.launch_builder(func);
        match x {
            DeviceInput::F32(x) => b.arg(x),
            DeviceInput::Bf16(x) => b.arg(x),
        };
        b.arg(&nblocks);
        match amax_bits {
            Some(a) => b.arg(a),
            None => b.arg(&null),
        };
        b.arg(&fixed_ws2)
            .arg(&reverse)
            .arg(&seed)
            .arg(&first_block)
            .arg(&mut out.packed)
            .arg(&mut out.scales)
            .arg(&mut out.tensor_scale);
        // SAFETY: argument list matches KILN_QUANT; x holds nblocks*16 elements, packed
        // nblocks*8 bytes, scales nblocks bytes (checked by check_quant_shapes / alloc_nvfp4).
        unsafe { b.launch(grid(nblocks as usize * 16 / per_thread)) }
            .map(|_| ())
            .map_err(drv("launching kiln_quantize_nvfp4"))
    }

    /// Queue a dequantize of `w` into f32 `out` (`[rows, cols]`).
    pub fn dequantize_f32_async(
        &self,
        w: &DeviceNvfp4,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        if out.len() != w.rows * w.cols {
            return Err(KernelError::LengthMismatch {
                what: "dequantize output",
                expected: w.rows * w.cols,
                got: out.len(),
            });
        }
        let nblocks = w.nblocks() as u64;
        let mut b = self.stream.launch_builder(&self.f.dequantize_f32);
        b.arg(&w.packed)
            .arg(&w.scales)
            .arg(&w.tensor_scale)
            .arg(&nblocks)
            .arg(out);
        // SAFETY: matches kiln_dequantize_nvfp4_f32; lengths checked above.
        unsafe { b.launch(grid(nblocks as usize * 4)) }
            .map(|_| ())
            .map_err(drv("launching kiln_dequantize_nvfp4_f32"))
    }

    /// Queue a dequantize of rows `r0..r1` of `w` into bf16 `out` (`[r1-r0, cols]`, a prefix of
    /// `out` is written).
    pub fn dequantize_bf16_rows_async(
        &self,
        w: &DeviceNvfp4,
        r0: usize,
        r1: usize,
        out: &mut CudaSlice<bf16>,
    ) -> Result<(), KernelError> {
        if r0 > r1 || r1 > w.rows || out.len() < (r1 - r0) * w.cols {
            return Err(KernelError::InvalidArgument(format!(
                "dequantize rows {r0}..{r1} of {} into a buffer of {} elements",
                w.rows,
                out.len()
            )));
        }
        let bpr = w.cols / BLOCK;
        let nblocks = ((r1 - r0) * bpr) as u64;
        let packed = w.packed.slice(r0 * bpr * 8..r1 * bpr * 8);
        let scales = w.scales.slice(r0 * bpr..r1 * bpr);
        let mut b = self.stream.launch_builder(&self.f.dequantize_bf16);
        b.arg(&packed)
            .arg(&scales)
            .arg(&w.tensor_scale)
            .arg(&nblocks)
            .arg(out);
        // SAFETY: matches kiln_dequantize_nvfp4_bf16; ranges checked above.
        unsafe { b.launch(grid(nblocks as usize * 2)) }
            .map(|_| ())
            .map_err(drv("launching kiln_dequantize_nvfp4_bf16"))
    }

    /// Queue f32 → bf16 (round to nearest even) of `x` into `y` (same length).
    pub fn f32_to_bf16_async(
        &self,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<bf16>,
    ) -> Result<(), KernelError> {
        self.convert(&self.f.f32_to_bf16, x, y, x.len(), y.len())
    }

    /// Queue bf16 → f32 of `x` into `y` (same length).
    pub fn bf16_to_f32_async(
        &self,
        x: &CudaSlice<bf16>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        self.convert(&self.f.bf16_to_f32, x, y, x.len(), y.len())
    }

    fn convert<A, B>(
        &self,
        f: &cudarc::driver::CudaFunction,
        x: &CudaSlice<A>,
        y: &mut CudaSlice<B>,
        nx: usize,
        ny: usize,
    ) -> Result<(), KernelError> {
        if nx != ny {
            return Err(KernelError::LengthMismatch {
                what: "conversion output",
                expected: nx,
                got: ny,
            });
        }
        let n = nx as u64;
        let blocks = n
            .div_ceil(THREADS as u64)
            .clamp(1, self.sm_count as u64 * 16) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(x).arg(&n).arg(y);
        // SAFETY: (x, n, y) matches the conversion kernels; lengths checked.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(drv("launching a bf16 conversion"))
    }

    /// Queue the fused dequantize-GEMV `y[m, N] = x[m, K] · Wᵀ` for `m` in 1..=8, x and y f32.
    /// Requires `K % 32 == 0` (use [`CudaKernels::matmul_nvfp4_large_async`] otherwise).
    pub fn gemv_async(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        self.gemv_variant_async(x, m, w, y, self.default_gemv_variant(m, w.cols))
    }

    /// The GEMV kernel `gemv_async` uses: for m ≥ 2 the tensor-core kernel when it passed its
    /// start-up check and the shape fits it, else (and always for m = 1) the CUDA-core kernel
    /// with 4 rows per warp.
    /// On the H100 (BENCHMARKS.md) the CUDA-core kernel wins at m = 1 and the tensor-core one
    /// at m = 8 (2-3x faster there); m = 2..7 follow the tensor-core kernel, whose cost barely
    /// depends on m.
    pub fn default_gemv_variant(&self, m: usize, k: usize) -> GemvVariant {
        if m >= 2 && self.tc_gemv_ok && self.gemv_tc_fits(m, k) {
            GemvVariant::TensorCore
        } else {
            GemvVariant::Rows4
        }
    }
    /// [`CudaKernels::gemv_async`] with an explicit kernel variant (the benchmark compares them).
    pub fn gemv_variant_async(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
        variant: GemvVariant,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        if !(1..=8).contains(&m) {
            return Err(KernelError::InvalidArgument(format!(
                "GEMV takes 1 to 8 rows of x, got {m}"
            )));
        }
        if !k.is_multiple_of(32) {
            return Err(KernelError::InvalidArgument(format!(
                "GEMV needs K % 32 == 0, got K = {k}"
            )));
        }
        if x.len() != m * k || y.len() != m * n {
            return Err(KernelError::InvalidArgument(format!(
                "GEMV shapes: x has {} elements (want {m}×{k}), y has {} (want {m}×{n})",
                x.len(),
                y.len()
            )));
        }
        if variant == GemvVariant::TensorCore {
            if !self.gemv_tc_fits(m, k) {
                return Err(KernelError::InvalidArgument(format!(
                    "the tensor-core GEMV needs K % 128 == 0 and {m}·K·4 bytes of shared memory (K = {k})"
                )));
            }
            let ksplit = gemv_tc_ksplit(n, k, self.sm_count as usize);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(16 * (8 / ksplit)) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: (m * k * 4 + 4096) as u32,
            };
            let (ni, ki, ks) = (n as i32, k as i32, ksplit as i32);
            let mut b = self.stream.launch_builder(&self.f.gemv_tc[m - 1]);
            b.arg(x)
                .arg(&w.packed)
                .arg(&w.scales)
                .arg(&w.tensor_scale)
                .arg(y)
                .arg(&ni)
                .arg(&ki)
                .arg(&ks);
            // SAFETY: matches kiln_gemv_nvfp4_tc_m{m}; shapes and shared memory checked above.
            return unsafe { b.launch(cfg) }
                .map(|_| ())
                .map_err(drv("launching kiln_gemv_nvfp4_tc"));
        }
        let (func, r) = match variant {
            GemvVariant::Rows8 if m == 1 => (&self.f.gemv_m1_r8, 8),
            GemvVariant::Rows8 => {
                return Err(KernelError::InvalidArgument(
                    "the 8-rows-per-warp GEMV exists for m = 1 only".into(),
                ))
            }
            _ => (&self.f.gemv[m - 1], 4),
        };
        let ksplit = gemv_ksplit(n, k, r, self.sm_count as usize);
        let rows_per_block = r * (8 / ksplit);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(rows_per_block) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ni, ki, ks) = (n as i32, k as i32, ksplit as i32);
        let mut b = self.stream.launch_builder(func);
        b.arg(x)
            .arg(&w.packed)
            .arg(&w.scales)
            .arg(&w.tensor_scale)
            .arg(y)
            .arg(&ni)
            .arg(&ki)
            .arg(&ks);
        // SAFETY: matches kiln_gemv_nvfp4_m{m}_r{r}; shapes checked above.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(drv("launching kiln_gemv_nvfp4"))
    }

    /// Whether the tensor-core GEMV can take `m` rows of x with this K (K % 128 == 0 and x as
    /// bf16 hi/lo fits in shared memory).
    pub fn gemv_tc_fits(&self, m: usize, k: usize) -> bool {
        k.is_multiple_of(128) && m * k * 4 + 4096 <= self.smem_optin
    }

    /// Queue one AdamW step on device-resident packed weights (see
    /// [`crate::cpu::adamw_step_nvfp4`], whose arithmetic and result this matches bit for bit).
    /// Fused kernels: the weights are never materialised in f32, so the scratch is the 4-byte
    /// amax in `status` whatever `chunk_rows` is (which must still be ≥ 1).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step_async(
        &self,
        w: &mut DeviceNvfp4,
        grad: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        hp: AdamWParams,
        step: u64,
        chunk_rows: usize,
        seed: u64,
        status: &mut DeviceStatus,
    ) -> Result<AdamWStepStats, KernelError> {
        let n = w.rows * w.cols;
        for (what, len) in [
            ("gradient", grad.len()),
            ("first moment m", m.len()),
            ("second moment v", v.len()),
        ] {
            if len != n {
                return Err(KernelError::LengthMismatch {
                    what,
                    expected: n,
                    got: len,
                });
            }
        }
        if chunk_rows == 0 {
            return Err(KernelError::InvalidArgument(
                "chunk_rows must be at least 1".into(),
            ));
        }
        let sc = AdamWScalars::new(hp, step, seed);
        let h = KilnAdamW {
            beta1: sc.beta1,
            beta2: sc.beta2,
            eps: sc.eps,
            decay: sc.decay,
            step_size: sc.step_size,
            bc2_sqrt: sc.bc2_sqrt,
        };
        let s = &self.stream;
        s.memset_zeros(&mut status.amax_bits)
            .map_err(drv("resetting amax"))?;
        // The fused kernels never hold a chunk of f32 weights, so there is nothing for a chunk
        // to bound: each pass is one launch over the whole tensor (chunk_rows is validated
        // only, for the same contract as the CPU path).
        let nb = w.nblocks() as u64;
        let first_block: u64 = 0;
        {
            let mut b = s.launch_builder(&self.f.adamw_amax);
            b.arg(&w.packed)
                .arg(&w.scales)
                .arg(&w.tensor_scale)
                .arg(grad)
                .arg(&*m)
                .arg(&*v)
                .arg(&nb)
                .arg(&h)
                .arg(&mut status.amax_bits);
            // SAFETY: matches kiln_adamw_nvfp4_amax; buffers cover nb blocks (checked above).
            unsafe { b.launch(grid(nb as usize * 4)) }
                .map_err(drv("launching kiln_adamw_nvfp4_amax"))?;
        }
        {
            let mut b = s.launch_builder(&self.f.adamw_apply);
            b.arg(&mut w.packed)
                .arg(&mut w.scales)
                .arg(&w.tensor_scale)
                .arg(grad)
                .arg(m)
                .arg(v)
                .arg(&nb)
                .arg(&h)
                .arg(&status.amax_bits)
                .arg(&sc.sr_seed)
                .arg(&first_block);
            // SAFETY: matches kiln_adamw_nvfp4_apply; buffers cover nb blocks.
            unsafe { b.launch(grid(nb as usize * 4)) }
                .map_err(drv("launching kiln_adamw_nvfp4_apply"))?;
        }
        let mut b = s.launch_builder(&self.f.tensor_scale_from_amax);
        b.arg(&status.amax_bits).arg(&mut w.tensor_scale);
        // SAFETY: matches kiln_tensor_scale_from_amax (two one-element buffers).
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(drv("launching kiln_tensor_scale_from_amax"))?;
        Ok(AdamWStepStats {
            peak_temp_bytes: 0,
            chunks: 1,
            old_tensor_scale: f32::NAN,
            new_tensor_scale: f32::NAN,
        })
    }
}

/// Which GEMV kernel: rows of W per warp (more rows keep more bytes in flight per lane, at the
/// cost of registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvVariant {
    /// 4 rows per warp (every m).
    Rows4,
    /// 8 rows per warp (m = 1 only).
    Rows8,
    /// Tensor cores (mma.sync bf16, x split into bf16 hi + lo): K % 128 == 0 and
    /// m·K·4 bytes of shared memory.
    TensorCore,
}

/// How many warps split the 128-wide super-tiles of K in the tensor-core GEMV: enough warp
/// tasks (16-row tiles × splits) to fill the GPU, each keeping ≥ 4 super-tiles.
pub fn gemv_tc_ksplit(n: usize, k: usize, sm_count: usize) -> usize {
    let nsup = k / 128;
    let tiles = n.div_ceil(16);
    let mut ks = 1;
    while ks < 8 && nsup / (2 * ks) >= 4 && tiles * ks < 16 * sm_count {
        ks *= 2;
    }
    ks
}

/// How many warps split K in the GEMV: enough warps to fill the GPU (≥ 16 per SM) while
/// each warp still covers at least 32 16-byte units (a full pass of its lanes), and at most
/// 64 units per warp when there are warps enough.
pub fn gemv_ksplit(n: usize, k: usize, rows_per_warp: usize, sm_count: usize) -> usize {
    let units = k / 32;
    let groups = n.div_ceil(rows_per_warp);
    let mut ks = 1;
    while ks < 8 && units / (2 * ks) >= 32 && (groups * ks < 16 * sm_count || units / ks > 64) {
        ks *= 2;
    }
    ks
}

#[cfg(test)]
mod tests {
    use super::gemv_ksplit;

    #[test]
    fn ksplit_choices_for_the_benchmark_shapes() {
        assert_eq!(gemv_ksplit(8192, 8192, 4, 132), 4);
        assert_eq!(gemv_ksplit(4864, 896, 4, 132), 1);
        assert_eq!(gemv_ksplit(896, 4864, 4, 132), 4);
        assert_eq!(gemv_ksplit(18944, 3584, 4, 132), 2);
        assert_eq!(gemv_ksplit(3584, 18944, 4, 132), 8);
        assert_eq!(gemv_ksplit(10, 32, 4, 132), 1);
    }
}
