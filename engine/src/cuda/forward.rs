//! The kernels one forward of a [`super::CudaSequence`] queues: its activations (`Acts`), the
//! device addresses its kernels take (`Scalars`), the decoder layers — separate kernels, or the
//! decode step's fused GEMVs ([`DecodeFusion`]) —, attention (split decode attention, flash or
//! GEMM prefill attention), the linears (GEMVs up to 8 rows, else bf16 GEMMs over W dequantized
//! slab by slab) and the pick of the next token; and the kernel classes a benchmark times apart
//! ([`class`]).

use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::CudaSlice;
use half::bf16;
use kiln_kernels::cuda::decode::{AttentionShape, DevAddr, DeviceSampling, QkvPost};
use kiln_kernels::cuda::decode_persistent::PersistentShape;
use kiln_kernels::cuda::gemv::GEMV_MAX_ROWS;
use kiln_kernels::cuda::gemv_fused::{FusedX, FUSED_COMBINE_MAX_SPLITS};
use kiln_kernels::cuda::{CudaKernels, DeviceNvfp4};

use super::cuda;
use super::slabs::WeightSlabs;
use super::weights::CudaModel;
use crate::error::Result;
use crate::model::ModelConfig;

/// The f32 activations of a forward of `rows` tokens (exact sizes: the GEMVs check them).
pub(super) struct Acts {
    pub(super) rows: usize,
    pub(super) x: CudaSlice<f32>,
    pub(super) h: CudaSlice<f32>,
    pub(super) qkv: CudaSlice<f32>,
    pub(super) q: CudaSlice<f32>,
    pub(super) attn: CudaSlice<f32>,
    pub(super) tmp: CudaSlice<f32>,
    pub(super) gu: CudaSlice<f32>,
    pub(super) act: CudaSlice<f32>,
    pub(super) part_o: CudaSlice<f32>,
    pub(super) part_ml: CudaSlice<f32>,
    /// bf16 buffers of the GEMM path (rows > 8): the linears' inputs h, attn and act, the
    /// gate/up output and q. There `h`, `gu` and `act` above are one-element placeholders.
    pub(super) bf: Option<BfActs>,
}

pub(super) struct BfActs {
    pub(super) h: CudaSlice<bf16>,
    /// The queries, for the attention GEMMs.
    pub(super) q: CudaSlice<bf16>,
    pub(super) attn: CudaSlice<bf16>,
    /// The gate/up GEMM's output (SwiGLU reads it).
    pub(super) gu: CudaSlice<bf16>,
    pub(super) act: CudaSlice<bf16>,
    /// W dequantized slab by slab (overlapped with the GEMMs or not).
    pub(super) w: WeightSlabs,
}

impl Acts {
    /// Activations of `rows` tokens, `splits` attention splits; over 8 rows with slab buffers
    /// of `scratch` bf16 elements for the dequantized weights, two and a side stream when
    /// `overlap` ([`WeightSlabs`]).
    pub(super) fn new(
        k: &CudaKernels,
        cfg: &ModelConfig,
        (rows, splits): (usize, usize),
        (scratch, overlap): (usize, bool),
    ) -> Result<Self> {
        let s = k.stream();
        let f = |n: usize| {
            s.alloc_zeros::<f32>(n)
                .map_err(cuda("allocating activations"))
        };
        let b = |n: usize| {
            s.alloc_zeros::<bf16>(n)
                .map_err(cuda("allocating activations"))
        };
        let (h, q, i) = (cfg.hidden_size, cfg.q_size(), cfg.intermediate_size);
        let qkv = q + 2 * cfg.kv_size();
        let nh = cfg.num_attention_heads;
        let bf = if rows > GEMV_MAX_ROWS {
            Some(BfActs {
                h: b(rows * h)?,
                q: b(rows * q)?,
                attn: b(rows * q)?,
                gu: b(rows * 2 * i)?,
                act: b(rows * i)?,
                w: WeightSlabs::new(k, scratch, overlap)?,
            })
        } else {
            None
        };
        // over 8 rows the bf16 buffers stand in for h, gu and act
        let f32_rows = if rows > GEMV_MAX_ROWS { 0 } else { rows };
        Ok(Acts {
            rows,
            x: f(rows * h)?,
            h: f((f32_rows * h).max(1))?,
            qkv: f(rows * qkv)?,
            q: f(rows * q)?,
            attn: f(rows * q)?,
            tmp: f(rows * h)?,
            gu: f((f32_rows * 2 * i).max(1))?,
            act: f((f32_rows * i).max(1))?,
            part_o: f(rows * nh * splits * cfg.head_dim)?,
            part_ml: f(rows * nh * splits * 2)?,
            bf,
        })
    }
}

