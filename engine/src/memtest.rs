//! The memtest job: allocate `bytes` in `steps` steps (device memory through cudarc on a CUDA
//! device, touched host pages on the CPU), report a `memtest_step` phase after each step, hold,
//! free, report `memtest_freed`, succeed with [`JobOutput::Memtest`].
//!
//! The memory is made really resident: device buffers are filled with a non-zero byte pattern
//! (`cuMemsetD8`) and read back at the ends; host buffers get a non-zero byte written into every
//! page, so the agent's guard sees the growth in NVML per-pid memory or in the process's RSS.

use crate::memory::{now_ms, page_size, self_rss_bytes};
use crate::report::{JobOutput, PhaseReport, Report, Reporter};
use crate::spec::{DeviceSpec, MemtestSpec};
use std::time::Duration;

/// Why a memtest failed.
#[derive(Debug, thiserror::Error)]
pub enum MemtestError {
    /// The spec cannot be run as given.
    #[error("memtest: invalid spec: {0}")]
    InvalidSpec(String),
    /// The host could not provide the memory.
    #[error("memtest: could not allocate {bytes} bytes of host memory in step {step}: {reason} (lower --gib or raise the host's free memory)")]
    HostAlloc {
        /// The step (1-based) that failed.
        step: u32,
        /// Bytes asked for in that step.
        bytes: u64,
        /// What the allocator said.
        reason: String,
    },
    /// CUDA cannot be used in this process.
    #[error("memtest: the job asked for CUDA device {ordinal} but CUDA is unusable: {reason}")]
    CudaUnavailable {
        /// Device ordinal as the job sees it.
        ordinal: u32,
        /// What is missing and how to fix it.
        reason: String,
    },
    /// A CUDA call failed.
    #[error("memtest: CUDA {what} failed on device {ordinal}: {reason}")]
    Cuda {
        /// Which call.
        what: &'static str,
        /// Device ordinal as the job sees it.
        ordinal: u32,
        /// The driver's error.
        reason: String,
    },
    /// The pattern read back was not the one written (memory is not behaving).
    #[error(
        "memtest: read-back check failed in step {step}: wrote {wrote:#04x}, read {read:#04x}"
    )]
    Verify {
        /// The step (1-based).
        step: u32,
        /// Byte written.
        wrote: u8,
        /// Byte read back.
        read: u8,
    },
}

/// Runs a memtest on `device`, reporting through `reporter`.
pub fn run(
    spec: &MemtestSpec,
    device: DeviceSpec,
    reporter: &Reporter,
) -> Result<JobOutput, MemtestError> {
    let sizes = step_sizes(spec)?;
    tracing::info!(
        bytes = spec.bytes,
        steps = spec.steps,
        ?device,
        "memtest starting"
    );
    match device {
        DeviceSpec::Cpu => run_host(spec, &sizes, reporter),
        DeviceSpec::Cuda(ordinal) => cuda::run(spec, &sizes, ordinal, reporter),
    }
}

/// Splits `spec.bytes` into `spec.steps` sizes; the last step takes the remainder.
pub fn step_sizes(spec: &MemtestSpec) -> Result<Vec<u64>, MemtestError> {
    use kiln_job::spec::{MAX_MEMTEST_BYTES, MAX_MEMTEST_STEPS, MAX_SECS};
    if spec.steps == 0 {
        return Err(MemtestError::InvalidSpec("steps must be at least 1".into()));
    }
    if spec.steps > MAX_MEMTEST_STEPS {
        return Err(MemtestError::InvalidSpec(format!(
            "steps must be at most {MAX_MEMTEST_STEPS}, got {}",
            spec.steps
        )));
    }
    if spec.bytes > MAX_MEMTEST_BYTES {
        return Err(MemtestError::InvalidSpec(format!(
            "bytes must be at most {MAX_MEMTEST_BYTES}, got {}",
            spec.bytes
        )));
    }
    for (name, v) in [
        ("hold_secs", spec.hold_secs),
        ("step_pause_secs", spec.step_pause_secs),
    ] {
        if !(v.is_finite() && (0.0..=MAX_SECS).contains(&v)) {
            return Err(MemtestError::InvalidSpec(format!(
                "{name} must be a number of seconds from 0 to {MAX_SECS}, got {v}"
            )));
        }
    }
    let n = u64::from(spec.steps);
    let each = spec.bytes / n;
    let mut sizes = vec![each; spec.steps as usize];
    *sizes.last_mut().expect("steps >= 1") += spec.bytes - each * n;
    Ok(sizes)
}

/// The non-zero byte written in step `step` (1-based).
fn pattern(step: u32) -> u8 {
    (step as u8).wrapping_mul(37) | 0x81
}

fn sleep_secs(secs: f64) {
    if secs > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(secs));
    }
}

/// One phase report with the host RSS and, on CUDA, cuMemGetInfo.
fn phase(name: &str, step: u32, allocated: u64, cuda: Option<(u64, u64)>) -> PhaseReport {
    let (cuda_free, cuda_total) = cuda.unwrap_or((0, 0));
    PhaseReport {
        phase: name.into(),
        step,
        at_ms: now_ms(),
        cuda_free,
        cuda_total,
        host_rss: self_rss_bytes(),
        metrics: [("allocated_bytes".to_string(), allocated as f64)].into(),
        ..Default::default()
    }
}

