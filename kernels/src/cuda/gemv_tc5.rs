//! The v5 tensor-core GEMV (`gemv_tensor_core_split_k.cu`): the v2 decode with K split across blocks, so
//! each block stages only its slice of x; the slices' partial sums meet in a scratch buffer and
//! the last block of each row range adds them in order (deterministic). This module holds the
//! list of built kernels, the split choice, the scratch buffer and the launch, plain or chained
//! (programmatic dependent launch, see [`GemvLaunch`]).

use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::driver::{
    sys, CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};

use super::context::{drv, CudaKernels};
use super::gemv::GemvLaunch;
use super::ops::DeviceNvfp4;
use crate::KernelError;

/// The v5 kernels built, as [`Tc5Config`]s: (m, tiles per warp, super-tiles in flight per tile,
/// late — the next loads are issued after a super-tile is decoded, into the registers it used —,
/// resident blocks per SM the register cap allows); the same list as the `KILN_GEMV_SPLIT_K` lines
/// of `gemv_tensor_core_split_k.cu`, in the same order.
pub const TC5_KERNELS: &[Tc5Config] = &[
    (1, 2, 3, false, 2),
    (1, 2, 2, false, 2),
    (1, 2, 3, true, 2),
    (1, 1, 4, true, 2),
    (1, 1, 3, true, 3),
    (2, 2, 3, true, 2),
    (3, 2, 3, true, 2),
    (4, 2, 3, true, 2),
    (4, 2, 3, false, 2),
    (5, 2, 2, true, 2),
    (6, 2, 2, true, 2),
    (7, 2, 2, true, 2),
    (8, 2, 2, true, 2),
    (8, 2, 3, true, 2),
];

/// A v5 kernel: (m, tiles, depth, late, blocks per SM).
pub type Tc5Config = (usize, usize, usize, bool, usize);

/// Index of a configuration in [`TC5_KERNELS`].
pub fn tc5_index(c: Tc5Config) -> Option<usize> {
    TC5_KERNELS.iter().position(|&e| e == c)
}

/// Rows of W one v5 block covers: 8 warps × `tiles` tiles × 16 rows.
pub fn tc5_rows_per_block(tiles: usize) -> usize {
    8 * tiles * 16
}

/// How many K slices (grid.y) a v5 launch uses for `[n, k]` on `slots` resident blocks: the
/// fewest waves × (super-tiles per block + 2, the block's fixed start-up and reduction cost),
/// then the fewest slices (less partial-sum traffic).
pub fn tc5_slices(n: usize, k: usize, tiles: usize, slots: usize) -> usize {
    let nsup = k / 128;
    let rowblocks = n.div_ceil(tc5_rows_per_block(tiles));
    let mut best = (usize::MAX, 1);
    for s in 1..=32.min(nsup.max(1)) {
        let cost = (rowblocks * s).div_ceil(slots.max(1)) * (nsup.div_ceil(s) + 2);
        if cost < best.0 {
            best = (cost, s);
        }
    }
    best.1
}

/// Dynamic shared memory of a v5 launch: the slice of x as bf16 hi/lo, the zero area and the
/// "last block" flag.
pub fn tc5_smem_bytes(m: usize, k: usize, slices: usize) -> usize {
    4 * m * (k / 128).div_ceil(slices) * 128 + 512 * m + 16
}

/// The partial sums and per-row-range counters of the split-K GEMV (grown on demand; the
/// counters are zero between launches: the last block of a row range resets its own).
#[derive(Default)]
pub struct GemvScratch {
    bufs: Option<(CudaSlice<f32>, CudaSlice<u32>)>,
}

impl GemvScratch {
    /// The buffers, grown (zeroed) to at least `partials` floats and `counters` counters.
    pub(crate) fn ensure(
        &mut self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        partials: usize,
        counters: usize,
    ) -> Result<(&mut CudaSlice<f32>, &mut CudaSlice<u32>), KernelError> {
        let grow = match &self.bufs {
            Some((p, c)) => p.len() < partials || c.len() < counters,
            None => true,
        };
        if grow {
            let p = stream
                .alloc_zeros::<f32>(partials.max(1))
                .map_err(drv("allocating the GEMV partial sums"))?;
            let c = stream
                .alloc_zeros::<u32>(counters.max(1))
                .map_err(drv("allocating the GEMV counters"))?;
            self.bufs = Some((p, c));
        }
        let (p, c) = self.bufs.as_mut().expect("allocated above");
        Ok((p, c))
    }
}

