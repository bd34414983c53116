//! The train step's causal attention, forward and backward, in one of two forms
//! ([`TrainAttention`]): materialized — S = Q·Kᵀ and O = P·V as batched cuBLAS GEMMs with
//! the `[B·nh·T × T]` scores, probabilities and their gradients in global memory and the
//! softmax kernels between them — or flash — `attention_train.cu`'s kernels, which keep the
//! scores on chip, save each query row's log-sum-exp and recompute P in the backward (no
//! `T × T` buffers at all). The workspace and the plan size their buffers by the form.

use kiln_kernels::cuda::decode::DevAddr;
use kiln_kernels::cuda::train::TrainAttnShape;
use kiln_kernels::cuda::train_attention::TRAIN_FLASH_HEAD_DIMS;
use kiln_kernels::cuda::CudaKernels;

use super::gemm::Mm;
use super::workspace::{LayerActs, Workspace};
use super::CudaTrainer;
use crate::error::Result;
use crate::model::ModelConfig;

/// Whether train jobs run their attention as the flash kernels (where built for the head
/// dim, and where `attention_train.cu` loaded). On since the GPU tests passed on the H200
/// (2026-12-05): the kernels against f64 references, first-step gradients and a 20-step loss
/// curve against the CPU as closely as the materialized form; 0.5B 8 × 512 `nvfp4-ste`
/// 52.0 → 49.2 ms a step and 1.6 GiB less memory. The benchmark runs either form
/// (`kiln bench train --attention materialized,flash`).
pub const TRAIN_FLASH_ATTENTION: bool = true;

/// How the train step computes its attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainAttention {
    /// GEMMs and softmax kernels over `[B·nh·T × T]` buffers.
    Materialized,
    /// The flash kernels (head dims in [`TRAIN_FLASH_HEAD_DIMS`]).
    Flash,
}

impl TrainAttention {
    /// Flash where it is asked for and built for the model's head dim, materialized
    /// otherwise.
    pub fn for_config(cfg: &ModelConfig, flash: bool) -> Self {
        if flash && TRAIN_FLASH_HEAD_DIMS.contains(&cfg.head_dim) {
            TrainAttention::Flash
        } else {
            TrainAttention::Materialized
        }
    }

    /// The form's name, as `kiln bench train --attention` takes it and its table shows it.
    pub fn name(self) -> &'static str {
        match self {
            TrainAttention::Materialized => "materialized",
            TrainAttention::Flash => "flash",
        }
    }

    /// The form named `name` ([`TrainAttention::name`]), if any.
    pub fn parse(name: &str) -> Option<Self> {
        [TrainAttention::Materialized, TrainAttention::Flash]
            .into_iter()
            .find(|a| a.name() == name)
    }

    /// Elements of the `[B·nh·T × T]` score-shaped buffers (scores, probabilities and their
    /// gradients), 0 in the flash form.
    pub(super) fn score_elems(self, cfg: &ModelConfig, (batch, seq): (usize, usize)) -> usize {
        match self {
            TrainAttention::Materialized => batch * cfg.num_attention_heads * seq * seq,
            TrainAttention::Flash => 0,
        }
    }

    /// Elements of the per-query-row buffers (log-sum-exp, the backward's D), 0 in the
    /// materialized form.
    pub(super) fn row_elems(self, cfg: &ModelConfig, (batch, seq): (usize, usize)) -> usize {
        match self {
            TrainAttention::Materialized => 0,
            TrainAttention::Flash => batch * cfg.num_attention_heads * seq,
        }
    }

    /// Elements of the group-layout f32 output the materialized form merges into tokens.
    pub(super) fn out_elems(self, cfg: &ModelConfig, tokens: usize) -> usize {
        match self {
            TrainAttention::Materialized => tokens * cfg.num_attention_heads * cfg.head_dim,
            TrainAttention::Flash => 0,
        }
    }
}

/// The materialized attention's GEMMs, one per attention group (`B·kvh` of them): the group's
/// `rt = rep·T` query rows against its `T` keys, bf16 in and f32 out.
struct GroupGemms<'a> {
    k: &'a CudaKernels,
    groups: usize,
    rt: usize,
    seq: usize,
    hd: usize,
}

impl<'a> GroupGemms<'a> {
    fn new(k: &'a CudaKernels, sh: TrainAttnShape) -> Self {
        GroupGemms {
            k,
            groups: sh.batch * sh.kv_heads,
            rt: sh.rep() * sh.seq,
            seq: sh.seq,
            hd: sh.head_dim,
        }
    }

    /// `out[rt × T] = x[rt × hd] · y[T × hd]ᵀ` (S = Q·Kᵀ, dP = dO·Vᵀ).
    fn row_key(&self, x: DevAddr, y: DevAddr, out: DevAddr) -> Result<()> {
        let (rt, seq, hd) = (self.rt, self.seq, self.hd);
        Mm::new((rt, seq, hd), (x, false), (y, true), out)
            .batched(self.groups, (rt * hd, seq * hd, rt * seq))
            .run(self.k)
    }