/// Which of a decode step's small kernels the fused GEMVs take in (all forms give the same
/// bits; see `kiln_kernels::cuda::gemv_fused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeFusion {
    /// The separate kernels: ten launches a layer.
    Off,
    /// The norms, SwiGLU and the attention's combine (up to [`FUSED_COMBINE_MAX_SPLITS`]
    /// splits) folded into the GEMVs, the residual adds into the o and down GEMVs: six.
    All,
    /// As `All` but SwiGLU a launch of its own (every block of the down GEMV recomputes all of
    /// SwiGLU in `All`, which may cost more than the launch it saves): seven.
    AllButSwiglu,
    /// The embedding, every layer and the final norm as one persistent kernel whose stages are
    /// separated by grid barriers ([`kiln_kernels::cuda::decode_persistent`]): no launch per
    /// layer at all; then the vocabulary GEMV and the pick.
    Persistent,
}

impl DecodeFusion {
    /// Its name in benchmark tables.
    pub fn name(self) -> &'static str {
        match self {
            DecodeFusion::Off => "off",
            DecodeFusion::All => "all",
            DecodeFusion::AllButSwiglu => "all but SwiGLU",
            DecodeFusion::Persistent => "persistent kernel",
        }
    }

    /// Whether a step of this form runs the fused GEMVs ([`fused_layers`]).
    pub(super) fn fused_gemvs(self) -> bool {
        matches!(self, DecodeFusion::All | DecodeFusion::AllButSwiglu)
    }
}

/// The model's shape as the persistent decode kernel takes it.
pub fn persistent_shape(cfg: &ModelConfig) -> PersistentShape {
    PersistentShape {
        layers: cfg.num_hidden_layers,
        hidden: cfg.hidden_size,
        intermediate: cfg.intermediate_size,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
    }
}

/// Whether decode steps of `cfg` can run as `fusion` on `k`; the error says why not.
pub fn decode_fusion_fits(k: &CudaKernels, cfg: &ModelConfig, fusion: DecodeFusion) -> Result<()> {
    let bad = |m: String| Err(crate::error::EngineError::InvalidArgument(m));
    match fusion {
        DecodeFusion::Off => Ok(()),
        DecodeFusion::Persistent => k
            .persistent_decode_fits(&persistent_shape(cfg))
            .or_else(|e| bad(format!("{e}; decode runs the captured separate kernels"))),
        DecodeFusion::All | DecodeFusion::AllButSwiglu => {
            if let Some(e) = k.fused_gemv_load_error() {
                return bad(format!(
                    "the fused decode GEMVs did not load on this GPU ({e}); decode runs the \
                     separate kernels"
                ));
            }
            if !fused_decode_fits(k, cfg) {
                return bad(format!(
                    "the fused decode GEMVs need every layer matrix in the CUDA-core GEMV's \
                     regime (under 16 Mi weights), K a multiple of 32 and x in shared memory (K \
                     up to {}); this model (hidden {}, intermediate {}) runs the separate kernels",
                    k.fused_gemv_max_k(),
                    cfg.hidden_size,
                    cfg.intermediate_size
                ));
            }
            Ok(())
        }
    }
}

/// The decode fusion a new sequence runs where the model's shapes allow it: off. The fused
/// GEMVs give the separate kernels' bits (GPU tests) but are slower — measured on the H200
/// (2026-12-05, `kiln bench engine --device cuda --fused-decode`), Qwen2.5-0.5B shape: 1,306
/// tok/s separate, 1,061 `All`, 1,221 `AllButSwiglu`: every block recomputing its x after
/// the wait lengthens each GEMV more than the dropped launches save. The persistent kernel is
/// slower still — H100, same run: 1,198 tok/s (816 µs a step) separate, 895 tok/s (1,105 µs)
/// persistent; see engine/BENCHMARKS.md.
pub const DECODE_FUSION: DecodeFusion = DecodeFusion::Off;

