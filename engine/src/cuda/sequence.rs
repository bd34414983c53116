//! [`CudaSequence`]: one sequence on the GPU — its bf16 KV cache (preallocated for a capacity),
//! the decode step's buffers and device scalars (position, token), the step captured once as
//! a CUDA graph and replayed per token, and the batched prompt path (prefill).
//!
//! The decode step, per layer: residual add + RMSNorm → q/k/v GEMV (one launch over the
//! concatenated rows) → epilogue (tensor scales, bias, q/k norm, RoPE, KV append) → attention
//! split over the context + combine → O GEMV → residual add + RMSNorm → gate/up GEMV (one
//! launch) → SwiGLU → down GEMV; then the final norm, the vocabulary GEMV and the greedy pick,
//! which writes the next input token and advances the position in device memory. Only the
//! token id crosses to the host (the logits only when a caller asks for them); a sequence can
//! sample on the GPU instead of picking greedily ([`CudaSequence::set_sampling`]).
//!
//! With the fused decode GEMVs ([`CudaSequence::set_decode_fusion`]) a layer is six launches
//! instead of ten: the norms are folded into the q/k/v and gate/up GEMVs' x load, the
//! attention's combine into the o GEMV's (up to 32 splits; past that the combine stays a launch
//! of its own) and SwiGLU into the down GEMV's, and those two
//! add their output to the residual stream as they store it — the same bits as the separate
//! kernels. The kernels a forward queues are in `forward`; this module holds the sequence's
//! state and the step's graph.
//!
//! Prefill runs the same kernels over T rows: short prompts (`plan::prompt_takes_gemvs`: 8 or
//! 16 tokens by the model's size, 64 until the process has run the GEMMs once) 8 rows at a
//! time through the GEMVs and the split attention; longer ones in batches of up to `PREFILL_ROWS` through bf16 tensor-core GEMMs (W dequantized
//! slab by slab) and the flash prefill attention (two cuBLAS GEMMs around a causal softmax for
//! head dims it is not built for).

use std::sync::Arc;

use cudarc::driver::{sys, CudaGraph, CudaSlice};
use half::bf16;
use kiln_kernels::cuda::decode::{DeviceSampling, ARGMAX_BLOCKS, FLASH_PREFILL_HEAD_DIMS};
use kiln_kernels::cuda::decode_persistent::{
    stage_timings, PersistentLayer, PersistentStep, StageTiming, BARRIER_WORDS,
};
use kiln_kernels::cuda::gemv::GEMV_MAX_ROWS;
use kiln_kernels::cuda::CudaKernels;

use super::cuda;
use super::forward::{
    class, decode_fusion_fits, fused_combine, gemm_path_warm, layers, persistent_shape, pick, Acts,
    DecodeFusion, Scalars, DECODE_FUSION,
};
use super::plan::{
    decode_chunk, forward_splits, kv_bytes, prefill_scratch_elems, prompt_takes_gemvs,
    widest_input, PREFILL_ROWS,
};
use super::slabs::PREFILL_OVERLAP;
use super::weights::CudaModel;
use crate::engine::HostTensor;
use crate::error::{EngineError, Result};
use crate::model::ModelConfig;

/// A captured decode step. The graph holds raw pointers into the sequence's buffers and the
/// model's weights, which outlive it (it is dropped first, and re-captured when they change).
struct StepGraph {
    graph: CudaGraph,
    /// The model the graph was captured with (its address).
    model: usize,
}

// SAFETY: the graph is used only by the thread that owns the sequence at a time (the
// sequence is moved between threads, never shared); CUDA graph handles may be used from any
// thread when access is serialised.
unsafe impl Send for StepGraph {}

