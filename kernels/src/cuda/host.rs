//! Host-slice conveniences over the device ops: the same signatures as the CPU reference
//! (`Nvfp4Tensor::quantize`, `cpu::matmul_nvfp4`, `cpu::adamw_step_nvfp4`), each uploading its
//! inputs, running the kernels and synchronising. Used by `kiln quantize --device cuda`, the GPU
//! tests and any caller that holds its data on the host.

use half::bf16;

use super::context::CudaKernels;
use super::driver::drv;
use super::gemv::{GemvKernel, GEMV_MAX_ROWS};
use cudarc::driver::CudaSlice;

use super::ops::{DeviceInput, DeviceNvfp4};
use crate::cpu::{AdamWParams, AdamWStepStats};
use crate::nvfp4::{Nvfp4Tensor, Rounding, BLOCK};
use crate::KernelError;

/// Most f32 values [`CudaKernels::quantize_staged`] uploads at once (16 Mi = 64 MiB).
pub const QUANTIZE_STAGING_VALUES: usize = 16 << 20;

/// Most bf16 elements of W dequantized at once by the large-M matmul (64 Mi = 128 MiB).
const LARGE_MATMUL_SCRATCH: usize = 64 << 20;

impl CudaKernels {
    /// [`Nvfp4Tensor::quantize`] on the GPU (bit-identical).
    pub fn quantize(
        &self,
        data: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Nvfp4Tensor, KernelError> {
        self.quantize_host(HostInput::F32(data), rows, cols, Rounding::Nearest)
    }

    /// [`Nvfp4Tensor::quantize`] on the GPU (bit-identical) through a staging buffer of at
    /// most [`QUANTIZE_STAGING_VALUES`] values beside the result, for model loaders (a whole f32
    /// embedding of a large vocabulary would be gigabytes). bf16 input is uploaded as it is
    /// (half the bytes of f32; the codes are those of its f32 values). The tensor scale comes
    /// from the host's amax pass, which also names the first non-finite value as the CPU does.
    pub fn quantize_staged(
        &self,
        data: HostInput<'_>,
        rows: usize,
        cols: usize,
    ) -> Result<Nvfp4Tensor, KernelError> {
        if data.len() != rows * cols {
            return Err(KernelError::LengthMismatch {
                what: "data [rows, cols]",
                expected: rows * cols,
                got: data.len(),
            });
        }
        let ts = crate::nvfp4::tensor::tensor_scale_for_amax(data.checked_amax(cols)?);
        let mut out = self.alloc_nvfp4(rows, cols)?;
        self.stream
            .memcpy_htod(&[ts], &mut out.tensor_scale)
            .map_err(drv("setting the tensor scale"))?;
        let mut staging = QuantizeStaging::default();
        self.quantize_rows_from_host(data, ts, &mut out, 0, &mut staging)?;
        self.download_nvfp4(&out)
    }

    /// Queue the round-to-nearest quantize of host rows `data` (`[n, out.cols]`) with the known
    /// `tensor_scale` into rows `first_row .. first_row + n` of `out`, uploading at most
    /// [`QUANTIZE_STAGING_VALUES`] values at a time into `staging` (allocated on first use and
    /// reused; keep it alive until the stream has run the queued work). `out`'s tensor scale is
    /// left alone.
    pub fn quantize_rows_from_host(
        &self,
        data: HostInput<'_>,
        tensor_scale: f32,
        out: &mut DeviceNvfp4,
        first_row: usize,
        staging: &mut QuantizeStaging,
    ) -> Result<(), KernelError> {
        let cols = out.cols;
        let chunk = (QUANTIZE_STAGING_VALUES / cols).max(1) * cols;
        match data {
            HostInput::F32(d) => self.quantize_chunks(
                d,
                chunk,
                &mut staging.f32,
                |b| DeviceInput::F32(b),
                tensor_scale,
                out,
                first_row,
            ),
            HostInput::Bf16(d) => self.quantize_chunks(
                d,
                chunk,
                &mut staging.bf16,
                |b| DeviceInput::Bf16(b),
                tensor_scale,
                out,
                first_row,
            ),
        }
    }

    /// [`CudaKernels::quantize_rows_from_host`] for one element type: `data` up `chunk` values
    /// at a time through `buf` (grown to fit), each chunk quantized into its rows of `out`.
    #[allow(clippy::too_many_arguments)]
    fn quantize_chunks<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        data: &[T],
        chunk: usize,
        buf: &mut Option<CudaSlice<T>>,
        input: impl for<'b> Fn(&'b CudaSlice<T>) -> DeviceInput<'b>,
        tensor_scale: f32,
        out: &mut DeviceNvfp4,
        first_row: usize,
    ) -> Result<(), KernelError> {
        let len = chunk.min(data.len());
        if buf.as_ref().is_none_or(|s| s.len() < len) {
            *buf = Some(
                self.stream
                    .alloc_zeros::<T>(len)
                    .map_err(drv("allocating the quantize staging buffer"))?,
            );
        }
        let buf = buf.as_mut().expect("allocated above");
        let mut row = first_row;
        for c in data.chunks(chunk) {
            self.stream
                .memcpy_htod(c, &mut buf.slice_mut(0..c.len()))
                .map_err(drv("uploading rows to quantize"))?;
            let n = c.len() / out.cols;
            self.quantize_rows_into_async(input(buf), n, tensor_scale, out, row)?;
            row += n;
        }
        Ok(())
    }

    /// [`Nvfp4Tensor::quantize_stochastic`] on the GPU (bit-identical).
    pub fn quantize_stochastic(
        &self,
        data: &[f32],
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> Result<Nvfp4Tensor, KernelError> {
        self.quantize_host(
            HostInput::F32(data),
            rows,
            cols,
            Rounding::Stochastic { seed },
        )
    }

    /// Quantize bf16 data (uploaded as bf16, half the bytes); identical to converting to f32 and
    /// calling [`Nvfp4Tensor::quantize`].
    pub fn quantize_bf16(
        &self,
        data: &[bf16],
        rows: usize,
        cols: usize,
    ) -> Result<Nvfp4Tensor, KernelError> {
        self.quantize_host(HostInput::Bf16(data), rows, cols, Rounding::Nearest)
    }

    fn quantize_host(
        &self,
        data: HostInput<'_>,
        rows: usize,
        cols: usize,
        rounding: Rounding,
    ) -> Result<Nvfp4Tensor, KernelError> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(KernelError::ColsNotMultipleOf16 { rows, cols });
        }
        if data.len() != rows * cols {
            return Err(KernelError::LengthMismatch {
                what: "input data for [rows, cols]",
                expected: rows * cols,
                got: data.len(),
            });
        }
        let s = &self.stream;
        let mut status = self.alloc_status()?;
        let mut out = self.alloc_nvfp4(rows, cols)?;
        match data {
            HostInput::F32(d) => {
                let x = s.clone_htod(d).map_err(drv("uploading the input"))?;
                self.quantize_async(
                    DeviceInput::F32(&x),
                    rows,
                    cols,
                    rounding,
                    &mut status,
                    &mut out,
                )?;
            }
            HostInput::Bf16(d) => {
                let x = s.clone_htod(d).map_err(drv("uploading the input"))?;
                self.quantize_async(
                    DeviceInput::Bf16(&x),
                    rows,
                    cols,
                    rounding,
                    &mut status,
                    &mut out,
                )?;
            }
        }
        let (_, bad) = self.read_status(&status)?;
        if let Some(index) = bad {
            let index = index as usize;
            let value = match data {
                HostInput::F32(d) => d[index],
                HostInput::Bf16(d) => d[index].to_f32(),
            };
            return Err(KernelError::NonFinite {
                index,
                row: index / cols,
                col: index % cols,
                value,
            });
        }
        self.download_nvfp4(&out)
    }

    /// [`Nvfp4Tensor::dequantize`] on the GPU (bit-identical).
    pub fn dequantize(&self, t: &Nvfp4Tensor) -> Result<Vec<f32>, KernelError> {
        let d = self.upload_nvfp4(t)?;
        let mut out = self
            .stream
            .alloc_zeros::<f32>(t.rows * t.cols)
            .map_err(drv("allocating the output"))?;
        self.dequantize_f32_async(&d, &mut out)?;
        self.stream
            .clone_dtoh(&out)
            .map_err(drv("downloading the output"))
    }

    /// `y[m, N] = x[m, K] · Wᵀ` like [`crate::cpu::matmul_nvfp4`]: the fused GEMV (f32; its
    /// scratch reserved first, [`CudaKernels::reserve_gemv`]) for m ≤ 8 and K % 32 == 0, otherwise dequantize-to-bf16 + cuBLASLt (x rounded to bf16,
    /// bf16 output: relative error ~1e-2 instead of ~1e-6).
    pub fn matmul_nvfp4(
        &self,
        x: &[f32],
        m: usize,
        w: &Nvfp4Tensor,
    ) -> Result<Vec<f32>, KernelError> {
        let (n, k) = (w.rows, w.cols);
        if x.len() != m * k {
            return Err(KernelError::LengthMismatch {
                what: "x [m, K]",
                expected: m * k,
                got: x.len(),
            });
        }
        let s = &self.stream;
        let dw = self.upload_nvfp4(w)?;
        if (1..=GEMV_MAX_ROWS).contains(&m) && k.is_multiple_of(32) {
            self.reserve_gemv(m, n, k)?;
            let dx = s.clone_htod(x).map_err(drv("uploading x"))?;
            let mut dy = s.alloc_zeros::<f32>(m * n).map_err(drv("allocating y"))?;
            self.gemv_async(&dx, m, &dw, &mut dy)?;
            return s.clone_dtoh(&dy).map_err(drv("downloading y"));
        }
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let dx = s.clone_htod(&xb).map_err(drv("uploading x"))?;
        let mut dy = s.alloc_zeros::<bf16>(m * n).map_err(drv("allocating y"))?;
        let scratch_len = (LARGE_MATMUL_SCRATCH / k).clamp(1, n) * k;
        let mut scratch = s
            .alloc_zeros::<bf16>(scratch_len)
            .map_err(drv("allocating scratch"))?;
        self.matmul_nvfp4_large_async(&dx, m, &dw, &mut scratch, &mut dy)?;
        let y = s.clone_dtoh(&dy).map_err(drv("downloading y"))?;
        Ok(y.into_iter().map(|v| v.to_f32()).collect())
    }

    /// The GEMV with an explicit kernel (for tests and comparisons; one
    /// [`CudaKernels::gemv_kernels_for`] lists for the shape); m in 1..=8.
    pub fn gemv_with(
        &self,
        x: &[f32],
        m: usize,
        w: &Nvfp4Tensor,
        kernel: GemvKernel,
    ) -> Result<Vec<f32>, KernelError> {
        let s = &self.stream;
        self.reserve_gemv(m, w.rows, w.cols)?;
        let dw = self.upload_nvfp4(w)?;
        let dx = s.clone_htod(x).map_err(drv("uploading x"))?;
        // poison y so an unwritten element shows as NaN
        let mut dy = s
            .clone_htod(&vec![f32::NAN; m * w.rows])
            .map_err(drv("allocating y"))?;
        self.gemv_with_async(&dx, m, &dw, &mut dy, kernel)?;
        s.clone_dtoh(&dy).map_err(drv("downloading y"))
    }

    /// [`crate::cpu::adamw_step_nvfp4`] on the GPU: same arguments, same arithmetic; moments and
    /// weights are uploaded, stepped and downloaded. `peak_temp_bytes` is the device scratch
    /// (the fused kernels hold no f32 copy of the weights).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step_nvfp4(
        &self,
        w: &mut Nvfp4Tensor,
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        hp: AdamWParams,
        step: u64,
        chunk_rows: usize,
        seed: u64,
    ) -> Result<AdamWStepStats, KernelError> {
        let n = w.rows * w.cols;
        crate::cpu::adamw::check_step_args(n, [grad.len(), m.len(), v.len()], chunk_rows)?;
        crate::nvfp4::checked_amax(grad, w.cols)?;
        let s = &self.stream;
        let mut dw = self.upload_nvfp4(w)?;
        let dg = s.clone_htod(grad).map_err(drv("uploading the gradient"))?;
        let mut dm = s.clone_htod(m).map_err(drv("uploading m"))?;
        let mut dv = s.clone_htod(v).map_err(drv("uploading v"))?;
        let mut status = self.alloc_status()?;
        let mut stats = self.adamw_step_async(
            &mut dw,
            &dg,
            &mut dm,
            &mut dv,
            hp,
            step,
            chunk_rows,
            seed,
            &mut status,
        )?;
        let (amax, _) = self.read_status(&status)?;
        if !amax.is_finite() {
            return Err(KernelError::InvalidArgument(format!(
                "AdamW step produced a non-finite weight (amax {amax}); lower the learning rate"
            )));
        }
        let new = self.download_nvfp4(&dw)?;
        s.memcpy_dtoh(&dm, m).map_err(drv("downloading m"))?;
        s.memcpy_dtoh(&dv, v).map_err(drv("downloading v"))?;
        stats.old_tensor_scale = w.tensor_scale;
        stats.new_tensor_scale = new.tensor_scale;
        stats.peak_temp_bytes = std::mem::size_of::<u32>() + std::mem::size_of::<u64>();
        *w = new;
        Ok(stats)
    }
}

/// Values on the host, f32 or bf16.
#[derive(Clone, Copy)]
pub enum HostInput<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values.
    Bf16(&'a [bf16]),
}

impl HostInput<'_> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            HostInput::F32(d) => d.len(),
            HostInput::Bf16(d) => d.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Largest |x| (as f32), or the first non-finite value as an error, as
    /// [`crate::nvfp4::tensor::checked_amax`] of the f32 values.
    pub fn checked_amax(&self, cols: usize) -> Result<f32, KernelError> {
        match self {
            HostInput::F32(d) => crate::nvfp4::tensor::checked_amax(d, cols),
            HostInput::Bf16(d) => crate::nvfp4::tensor::checked_amax_by(d, cols, |x| x.to_f32()),
        }
    }
}

/// The device staging buffers of [`CudaKernels::quantize_rows_from_host`], reused across calls.
#[derive(Default)]
pub struct QuantizeStaging {
    f32: Option<CudaSlice<f32>>,
    bf16: Option<CudaSlice<bf16>>,
}

impl QuantizeStaging {
    /// Whether a buffer was allocated (work may be queued that reads it).
    pub fn in_use(&self) -> bool {
        self.f32.is_some() || self.bf16.is_some()
    }
}