/// Whether every GEMV of a decode layer of `cfg` can run fused on `k` (see
/// [`CudaKernels::fused_gemv_fits`]): the CUDA-core kernel is the m = 1 default for all four
/// (matrices under 16 Mi weights) and x fits in shared memory.
pub fn fused_decode_fits(k: &CudaKernels, cfg: &ModelConfig) -> bool {
    let (h, i, q) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_size());
    k.fused_gemv_fits(q + 2 * cfg.kv_size(), h)
        && k.fused_gemv_fits(h, q)
        && k.fused_gemv_fits(2 * i, h)
        && k.fused_gemv_fits(h, i)
}

/// Whether the fused o GEMV of a decode step of `cfg` with `splits` attention splits also
/// combines them: at most [`FUSED_COMBINE_MAX_SPLITS`], and the kernel takes the heads.
pub(super) fn fused_combine(k: &CudaKernels, cfg: &ModelConfig, splits: usize) -> bool {
    splits <= FUSED_COMBINE_MAX_SPLITS
        && k.fused_combine_fits(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.head_dim,
            splits,
        )
}

/// Kernel classes of a step, for timing them apart (`CudaSequence::time_step_classes`).
pub mod class {
    /// The NVFP4 GEMVs (and GEMMs).
    pub const GEMV: u8 = 1;
    /// Attention and its combine.
    pub const ATTENTION: u8 = 2;
    /// Embedding, norms, the q/k/v epilogue (RoPE, KV append), SwiGLU.
    pub const SMALL: u8 = 4;
    /// The greedy pick.
    pub const PICK: u8 = 8;
    /// Everything.
    pub const ALL: u8 = 15;
}

/// The device addresses and sizes a forward's kernels take besides the activations.
#[derive(Clone, Copy)]
pub(super) struct Scalars {
    pub(super) pos: DevAddr,
    pub(super) token: DevAddr,
    pub(super) counter: DevAddr,
    pub(super) part_val: DevAddr,
    pub(super) part_idx: DevAddr,
    pub(super) logits: DevAddr,
    pub(super) kc: DevAddr,
    pub(super) vc: DevAddr,
    pub(super) cap: usize,
    /// Attention: positions per split and splits.
    pub(super) chunk: usize,
    pub(super) splits: usize,
    /// Which kernel classes to queue ([`class`]).
    pub(super) mask: u8,
    /// A decode step (one token) through the fused GEMVs ([`fused_layers`]).
    pub(super) fused: bool,
    /// With `fused`, the o GEMV also combines the attention's splits.
    pub(super) fused_combine: bool,
    /// With `fused`, the down GEMV also computes SwiGLU.
    pub(super) fused_swiglu: bool,
    /// Keys the forward's last query sees (pos + rows), for the prefill attention GEMMs.
    pub(super) keys: usize,
    /// Prefill attention scores `[kv_heads][rows][keys]` f32 and probabilities (bf16), or 0.
    pub(super) scores: DevAddr,
    pub(super) probs: DevAddr,
    /// Sample instead of the greedy pick, with the step counter.
    pub(super) sampling: Option<DeviceSampling>,
    pub(super) step: DevAddr,
}

