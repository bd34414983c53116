//! The persistent decode kernel (`decode_persistent.cu`, `kiln_decode_persistent_hd*_rep*`): a
//! decode step's embedding, every decoder layer and the final norm as one cooperative launch
//! whose blocks run the stages one after another, separated by grid barriers (a counter in
//! global memory) instead of kernel boundaries — ~10 launches a layer become none. It computes
//! the separate kernels' bits (GPU test `fused_decode_steps_equal_the_separate_kernels` in the
//! engine, passed on an H100 and an H200). Where it runs is the engine's choice;
//! [`CudaKernels::persistent_decode_fits`] says where it can. Measured it is slower than the
//! captured graph of separate kernels — Qwen2.5-0.5B shape 1,105 vs 819 µs a step on an H100,
//! 1,029 vs 767 µs on an H200 — so the engine does not run it by default (`DECODE_FUSION`); it
//! is a benchmark option (`kiln bench engine --device cuda --persistent-decode`), which also
//! traces a step ([`PersistentStep::trace`], [`stage_timings`]) and times grid barriers alone
//! ([`CudaKernels::grid_barrier_probe_us`]): a barrier costs ~1 µs, a stage 3–8 µs, the
//! critical path of the few blocks with a tile.

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig};

use super::context::CudaKernels;
use super::decode::{attention_kernel_for, DevAddr};
use super::driver::{drv, launch_cooperative, param};
use super::gemv::{cuda_core_ksplit, GemvKernel};
use super::gemv_fused::{FUSED_COMBINE_MAX_HEADS, FUSED_COMBINE_MAX_SPLITS};
use crate::KernelError;

/// The kernels built: (head_dim, most query heads per KV head), as the attention kernels
/// ([`attention_kernel_for`] picks the entry). Keep in step with `decode_persistent.cu`.
pub const PERSISTENT_KERNELS: &[(usize, usize)] = &[
    (32, 2),
    (32, 4),
    (32, 8),
    (64, 2),
    (64, 4),
    (64, 8),
    (128, 2),
    (128, 4),
    (128, 8),
];

/// u32 words of a step's barrier buffer ([`PersistentStep::barrier`]): the arrival counter
/// at word 0, kind 2's release flag at word 32 (its own 128-byte line).
pub const BARRIER_WORDS: usize = 64;

/// The stages a layer's grid barriers end, in order: without the combine folded into the o
/// stage, and with it.
const STAGES: [&str; 6] = ["q/k/v", "attention", "combine", "o", "gate/up", "down"];
const STAGES_FOLDED: [&str; 5] = ["q/k/v", "attention", "o + combine", "gate/up", "down"];

/// One stage of the persistent kernel as a traced step ran it (µs, the mean over layers).
#[derive(Debug, Clone, PartialEq)]
pub struct StageTiming {
    /// What the stage computes.
    pub stage: &'static str,
    /// From the first block leaving the barrier before it to the last block arriving at the
    /// barrier after it: the stage's critical path.
    pub span_us: f64,
    /// The same to the median block's arrival (most blocks of a small stage have no tile and
    /// arrive at once).
    pub median_block_us: f64,
    /// From the last block's arrival to the last block's release: the barrier itself.
    pub barrier_us: f64,
}