/// One sequence on the GPU: KV cache, decode buffers, device scalars and the step graph.
pub struct CudaSequence {
    k: Arc<CudaKernels>,
    cfg: ModelConfig,
    cap: usize,
    len: usize,
    /// Keys, bf16 `[layers][kv_heads][cap][head_dim]`.
    kc: CudaSlice<bf16>,
    /// Values, same layout.
    vc: CudaSlice<bf16>,
    /// The position of the next forward's first token (device copy of `len` during decode).
    pos: CudaSlice<i32>,
    /// The decode step's input token; the greedy pick writes the next one.
    token: CudaSlice<u32>,
    /// What `token` holds, as far as the host knows.
    device_token: Option<u32>,
    /// What `pos` holds, as far as the host knows.
    device_pos: Option<usize>,
    counter: CudaSlice<u32>,
    part_val: CudaSlice<f32>,
    part_idx: CudaSlice<i32>,
    logits: CudaSlice<f32>,
    dec: Acts,
    /// Decode attention: positions per split and splits.
    chunk: usize,
    splits: usize,
    graph: Option<StepGraph>,
    use_graph: bool,
    prefill: Option<Acts>,
    /// Kernel classes the prompt path queues ([`class`]; all but in benchmarks).
    prefill_mask: u8,
    /// bf16 elements of the prompt GEMMs' dequantized-weight scratch (the plan's
    /// [`prefill_scratch_elems`] but in benchmarks).
    prefill_scratch: usize,
    /// Whether the prompt GEMMs' weight dequantization overlaps them ([`PREFILL_OVERLAP`] but
    /// in benchmarks).
    prefill_overlap: bool,
    /// Prompts of at most this many tokens go 8 rows at a time through the GEMVs: a fixed
    /// bound set by a benchmark; `None`: the jobs' rule ([`prompt_takes_gemvs`]).
    short_prompt: Option<usize>,
    /// Sampling on the GPU instead of the greedy pick (`None`: greedy).
    sampling: Option<DeviceSampling>,
    /// The sampler's step counter (its noise stream), advanced by every sampled pick.
    step: CudaSlice<u32>,
    /// Which kernels of a decode step run fused ([`CudaSequence::set_decode_fusion`]).
    fusion: DecodeFusion,
    /// The persistent kernel's layer table for the model at this address.
    persistent_layers: Option<(usize, CudaSlice<u64>)>,
    /// The persistent kernel's grid-barrier counter and flag.
    barrier: CudaSlice<u32>,
    /// While [`CudaSequence::trace_persistent_step`] runs: the barriers' timestamps.
    trace: Option<CudaSlice<u64>>,
}

impl std::fmt::Debug for CudaSequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaSequence")
            .field("len", &self.len)
            .field("capacity", &self.cap)
            .field("graph", &self.graph.is_some())
            .finish()
    }
}