/// Queue every decoder layer for `rows` tokens of `acts` (x holds the embeddings; on return
/// tmp holds the last layer's MLP output, not yet added to x — with `sc.fused`, x holds the
/// sum, see [`fused_layers`]).
///
/// # Safety
/// `acts` is sized for `rows` tokens and `sc.splits` splits; `sc` holds live buffers of a
/// sequence of this model with pos + rows <= capacity.
pub(super) unsafe fn layers(
    k: &CudaKernels,
    cfg: &ModelConfig,
    sc: &Scalars,
    m: &CudaModel,
    acts: &mut Acts,
    rows: usize,
) -> Result<()> {
    if sc.fused {
        assert_eq!(rows, 1, "the fused layers are a decode step's");
        // SAFETY: the caller's contract.
        return unsafe { fused_layers(k, cfg, sc, m, acts) };
    }
    let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps as f32);
    let (small, gemv, attn) = (
        sc.mask & class::SMALL != 0,
        sc.mask & class::GEMV != 0,
        sc.mask & class::ATTENTION != 0,
    );
    // over 8 rows the linears are bf16 GEMMs: the norms and SwiGLU write their bf16 input
    // directly (no f32 copy to convert), and SwiGLU reads the gate/up GEMM's bf16 output
    let (h_out, gu_in, act_out) = match (&acts.bf, rows > GEMV_MAX_ROWS) {
        (Some(bf), true) => (k.addr(&bf.h, 0), k.addr(&bf.gu, 0), k.addr(&bf.act, 0)),
        _ => (
            k.addr(&acts.h, 0),
            k.addr(&acts.gu, 0),
            k.addr(&acts.act, 0),
        ),
    };
    let bf16_out = rows > GEMV_MAX_ROWS;
    for (l, layer) in m.layers.iter().enumerate() {
        let resid = if l == 0 { 0 } else { k.addr(&acts.tmp, 0) };
        // SAFETY: the caller's contract.
        unsafe {
            if small {
                k.add_rmsnorm_async(
                    k.addr(&acts.x, 0),
                    resid,
                    k.addr(&layer.input_norm, 0),
                    h_out,
                    rows,
                    h,
                    eps,
                    bf16_out,
                )?;
            }
            if gemv {
                linear(k, acts, &layer.qkv, Input::H, Output::Qkv, rows)?;
            }
            attention_block(k, cfg, sc, m, l, acts, rows, small, attn)?;
            if gemv {
                linear(k, acts, &layer.o, Input::Attn, Output::Tmp, rows)?;
            }
            if small {
                k.add_rmsnorm_async(
                    k.addr(&acts.x, 0),
                    k.addr(&acts.tmp, 0),
                    k.addr(&layer.post_norm, 0),
                    h_out,
                    rows,
                    h,
                    eps,
                    bf16_out,
                )?;
            }
            if gemv {
                linear(k, acts, &layer.gate_up, Input::H, Output::Gu, rows)?;
            }
            if small {
                k.swiglu_async(
                    gu_in,
                    k.addr(&layer.gate_up_scale, 0),
                    act_out,
                    rows,
                    cfg.intermediate_size,
                    bf16_out,
                )?;
            }
            if gemv {
                linear(k, acts, &layer.down, Input::Act, Output::Tmp, rows)?;
            }
        }
    }
    Ok(())
}

/// [`layers`] for one token through the fused GEMVs: per layer the q/k/v GEMV with the input
/// norm in its x load, the q/k/v epilogue, the attention's splits, the o GEMV with their
/// combine in its x load (with `sc.fused_combine`; else the attention's own combine first)
/// adding its output to x, the gate/up GEMV with the post-attention norm, the down GEMV with
/// SwiGLU in its x load (with `sc.fused_swiglu`; else SwiGLU's own kernel first) adding its
/// output to x. On return x holds the residual stream after the last layer (tmp and h are
/// not used).
///
/// # Safety
/// As [`layers`] with `rows` = 1, and the model's shapes fit ([`fused_decode_fits`]).
unsafe fn fused_layers(
    k: &CudaKernels,
    cfg: &ModelConfig,
    sc: &Scalars,
    m: &CudaModel,
    acts: &mut Acts,
) -> Result<()> {
    let (small, gemv, attn) = (
        sc.mask & class::SMALL != 0,
        sc.mask & class::GEMV != 0,
        sc.mask & class::ATTENTION != 0,
    );
    let eps = cfg.rms_norm_eps as f32;
    let x = k.addr(&acts.x, 0);
    let o_input = if sc.fused_combine {
        FusedX::CombineResidual {
            part_o: k.addr(&acts.part_o, 0),
            part_ml: k.addr(&acts.part_ml, 0),
            pos: sc.pos,
            head_dim: cfg.head_dim,
            splits: sc.splits,
            chunk: sc.chunk,
        }
    } else {
        // the attention combined its splits into attn
        FusedX::Residual {
            x: k.addr(&acts.attn, 0),
        }
    };
    for (l, layer) in m.layers.iter().enumerate() {
        let norm = |w: &CudaSlice<f32>| FusedX::Norm {
            h: x,
            weight: k.addr(w, 0),
            eps,
        };
        // SAFETY: the caller's contract; y never overlaps the fused kernel's inputs (qkv and
        // gu are written from x, x from part_o / part_ml and gu).
        unsafe {
            if gemv {
                k.gemv_fused_async(&norm(&layer.input_norm), &layer.qkv, k.addr(&acts.qkv, 0))?;
            }
            attention_block(k, cfg, sc, m, l, acts, 1, small, attn)?;
            if gemv {
                k.gemv_fused_async(&o_input, &layer.o, x)?;
                k.gemv_fused_async(&norm(&layer.post_norm), &layer.gate_up, k.addr(&acts.gu, 0))?;
            }
            let (gu, scales) = (k.addr(&acts.gu, 0), k.addr(&layer.gate_up_scale, 0));
            let down_input = if sc.fused_swiglu {
                FusedX::SwigluResidual {
                    gate_up: gu,
                    scales,
                }
            } else {
                if small {
                    let act = k.addr(&acts.act, 0);
                    k.swiglu_async(gu, scales, act, 1, cfg.intermediate_size, false)?;
                }
                FusedX::Residual {
                    x: k.addr(&acts.act, 0),
                }
            };
            if gemv {
                k.gemv_fused_async(&down_input, &layer.down, x)?;
            }
        }
    }
    Ok(())
}