fn progress(reporter: &Reporter, done: u32, total: u32, allocated: u64) {
    reporter.send(&Report::Progress {
        done: done.into(),
        total: total.into(),
        unit: "steps".into(),
        message: format!(
            "{:.1} MiB allocated",
            allocated as f64 / (1u64 << 20) as f64
        ),
    });
}

fn run_host(
    spec: &MemtestSpec,
    sizes: &[u64],
    reporter: &Reporter,
) -> Result<JobOutput, MemtestError> {
    let page = page_size() as usize;
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(sizes.len());
    let mut allocated = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        let step = i as u32 + 1;
        let len = usize::try_from(size).map_err(|_| MemtestError::HostAlloc {
            step,
            bytes: size,
            reason: "larger than the address space".into(),
        })?;
        let mut block: Vec<u8> = Vec::new();
        block
            .try_reserve_exact(len)
            .map_err(|e| MemtestError::HostAlloc {
                step,
                bytes: size,
                reason: e.to_string(),
            })?;
        // The pages are fresh from the allocator; one non-zero byte per page makes each resident.
        let value = pattern(step);
        let ptr = block.as_mut_ptr();
        let mut off = 0;
        while off < len {
            // SAFETY: off < len <= capacity; volatile so the stores are not optimized away.
            unsafe { std::ptr::write_volatile(ptr.add(off), value) };
            off += page;
        }
        if len > 0 {
            // SAFETY: as above; the last byte, so a partial last page is touched too.
            unsafe { std::ptr::write_volatile(ptr.add(len - 1), value) };
            // SAFETY: every byte we read below was written above; the rest stays unread.
            let (first, last) = unsafe {
                (
                    std::ptr::read_volatile(ptr),
                    std::ptr::read_volatile(ptr.add(len - 1)),
                )
            };
            for read in [first, last] {
                if read != value {
                    return Err(MemtestError::Verify {
                        step,
                        wrote: value,
                        read,
                    });
                }
            }
        }
        blocks.push(block);
        allocated += size;
        reporter.phase(phase("memtest_step", step, allocated, None));
        progress(reporter, step, spec.steps, allocated);
        if step < spec.steps {
            sleep_secs(spec.step_pause_secs);
        }
    }
    sleep_secs(spec.hold_secs);
    drop(blocks);
    reporter.phase(phase("memtest_freed", spec.steps, 0, None));
    Ok(JobOutput::Memtest {
        allocated_bytes: allocated,
        device: "host".into(),
    })
}

/// The CUDA path: device memory through cudarc's driver API.
mod cuda {
    use super::*;
    use cudarc::driver::{CudaContext, CudaSlice, DevicePtrMut};

    fn err(
        what: &'static str,
        ordinal: u32,
    ) -> impl Fn(cudarc::driver::DriverError) -> MemtestError {
        move |e| MemtestError::Cuda {
            what,
            ordinal,
            reason: e.to_string(),
        }
    }

