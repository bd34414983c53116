//! The buffers of one micro-batch shape (B, T): the activations each layer saves for its
//! backward and the scratch the layers share (GEMM outputs, gradients, one chunk of logits).

use cudarc::driver::CudaSlice;
use half::bf16;
use kiln_kernels::cuda::CudaKernels;

use super::super::cuda;
use super::attention::TrainAttention;
use crate::error::Result;
use crate::model::ModelConfig;

/// Rows of logits made at once by the vocabulary projection (bounds its scratch to
/// `LOGIT_CHUNK × vocab × 6` bytes).
pub const LOGIT_CHUNK: usize = 1024;

/// Activations one layer saves for its backward (besides its input, in [`Workspace::h`]).
pub(super) struct LayerActs {
    pub(super) xn1: CudaSlice<bf16>,
    pub(super) rstd1: CudaSlice<f32>,
    pub(super) q: CudaSlice<bf16>,
    pub(super) k: CudaSlice<bf16>,
    pub(super) v: CudaSlice<bf16>,
    /// Qwen3: the per-head q/k norm's normalized values (bf16 `[N·(nh + kvh)·hd]`) and
    /// reciprocal RMS (`[N·(nh + kvh)]`).
    pub(super) qk_norm: Option<(CudaSlice<bf16>, CudaSlice<f32>)>,
    /// Materialized attention: the probabilities `[B·nh·T, T]` (one element in the flash
    /// form).
    pub(super) p: CudaSlice<bf16>,
    /// Flash attention: each query row's log-sum-exp `[B·nh·T]` (one element otherwise).
    pub(super) lse: CudaSlice<f32>,
    /// Merged attention output `[N, nh·hd]`.
    pub(super) attn: CudaSlice<bf16>,
    /// Residual stream after attention.
    pub(super) h_mid: CudaSlice<f32>,
    pub(super) xn2: CudaSlice<bf16>,
    pub(super) rstd2: CudaSlice<f32>,
    /// Gate/up GEMM output `[N, 2I]`.
    pub(super) gu: CudaSlice<f32>,
    /// SwiGLU output `[N, I]`.
    pub(super) a: CudaSlice<bf16>,
}

/// Buffers for one micro-batch shape (B, T), shared by the layers or saved per layer.
pub(super) struct Workspace {
    pub(super) batch: usize,
    pub(super) seq: usize,
    pub(super) ids: CudaSlice<i32>,
    pub(super) target: CudaSlice<i32>,
    pub(super) weight: CudaSlice<f32>,
    /// The residual stream into each layer and, last, out of the last one: f32 `[N, H]` each.
    pub(super) h: Vec<CudaSlice<f32>>,
    /// Each layer's saved activations; with `recompute` one set that every layer remakes
    /// just before its backward.
    layers: Vec<LayerActs>,
    /// Activations are recomputed per layer in backward (`--recompute`).
    pub(super) recompute: bool,
    /// The attention's form; its score-shaped buffers (`scores`, `o`, `dp`, `ds`, each
    /// layer's `p`) are one element in the flash form, its row buffers (`dd`, each layer's
    /// `lse`) one element in the materialized form.
    pub(super) attention: TrainAttention,
    pub(super) xnf: CudaSlice<bf16>,
    pub(super) rstdf: CudaSlice<f32>,
    /// GEMM outputs reused by every layer (`scores`, `o`: materialized attention).
    pub(super) qkv: CudaSlice<f32>,
    pub(super) scores: CudaSlice<f32>,
    pub(super) o: CudaSlice<f32>,
    /// The residual's gradient and its bf16 copy (GEMM input).
    pub(super) dh: CudaSlice<f32>,
    /// `nvfp4-full` with clipping: the final norm's input gradient, kept from the first
    /// backward pass for the second (`[N, H]`; one element otherwise).
    pub(super) dh_top: CudaSlice<f32>,
    pub(super) dh_bf16: CudaSlice<bf16>,
    /// f32 GEMM output of the widest input gradient (`[N, max(H, I, nh·hd)]`).
    pub(super) dx: CudaSlice<f32>,
    /// bf16 gradients fed to backward GEMMs: `[N, max(2I, qkv_cols)]`.
    pub(super) dmid: CudaSlice<bf16>,
    /// Attention backward: dO (group layout, bf16), dP (f32), dS (bf16), dQ / dK / dV (f32).
    pub(super) d_o: CudaSlice<bf16>,
    pub(super) dp: CudaSlice<f32>,
    pub(super) ds: CudaSlice<bf16>,
    pub(super) dq: CudaSlice<f32>,
    pub(super) dk: CudaSlice<f32>,
    pub(super) dv: CudaSlice<f32>,
    /// Flash attention backward: D = rowsum(dO ⊙ O) per query row `[B·nh·T]`.
    pub(super) dd: CudaSlice<f32>,
    /// One chunk of logits and their gradient.
    pub(super) logits: CudaSlice<f32>,
    pub(super) dlogits: CudaSlice<bf16>,
}