    /// `out[rt × hd] = p[rt × T] · y[T × hd]` (O = P·V, dQ = dS·K).
    fn row_dim(&self, p: DevAddr, y: DevAddr, out: DevAddr) -> Result<()> {
        let (rt, seq, hd) = (self.rt, self.seq, self.hd);
        Mm::new((rt, hd, seq), (p, false), (y, false), out)
            .batched(self.groups, (rt * seq, seq * hd, rt * hd))
            .run(self.k)
    }

    /// `out[T × hd] = p[rt × T]ᵀ · y[rt × hd]` (dV = Pᵀ·dO, dK = dSᵀ·Q; the group's query heads
    /// sum inside the GEMM).
    fn key_dim(&self, p: DevAddr, y: DevAddr, out: DevAddr) -> Result<()> {
        let (rt, seq, hd) = (self.rt, self.seq, self.hd);
        Mm::new((seq, hd, rt), (p, true), (y, false), out)
            .batched(self.groups, (rt * seq, rt * hd, seq * hd))
            .run(self.k)
    }
}

impl CudaTrainer {
    /// The attention forward of one layer: `a.q`, `a.k`, `a.v` (group layouts) → `a.attn`
    /// (tokens, bf16), saving what the backward needs (`a.p` or `a.lse`).
    ///
    /// # Safety
    /// `w` and `a` come from `Workspace::new` for a micro-batch at least `sh`.
    pub(super) unsafe fn attention_forward(
        &self,
        sh: TrainAttnShape,
        a: &LayerActs,
        w: &Workspace,
    ) -> Result<()> {
        let k: &CudaKernels = &self.k;
        let (hd, seq) = (sh.head_dim, sh.seq);
        // SAFETY (whole function): the caller's contract; every buffer is sized for `sh`.
        unsafe {
            if w.attention == TrainAttention::Flash {
                let qkv = (self.addr(&a.q), self.addr(&a.k), self.addr(&a.v));
                k.train_flash_attn_fwd_async(sh, qkv, self.addr(&a.attn), self.addr(&a.lse))?;
                return Ok(());
            }
            let gg = GroupGemms::new(k, sh);
            let scale = 1.0 / (hd as f32).sqrt();
            // S = Q·Kᵀ per group, then P = causal softmax, O = P·V.
            gg.row_key(self.addr(&a.q), self.addr(&a.k), self.addr(&w.scores))?;
            let rows = gg.groups * gg.rt;
            k.train_causal_softmax_async(self.addr(&w.scores), self.addr(&a.p), rows, seq, scale)?;
            gg.row_dim(self.addr(&a.p), self.addr(&a.v), self.addr(&w.o))?;
            k.train_merge_heads_async(sh, self.addr(&w.o), self.addr(&a.attn))?;
        }
        Ok(())
    }

    /// The attention backward of one layer: from the output's gradient `w.dx` (tokens, f32)
    /// to `w.dq`, `w.dk`, `w.dv` (f32, the group layouts).
    ///
    /// # Safety
    /// As [`CudaTrainer::attention_forward`], after it (or its recompute) for this layer.
    pub(super) unsafe fn attention_backward(
        &self,
        sh: TrainAttnShape,
        a: &LayerActs,
        w: &Workspace,
    ) -> Result<()> {
        let k: &CudaKernels = &self.k;
        let (hd, seq) = (sh.head_dim, sh.seq);
        // SAFETY (whole function): as in attention_forward.
        unsafe {
            k.train_split_heads_async(sh, self.addr(&w.dx), self.addr(&w.d_o))?;
            if w.attention == TrainAttention::Flash {
                return Ok(k.train_flash_attn_bwd_async(
                    sh,
                    (self.addr(&a.q), self.addr(&a.k), self.addr(&a.v)),
                    (self.addr(&a.attn), self.addr(&a.lse)),
                    self.addr(&w.d_o),
                    self.addr(&w.dd),
                    (self.addr(&w.dq), self.addr(&w.dk), self.addr(&w.dv)),
                )?);
            }
            let gg = GroupGemms::new(k, sh);
            let scale = 1.0 / (hd as f32).sqrt();
            // dP = dO·Vᵀ; dV = Pᵀ·dO; dS = softmax backward; dQ = dS·K; dK = dSᵀ·Q.
            gg.row_key(self.addr(&w.d_o), self.addr(&a.v), self.addr(&w.dp))?;
            gg.key_dim(self.addr(&a.p), self.addr(&w.d_o), self.addr(&w.dv))?;
            let (p, dp, ds) = (self.addr(&a.p), self.addr(&w.dp), self.addr(&w.ds));
            k.train_softmax_bwd_async(p, dp, ds, gg.groups * gg.rt, seq, scale)?;
            gg.row_dim(ds, self.addr(&a.k), self.addr(&w.dq))?;
            gg.key_dim(ds, self.addr(&a.q), self.addr(&w.dk))?;
        }
        Ok(())
    }
}
