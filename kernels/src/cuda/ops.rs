//! Device-resident NVFP4 operations: tensors live in GPU memory ([`DeviceNvfp4`]), every call
//! only queues work on the stream (no host synchronisation), so the engine can chain them and
//! the benchmark can time them. Non-finite inputs are found by the amax pass and reported
//! through [`DeviceStatus`] when the caller reads it.

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::CudaKernels;
use super::driver::drv;
use crate::nvfp4::{Nvfp4Tensor, Rounding, BLOCK};
use crate::KernelError;

/// Threads per CUDA block for the element-wise kernels.
pub(crate) const THREADS: u32 = 256;

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
    pub(crate) amax_bits: CudaSlice<u32>,
    pub(crate) first_bad_inv: CudaSlice<u64>,
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

pub(crate) fn grid(n: usize) -> LaunchConfig {
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
        self.reset_status(status)?;
        let n = x.len() as u64;
        let cfg = self.amax_cfg(n, matches!(x, DeviceInput::F32(_)));
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

    /// Queue zeroing `status` before an amax pass.
    fn reset_status(&self, status: &mut DeviceStatus) -> Result<(), KernelError> {
        let s = &self.stream;
        s.memset_zeros(&mut status.amax_bits)
            .map_err(drv("resetting amax"))?;
        s.memset_zeros(&mut status.first_bad_inv)
            .map_err(drv("resetting amax"))?;
        Ok(())
    }

    /// The amax pass's launch shape over `n` f32 (4 per thread) or bf16 (8) elements.
    fn amax_cfg(&self, n: u64, f32_input: bool) -> LaunchConfig {
        let per_thread = if f32_input { 4 } else { 8 };
        let blocks = (n.div_ceil(per_thread * THREADS as u64)).clamp(1, self.sm_count as u64 * 8);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// [`CudaKernels::amax_async`] over `n` f32 at a raw device address (a part of a larger
    /// buffer, e.g. one weight of a training model's flat parameter buffer).
    ///
    /// # Safety
    /// `x` holds `n` f32 and is 16-byte aligned.
    pub unsafe fn amax_f32_at_async(
        &self,
        x: u64,
        n: usize,
        status: &mut DeviceStatus,
    ) -> Result<(), KernelError> {
        let s = &self.stream;
        self.reset_status(status)?;
        let n = n as u64;
        let cfg = self.amax_cfg(n, true);
        let (amax, bad) = (
            self.addr(&status.amax_bits, 0),
            self.addr(&status.first_bad_inv, 0),
        );
        // SAFETY: (x, n, amax_bits, first_bad_inv) is kiln_amax_f32's parameter list; the
        // caller's contract covers x.
        unsafe {
            super::driver::launch_raw(
                s,
                &self.f.amax_f32,
                cfg,
                &mut [
                    super::driver::param(&x),
                    super::driver::param(&n),
                    super::driver::param(&amax),
                    super::driver::param(&bad),
                ],
                false,
            )
        }
        .map_err(drv("launching kiln_amax_f32"))
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

    /// Queue a round-to-nearest quantize of `x` (`rows` rows of `out.cols` values, f32 or bf16)
    /// with a known tensor scale into rows `first_row .. first_row + rows` of `out`, leaving
    /// its other rows and its own tensor scale alone: how a model loader quantizes a matrix
    /// through a bounded staging buffer, or stacks several matrices of one width (each with
    /// its own tensor scale) into one. The codes and block scales are those of
    /// [`Nvfp4Tensor::quantize_with`] for that tensor scale.
    pub fn quantize_rows_into_async(
        &self,
        x: DeviceInput<'_>,
        rows: usize,
        tensor_scale: f32,
        out: &mut DeviceNvfp4,
        first_row: usize,
    ) -> Result<(), KernelError> {
        let cols = out.cols;
        if x.len() < rows * cols || first_row + rows > out.rows {
            return Err(KernelError::InvalidArgument(format!(
                "quantizing {rows} rows of {cols} from {} values into rows {first_row}.. of a \
                 [{}, {cols}] tensor",
                x.len(),
                out.rows
            )));
        }
        if !(tensor_scale.is_finite() && tensor_scale > 0.0) {
            return Err(KernelError::InvalidArgument(format!(
                "tensor scale must be > 0, got {tensor_scale}"
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        let nblocks = (rows * cols / BLOCK) as u64;
        let first_block = first_row * cols / BLOCK;
        let (null, reverse, seed, first): (u64, i32, u64, u64) = (0, 0, 0, 0);
        let mut packed = out
            .packed
            .slice_mut(first_block * 8..(first_block + nblocks as usize) * 8);
        let mut scales = out
            .scales
            .slice_mut(first_block..first_block + nblocks as usize);
        let func = match x {
            DeviceInput::F32(_) => &self.f.quantize_f32,
            DeviceInput::Bf16(_) => &self.f.quantize_bf16,
        };
        let mut b = self.stream.launch_builder(func);
        match x {
            DeviceInput::F32(x) => b.arg(x),
            DeviceInput::Bf16(x) => b.arg(x),
        };
        b.arg(&nblocks)
            .arg(&null)
            .arg(&tensor_scale)
            .arg(&reverse)
            .arg(&seed)
            .arg(&first)
            .arg(&mut packed)
            .arg(&mut scales)
            .arg(&null);
        // SAFETY: argument list matches KILN_QUANT (amax_bits and tensor_scale_out null); x
        // holds at least nblocks*16 elements, the views nblocks*8 and nblocks bytes.
        unsafe { b.launch(grid(nblocks as usize)) }
            .map(|_| ())
            .map_err(drv("launching kiln_quantize_nvfp4"))
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
        self.dequantize_bf16_rows_on(&self.stream, w, r0, r1, out)
    }

    /// [`CudaKernels::dequantize_bf16_rows_async`] queued on `stream` (a stream of this
    /// context: the prompt GEMMs' side stream dequantizes the next slab while the main
    /// stream's GEMM reads the last; the caller orders the two with events).
    pub fn dequantize_bf16_rows_on(
        &self,
        stream: &CudaStream,
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
        let mut b = stream.launch_builder(&self.f.dequantize_bf16);
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

    /// Queue a dequantize of the whole of `w` into bf16 at device address `out` (the GPU
    /// trainer's working copy of a packed weight, written into its place in a stacked matrix).
    ///
    /// # Safety
    /// `out` holds `w.rows·w.cols` bf16 and is live until the queued work has run.
    pub unsafe fn dequantize_bf16_to_async(
        &self,
        w: &DeviceNvfp4,
        out: super::decode::DevAddr,
    ) -> Result<(), KernelError> {
        let nblocks = w.nblocks() as u64;
        let mut b = self.stream.launch_builder(&self.f.dequantize_bf16);
        b.arg(&w.packed)
            .arg(&w.scales)
            .arg(&w.tensor_scale)
            .arg(&nblocks)
            .arg(&out);
        // SAFETY: matches kiln_dequantize_nvfp4_bf16; w's buffers cover nblocks, the caller's
        // contract covers out.
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
}