/// Queue the pick of the next token from the logits — greedy, or sampled when the sequence
/// samples — into the token (advancing pos when `advance`).
///
/// # Safety
/// `sc` holds the live scalars of a sequence of a model of shape `cfg`.
pub(super) unsafe fn pick(
    k: &CudaKernels,
    cfg: &ModelConfig,
    sc: &Scalars,
    advance: bool,
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        match &sc.sampling {
            Some(p) => k.sample_advance_async(
                sc.logits,
                cfg.vocab_size,
                p,
                sc.step,
                sc.token,
                sc.pos,
                advance,
            )?,
            None => k.argmax_advance_async(
                sc.logits,
                cfg.vocab_size,
                sc.part_val,
                sc.part_idx,
                sc.counter,
                sc.token,
                sc.pos,
                advance,
            )?,
        }
    }
    Ok(())
}

/// The q/k/v epilogue and attention of layer `l` for `rows` tokens of `acts` (qkv → attn).
///
/// # Safety
/// As [`layers`].
#[allow(clippy::too_many_arguments)]
unsafe fn attention_block(
    k: &CudaKernels,
    cfg: &ModelConfig,
    sc: &Scalars,
    m: &CudaModel,
    l: usize,
    acts: &mut Acts,
    rows: usize,
    epilogue: bool,
    attention: bool,
) -> Result<()> {
    let layer = &m.layers[l];
    let layer_bytes = (cfg.kv_size() * sc.cap * 2) as u64;
    let opt = |b: &Option<CudaSlice<f32>>| b.as_ref().map_or(0, |b| k.addr(b, 0));
    let (qn, kn) = layer
        .qk_norm
        .as_ref()
        .map_or((0, 0), |(q, kk)| (k.addr(q, 0), k.addr(kk, 0)));
    let post = QkvPost {
        qkv: k.addr(&acts.qkv, 0),
        scale: k.addr(&layer.qkv_scale, 0),
        bias: opt(&layer.qkv_bias),
        q_norm: qn,
        k_norm: kn,
        inv_freq: k.addr(&m.inv_freq, 0),
        pos: sc.pos,
        q_out: k.addr(&acts.q, 0),
        k_cache: sc.kc + l as u64 * layer_bytes,
        v_cache: sc.vc + l as u64 * layer_bytes,
    };
    let shape = AttentionShape {
        tokens: rows,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        capacity: sc.cap,
        chunk: sc.chunk,
        splits: sc.splits,
    };
    // SAFETY: the caller's contract.
    unsafe {
        if epilogue {
            k.qkv_post_async(
                &post,
                rows,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
                sc.cap,
                cfg.rms_norm_eps as f32,
            )?;
        }
        if !attention {
            return Ok(());
        }
        if rows > GEMV_MAX_ROWS {
            return attention_gemm(k, cfg, sc, acts, rows, post.k_cache, post.v_cache);
        }
        // the fused o GEMV may combine the splits itself (fused_layers)
        let out = (!(sc.fused && sc.fused_combine)).then(|| k.addr(&acts.attn, 0));
        k.attention_async(
            post.q_out,
            post.k_cache,
            post.v_cache,
            post.pos,
            k.addr(&acts.part_o, 0),
            k.addr(&acts.part_ml, 0),
            out,
            &shape,
        )?;
    }
    Ok(())
}