/// The stage timings of a trace the kernel wrote ([`PersistentStep::trace`]): header (blocks,
/// barriers), then per barrier and block the global timer (ns) at arrival and at release.
/// Barrier 0 ends the embedding; then each layer's six stages (q/k/v, attention, combine, o,
/// gate/up, down; five with the combine folded into o), the last barrier ending the last layer's down GEMV.
pub fn stage_timings(raw: &[u64], layers: usize) -> Result<Vec<StageTiming>, String> {
    let (nb, nbar) = (
        raw.first().copied().unwrap_or(0) as usize,
        raw.get(1).copied().unwrap_or(0) as usize,
    );
    if nb == 0 || layers == 0 || nbar < 2 || raw.len() < 8 + 2 * nb * nbar {
        return Err(format!(
            "the trace is empty or short ({nb} blocks, {nbar} barriers)"
        ));
    }
    let per = (nbar - 1) / layers;
    let names: &[&'static str] = match per {
        6 | 5 if per * layers != nbar - 1 => {
            return Err(format!("{nbar} barriers do not make {layers} whole layers"))
        }
        6 => &STAGES,
        5 => &STAGES_FOLDED,
        _ => {
            return Err(format!(
                "{nbar} barriers do not make {layers} layers of 5 or 6 stages"
            ))
        }
    };
    let at =
        |e: usize, b: usize, release: bool| raw[8 + 2 * (e * nb + b) + usize::from(release)] as f64;
    let mut sums = vec![(0.0f64, 0.0f64, 0.0f64); per];
    for e in 1..nbar {
        let start = (0..nb)
            .map(|b| at(e - 1, b, true))
            .fold(f64::INFINITY, f64::min);
        let mut arrivals: Vec<f64> = (0..nb).map(|b| at(e, b, false)).collect();
        arrivals.sort_by(f64::total_cmp);
        let last = arrivals[nb - 1];
        let released = (0..nb).map(|b| at(e, b, true)).fold(0.0, f64::max);
        let t = &mut sums[(e - 1) % per];
        t.0 += last - start;
        t.1 += arrivals[nb / 2] - start;
        t.2 += released - last;
    }
    let n = (nbar - 1) as f64 / per as f64;
    Ok(names
        .iter()
        .zip(sums)
        .map(|(stage, (span, median, barrier))| StageTiming {
            stage,
            span_us: span / n / 1e3,
            median_block_us: median / n / 1e3,
            barrier_us: barrier / n / 1e3,
        })
        .collect())
}

/// Threads per block (the CUDA-core GEMV tile's 8 warps).
const BLOCK: u32 = 256;

/// Most blocks per SM the launch asks for (the kernel's `__launch_bounds__(256, 2)`): more
/// blocks make each grid barrier slower, and a step's stages have few tiles each.
const MAX_BLOCKS_PER_SM: u32 = 2;

/// One decoder layer's device addresses (`KilnPLayer`; 0 where the model has none).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PersistentLayer {
    /// The input RMSNorm weight (f32).
    pub input_norm: DevAddr,
    /// The q/k/v matrix (rows concatenated, tensor scale 1): packed codes,
    pub qkv_packed: DevAddr,
    /// its block scales,
    pub qkv_scales: DevAddr,
    /// its tensor scale.
    pub qkv_tensor_scale: DevAddr,
    /// q, k and v tensor scales (three f32).
    pub qkv_part_scales: DevAddr,
    /// q, k, v biases concatenated (Qwen2), or 0.
    pub qkv_bias: DevAddr,
    /// Per-head q norm weight (Qwen3), or 0.
    pub q_norm: DevAddr,
    /// Per-head k norm weight (Qwen3), or 0.
    pub k_norm: DevAddr,
    /// The o matrix: packed codes,
    pub o_packed: DevAddr,
    /// block scales,
    pub o_scales: DevAddr,
    /// tensor scale.
    pub o_tensor_scale: DevAddr,
    /// The post-attention RMSNorm weight.
    pub post_norm: DevAddr,
    /// The gate/up matrix (rows concatenated, tensor scale 1): packed codes,
    pub gate_up_packed: DevAddr,
    /// block scales,
    pub gate_up_scales: DevAddr,
    /// tensor scale.
    pub gate_up_tensor_scale: DevAddr,
    /// gate and up tensor scales (two f32).
    pub gate_up_part_scales: DevAddr,
    /// The down matrix: packed codes,
    pub down_packed: DevAddr,
    /// block scales,
    pub down_scales: DevAddr,
    /// tensor scale.
    pub down_tensor_scale: DevAddr,
}

/// A model's shape as the persistent kernel needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistentShape {
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size.
    pub intermediate: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// The step's buffers and scalars besides the layers (`KilnPArgs` less the shape and K
