//! The prompt GEMMs' dequantized weights ([`WeightSlabs`]): W is dequantized to bf16 a slab
//! of rows at a time, and a GEMM multiplies each slab. Serial, one buffer: dequantize, GEMM,
//! dequantize, GEMM on the sequence's stream. Overlapped, two buffers: a side stream
//! dequantizes the next slab into one buffer while the main stream's GEMM reads the other —
//! the dequantization is memory-bound, the GEMM compute-bound, and the dequantization of a
//! matrix's first slab no longer waits for the previous linear's GEMM. Events order the two
//! streams: a slab's GEMM waits for its dequantization (`ready`), a buffer's next
//! dequantization for the GEMM that last read it (`free`).

use std::sync::Arc;

use cudarc::driver::{sys, CudaEvent, CudaSlice, CudaStream};
use half::bf16;
use kiln_kernels::cuda::{CudaKernels, DeviceNvfp4};

use super::cuda;
use crate::error::Result;

/// Whether new prompt buffers overlap the dequantization with the GEMMs (two slab buffers and a
/// side stream) — a benchmark can time either (`CudaSequence::set_prefill_overlap`).
pub const PREFILL_OVERLAP: bool = true;

/// Slab buffers the prompt GEMMs use: two when the dequantization overlaps the GEMMs, else one.
pub fn buffers(overlap: bool) -> usize {
    if overlap {
        2
    } else {
        1
    }
}

/// Slab buffers of the prompt GEMMs, `elems` bf16 elements each.
pub(super) struct WeightSlabs {
    bufs: Vec<CudaSlice<bf16>>,
    /// The side stream and each buffer's `ready` / `free` events (overlapped form only).
    side: Option<Side>,
    /// The buffer the next slab goes to.
    next: usize,
}

struct Side {
    stream: Arc<CudaStream>,
    ready: [CudaEvent; 2],
    free: [CudaEvent; 2],
}

impl WeightSlabs {
    /// Buffers of `elems` bf16 elements: two and a side stream when `overlap`, else one.
    pub(super) fn new(k: &CudaKernels, elems: usize, overlap: bool) -> Result<Self> {
        let s = k.stream();
        let bufs = (0..buffers(overlap))
            .map(|_| {
                // SAFETY: every slab is written by the dequantization before its GEMM reads it
                unsafe { s.alloc::<bf16>(elems) }.map_err(cuda("allocating the weight slabs"))
            })
            .collect::<Result<Vec<_>>>()?;
        let side = if overlap {
            let ctx = s.context();
            let event = || {
                ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
                    .map_err(cuda("creating the weight slabs' events"))
            };
            Some(Side {
                stream: ctx
                    .new_stream()
                    .map_err(cuda("creating the weight slabs' stream"))?,
                ready: [event()?, event()?],
                free: [event()?, event()?],
            })
        } else {
            None
        };
        Ok(WeightSlabs {
            bufs,
            side,
            next: 0,
        })
    }

    /// bf16 elements of one buffer.
    pub(super) fn elems(&self) -> usize {
        self.bufs[0].len()
    }

    /// Make the side stream's next work wait for everything queued on the main stream so far
    /// (a prompt's start: the weights' upload and every earlier use of the buffers).
    pub(super) fn join(&self, k: &CudaKernels) -> Result<()> {
        if let Some(side) = &self.side {
            side.stream
                .join(k.stream())
                .map_err(cuda("ordering the weight slabs' stream"))?;
        }
        Ok(())
    }

    /// For each slab of `slab` rows of `w` in order: dequantize it, then `gemm(r0, r1, slab)`
    /// on the main stream (the slab holds rows `r0..r1`, `K` elements each).
    pub(super) fn for_each(
        &mut self,
        k: &CudaKernels,
        w: &DeviceNvfp4,
        slab: usize,
        mut gemm: impl FnMut(usize, usize, &CudaSlice<bf16>) -> Result<()>,
    ) -> Result<()> {
        for r0 in (0..w.rows).step_by(slab.max(1)) {
            let r1 = (r0 + slab).min(w.rows);
            let b = self.next;
            let buf = &mut self.bufs[b];
            match &self.side {
                None => {
                    k.dequantize_bf16_rows_async(w, r0, r1, buf)?;
                    gemm(r0, r1, buf)?;
                }
                Some(side) => {
                    const ORDER: &str = "ordering the weight slabs";
                    side.stream.wait(&side.free[b]).map_err(cuda(ORDER))?;
                    k.dequantize_bf16_rows_on(&side.stream, w, r0, r1, buf)?;
                    side.ready[b].record(&side.stream).map_err(cuda(ORDER))?;
                    k.stream().wait(&side.ready[b]).map_err(cuda(ORDER))?;
                    gemm(r0, r1, buf)?;
                    side.free[b].record(k.stream()).map_err(cuda(ORDER))?;
                    self.next = 1 - b;
                }
            }
        }
        Ok(())
    }
}