impl CudaSequence {
    /// An empty sequence of `capacity` positions for a model of shape `cfg` on `k`.
    pub fn new(k: Arc<CudaKernels>, cfg: &ModelConfig, capacity: usize) -> Result<Self> {
        let capacity = capacity.clamp(1, cfg.max_position_embeddings);
        let s = k.stream().clone();
        let kv_elems = cfg.num_hidden_layers * cfg.kv_size() * capacity;
        let (chunk, splits) = decode_chunk(capacity, cfg.num_key_value_heads, k.sm_count());
        let dec = Acts::new(&k, cfg, (1, splits), (0, false))?;
        let seq = CudaSequence {
            kc: s
                .alloc_zeros::<bf16>(kv_elems)
                .map_err(cuda("allocating the KV cache"))?,
            vc: s
                .alloc_zeros::<bf16>(kv_elems)
                .map_err(cuda("allocating the KV cache"))?,
            pos: s
                .alloc_zeros::<i32>(1)
                .map_err(cuda("allocating scalars"))?,
            token: s
                .alloc_zeros::<u32>(1)
                .map_err(cuda("allocating scalars"))?,
            device_token: Some(0),
            device_pos: Some(0),
            counter: s
                .alloc_zeros::<u32>(1)
                .map_err(cuda("allocating scalars"))?,
            part_val: s
                .alloc_zeros::<f32>(ARGMAX_BLOCKS)
                .map_err(cuda("allocating scalars"))?,
            part_idx: s
                .alloc_zeros::<i32>(ARGMAX_BLOCKS)
                .map_err(cuda("allocating scalars"))?,
            logits: s
                .alloc_zeros::<f32>(cfg.vocab_size)
                .map_err(cuda("allocating logits"))?,
            dec,
            chunk,
            splits,
            graph: None,
            use_graph: std::env::var_os("KILN_NO_CUDA_GRAPH").is_none(),
            prefill: None,
            prefill_mask: class::ALL,
            prefill_scratch: prefill_scratch_elems(cfg),
            prefill_overlap: PREFILL_OVERLAP,
            short_prompt: None,
            sampling: None,
            step: s
                .alloc_zeros::<u32>(1)
                .map_err(cuda("allocating scalars"))?,
            fusion: if decode_fusion_fits(&k, cfg, DECODE_FUSION).is_ok() {
                DECODE_FUSION
            } else {
                DecodeFusion::Off
            },
            persistent_layers: None,
            barrier: s
                .alloc_zeros::<u32>(BARRIER_WORDS)
                .map_err(cuda("allocating scalars"))?,
            trace: None,
            k,
            cfg: cfg.clone(),
            cap: capacity,
            len: 0,
        };
        Ok(seq)
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Layers of the model.
    pub fn num_layers(&self) -> usize {
        self.cfg.num_hidden_layers
    }

    /// Positions the cache can hold without growing.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Bytes of keys and values held (`len` positions).
    pub fn used_kv_bytes(&self) -> u64 {
        kv_bytes(&self.cfg, self.len)
    }

    /// Replay the captured step (default) or launch the kernels one by one (`false`, or
    /// `KILN_NO_CUDA_GRAPH` set): the tests compare the two.
    pub fn set_use_graph(&mut self, on: bool) {
        self.use_graph = on;
    }

    /// Run decode steps with the fused GEMVs or the persistent kernel (see [`DecodeFusion`]) or
    /// the separate kernels (the step graph is re-captured at the next step). Every form gives
    /// the same bits; the fused step launches three or four kernels fewer per layer, the
    /// persistent one none. Errors when the form's kernels did not load or the model's shapes
    /// cannot run it ([`decode_fusion_fits`]).
    pub fn set_decode_fusion(&mut self, fusion: DecodeFusion) -> Result<()> {
        decode_fusion_fits(&self.k, &self.cfg, fusion)?;
        if fusion != self.fusion {
            self.fusion = fusion;
            self.graph = None;
        }
        Ok(())
    }

    /// Which kernels decode steps fuse.
    pub fn decode_fusion(&self) -> DecodeFusion {
        self.fusion
    }

    /// Make room for `positions` positions (copying what is held; the step graph is
    /// re-captured at the next step).
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        if positions <= self.cap {
            return Ok(());
        }
        let max = self.cfg.max_position_embeddings;
        let want = positions.max(self.cap * 2).min(max).max(positions);
        let held = self.to_host()?;
        let mut grown = CudaSequence::new(self.k.clone(), &self.cfg, want)?;
        grown.use_graph = self.use_graph;
        grown.prefill_mask = self.prefill_mask;
        grown.sampling = self.sampling;
        grown.fusion = self.fusion;
        // the sampler's noise stream goes on where it was
        let mut st = [0u32];
        self.k
            .stream()
            .memcpy_dtoh(&self.step, &mut st)
            .map_err(cuda("reading the sampler step"))?;
        self.k
            .stream()
            .memcpy_htod(&st, &mut grown.step)
            .map_err(cuda("writing the sampler step"))?;
        grown.load_host(held, self.len)?;
        *self = grown;
        Ok(())
    }

    /// Forward `ids` (appending their keys and values) and leave the last position's logits
    /// on the device; returns the greedy pick of those logits when `read_token`.
    pub fn forward(&mut self, m: &CudaModel, ids: &[u32], read_token: bool) -> Result<Option<u32>> {
        if ids.is_empty() {
            return Err(EngineError::InvalidArgument(
                "forward of zero tokens".into(),
            ));
        }
        let need = self.len + ids.len();
        if need > self.cfg.max_position_embeddings {
            return Err(EngineError::PromptTooLong {
                tokens: need,
                max_context: self.cfg.max_position_embeddings,
                reserve: 0,
            });
        }
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
            return Err(EngineError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        self.reserve(need)?;
        if ids.len() == 1 {
            self.step(m, ids[0])?;
        } else {
            // short prompts (a chat turn's delta) go 8 rows at a time through the GEMVs: no
            // GEMM set-up, weights read once per 8 tokens; longer ones through the GEMMs
            let gemvs = match self.short_prompt {
                Some(most) => ids.len() <= most,
                None => prompt_takes_gemvs(&self.cfg, ids.len(), gemm_path_warm()),
            };
            let batch = if gemvs { GEMV_MAX_ROWS } else { PREFILL_ROWS };
            for part in ids.chunks(batch) {
                self.prefill_rows(m, part)?;
            }
        }
        if read_token {
            let mut t = [0u32];
            self.k
                .stream()
                .memcpy_dtoh(&self.token, &mut t)
                .map_err(cuda("reading the picked token"))?;
            self.device_token = Some(t[0]);
            Ok(Some(t[0]))
        } else {
            self.device_token = None;
            Ok(None)
        }
    }

    /// The last forward's logits, on the host.
    pub fn logits(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.cfg.vocab_size];
        self.k
            .stream()
            .memcpy_dtoh(&self.logits, &mut out)
            .map_err(cuda("reading logits"))?;
        Ok(out)
    }