/// splits). Activations are f32 of one token.
#[derive(Debug, Clone, Copy)]
pub struct PersistentStep {
    /// The device array of [`PersistentLayer`]s ([`CudaKernels::upload_persistent_layers`]).
    pub layers: DevAddr,
    /// The input token (one u32).
    pub token: DevAddr,
    /// Its position (one i32).
    pub pos: DevAddr,
    /// The embedding table, bf16 `[vocab, hidden]`.
    pub embed: DevAddr,
    /// The final RMSNorm weight.
    pub final_norm: DevAddr,
    /// `head_dim / 2` RoPE inverse frequencies.
    pub inv_freq: DevAddr,
    /// The residual stream (hidden).
    pub x: DevAddr,
    /// q/k/v GEMV output ((heads + 2·kv_heads)·head_dim).
    pub qkv: DevAddr,
    /// Attention output (heads·head_dim).
    pub attn: DevAddr,
    /// Gate/up GEMV output (2·intermediate).
    pub gate_up: DevAddr,
    /// SwiGLU output (intermediate).
    pub act: DevAddr,
    /// The final norm's output (hidden): the vocabulary GEMV's input.
    pub h: DevAddr,
    /// The attention splits' outputs `[heads][splits][head_dim]`.
    pub part_o: DevAddr,
    /// Their (max, sum) `[heads][splits][2]`.
    pub part_ml: DevAddr,
    /// Key cache, bf16 `[layers][kv_heads][capacity][head_dim]`.
    pub k_cache: DevAddr,
    /// Value cache, same layout.
    pub v_cache: DevAddr,
    /// [`BARRIER_WORDS`] u32 the launch zeroes first (the grid barrier's counter and flag).
    pub barrier: DevAddr,
    /// 0, or [`CudaKernels::persistent_trace_words`] u64 for the barriers' timestamps (see
    /// [`stage_timings`]).
    pub trace: DevAddr,
    /// Positions the caches hold.
    pub capacity: usize,
    /// Attention: positions per split.
    pub chunk: usize,
    /// Attention splits.
    pub splits: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
}

/// `KilnPArgs`: the order and types of the kernel's by-value parameter.
#[repr(C)]
struct KernelArgs {
    ptrs: [DevAddr; 18],
    n_layers: i32,
    hidden: i32,
    intermediate: i32,
    heads: i32,
    kv_heads: i32,
    cap: i32,
    chunk: i32,
    splits: i32,
    ks: [i32; 4],
    fold_combine: i32,
    prefetch: i32,
    barrier_kind: i32,
    eps: f32,
    softmax_scale: f32,
}

const _: () = assert!(std::mem::size_of::<KernelArgs>() == 216);

/// How the persistent kernel runs; [`PersistentOptions::default`] is what jobs run, a
/// benchmark may set `KILN_PERSISTENT` (e.g. `blocks=1,fold=0,prefetch=0`) to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistentOptions {
    /// Most blocks per SM (1 or 2; fewer if fewer fit).
    pub blocks_per_sm: u32,
    /// The o stage combines the attention's splits itself, up to
    /// [`super::gemv_fused::FUSED_COMBINE_MAX_SPLITS`] splits (one grid barrier a layer fewer).
    pub fold_combine: bool,
    /// Each layer asks the L2 for the next layer's weights.
    pub prefetch: bool,
    /// The grid barrier's implementation (`KilnGridBarrier` in the kernel): 0 fences and
    /// polls the counter, 1 release/acquire on the counter, 2 the last block to arrive
    /// releases a flag the others poll.
    pub barrier: u32,
}

impl Default for PersistentOptions {
    fn default() -> Self {
        // measured on an H100 (2026-12-05, Qwen2.5-0.5B shape): 1,105 µs a step without
        // the fold and the prefetch, 1,184 µs with both, 1,145 µs with one block per SM; the
        // barrier kind on an H200 the same day
        PersistentOptions {
            blocks_per_sm: MAX_BLOCKS_PER_SM,
            fold_combine: false,
            prefetch: false,
            // H200, 2026-12-05: one barrier alone 1.06 µs (kind 0: 1.19, kind 2: 1.47) with one
            // block per SM; the 0.5B step 1,028.6 µs (kind 0: 1,056.0, kind 2: 1,057.7)
            barrier: 1,
        }
    }
}

impl PersistentOptions {
    /// The defaults with `KILN_PERSISTENT`'s `key=value` pairs applied (unknown keys and
    /// values are ignored with a warning).
    pub fn from_env() -> Self {
        std::env::var("KILN_PERSISTENT").map_or_else(|_| Self::default(), |v| Self::parse(&v))
    }

    /// The defaults with the `key=value` pairs of `v` (comma-separated) applied.
    pub fn parse(v: &str) -> Self {
        let mut o = PersistentOptions::default();
        for kv in v.split(',').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("blocks", n)) if matches!(n, "1" | "2") => {
                    o.blocks_per_sm = n.parse().expect("1 or 2")
                }
                Some(("fold", b)) if matches!(b, "0" | "1") => o.fold_combine = b == "1",
                Some(("prefetch", b)) if matches!(b, "0" | "1") => o.prefetch = b == "1",
                Some(("barrier", k)) if matches!(k, "0" | "1" | "2") => {
                    o.barrier = k.parse().expect("0, 1 or 2")
                }
                _ => tracing::warn!(
                    "KILN_PERSISTENT: ignoring {kv:?} (blocks=1|2, fold=0|1, prefetch=0|1, \
                     barrier=0|1|2)"
                ),
            }
        }
        o
    }
}
const _: () = assert!(std::mem::size_of::<PersistentLayer>() == 152);

