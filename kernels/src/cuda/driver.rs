//! Driver-level helpers the CUDA modules share (a leaf: it knows no Kiln type but
//! [`KernelError`]): turning a driver error into a [`KernelError`] that says what was being done
//! ([`drv`]), and queueing a kernel as a programmatic dependent launch ([`launch_chained`]) or
//! a cooperative one ([`launch_cooperative`]).

use std::ffi::c_void;

use cudarc::driver::{sys, CudaFunction, CudaStream, DriverError, LaunchConfig};

use crate::KernelError;

/// Turn a driver error into Kiln's error with what was being done.
pub(crate) fn drv(context: &str) -> impl FnOnce(DriverError) -> KernelError + '_ {
    move |e| KernelError::Cuda {
        context: context.to_string(),
        message: e.to_string(),
    }
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
    stream: &CudaStream,
    func: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { launch_raw(stream, func, cfg, params, true) }
}

/// Queue `func` on `stream` with the parameter addresses `params`, as a programmatic dependent
/// launch when `chained` (see [`launch_chained`]), else as a plain launch.
///
/// # Safety
/// As [`launch_chained`]; a plain launch has no wait to honour.
pub(crate) unsafe fn launch_raw(
    stream: &CudaStream,
    func: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
    chained: bool,
) -> Result<(), DriverError> {
    // SAFETY: a zeroed attribute is a valid "ignore" attribute; id and value are set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    // SAFETY: the caller's contract.
    unsafe { launch_with(stream, func, cfg, params, chained.then_some(attr)) }
}

/// Queue `func` as a cooperative launch: every block of the grid is resident at once (the
/// driver refuses a grid larger than fits), so its blocks may wait on one another.
///
/// # Safety
/// As [`launch_raw`] for a plain launch.
pub(crate) unsafe fn launch_cooperative(
    stream: &CudaStream,
    func: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
) -> Result<(), DriverError> {
    // SAFETY: a zeroed attribute is a valid "ignore" attribute; id and value are set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
    attr.value.cooperative = 1;
    // SAFETY: the caller's contract.
    unsafe { launch_with(stream, func, cfg, params, Some(attr)) }
}

/// `cuLaunchKernelEx` with at most one launch attribute.
unsafe fn launch_with(
    stream: &CudaStream,
    func: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
    attr: Option<sys::CUlaunchAttribute>,
) -> Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    let (mut attr, with) = match attr {
        Some(a) => (a, true),
        // SAFETY: as above; not passed (numAttrs 0)
        None => (unsafe { std::mem::zeroed() }, false),
    };
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
        numAttrs: u32::from(with),
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