impl CudaKernels {
    /// Whether the v5 GEMV can run `c` on an `[n, k]` W: built for `c.0` rows of x (or, for
    /// 5..=8 rows without a kernel of their own, as 4 + the rest, both built), K % 128 == 0,
    /// and the slice of x fits in shared memory.
    pub fn gemv_tc5_fits(&self, c: Tc5Config, n: usize, k: usize) -> bool {
        let (m, t, d, l, b) = c;
        let direct = tc5_index(c).is_some();
        let split = (5..=8).contains(&m)
            && tc5_index((4, t, d, l, b)).is_some()
            && tc5_index((m - 4, t, d, l, b)).is_some();
        let staged = if direct { m } else { m.min(4) };
        (direct || split)
            && k.is_multiple_of(128)
            && tc5_smem_bytes(staged, k, self.tc5_slices_for(n, k, t, b)) <= self.smem_optin
    }

    /// The K slices a v5 launch of this shape uses (`per_sm` resident blocks per SM), or
    /// `KILN_GEMV_SLICES` when it was set at start-up (a tuning knob for the benchmark; clamped
    /// to 1..=K/128).
    pub fn tc5_slices_for(&self, n: usize, k: usize, tiles: usize, per_sm: usize) -> usize {
        if let Some(s) = self.gemv_slices {
            return s.clamp(1, (k / 128).max(1));
        }
        tc5_slices(n, k, tiles, per_sm * self.sm_count as usize)
    }

    /// Launch the v5 GEMV for `c.0` rows of x (5..=8 rows without a kernel of their own as two
    /// launches: rows 0..4, then the rest); the caller (`gemv_variant_launch_async`) checked
    /// the shapes of x and y.
    pub(super) fn gemv_tc5_launch(
        &self,
        x: &CudaSlice<f32>,
        w: &DeviceNvfp4,
        y: &mut CudaSlice<f32>,
        c: Tc5Config,
        launch: GemvLaunch,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        if !self.gemv_tc5_fits(c, n, k) {
            return Err(KernelError::InvalidArgument(format!(
                "the tensor-core GEMV v5 takes K % 128 == 0, a slice of x that fits in shared \
                 memory and one of the built (m, tiles, depth, late, blocks per SM) \
                 {TC5_KERNELS:?} (m = 5..8 without a kernel of their own run as 4 + the \
                 rest); got [{n}, {k}], {c:?}"
            )));
        }
        let m = c.0;
        if tc5_index(c).is_some() {
            return self.gemv_tc5_part(&x.slice(..), w, &mut y.slice_mut(..), c, launch);
        }
        let first = m.min(4);
        self.gemv_tc5_part(
            &x.slice(..first * k),
            w,
            &mut y.slice_mut(..first * n),
            (first, c.1, c.2, c.3, c.4),
            launch,
        )?;
        if m > 4 {
            self.gemv_tc5_part(
                &x.slice(first * k..),
                w,
                &mut y.slice_mut(first * n..),
                (m - 4, c.1, c.2, c.3, c.4),
                launch,
            )?;
        }
        Ok(())
    }