    pub(super) fn run(
        spec: &MemtestSpec,
        sizes: &[u64],
        ordinal: u32,
        reporter: &Reporter,
    ) -> Result<JobOutput, MemtestError> {
        // cudarc panics when the driver library is missing; ask first and say so clearly.
        // SAFETY: only probes whether the library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(MemtestError::CudaUnavailable {
                ordinal,
                reason: "the CUDA driver library (libcuda.so) could not be loaded; install the \
                         NVIDIA driver or run the job on a CPU slot (--gpus 0)"
                    .into(),
            });
        }
        let ctx =
            CudaContext::new(ordinal as usize).map_err(|e| MemtestError::CudaUnavailable {
                ordinal,
                reason: format!(
                "creating a context failed ({e}); check CUDA_VISIBLE_DEVICES={:?} and nvidia-smi",
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
            ),
            })?;
        let stream = ctx.default_stream();
        let mem_info = || -> Result<(u64, u64), MemtestError> {
            let (free, total) = ctx.mem_get_info().map_err(err("cuMemGetInfo", ordinal))?;
            Ok((free as u64, total as u64))
        };
        let mut blocks: Vec<CudaSlice<u8>> = Vec::with_capacity(sizes.len());
        let mut allocated = 0u64;
        for (i, &size) in sizes.iter().enumerate() {
            let step = i as u32 + 1;
            let len = size as usize;
            // SAFETY: filled right below before anything reads it.
            let mut block =
                unsafe { stream.alloc::<u8>(len) }.map_err(err("cuMemAlloc", ordinal))?;
            let value = pattern(step);
            if len > 0 {
                let (dptr, _record) = block.device_ptr_mut(&stream);
                // SAFETY: dptr is a live allocation of len bytes made on this stream.
                unsafe {
                    cudarc::driver::result::memset_d8_async(dptr, value, len, stream.cu_stream())
                }
                .map_err(err("cuMemsetD8", ordinal))?;
                drop(_record);
                for at in [0, len - 1] {
                    let got = stream
                        .clone_dtoh(&block.slice(at..at + 1))
                        .map_err(err("cuMemcpyDtoH", ordinal))?;
                    if got[0] != value {
                        return Err(MemtestError::Verify {
                            step,
                            wrote: value,
                            read: got[0],
                        });
                    }
                }
            }
            stream
                .synchronize()
                .map_err(err("cuStreamSynchronize", ordinal))?;
            blocks.push(block);
            allocated += size;
            reporter.phase(phase("memtest_step", step, allocated, Some(mem_info()?)));
            progress(reporter, step, spec.steps, allocated);
            if step < spec.steps {
                sleep_secs(spec.step_pause_secs);
            }
        }
        sleep_secs(spec.hold_secs);
        drop(blocks);
        stream
            .synchronize()
            .map_err(err("cuStreamSynchronize", ordinal))?;
        reporter.phase(phase("memtest_freed", spec.steps, 0, Some(mem_info()?)));
        Ok(JobOutput::Memtest {
            allocated_bytes: allocated,
            device: "cuda".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(bytes: u64, steps: u32) -> MemtestSpec {
        MemtestSpec {
            bytes,
            steps,
            hold_secs: 0.0,
            step_pause_secs: 0.0,
        }
    }

    #[test]
    fn step_sizes_sum_to_bytes_with_remainder_last() {
        assert_eq!(step_sizes(&spec(10, 3)).unwrap(), vec![3, 3, 4]);
        assert_eq!(step_sizes(&spec(0, 2)).unwrap(), vec![0, 0]);
        assert!(matches!(
            step_sizes(&spec(10, 0)),
            Err(MemtestError::InvalidSpec(_))
        ));
        let mut bad = spec(10, 1);
        bad.hold_secs = -1.0;
        assert!(step_sizes(&bad).is_err());
    }

    #[test]
    fn patterns_are_never_zero() {
        assert!((1..=600u32).all(|s| pattern(s) != 0));
    }

    #[test]
    fn host_memtest_reports_each_step_then_freed() {
        let (reporter, reports) = Reporter::capture();
        let out = run(&spec(48 << 20, 3), DeviceSpec::Cpu, &reporter).unwrap();
        assert_eq!(
            out,
            JobOutput::Memtest {
                allocated_bytes: 48 << 20,
                device: "host".into()
            }
        );
        let reports = reports.lock().unwrap();
        let phases: Vec<(String, u32, f64)> = reports
            .iter()
            .filter_map(|r| match r {
                Report::Phase(p) => Some((p.phase.clone(), p.step, p.metrics["allocated_bytes"])),
                _ => None,
            })
            .collect();
        let mib = (1u64 << 20) as f64;
        assert_eq!(
            phases,
            vec![
                ("memtest_step".into(), 1, 16.0 * mib),
                ("memtest_step".into(), 2, 32.0 * mib),
                ("memtest_step".into(), 3, 48.0 * mib),
                ("memtest_freed".into(), 3, 0.0),
            ]
        );
        for r in reports.iter() {
            if let Report::Phase(p) = r {
                assert!(p.host_rss > 0, "host_rss read from /proc");
                assert_eq!(
                    (p.cuda_free, p.cuda_total),
                    (0, 0),
                    "no CUDA on a CPU memtest"
                );
            }
        }
        let progress = reports
            .iter()
            .filter(|r| matches!(r, Report::Progress { .. }))
            .count();
        assert_eq!(progress, 3);
    }

    #[test]
    fn cuda_memtest_without_a_driver_is_a_clear_error_not_a_fallback() {
        // SAFETY: only probes whether the library can be loaded.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            eprintln!("skipping: a CUDA driver is present here (the GPU script covers this path)");
            return;
        }
        let err = run(
            &spec(1 << 20, 1),
            DeviceSpec::Cuda(0),
            &Reporter::capture().0,
        )
        .unwrap_err();
        assert!(matches!(err, MemtestError::CudaUnavailable { .. }), "{err}");
        assert!(err.to_string().contains("libcuda"), "{err}");
    }

    /// Any memtest values through the job's own check: an error or sizes, never a panic or an
    /// abort (steps = 2^32-1 used to allocate a 32 GB vector; 1e308 s used to panic in sleep).
    #[test]
    fn arbitrary_memtest_values_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let floats = [
            f64::NAN,
            f64::INFINITY,
            -1.0,
            1e308,
            0.0,
            86_400.0,
            86_401.0,
        ];
        for i in 0..2000 {
            let s = MemtestSpec {
                bytes: if i % 3 == 0 { u64::MAX } else { r.random() },
                steps: if i % 5 == 0 { u32::MAX } else { r.random() },
                hold_secs: floats[i % floats.len()],
                step_pause_secs: if i % 2 == 0 {
                    r.random::<f64>() * 1e6
                } else {
                    0.0
                },
            };
            if let Ok(sizes) = step_sizes(&s) {
                assert_eq!(sizes.iter().sum::<u64>(), s.bytes);
                assert!(s.hold_secs <= 86_400.0 && s.step_pause_secs <= 86_400.0);
            }
        }
    }
}