impl Workspace {
    pub(super) fn new(
        k: &CudaKernels,
        cfg: &ModelConfig,
        layers: usize,
        (batch, seq): (usize, usize),
        packed: bool,
        recompute: bool,
        attention: TrainAttention,
    ) -> Result<Self> {
        let s = k.stream();
        let n = batch * seq;
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (nh, kvh) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let qkv_cols = (nh + 2 * kvh) * hd;
        let scores = attention.score_elems(cfg, (batch, seq));
        let rows = attention.row_elems(cfg, (batch, seq));
        let f = |len: usize| {
            s.alloc_zeros::<f32>(len.max(1))
                .map_err(cuda("allocating training activations"))
        };
        let b = |len: usize| {
            s.alloc_zeros::<bf16>(len.max(1))
                .map_err(cuda("allocating training activations"))
        };
        let saved = if recompute { layers.min(1) } else { layers };
        let acts = (0..saved)
            .map(|_| {
                Ok(LayerActs {
                    xn1: b(n * h)?,
                    rstd1: f(n)?,
                    q: b(n * nh * hd)?,
                    k: b(n * kvh * hd)?,
                    v: b(n * kvh * hd)?,
                    qk_norm: if cfg.qk_norm() {
                        Some((b(n * (nh + kvh) * hd)?, f(n * (nh + kvh))?))
                    } else {
                        None
                    },
                    p: b(scores)?,
                    lse: f(rows)?,
                    attn: b(n * nh * hd)?,
                    h_mid: f(n * h)?,
                    xn2: b(n * h)?,
                    rstd2: f(n)?,
                    gu: f(n * 2 * i)?,
                    a: b(n * i)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let chunk = LOGIT_CHUNK.min(n);
        Ok(Workspace {
            batch,
            seq,
            ids: s
                .alloc_zeros::<i32>(n)
                .map_err(cuda("allocating the batch"))?,
            target: s
                .alloc_zeros::<i32>(n)
                .map_err(cuda("allocating the batch"))?,
            weight: f(n)?,
            h: (0..=layers).map(|_| f(n * h)).collect::<Result<_>>()?,
            layers: acts,
            recompute,
            attention,
            xnf: b(n * h)?,
            rstdf: f(n)?,
            qkv: f(n * qkv_cols)?,
            scores: f(scores)?,
            o: f(attention.out_elems(cfg, n))?,
            dh: f(n * h)?,
            dh_top: f(if packed { n * h } else { 1 })?,
            dh_bf16: b(n * h)?,
            dx: f(n * h.max(i).max(nh * hd))?,
            dmid: b(n * (2 * i).max(qkv_cols))?,
            d_o: b(n * nh * hd)?,
            dp: f(scores)?,
            ds: b(scores)?,
            dq: f(n * nh * hd)?,
            dk: f(n * kvh * hd)?,
            dv: f(n * kvh * hd)?,
            dd: f(rows)?,
            logits: f(chunk * cfg.vocab_size)?,
            dlogits: b(chunk * cfg.vocab_size)?,
        })
    }

    /// The activations layer `l` saves (the one recomputed set with `recompute`).
    pub(super) fn acts(&self, l: usize) -> &LayerActs {
        &self.layers[if self.recompute { 0 } else { l }]
    }

    pub(super) fn bytes(&self) -> u64 {
        let f = |s: &CudaSlice<f32>| s.len() as u64 * 4;
        let b = |s: &CudaSlice<bf16>| s.len() as u64 * 2;
        let per_layer: u64 = self
            .layers
            .iter()
            .map(|a| {
                b(&a.xn1)
                    + f(&a.rstd1)
                    + b(&a.q)
                    + b(&a.k)
                    + b(&a.v)
                    + a.qk_norm.as_ref().map_or(0, |(x, r)| b(x) + f(r))
                    + b(&a.p)
                    + f(&a.lse)
                    + b(&a.attn)
                    + f(&a.h_mid)
                    + b(&a.xn2)
                    + f(&a.rstd2)
                    + f(&a.gu)
                    + b(&a.a)
            })
            .sum();
        per_layer
            + self.h.iter().map(f).sum::<u64>()
            + self.ids.len() as u64 * 8
            + f(&self.weight)
            + b(&self.xnf)
            + f(&self.rstdf)
            + f(&self.qkv)
            + f(&self.scores)
            + f(&self.o)
            + f(&self.dh)
            + f(&self.dh_top)
            + b(&self.dh_bf16)
            + f(&self.dx)
            + b(&self.dmid)
            + b(&self.d_o)
            + f(&self.dp)
            + b(&self.ds)
            + f(&self.dq)
            + f(&self.dk)
            + f(&self.dv)
            + f(&self.dd)
            + f(&self.logits)
            + b(&self.dlogits)
    }
}