/// The loaded kernels, each with how many blocks of it fit on an SM.
pub(crate) struct PersistentFunctions {
    kernels: Vec<((usize, usize), CudaFunction)>,
    /// `kiln_grid_barrier_probe`: grid barriers alone.
    probe: CudaFunction,
    /// Dynamic shared memory the kernels may use.
    smem_bytes: usize,
}

impl PersistentFunctions {
    /// Load every kernel and let it use the device's opt-in shared memory less its static
    /// shared memory.
    pub(crate) fn load(
        func: &dyn Fn(&str, &str) -> Result<CudaFunction, KernelError>,
        smem_optin: usize,
    ) -> Result<Self, KernelError> {
        let mut kernels = Vec::new();
        let mut static_bytes = 0usize;
        for &(hd, rep) in PERSISTENT_KERNELS {
            let f = func(
                "decode_persistent.cu",
                &format!("kiln_decode_persistent_hd{hd}_rep{rep}"),
            )?;
            let s = f
                .get_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                )
                .map_err(drv("reading the persistent kernel's static shared memory"))?;
            static_bytes = static_bytes.max(s.max(0) as usize);
            kernels.push(((hd, rep), f));
        }
        // two blocks per SM: each may take half the SM's shared memory
        let smem_bytes = (smem_optin / MAX_BLOCKS_PER_SM as usize).saturating_sub(static_bytes);
        for (_, f) in &kernels {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes as i32,
            )
            .map_err(drv("raising the persistent kernel's shared-memory limit"))?;
        }
        let probe = func("decode_persistent.cu", "kiln_grid_barrier_probe")?;
        Ok(PersistentFunctions {
            kernels,
            probe,
            smem_bytes,
        })
    }
}

/// Dynamic shared memory of a step of `s`: x of the widest GEMV input (the o GEMV's with
/// the splits' weights when it combines `fold_splits` splits), or the attention stage's scaled
/// q/k/v rows and rotated queries.
fn smem_floats(s: &PersistentShape, rep_bound: usize, fold_splits: usize) -> usize {
    let q = s.heads * s.head_dim;
    s.hidden
        .max(q + s.heads * fold_splits)
        .max(s.intermediate)
        .max((2 * rep_bound + 2) * s.head_dim)
}

/// Whether the o stage combines `splits` splits itself (`o.fold_combine`, at most
/// [`FUSED_COMBINE_MAX_SPLITS`] and [`FUSED_COMBINE_MAX_HEADS`] heads).
fn folds(o: &PersistentOptions, s: &PersistentShape, splits: usize) -> bool {
    o.fold_combine && splits <= FUSED_COMBINE_MAX_SPLITS && s.heads <= FUSED_COMBINE_MAX_HEADS
}

impl CudaKernels {
    /// Why the persistent decode kernel did not load, if it did not.
    pub fn persistent_decode_load_error(&self) -> Option<&str> {
        self.f.persistent.as_ref().err().map(String::as_str)
    }

    /// The K splits of the q/k/v, o, gate/up and down GEMVs of `s` as the separate CUDA-core
    /// GEMVs run them (the same splits give the same bits).
    fn persistent_ksplits(&self, s: &PersistentShape) -> [usize; 4] {
        let (h, i, q) = (s.hidden, s.intermediate, s.heads * s.head_dim);
        let qkv = q + 2 * s.kv_heads * s.head_dim;
        let sm = self.sm_count as usize;
        [
            cuda_core_ksplit(qkv, h, 4, sm),
            cuda_core_ksplit(h, q, 4, sm),
            cuda_core_ksplit(2 * i, h, 4, sm),
            cuda_core_ksplit(h, i, 4, sm),
        ]
    }