/// Prefill attention on the tensor cores: the flash kernel (scores in registers) where it is
/// built for the head dim; else per query head of each KV group, S = Q·Kᵀ (scaled) as one
/// strided batched GEMM over the groups, the causal softmax into bf16 P, then O = P·V into
/// `attn`.
///
/// # Safety
/// As [`layers`], with `sc.scores` / `sc.probs` holding `kv_heads·rows·keys` elements.
unsafe fn attention_gemm(
    k: &CudaKernels,
    cfg: &ModelConfig,
    sc: &Scalars,
    acts: &mut Acts,
    rows: usize,
    k_cache: DevAddr,
    v_cache: DevAddr,
) -> Result<()> {
    use kiln_kernels::cuda::blas::StridedGemm;
    let (nh, kvh, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let rep = nh / kvh;
    let keys = sc.keys;
    let Acts { q, attn, bf, .. } = acts;
    let bf = bf.as_mut().expect("rows > 8 have bf16 twins");
    k.f32_to_bf16_async(q, &mut bf.q)?;
    let (q_bf, out) = (k.addr(&bf.q, 0), k.addr(attn, 0));
    // SAFETY: the caller's contract: q and attn hold rows · nh · hd, the caches kv_heads · cap
    // · hd with positions below pos + rows written by the epilogue just queued.
    if unsafe {
        k.flash_prefill_async(
            q_bf,
            k_cache,
            v_cache,
            sc.pos,
            out,
            rows,
            (nh, kvh, hd),
            sc.cap,
        )
    }? {
        return Ok(());
    }
    for r in 0..rep {
        // SAFETY: the caller's contract; the strides stay inside the cache (kv_heads · cap ·
        // hd), the queries (rows · nh · hd), the scores and the output.
        unsafe {
            k.gemm_bf16_strided_batched_async(&StridedGemm {
                transa: true,
                transb: false,
                m: keys,
                n: rows,
                k: hd,
                alpha: 1.0 / (hd as f32).sqrt(),
                beta: 0.0,
                a: (k_cache, hd, sc.cap * hd),
                b: (q_bf + (r * hd * 2) as u64, nh * hd, rep * hd),
                c: (sc.scores, keys, rows * keys),
                c_f32: true,
                batch: kvh,
            })?;
            k.causal_softmax_async(sc.scores, sc.probs, kvh, rows, keys, sc.pos)?;
            k.gemm_bf16_strided_batched_async(&StridedGemm {
                transa: false,
                transb: false,
                m: hd,
                n: rows,
                k: keys,
                alpha: 1.0,
                beta: 0.0,
                a: (v_cache, hd, sc.cap * hd),
                b: (sc.probs, keys, rows * keys),
                c: (out + (r * hd * 4) as u64, nh * hd, rep * hd),
                c_f32: true,
                batch: kvh,
            })?;
        }
    }
    Ok(())
}

/// Which activation a linear reads.
#[derive(Clone, Copy)]
enum Input {
    H,
    Attn,
    Act,
}

/// Whether this process has run the prompt GEMMs (cuBLAS) once: the first call pays a one-time
/// cost — ~160 ms measured on the H200 (the demo's 12-token turns took 164–167 ms through the
/// GEMMs in a fresh job process against 0.6 ms through the GEMV batches) — that a short prompt
/// should not. Set by the first GEMM-path linear; see [`super::plan::prompt_takes_gemvs`].
static GEMM_PATH_WARM: AtomicBool = AtomicBool::new(false);

/// Whether this process has run the prompt GEMMs ([`GEMM_PATH_WARM`]).
pub fn gemm_path_warm() -> bool {
    GEMM_PATH_WARM.load(Ordering::Relaxed)
}

/// Rows per weight slab for a matrix of `n` rows when a slab buffer holds `rows_fit` rows: as
/// few slabs as fit, of equal size rounded up to a multiple of 128 rows (a slab's first column
/// of y stays 16-byte aligned: an odd offset sends cuBLAS to slow unvectorized kernels) — no
/// short last slab, whose GEMM would take a whole wave of the GPU for a sliver of the rows.
pub(super) fn balanced_slab_rows(n: usize, rows_fit: usize) -> usize {
    if rows_fit < 128 {
        return rows_fit.max(1);
    }
    let most = rows_fit / 128 * 128;
    let slabs = n.div_ceil(most);
    n.div_ceil(slabs).div_ceil(128) * 128
}

/// Which activation a linear writes.
#[derive(Clone, Copy)]
enum Output {
    Qkv,
    Tmp,
    Gu,
}

/// `out = in · Wᵀ` for `rows` rows of `acts`: GEMV (chained) for rows ≤ 8, else bf16 GEMMs
/// (cublasGemmEx, f32 out) over W dequantized slab by slab.
fn linear(
    k: &CudaKernels,
    acts: &mut Acts,
    w: &DeviceNvfp4,
    input: Input,
    output: Output,
    rows: usize,
) -> Result<()> {
    let Acts {
        h,
        attn,
        act,
        qkv,
        tmp,
        gu,
        bf,
        ..
    } = acts;
    let x: &CudaSlice<f32> = match input {
        Input::H => h,
        Input::Attn => attn,
        Input::Act => act,
    };
    let y: &mut CudaSlice<f32> = match output {
        Output::Qkv => qkv,
        Output::Tmp => tmp,
        Output::Gu => gu,
    };
    if rows <= GEMV_MAX_ROWS {
        k.gemv_chained_async(x, rows, w, y)?;
        return Ok(());
    }
    let bf = bf.as_mut().expect("rows > 8 have bf16 twins");
    let BfActs {
        h: bh,
        attn: battn,
        gu: bgu,
        act: bact,
        w: scratch,
        ..
    } = bf;
    // the gate/up output goes to bf16 (SwiGLU's input), the others to f32
    let c_f32 = !matches!(output, Output::Gu);
    let c_at = |r0: usize| {
        if c_f32 {
            k.addr(y, r0)
        } else {
            k.addr(bgu, r0)
        }
    };
    // the norms and SwiGLU wrote h and act in bf16 already; attention's output is f32
    let xb: &mut CudaSlice<bf16> = match input {
        Input::H => bh,
        Input::Attn => {
            k.f32_to_bf16_async(x, battn)?;
            battn
        }
        Input::Act => bact,
    };
    // W dequantized to bf16 a slab of rows at a time; cublasGemmEx writes the slab's columns
    // of y (f32, or bf16 for gate/up) directly: C[N × T] column-major is y [T, N] row-major
    let (n, kk) = (w.rows, w.cols);
    let rows_fit = CudaKernels::large_matmul_chunk_rows(w, scratch.elems()).max(1);
    let slab = balanced_slab_rows(n, rows_fit);
    GEMM_PATH_WARM.store(true, Ordering::Relaxed);
    scratch.for_each(k, w, slab, |r0, r1, a| {
        // SAFETY: A = the slab (K × (r1-r0), ld K), B = x (K × rows, ld K), C = y from column
        // r0 with ld N: every access is inside the buffers.
        unsafe {
            k.gemm_bf16_strided_batched_async(&kiln_kernels::cuda::blas::StridedGemm {
                transa: true,
                transb: false,
                m: r1 - r0,
                n: rows,
                k: kk,
                alpha: 1.0,
                beta: 0.0,
                a: (k.addr(a, 0), kk, 0),
                b: (k.addr(xb, 0), kk, 0),
                c: (c_at(r0), n, 0),
                c_f32,
                batch: 1,
            })?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slabs_are_balanced_multiples_of_128_rows() {
        // the 7B gate/up matrix (37,888 rows) through a 64 MiB buffer (9,362 rows of 3,584):
        // 5 slabs of 7,680 (the last 7,168) instead of 4 × 9,344 and 512
        assert_eq!(balanced_slab_rows(37_888, 9_362), 7_680);
        // the 7B down matrix (3,584 rows of 18,944) through 64 MiB (1,771 rows): 3 × 1,280
        assert_eq!(balanced_slab_rows(3_584, 1_771), 1_280);
        // everything in one slab when it fits; tiny buffers keep whole rows
        assert_eq!(balanced_slab_rows(4_608, 9_362), 4_608);
        assert_eq!(balanced_slab_rows(4_608, 100), 100);
        assert_eq!(balanced_slab_rows(4_608, 0), 1);
        for (n, fit) in [(37_888, 4_681), (1_000, 128), (129, 128), (151_936, 37_449)] {
            let slab = balanced_slab_rows(n, fit);
            assert!(
                slab <= fit / 128 * 128 && slab.is_multiple_of(128),
                "{n} {fit} {slab}"
            );
            assert_eq!(n.div_ceil(slab), n.div_ceil(fit / 128 * 128), "{n} {fit}");
        }
    }
}