    /// One decode step of `tok` at position `len`.
    fn step(&mut self, m: &CudaModel, tok: u32) -> Result<()> {
        let s = self.k.stream().clone();
        if self.device_token != Some(tok) {
            s.memcpy_htod(&[tok], &mut self.token)
                .map_err(cuda("writing the input token"))?;
        }
        if self.device_pos != Some(self.len) {
            s.memcpy_htod(&[self.len as i32], &mut self.pos)
                .map_err(cuda("writing the position"))?;
        }
        self.ensure_persistent_layers(m)?;
        let key = m as *const CudaModel as usize;
        if self.use_graph {
            if self.graph.as_ref().map(|g| g.model) != Some(key) {
                self.graph = None;
                self.graph = Some(StepGraph {
                    graph: self.capture(m)?,
                    model: key,
                });
            }
            let g = self.graph.as_ref().expect("captured above");
            g.graph
                .launch()
                .map_err(cuda("launching the decode graph"))?;
        } else {
            self.enqueue_step(m)?;
        }
        // the pick advanced the position
        self.device_pos = Some(self.len + 1);
        self.len += 1;
        Ok(())
    }

    /// Capture the decode step as a graph (the stream is restored on failure).
    fn capture(&mut self, m: &CudaModel) -> Result<CudaGraph> {
        self.capture_classes(m, class::ALL)
    }

    /// Pick tokens by sampling on the GPU with `s` (temperature, top-k, top-p, seed), or
    /// greedily (`None`). The captured step is re-captured when this changes.
    pub fn set_sampling(&mut self, s: Option<DeviceSampling>) {
        if self.sampling != s {
            self.sampling = s;
            self.graph = None;
        }
    }

    /// Queue only the kernel classes of `mask` ([`class`]) in the prompt path: a benchmark's
    /// way to time a prompt's linears, attention and small kernels apart (the outputs are
    /// then meaningless). The vocabulary projection and pick of the last row always run.
    pub fn set_prefill_classes(&mut self, mask: u8) {
        self.prefill_mask = mask;
    }

    /// Dequantize the prompt GEMMs' weights in slabs of at most `elems` bf16 elements (at
    /// least one row of the widest matrix is kept): a benchmark's way to compare slab sizes —
    /// a slab small enough to stay in L2 between its dequantization and its GEMM saves the
    /// DRAM round trip. Jobs use the plan's [`prefill_scratch_elems`].
    pub fn set_prefill_scratch_elems(&mut self, elems: usize) {
        let elems = elems.max(widest_input(&self.cfg));
        if elems != self.prefill_scratch {
            self.prefill_scratch = elems;
            self.prefill = None;
        }
    }

    /// Dequantize the prompt GEMMs' next weight slab on a side stream while the GEMM reads
    /// the last (`true`, two slab buffers) or one after the other (`false`, one buffer): a
    /// benchmark's way to time both. Jobs use [`PREFILL_OVERLAP`].
    pub fn set_prefill_overlap(&mut self, on: bool) {
        if on != self.prefill_overlap {
            self.prefill_overlap = on;
            self.prefill = None;
        }
    }

    /// Send prompts of at most `tokens` tokens 8 rows at a time through the GEMVs, longer ones
    /// through the GEMMs (0: every prompt through the GEMMs): a benchmark's way to time both
    /// paths at one length. Jobs use [`prompt_takes_gemvs`] (the plan sizes their buffers for it).
    pub fn set_short_prompt(&mut self, tokens: usize) {
        self.short_prompt = Some(tokens);
    }