    /// Whether the persistent kernel can run a decode step of `s`; the error says why not.
    /// It needs: the kernel loaded and built for the head dim and query group; every layer
    /// matrix in the CUDA-core GEMV's regime (the separate step's m = 1 default, whose bits
    /// it reproduces), K a multiple of 32; the gate/up K split at most 4 with the intermediate
    /// size a multiple of its paired tile; the widest x in shared memory.
    pub fn persistent_decode_fits(&self, s: &PersistentShape) -> Result<(), String> {
        let f = self
            .f
            .persistent
            .as_ref()
            .map_err(|e| format!("the persistent decode kernel did not load ({e})"))?;
        let rep = s.heads / s.kv_heads.max(1);
        let Some(key) =
            attention_kernel_for(s.head_dim, rep).filter(|k| PERSISTENT_KERNELS.contains(k))
        else {
            return Err(format!(
                "no persistent decode kernel for head_dim {} with {rep} query heads per KV head",
                s.head_dim
            ));
        };
        let (h, i, q) = (s.hidden, s.intermediate, s.heads * s.head_dim);
        let qkv = q + 2 * s.kv_heads * s.head_dim;
        for (n, k) in [(qkv, h), (h, q), (2 * i, h), (h, i)] {
            if self.default_gemv_kernel(1, n, k) != GemvKernel::CUDA_CORE || !k.is_multiple_of(32) {
                return Err(format!(
                    "the layer matrix [{n}, {k}] is not in the CUDA-core GEMV's regime (under 16 \
                     Mi weights, K a multiple of 32)"
                ));
            }
        }
        let ks_gu = self.persistent_ksplits(s)[2];
        let paired = 4 * (8 / ks_gu) / 2;
        if ks_gu > 4 || !i.is_multiple_of(paired) {
            return Err(format!(
                "the gate/up GEMV's tiles (K split {ks_gu}) cannot pair gate and up rows of \
                 intermediate size {i}"
            ));
        }
        let need = smem_floats(s, key.1, 0) * 4;
        if need > f.smem_bytes {
            return Err(format!(
                "x needs {need} bytes of shared memory, the kernel has {}",
                f.smem_bytes
            ));
        }
        Ok(())
    }