    /// One v5 launch (a kernel built for `c.0` rows of x, 1..=8).
    fn gemv_tc5_part(
        &self,
        x: &CudaView<'_, f32>,
        w: &DeviceNvfp4,
        y: &mut CudaViewMut<'_, f32>,
        c: Tc5Config,
        launch: GemvLaunch,
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows, w.cols);
        let (m, tiles, _, _, per_sm) = c;
        let func = &self.f.gemv_tc5[tc5_index(c).expect("checked by gemv_tc5_fits")];
        let slices = self.tc5_slices_for(n, k, tiles, per_sm);
        let rowblocks = n.div_ceil(tc5_rows_per_block(tiles));
        let mut scratch = self
            .gemv_scratch
            .lock()
            .map_err(|_| KernelError::InvalidArgument("GEMV scratch lock poisoned".into()))?;
        let (partial, counters) = scratch.ensure(&self.stream, slices * m * n, rowblocks)?;
        let cfg = LaunchConfig {
            grid_dim: (rowblocks as u32, slices as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: tc5_smem_bytes(m, k, slices) as u32,
        };
        let (ni, ki) = (n as i32, k as i32);
        let flags = i32::from(launch.l2_prefetch);
        if launch.chained {
            let s = &self.stream;
            let (qp, cp) = (partial.device_ptr_mut(s).0, counters.device_ptr_mut(s).0);
            let ptrs = gemv_ptrs(s, x, w, y);
            let mut params: Vec<*mut c_void> = ptrs
                .iter()
                .map(param)
                .chain([
                    param(&ni),
                    param(&ki),
                    param(&qp),
                    param(&cp),
                    param(&flags),
                ])
                .collect();
            // SAFETY: the same kernel and arguments as the plain launch below (the pointers
            // outlive the call: cuLaunchKernelEx copies the values); the kernel reads only W
            // before griddepcontrol.wait, which the caller of a chained launch vouches the
            // previous kernel on the stream does not write.
            return unsafe { launch_chained(s, func, cfg, &mut params) }
                .map_err(drv("launching kiln_gemv_tensor_core_split_k (chained)"));
        }
        let mut b = self.stream.launch_builder(func);
        b.arg(x)
            .arg(&w.packed)
            .arg(&w.scales)
            .arg(&w.tensor_scale)
            .arg(y)
            .arg(&ni)
            .arg(&ki)
            .arg(partial)
            .arg(counters)
            .arg(&flags);
        // SAFETY: matches kiln_gemv_tensor_core_split_k_*; x holds m × K and y
        // m × N floats (the caller's views); the partial buffer holds slices × m × N floats and
        // one counter per row range, all zero between launches; everything is on this stream.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(drv("launching kiln_gemv_tensor_core_split_k"))
    }
}

/// The raw device pointers of a GEMV's x, packed W, scales, tensor scale and y (the first five
/// parameters of every GEMV kernel), for [`launch_chained`]. Event tracking is off in this
/// crate, so the pointers need no guard.
pub(crate) fn gemv_ptrs(
    s: &cudarc::driver::CudaStream,
    x: &impl DevicePtr<f32>,
    w: &DeviceNvfp4,
    y: &mut impl DevicePtrMut<f32>,
) -> [sys::CUdeviceptr; 5] {
    [
        x.device_ptr(s).0,
        w.packed.device_ptr(s).0,
        w.scales.device_ptr(s).0,
        w.tensor_scale.device_ptr(s).0,
        y.device_ptr_mut(s).0,
    ]
}

/// A kernel parameter for [`launch_chained`]: the address of its value.
pub(crate) fn param<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

/// Queue `func` on `stream` with the programmatic-stream-serialization attribute (programmatic
/// dependent launch, compute capability 9.0+): it may start before the previous kernel on the
/// stream has finished and must `griddepcontrol.wait` before touching anything that kernel
/// writes.
///
/// # Safety
/// `params` must point at values matching `func`'s parameter list, and `func` must honour the
/// wait as above.
pub(crate) unsafe fn launch_chained(
    stream: &cudarc::driver::CudaStream,
    func: &cudarc::driver::CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
) -> Result<(), cudarc::driver::DriverError> {
    stream.context().bind_to_thread()?;
    // SAFETY: a zeroed attribute is a valid "ignore" attribute; id and value are set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let lc = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: lc and params are valid for the call (the caller's contract for params).
    unsafe {
        sys::cuLaunchKernelEx(
            &lc,
            func.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
}

/// The scratch a [`CudaKernels`] keeps for the split-K GEMV.
pub(crate) type ScratchCell = Mutex<GemvScratch>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_tc5_kernel_is_instantiated_in_the_cu_file() {
        let src = include_str!("../../cuda/gemv_tensor_core_split_k.cu");
        let built: Vec<Tc5Config> = crate::cuda::compile::macro_instances(src, "KILN_GEMV_SPLIT_K")
            .iter()
            .map(|v| (v[0], v[1], v[2], v[3] == 1, v[4]))
            .collect();
        assert_eq!(built, TC5_KERNELS);
    }

    #[test]
    fn slices_for_the_benchmark_shapes_on_an_h100() {
        let slots = 264;
        assert_eq!(tc5_slices(8192, 8192, 2, slots), 8);
        assert_eq!(tc5_slices(18944, 3584, 2, slots), 3);
        assert_eq!(tc5_slices(3584, 18944, 2, slots), 17);
        // many row ranges: no split (one wave more costs less than a second start-up)
        assert_eq!(tc5_slices(151936, 896, 2, slots), 1);
        // a tiny K never splits below one super-tile per slice
        assert_eq!(tc5_slices(64, 128, 2, slots), 1);
    }
}