    /// Forget every position from `len` on (a benchmark runs several prompts on one
    /// sequence; the bytes stay until overwritten).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Time the decode step at the current length: the whole captured step and graphs of each
    /// kernel class alone ([`class`]), replayed `reps` times each (after a warm-up); µs per
    /// replay. The whole step advances the position `reps` times (then it is put back), so
    /// the capacity must hold `len + reps + 1` positions.
    pub fn time_step_classes(&mut self, m: &CudaModel, reps: usize) -> Result<Vec<(u8, f64)>> {
        let need = self.len + reps + 2;
        self.reserve(need)?;
        let s = self.k.stream().clone();
        let mut out = Vec::new();
        for mask in [
            class::ALL,
            class::GEMV,
            class::ATTENTION,
            class::SMALL,
            class::PICK,
        ] {
            let g = self.capture_classes(m, mask)?;
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                s.memcpy_htod(&[self.len as i32], &mut self.pos)
                    .map_err(cuda("writing the position"))?;
                g.launch().map_err(cuda("launching a timing graph"))?;
                self.k.synchronize()?;
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    g.launch().map_err(cuda("launching a timing graph"))?;
                }
                self.k.synchronize()?;
                best = best.min(t.elapsed().as_secs_f64() * 1e6 / reps as f64);
            }
            out.push((mask, best));
        }
        s.memcpy_htod(&[self.len as i32], &mut self.pos)
            .map_err(cuda("writing the position"))?;
        self.device_pos = Some(self.len);
        self.device_token = None;
        Ok(out)
    }

    /// Where the persistent kernel's time goes: one decode step at the current position (as
    /// [`CudaSequence::time_step_classes`] replays it, nothing advances) run once with the
    /// kernel writing a timestamp at every grid barrier, as the mean per stage over layers.
    /// Only with the persistent kernel set ([`CudaSequence::set_decode_fusion`]).
    pub fn trace_persistent_step(&mut self, m: &CudaModel) -> Result<Vec<StageTiming>> {
        if self.fusion != DecodeFusion::Persistent {
            return Err(EngineError::InvalidArgument(
                "tracing a decode step needs the persistent kernel".into(),
            ));
        }
        self.reserve(self.len + 2)?;
        self.ensure_persistent_layers(m)?;
        let s = self.k.stream().clone();
        let words = self.k.persistent_trace_words(self.cfg.num_hidden_layers);
        self.trace = Some(
            s.alloc_zeros::<u64>(words)
                .map_err(cuda("allocating the step's trace"))?,
        );
        s.memcpy_htod(&[self.len as i32], &mut self.pos)
            .map_err(cuda("writing the position"))?;
        let ran = self.enqueue_step_classes(m, class::ALL);
        let trace = self.trace.take().expect("set above");
        ran?;
        self.k.synchronize()?;
        self.device_pos = Some(self.len);
        self.device_token = None;
        let raw = s
            .clone_dtoh(&trace)
            .map_err(cuda("reading the step's trace"))?;
        stage_timings(&raw, self.cfg.num_hidden_layers).map_err(EngineError::InvalidArgument)
    }

    /// Capture the decode step's kernels of `mask` as a graph.
    fn capture_classes(&mut self, m: &CudaModel, mask: u8) -> Result<CudaGraph> {
        self.ensure_persistent_layers(m)?;
        let s = self.k.stream().clone();
        s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda("starting the decode graph capture"))?;
        let queued = self.enqueue_step_classes(m, mask);
        let ended = s.end_capture(sys::CUgraphInstantiate_flags(0));
        queued?;
        let graph = ended
            .map_err(cuda("capturing the decode graph"))?
            .ok_or_else(|| {
                EngineError::InvalidArgument("the decode graph capture was empty".into())
            })?;
        graph.upload().map_err(cuda("uploading the decode graph"))?;
        Ok(graph)
    }

    /// The addresses the step's kernels take besides the activations.
    fn scalars(&self) -> Scalars {
        let k = &*self.k;
        Scalars {
            pos: k.addr(&self.pos, 0),
            token: k.addr(&self.token, 0),
            counter: k.addr(&self.counter, 0),
            part_val: k.addr(&self.part_val, 0),
            part_idx: k.addr(&self.part_idx, 0),
            logits: k.addr(&self.logits, 0),
            kc: k.addr(&self.kc, 0),
            vc: k.addr(&self.vc, 0),
            cap: self.cap,
            chunk: self.chunk,
            splits: self.splits,
            mask: class::ALL,
            fused: false,
            fused_combine: false,
            fused_swiglu: false,
            keys: self.len + 1,
            scores: 0,
            probs: 0,
            sampling: self.sampling,
            step: k.addr(&self.step, 0),
        }
    }

    /// Queue one decode step (T = 1, the position read from `pos`; the pick writes the next
    /// token and advances `pos`).
    fn enqueue_step(&mut self, m: &CudaModel) -> Result<()> {
        self.enqueue_step_classes(m, class::ALL)
    }

    /// [`CudaSequence::enqueue_step`] with only the kernel classes in `mask`.
    fn enqueue_step_classes(&mut self, m: &CudaModel, mask: u8) -> Result<()> {
        if self.fusion == DecodeFusion::Persistent {
            return self.enqueue_persistent_step(m, mask);
        }
        let sc = Scalars {
            mask,
            fused: self.fusion.fused_gemvs(),
            fused_combine: self.fusion.fused_gemvs()
                && fused_combine(&self.k, &self.cfg, self.splits),
            fused_swiglu: self.fusion == DecodeFusion::All,
            ..self.scalars()
        };
        let (small, gemv) = (mask & class::SMALL != 0, mask & class::GEMV != 0);
        let k = self.k.clone();
        let cfg = &self.cfg;
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps as f32);
        let d = &mut self.dec;
        // SAFETY: every address is a live buffer of this sequence or of `m`, sized for one
        // token of `cfg` (Acts::new, CudaModel), and pos < capacity (checked by forward).
        unsafe {
            if small {
                k.embed_async(sc.token, k.addr(&m.embed, 0), k.addr(&d.x, 0), 1, h)?;
            }
            layers(&k, cfg, &sc, m, d, 1)?;
            if small {
                // (the fused layers leave the last MLP output added to x already)
                let resid = if sc.fused { 0 } else { k.addr(&d.tmp, 0) };
                k.add_rmsnorm_async(
                    k.addr(&d.x, 0),
                    resid,
                    k.addr(&m.norm, 0),
                    k.addr(&d.h, 0),
                    1,
                    h,
                    eps,
                    false,
                )?;
            }
            if gemv {
                k.gemv_chained_async(&d.h, 1, &m.lm_head, &mut self.logits)?;
            }
            if mask & class::PICK != 0 {
                pick(&k, cfg, &sc, true)?;
            }
        }
        Ok(())
    }

    /// Upload the persistent kernel's layer table of `m` unless held (outside a capture: it
    /// copies from the host).
    fn ensure_persistent_layers(&mut self, m: &CudaModel) -> Result<()> {
        let key = m as *const CudaModel as usize;
        if self.fusion != DecodeFusion::Persistent
            || self.persistent_layers.as_ref().map(|l| l.0) == Some(key)
        {
            return Ok(());
        }
        let k = &*self.k;
        let opt = |b: &Option<CudaSlice<f32>>| b.as_ref().map_or(0, |b| k.addr(b, 0));
        let table: Vec<PersistentLayer> = m
            .layers
            .iter()
            .map(|l| {
                let (qn, kn) = l
                    .qk_norm
                    .as_ref()
                    .map_or((0, 0), |(q, kk)| (k.addr(q, 0), k.addr(kk, 0)));
                PersistentLayer {
                    input_norm: k.addr(&l.input_norm, 0),
                    qkv_packed: k.addr(&l.qkv.packed, 0),
                    qkv_scales: k.addr(&l.qkv.scales, 0),
                    qkv_tensor_scale: k.addr(&l.qkv.tensor_scale, 0),
                    qkv_part_scales: k.addr(&l.qkv_scale, 0),
                    qkv_bias: opt(&l.qkv_bias),
                    q_norm: qn,
                    k_norm: kn,
                    o_packed: k.addr(&l.o.packed, 0),
                    o_scales: k.addr(&l.o.scales, 0),
                    o_tensor_scale: k.addr(&l.o.tensor_scale, 0),
                    post_norm: k.addr(&l.post_norm, 0),
                    gate_up_packed: k.addr(&l.gate_up.packed, 0),
                    gate_up_scales: k.addr(&l.gate_up.scales, 0),
                    gate_up_tensor_scale: k.addr(&l.gate_up.tensor_scale, 0),
                    gate_up_part_scales: k.addr(&l.gate_up_scale, 0),
                    down_packed: k.addr(&l.down.packed, 0),
                    down_scales: k.addr(&l.down.scales, 0),
                    down_tensor_scale: k.addr(&l.down.tensor_scale, 0),
                }
            })
            .collect();
        let dev = k.upload_persistent_layers(&table)?;
        self.persistent_layers = Some((key, dev));
        Ok(())
    }

    /// [`CudaSequence::enqueue_step_classes`] for the persistent kernel: it runs for any
    /// class of the layers (it cannot be split), the vocabulary GEMV with [`class::GEMV`], the
    /// pick with [`class::PICK`].
    fn enqueue_persistent_step(&mut self, m: &CudaModel, mask: u8) -> Result<()> {
        let k = self.k.clone();
        let layers = match &self.persistent_layers {
            Some((key, t)) if *key == m as *const CudaModel as usize => k.addr(t, 0),
            _ => {
                return Err(EngineError::InvalidArgument(
                    "the persistent kernel's layer table was not uploaded for this model".into(),
                ))
            }
        };
        let sc = self.scalars();
        let d = &mut self.dec;
        let step = PersistentStep {
            layers,
            token: sc.token,
            pos: sc.pos,
            embed: k.addr(&m.embed, 0),
            final_norm: k.addr(&m.norm, 0),
            inv_freq: k.addr(&m.inv_freq, 0),
            x: k.addr(&d.x, 0),
            qkv: k.addr(&d.qkv, 0),
            attn: k.addr(&d.attn, 0),
            gate_up: k.addr(&d.gu, 0),
            act: k.addr(&d.act, 0),
            h: k.addr(&d.h, 0),
            part_o: k.addr(&d.part_o, 0),
            part_ml: k.addr(&d.part_ml, 0),
            k_cache: sc.kc,
            v_cache: sc.vc,
            barrier: k.addr(&self.barrier, 0),
            trace: self.trace.as_ref().map_or(0, |t| k.addr(t, 0)),
            capacity: sc.cap,
            chunk: sc.chunk,
            splits: sc.splits,
            eps: self.cfg.rms_norm_eps as f32,
        };
        // SAFETY: every address is a live buffer of this sequence or of `m` sized for one
        // token of its shape (Acts::new, CudaModel), the table holds m's layers, and pos <
        // capacity (checked by forward).
        unsafe {
            if mask & (class::GEMV | class::ATTENTION | class::SMALL) != 0 {
                k.persistent_decode_async(&persistent_shape(&self.cfg), &step)?;
            }
            if mask & class::GEMV != 0 {
                k.gemv_chained_async(&d.h, 1, &m.lm_head, &mut self.logits)?;
            }
            if mask & class::PICK != 0 {
                pick(&k, &self.cfg, &sc, true)?;
            }
        }
        Ok(())
    }

    /// Forward up to [`PREFILL_ROWS`] tokens as one batch.
    fn prefill_rows(&mut self, m: &CudaModel, ids: &[u32]) -> Result<()> {
        let rows = ids.len();
        if self.prefill.as_ref().map(|p| p.rows) != Some(rows) {
            self.prefill = None;
            let splits = forward_splits(rows, self.splits);
            let acts = Acts::new(
                &self.k,
                &self.cfg,
                (rows, splits),
                (self.prefill_scratch, self.prefill_overlap),
            )?;
            self.prefill = Some(acts);
        }
        let mut acts = self.prefill.take().expect("allocated above");
        let r = self.prefill_with(m, ids, &mut acts);
        self.prefill = Some(acts);
        r?;
        self.len += rows;
        Ok(())
    }

    fn prefill_with(&mut self, m: &CudaModel, ids: &[u32], acts: &mut Acts) -> Result<()> {
        let rows = ids.len();
        let k = self.k.clone();
        let s = k.stream().clone();
        s.memcpy_htod(&[self.len as i32], &mut self.pos)
            .map_err(cuda("writing the position"))?;
        // the prompt path's pick does not advance it
        self.device_pos = Some(self.len);
        let ids_dev = s.clone_htod(ids).map_err(cuda("uploading token ids"))?;
        if let Some(bf) = &acts.bf {
            // the weight slabs' side stream starts after everything queued so far
            bf.w.join(&k)?;
        }
        // prefill attention: over 8 rows, the flash kernel, or (head dims it is not built
        // for) two GEMMs around a softmax, through scores and probabilities of
        // [kv_heads][rows][keys]; else one split per query
        let keys = self.len + rows;
        let score_elems = self.cfg.num_key_value_heads * rows * keys;
        let flash = FLASH_PREFILL_HEAD_DIMS.contains(&self.cfg.head_dim);
        let (scores, probs) = if rows > GEMV_MAX_ROWS && !flash {
            // SAFETY: written by the GEMM before they are read
            unsafe {
                (
                    Some(
                        s.alloc::<f32>(score_elems)
                            .map_err(cuda("allocating attention scores"))?,
                    ),
                    Some(
                        s.alloc::<bf16>(score_elems)
                            .map_err(cuda("allocating attention scores"))?,
                    ),
                )
            }
        } else {
            (None, None)
        };
        let (chunk, splits) = if rows > GEMV_MAX_ROWS {
            (self.cap, 1)
        } else {
            (self.chunk, self.splits)
        };
        let sc = Scalars {
            mask: self.prefill_mask,
            chunk,
            splits,
            keys,
            scores: scores.as_ref().map_or(0, |b| k.addr(b, 0)),
            probs: probs.as_ref().map_or(0, |b| k.addr(b, 0)),
            ..self.scalars()
        };
        let cfg = &self.cfg;
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps as f32);
        // SAFETY: `acts` is sized for `rows` tokens with one split, ids_dev holds `rows` ids <
        // vocab (checked by forward), and pos + rows <= capacity (reserved by forward).
        unsafe {
            k.embed_async(
                k.addr(&ids_dev, 0),
                k.addr(&m.embed, 0),
                k.addr(&acts.x, 0),
                rows,
                h,
            )?;
            layers(&k, cfg, &sc, m, acts, rows)?;
            // the last row only: final norm into the decode buffer, the head, the pick
            let last = (rows - 1) * h;
            k.add_rmsnorm_async(
                k.addr(&acts.x, last),
                k.addr(&acts.tmp, last),
                k.addr(&m.norm, 0),
                k.addr(&self.dec.h, 0),
                1,
                h,
                eps,
                false,
            )?;
            k.gemv_async(&self.dec.h, 1, &m.lm_head, &mut self.logits)?;
            pick(&k, cfg, &sc, false)?;
        }
        // the ids and scores must stay alive until the queued work has read them
        k.synchronize()?;
        drop((ids_dev, scores, probs));
        Ok(())
    }

    /// Every layer's keys and values on the host, `[1, kv_heads, len, head_dim]` f32 each.
    pub fn to_host(&self) -> Result<Vec<(HostTensor, HostTensor)>> {
        if self.len == 0 {
            return Ok(Vec::new());
        }
        let cfg = &self.cfg;
        let (kvh, hd, cap, len) = (cfg.num_key_value_heads, cfg.head_dim, self.cap, self.len);
        let mut kh = vec![bf16::ZERO; self.kc.len()];
        let mut vh = vec![bf16::ZERO; self.vc.len()];
        let s = self.k.stream();
        s.memcpy_dtoh(&self.kc, &mut kh)
            .map_err(cuda("downloading the KV cache"))?;
        s.memcpy_dtoh(&self.vc, &mut vh)
            .map_err(cuda("downloading the KV cache"))?;
        let layer = |src: &[bf16], l: usize| -> HostTensor {
            let mut data = Vec::with_capacity(kvh * len * hd);
            for h in 0..kvh {
                let base = ((l * kvh + h) * cap) * hd;
                data.extend(src[base..base + len * hd].iter().map(|v| v.to_f32()));
            }
            HostTensor {
                shape: vec![1, kvh, len, hd],
                data,
            }
        };
        Ok((0..cfg.num_hidden_layers)
            .map(|l| (layer(&kh, l), layer(&vh, l)))
            .collect())
    }

    /// Load saved keys and values (`len` positions per layer, as [`CudaSequence::to_host`]
    /// writes them), replacing what is held.
    pub fn load_host(&mut self, layers: Vec<(HostTensor, HostTensor)>, len: usize) -> Result<()> {
        let cfg = self.cfg.clone();
        let (kvh, hd) = (cfg.num_key_value_heads, cfg.head_dim);
        if len == 0 {
            self.len = 0;
            return Ok(());
        }
        if layers.len() != cfg.num_hidden_layers {
            return Err(EngineError::InvalidArgument(format!(
                "saved cache has {} layers, the model {}",
                layers.len(),
                cfg.num_hidden_layers
            )));
        }
        self.reserve(len)?;
        let cap = self.cap;
        let mut kh = vec![bf16::ZERO; self.kc.len()];
        let mut vh = vec![bf16::ZERO; self.vc.len()];
        for (l, (k, v)) in layers.iter().enumerate() {
            for (t, dst) in [(k, &mut kh), (v, &mut vh)] {
                if t.shape != [1, kvh, len, hd] {
                    return Err(EngineError::InvalidArgument(format!(
                        "saved cache layer {l} has shape {:?}, expected [1, {kvh}, {len}, {hd}]",
                        t.shape
                    )));
                }
                for h in 0..kvh {
                    let base = ((l * kvh + h) * cap) * hd;
                    let src = &t.data[h * len * hd..(h + 1) * len * hd];
                    for (d, s) in dst[base..base + len * hd].iter_mut().zip(src) {
                        *d = bf16::from_f32(*s);
                    }
                }
            }
        }
        let s = self.k.stream().clone();
        s.memcpy_htod(&kh, &mut self.kc)
            .map_err(cuda("uploading the KV cache"))?;
        s.memcpy_htod(&vh, &mut self.vc)
            .map_err(cuda("uploading the KV cache"))?;
        self.len = len;
        Ok(())
    }
}