    /// Queue the zeroing of a grid barrier's [`BARRIER_WORDS`] u32 at `bar` (before each
    /// launch that waits on it).
    ///
    /// # Safety
    /// `bar` is a live buffer of [`BARRIER_WORDS`] u32.
    unsafe fn zero_barrier(&self, bar: DevAddr) -> Result<(), KernelError> {
        // SAFETY: the caller's contract.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                bar,
                0,
                BARRIER_WORDS * 4,
                self.stream.cu_stream(),
            )
        }
        .map_err(drv("zeroing a grid barrier"))
    }

    /// u64 words a trace of a step of `layers` layers needs ([`PersistentStep::trace`]).
    pub fn persistent_trace_words(&self, layers: usize) -> usize {
        8 + 2 * (6 * layers + 1) * (MAX_BLOCKS_PER_SM * self.sm_count) as usize
    }

    /// What one grid barrier of `kind` (as [`PersistentOptions::barrier`]) costs with
    /// `blocks_per_sm` blocks of 256 threads on every SM, in µs: the median of five
    /// cooperative launches of `n` barriers and nothing else (after one warm-up launch).
    pub fn grid_barrier_probe_us(
        &self,
        kind: u32,
        blocks_per_sm: u32,
        n: u32,
    ) -> Result<f64, KernelError> {
        let f = self.f.persistent.as_ref().map_err(|e| {
            KernelError::InvalidArgument(format!("the persistent decode kernel did not load ({e})"))
        })?;
        let bar = self
            .stream
            .alloc_zeros::<u32>(BARRIER_WORDS)
            .map_err(drv("allocating the barrier probe's counter"))?;
        let (bar_addr, no_trace, kind, n_i) = (self.addr(&bar, 0), 0u64, kind as i32, n as i32);
        let cfg = LaunchConfig {
            grid_dim: (blocks_per_sm * self.sm_count, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut times = Vec::new();
        for _ in 0..6 {
            let t = std::time::Instant::now();
            // SAFETY: the counter is BARRIER_WORDS live u32; the parameters match
            // kiln_grid_barrier_probe's (u32*, u64*, int, int).
            unsafe {
                self.zero_barrier(bar_addr)?;
                launch_cooperative(
                    &self.stream,
                    &f.probe,
                    cfg,
                    &mut [
                        param(&bar_addr),
                        param(&no_trace),
                        param(&kind),
                        param(&n_i),
                    ],
                )
                .map_err(drv("launching the barrier probe"))?;
            }
            self.synchronize()?;
            times.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(n));
        }
        let mut timed = times.split_off(1);
        timed.sort_by(f64::total_cmp);
        Ok(timed[timed.len() / 2])
    }

    /// Upload the layers' addresses for [`PersistentStep::layers`].
    pub fn upload_persistent_layers(
        &self,
        layers: &[PersistentLayer],
    ) -> Result<CudaSlice<u64>, KernelError> {
        let words: Vec<u64> = layers
            .iter()
            .flat_map(|l| {
                // SAFETY: PersistentLayer is repr(C) of 19 u64 fields and nothing else.
                let w: [u64; 19] = unsafe { std::mem::transmute(*l) };
                w
            })
            .collect();
        self.stream
            .clone_htod(&words)
            .map_err(drv("uploading the persistent kernel's layer table"))
    }

    /// Queue one decode step's embedding, layers and final norm (into `step.h`) for a model
    /// of shape `s` as the persistent kernel: the barrier counter zeroed, then one cooperative
    /// launch of as many blocks as fit on the device at once (at most two per SM).
    ///
    /// # Safety
    /// Every address of `step` is a live buffer of the size [`PersistentStep`] states for `s`,
    /// the layer table holds `s.layers` entries of live weights of this shape, and
    /// pos < capacity.
    pub unsafe fn persistent_decode_async(
        &self,
        s: &PersistentShape,
        step: &PersistentStep,
    ) -> Result<(), KernelError> {
        self.persistent_decode_fits(s)
            .map_err(KernelError::InvalidArgument)?;
        let f = self.f.persistent.as_ref().expect("checked by fits");
        let rep = s.heads / s.kv_heads;
        let key = attention_kernel_for(s.head_dim, rep).expect("checked by fits");
        let func = &f
            .kernels
            .iter()
            .find(|(k, _)| *k == key)
            .expect("checked by fits")
            .1;
        let opts = PersistentOptions::from_env();
        let mut fold = folds(&opts, s, step.splits);
        if smem_floats(s, key.1, step.splits) * 4 > f.smem_bytes {
            fold = false;
        }
        let smem = smem_floats(s, key.1, if fold { step.splits } else { 0 }) * 4;
        let per_sm = func
            .occupancy_max_active_blocks_per_multiprocessor(BLOCK, smem, None)
            .map_err(drv("reading the persistent kernel's occupancy"))?
            .min(opts.blocks_per_sm);
        if per_sm == 0 {
            return Err(KernelError::InvalidArgument(format!(
                "the persistent decode kernel does not fit on an SM with {smem} bytes of shared \
                 memory"
            )));
        }
        let ks = self.persistent_ksplits(s).map(|k| k as i32);
        let i32_of = |v: usize| v as i32;
        let args = KernelArgs {
            ptrs: [
                step.layers,
                step.token,
                step.pos,
                step.embed,
                step.final_norm,
                step.inv_freq,
                step.x,
                step.qkv,
                step.attn,
                step.gate_up,
                step.act,
                step.h,
                step.part_o,
                step.part_ml,
                step.k_cache,
                step.v_cache,
                step.barrier,
                step.trace,
            ],
            n_layers: i32_of(s.layers),
            hidden: i32_of(s.hidden),
            intermediate: i32_of(s.intermediate),
            heads: i32_of(s.heads),
            kv_heads: i32_of(s.kv_heads),
            cap: i32_of(step.capacity),
            chunk: i32_of(step.chunk),
            splits: i32_of(step.splits),
            ks,
            fold_combine: i32::from(fold),
            prefetch: i32::from(opts.prefetch),
            barrier_kind: opts.barrier as i32,
            eps: step.eps,
            softmax_scale: 1.0 / (s.head_dim as f32).sqrt(),
        };
        // SAFETY: BARRIER_WORDS u32 (the caller's contract).
        unsafe { self.zero_barrier(step.barrier)? };
        let cfg = LaunchConfig {
            grid_dim: (per_sm * self.sm_count, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the parameter is KilnPArgs by value; the caller's contract covers the rest.
        unsafe { launch_cooperative(&self.stream, func, cfg, &mut [param(&args)]) }
            .map_err(drv("launching the persistent decode kernel"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen05() -> PersistentShape {
        PersistentShape {
            layers: 24,
            hidden: 896,
            intermediate: 4864,
            heads: 14,
            kv_heads: 2,
            head_dim: 64,
        }
    }

    #[test]
    fn options_parse_known_keys_and_ignore_the_rest() {
        assert_eq!(PersistentOptions::parse(""), PersistentOptions::default());
        let o = PersistentOptions::parse("blocks=1,fold=1,prefetch=1,barrier=2");
        assert_eq!(
            o,
            PersistentOptions {
                blocks_per_sm: 1,
                fold_combine: true,
                prefetch: true,
                barrier: 2,
            }
        );
        assert_eq!(
            PersistentOptions::parse("blocks=9,nonsense,fold=x,barrier=3"),
            PersistentOptions::default()
        );
    }

    #[test]
    fn shared_memory_covers_the_widest_x_and_the_attention_rows() {
        let s = qwen05();
        // the down GEMV's x (intermediate) is the widest
        assert_eq!(smem_floats(&s, 8, 0), 4864);
        // the o GEMV's x with 32 splits' weights: 896 + 14·32 = 1344 < 4864
        assert_eq!(smem_floats(&s, 8, 32), 4864);
        let wide = PersistentShape {
            intermediate: 64,
            hidden: 64,
            ..s
        };
        assert_eq!(smem_floats(&wide, 8, 0), 18 * 64);
        assert_eq!(smem_floats(&wide, 8, 32), 896 + 14 * 32);
    }

    #[test]
    fn the_kernel_table_is_what_the_cu_file_instantiates() {
        let built: Vec<(usize, usize)> = crate::cuda::compile::macro_instances(
            include_str!("../../cuda/decode_persistent.cu"),
            "KILN_DECODE_PERSISTENT",
        )
        .into_iter()
        .map(|(v, _)| (v[0], v[1]))
        .collect();
        assert_eq!(built, PERSISTENT_KERNELS);
        // each is an attention kernel's configuration (the engine picks both by one key)
        for k in PERSISTENT_KERNELS {
            assert!(super::super::decode::ATTENTION_KERNELS.contains(k), "{k:?}");
        }
    }

    #[test]
    fn a_trace_becomes_stage_timings() {
        // 2 blocks, 1 layer of 6 stages: barrier e released by both blocks at 10e µs; block 0
        // arrives 1 µs after the previous release, block 1 (the stage's tile) after 3e µs
        let (nb, nbar) = (2usize, 7usize);
        let mut raw = vec![0u64; 8 + 2 * nb * nbar];
        raw[0] = nb as u64;
        raw[1] = nbar as u64;
        for e in 0..nbar {
            let rel = 10_000 * e as u64;
            let prev = 10_000 * e.saturating_sub(1) as u64;
            for (b, arrive) in [(0, prev + 1_000), (1, prev + 3_000 * e as u64)] {
                raw[8 + 2 * (e * nb + b)] = arrive;
                raw[8 + 2 * (e * nb + b) + 1] = rel;
            }
        }
        let t = stage_timings(&raw, 1).unwrap();
        assert_eq!(t.len(), 6);
        assert_eq!(t[1].stage, "attention");
        // barrier 2 (ends attention): last arrival 6 µs after barrier 1's release at 10
        assert!((t[1].span_us - 6.0).abs() < 1e-9);
        // the median of two blocks is the upper one
        assert!((t[1].median_block_us - 6.0).abs() < 1e-9);
        assert!((t[1].barrier_us - 4.0).abs() < 1e-9);
        assert!(stage_timings(&raw, 2).is_err());
        assert!(stage_timings(&raw[..20], 1).is_err());
        // 14 barriers: 2 layers of 6 and one too many
        let mut odd = vec![0u64; 8 + 2 * nb * 14];
        odd[0] = nb as u64;
        odd[1] = 14;
        assert!(stage_timings(&odd, 2).unwrap_err().contains("whole layers"));
    }

    #[test]
    fn the_o_stage_combines_only_few_splits() {
        let s = qwen05();
        let o = PersistentOptions::parse("fold=1");
        assert!(folds(&o, &s, 12));
        assert!(folds(&o, &s, FUSED_COMBINE_MAX_SPLITS));
        assert!(!folds(&o, &s, FUSED_COMBINE_MAX_SPLITS + 1));
        let off = PersistentOptions {
            fold_combine: false,
            ..o
        };
        assert!(!folds(&off, &s, 12));
    }
}
