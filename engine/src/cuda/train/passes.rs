//! The passes of one micro-batch: forward through the layers, the vocabulary projection with
//! cross-entropy in chunks of rows, and backward through the layers in reverse (in
//! `nvfp4-full`, with each layer's linears stepped right after its backward: see `packed`).

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use kiln_kernels::cuda::decode::DevAddr;
use kiln_kernels::cuda::CudaKernels;

use super::super::cuda;
use super::gemm::Mm;
use super::packed::Stack;
use super::workspace::LOGIT_CHUNK;
use super::{CudaTrainer, LayerWeights};
use crate::error::Result;

/// Which backward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    /// Every gradient into the flat buffers (`none`, `nvfp4-ste`).
    Dense,
    /// `nvfp4-full` with clipping, first pass: dense gradients as usual, each layer's linear
    /// gradients summed into the norm and dropped.
    SumOnly,
    /// `nvfp4-full` with clipping, second pass: the layers' linear gradients again, each
    /// layer's linears stepped; dense gradients discarded (the first pass made them).
    Apply,
    /// `nvfp4-full` without clipping: dense gradients as usual, each layer's linears summed
    /// into the norm and stepped.
    SumAndApply,
    /// `nvfp4-full` with gradient accumulation: dense gradients as usual, each layer's linear
    /// gradients added into the accumulator (they step after the last micro-batch).
    Accumulate,
}

impl CudaTrainer {
    /// Layer `l`'s bf16 working weights (`nvfp4-full`: dequantized into the one scratch now).
    fn layer_weights(&self, l: usize) -> Result<&LayerWeights> {
        let Some(p) = &self.packed else {
            return Ok(&self.weights[l]);
        };
        let lw = &self.weights[0];
        let dst = [
            self.addr(&lw.qkv),
            self.addr(&lw.o),
            self.addr(&lw.gate_up),
            self.addr(&lw.down),
        ];
        // SAFETY: the scratch matrices hold one layer's stacks in bf16; everything runs on
        // the one stream, so the previous layer's GEMMs have read them before this writes.
        unsafe { p.dequantize_layer(&self.k, l, dst)? };
        Ok(lw)
    }

    /// Where layer `l`'s linear weight gradient goes: its flat offset `off`, or in
    /// `nvfp4-full` its stack in the layer scratch (in the accumulator when accumulating).
    fn lin_grad(&self, l: usize, off: usize, stack: Stack) -> DevAddr {
        match &self.packed {
            Some(p) if p.accumulates() => p.acc_of(&self.k, l, stack),
            Some(p) => p.grad_of(&self.k, stack),
            None => self.grad_at(off),
        }
    }

    /// Where a dense parameter's gradient goes in `pass`: its flat offset, or the discard
    /// buffer in the second `nvfp4-full` pass (the first one made it).
    fn dense_grad(&self, off: usize, pass: Pass) -> DevAddr {
        match (&self.packed, pass) {
            (Some(p), Pass::Apply) => self.addr(&p.discard),
            _ => self.grad_at(off),
        }
    }

    pub(super) fn forward_layers(&mut self, batch: usize, seq: usize) -> Result<()> {
        let k = &*self.k;
        let w = self.work.as_ref().expect("ensured");
        let (n, h) = (batch * seq, self.cfg.hidden_size);
        // SAFETY: every buffer comes from Workspace::new for this (B, T) or from the trainer's
        // own allocations, sized as each launcher's contract says.
        unsafe {
            k.train_embed_fwd_async(
                self.addr(&w.ids),
                self.master_at(self.embed),
                self.addr(&w.h[0]),
                n,
                h,
            )?;
            for l in 0..self.layers.len() {
                let lw = self.layer_weights(l)?;
                self.forward_layer(l, batch, seq, lw, Some(&w.h[l + 1]))?;
            }
            let l = self.layers.len();
            k.train_rmsnorm_fwd_async(
                self.addr(&w.h[l]),
                self.master_at(self.norm),
                self.addr(&w.xnf),
                self.addr(&w.rstdf),
                n,
                h,
                self.cfg.rms_norm_eps as f32,
            )?;
        }
        Ok(())
    }

    /// Layer `l`'s forward on its input `w.h[l]` with its working weights `lw`, saving what its
    /// backward reads in `w.acts(l)` and writing its output into `next`; with `next` `None` (a
    /// recompute before the layer's backward) it stops once the saved activations are made.
    ///
    /// # Safety
    /// `lw` holds layer `l`'s working weights until the queued work runs; `next` holds
    /// `batch·seq·H` f32.
    unsafe fn forward_layer(
        &self,
        l: usize,
        batch: usize,
        seq: usize,
        lw: &LayerWeights,
        next: Option<&CudaSlice<f32>>,
    ) -> Result<()> {
        let k = &*self.k;
        let w = self.work.as_ref().expect("ensured");
        let cfg = &self.cfg;
        let sh = self.shape(batch, seq);
        let n = sh.tokens();
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let nh = sh.heads;
        let qkv_cols = sh.qkv_cols();
        let eps = cfg.rms_norm_eps as f32;
        let s = k.stream();
        let (off, a, h_in) = (self.layers[l], w.acts(l), &w.h[l]);
        // SAFETY (whole function): as in forward_layers; the caller's contract for lw / next.
        unsafe {
            k.train_rmsnorm_fwd_async(
                self.addr(h_in),
                self.master_at(off.input_norm),
                self.addr(&a.xn1),
                self.addr(&a.rstd1),
                n,
                h,
                eps,
            )?;
            Mm::new(
                (n, qkv_cols, h),
                (self.addr(&a.xn1), false),
                (self.addr(&lw.qkv), true),
                self.addr(&w.qkv),
            )
            .run(k)?;
            if let (Some((qn, kn)), Some((xhat, rstd))) = (off.qk_norm, &a.qk_norm) {
                k.train_head_norm_fwd_async(
                    sh,
                    self.addr(&w.qkv),
                    self.master_at(qn),
                    self.master_at(kn),
                    self.addr(xhat),
                    self.addr(rstd),
                    eps,
                )?;
            }
            k.train_qkv_fwd_async(
                sh,
                self.addr(&w.qkv),
                off.qkv_bias.map_or(0, |o| self.master_at(o)),
                self.addr(&self.inv_freq),
                self.addr(&a.q),
                self.addr(&a.k),
                self.addr(&a.v),
            )?;
            self.attention_forward(sh, a, w)?;
            // h_mid = h_in + attn · Woᵀ
            copy_f32(s, &a.h_mid, h_in, n * h, k)?;
            Mm::new(
                (n, h, nh * hd),
                (self.addr(&a.attn), false),
                (self.addr(&lw.o), true),
                self.addr(&a.h_mid),
            )
            .accumulate()
            .run(k)?;
            k.train_rmsnorm_fwd_async(
                self.addr(&a.h_mid),
                self.master_at(off.post_norm),
                self.addr(&a.xn2),
                self.addr(&a.rstd2),
                n,
                h,
                eps,
            )?;
            Mm::new(
                (n, 2 * i, h),
                (self.addr(&a.xn2), false),
                (self.addr(&lw.gate_up), true),
                self.addr(&a.gu),
            )
            .run(k)?;
            k.train_swiglu_fwd_async(self.addr(&a.gu), self.addr(&a.a), n, i)?;
            // The next layer's input = h_mid + a · Wdownᵀ (a recompute stops before it).
            let Some(next) = next else {
                return Ok(());
            };
            copy_f32(s, next, &a.h_mid, n * h, k)?;
            Mm::new(
                (n, h, i),
                (self.addr(&a.a), false),
                (self.addr(&lw.down), true),
                self.addr(next),
            )
            .accumulate()
            .run(k)?;
        }
        Ok(())
    }

    /// The vocabulary projection and cross-entropy in chunks of rows; each chunk's dlogits go
    /// straight into the head's backward GEMMs: `dx` (the final norm's output gradient) and
    /// the head's (or the tied embedding's) weight gradient.
    pub(super) fn head_and_loss(&mut self, n: usize) -> Result<()> {
        let k = &*self.k;
        let w = self.work.as_ref().expect("ensured");
        let (h, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let head_grad = self.grad_at(self.lm_head.unwrap_or(self.embed));
        for r0 in (0..n).step_by(LOGIT_CHUNK) {
            let rows = LOGIT_CHUNK.min(n - r0);
            let xn = k.addr(&w.xnf, r0 * h);
            // SAFETY: logits / dlogits hold LOGIT_CHUNK·vocab; xnf, dx, target and weight hold
            // n rows; the head and its gradient vocab·h.
            unsafe {
                Mm::new(
                    (rows, vocab, h),
                    (xn, false),
                    (self.addr(&self.head), true),
                    self.addr(&w.logits),
                )
                .run(k)?;
                k.train_cross_entropy_async(
                    self.addr(&w.logits),
                    k.addr(&w.target, r0),
                    k.addr(&w.weight, r0),
                    self.addr(&w.dlogits),
                    self.addr(&self.loss),
                    rows,
                    vocab,
                )?;
                // dx[r0..] = dlogits · W_head; dW_head += dlogitsᵀ · xn
                Mm::new(
                    (rows, h, vocab),
                    (self.addr(&w.dlogits), false),
                    (self.addr(&self.head), false),
                    k.addr(&w.dx, r0 * h),
                )
                .run(k)?;
                Mm::new(
                    (vocab, h, rows),
                    (self.addr(&w.dlogits), true),
                    (xn, false),
                    head_grad,
                )
                .accumulate()
                .run(k)?;
            }
        }
        Ok(())
    }

    pub(super) fn backward_layers(&mut self, batch: usize, seq: usize, pass: Pass) -> Result<()> {
        let kk = self.k.clone();
        {
            let w = self.work.as_mut().expect("ensured");
            match pass {
                // The final norm's input gradient, saved by the first pass.
                Pass::Apply => kk.stream().memcpy_dtod(&w.dh_top, &mut w.dh),
                _ => kk.stream().memset_zeros(&mut w.dh),
            }
            .map_err(cuda("starting the residual gradient"))?;
        }
        let k = &*kk;
        let (hp, step, clip) = self.opt;
        let seed = self.seed;
        let sumsq = self.addr(&self.sumsq);
        let w = self.work.as_ref().expect("ensured");
        let cfg = &self.cfg;
        let sh = self.shape(batch, seq);
        let n = sh.tokens();
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let nh = sh.heads;
        let qkv_cols = sh.qkv_cols();
        // SAFETY (whole function): as in forward.
        unsafe {
            if pass != Pass::Apply {
                // Final norm: dh = its input gradient (dx from the head).
                k.train_rmsnorm_bwd_async(
                    self.addr(&w.h[self.layers.len()]),
                    self.master_at(self.norm),
                    self.addr(&w.rstdf),
                    self.addr(&w.dx),
                    self.addr(&w.dh),
                    self.grad_at(self.norm),
                    n,
                    h,
                )?;
            }
            if pass == Pass::SumOnly {
                copy_f32(k.stream(), &w.dh_top, &w.dh, n * h, k)?;
            }
            for l in (0..self.layers.len()).rev() {
                let (off, lw, a) = (self.layers[l], self.layer_weights(l)?, w.acts(l));
                if w.recompute {
                    // Only the layer's input was kept: make its activations again.
                    self.forward_layer(l, batch, seq, lw, None)?;
                }
                if let Some(p) = self.packed.as_ref().filter(|p| !p.accumulates()) {
                    zero_f32(k, self.addr(&p.lgrad), p.lgrad.len())?;
                }
                // MLP branch: dh (the gradient of h_out) is the down GEMM's output gradient.
                k.train_f32_to_bf16_async(self.addr(&w.dh), self.addr(&w.dh_bf16), n * h)?;
                Mm::new(
                    (n, i, h),
                    (self.addr(&w.dh_bf16), false),
                    (self.addr(&lw.down), false),
                    self.addr(&w.dx),
                )
                .run(k)?;
                Mm::new(
                    (h, i, n),
                    (self.addr(&w.dh_bf16), true),
                    (self.addr(&a.a), false),
                    self.lin_grad(l, off.down, Stack::Down),
                )
                .accumulate()
                .run(k)?;
                k.train_swiglu_bwd_async(
                    self.addr(&a.gu),
                    self.addr(&w.dx),
                    self.addr(&w.dmid),
                    n,
                    i,
                )?;
                Mm::new(
                    (2 * i, h, n),
                    (self.addr(&w.dmid), true),
                    (self.addr(&a.xn2), false),
                    self.lin_grad(l, off.gate_up, Stack::GateUp),
                )
                .accumulate()
                .run(k)?;
                Mm::new(
                    (n, h, 2 * i),
                    (self.addr(&w.dmid), false),
                    (self.addr(&lw.gate_up), false),
                    self.addr(&w.dx),
                )
                .run(k)?;
                k.train_rmsnorm_bwd_async(
                    self.addr(&a.h_mid),
                    self.master_at(off.post_norm),
                    self.addr(&a.rstd2),
                    self.addr(&w.dx),
                    self.addr(&w.dh),
                    self.dense_grad(off.post_norm, pass),
                    n,
                    h,
                )?;
                // Attention branch: dh is now the gradient of h_mid.
                k.train_f32_to_bf16_async(self.addr(&w.dh), self.addr(&w.dh_bf16), n * h)?;
                Mm::new(
                    (n, nh * hd, h),
                    (self.addr(&w.dh_bf16), false),
                    (self.addr(&lw.o), false),
                    self.addr(&w.dx),
                )
                .run(k)?;
                Mm::new(
                    (h, nh * hd, n),
                    (self.addr(&w.dh_bf16), true),
                    (self.addr(&a.attn), false),
                    self.lin_grad(l, off.o, Stack::O),
                )
                .accumulate()
                .run(k)?;
                self.attention_backward(sh, a, w)?;
                k.train_qkv_bwd_async(
                    sh,
                    self.addr(&w.dq),
                    self.addr(&w.dk),
                    self.addr(&w.dv),
                    self.addr(&self.inv_freq),
                    self.addr(&w.dmid),
                    off.qkv_bias.map_or(0, |o| self.dense_grad(o, pass)),
                )?;
                if let (Some((qn, kn)), Some((xhat, rstd))) = (off.qk_norm, &a.qk_norm) {
                    k.train_head_norm_bwd_async(
                        sh,
                        self.addr(&w.dmid),
                        self.addr(xhat),
                        self.addr(rstd),
                        self.master_at(qn),
                        self.master_at(kn),
                        self.dense_grad(qn, pass),
                        self.dense_grad(kn, pass),
                    )?;
                }
                Mm::new(
                    (qkv_cols, h, n),
                    (self.addr(&w.dmid), true),
                    (self.addr(&a.xn1), false),
                    self.lin_grad(l, off.qkv, Stack::Qkv),
                )
                .accumulate()
                .run(k)?;
                Mm::new(
                    (n, h, qkv_cols),
                    (self.addr(&w.dmid), false),
                    (self.addr(&lw.qkv), false),
                    self.addr(&w.dx),
                )
                .run(k)?;
                k.train_rmsnorm_bwd_async(
                    self.addr(&w.h[l]),
                    self.master_at(off.input_norm),
                    self.addr(&a.rstd1),
                    self.addr(&w.dx),
                    self.addr(&w.dh),
                    self.dense_grad(off.input_norm, pass),
                    n,
                    h,
                )?;
                if matches!(pass, Pass::SumOnly | Pass::SumAndApply) {
                    if let Some(p) = &self.packed {
                        p.add_sumsq(k, sumsq)?;
                    }
                }
                if matches!(pass, Pass::Apply | Pass::SumAndApply) {
                    let max_norm = if pass == Pass::Apply { clip } else { 0.0 };
                    let p = self.packed.as_mut().expect("a packed pass");
                    p.step_layer(k, l, hp, step, seed, (sumsq, max_norm), &mut self.status)?;
                }
            }
            if pass != Pass::Apply {
                k.train_embed_bwd_async(
                    self.addr(&w.ids),
                    self.addr(&w.dh),
                    self.grad_at(self.embed),
                    n,
                    h,
                )?;
            }
        }
        Ok(())
    }
}

/// `count` f32 zeros at `at`, on the stream.
///
/// # Safety
/// `at` holds `count` f32.
unsafe fn zero_f32(k: &CudaKernels, at: DevAddr, count: usize) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { cudarc::driver::result::memset_d8_async(at, 0, count * 4, k.stream().cu_stream()) }
        .map_err(cuda("zeroing the layer gradients"))
}

/// `dst[..count] = src[..count]` (f32), on the stream.
fn copy_f32(
    s: &Arc<cudarc::driver::CudaStream>,
    dst: &CudaSlice<f32>,
    src: &CudaSlice<f32>,
    count: usize,
    k: &CudaKernels,
) -> Result<()> {
    assert!(
        count <= dst.len() && count <= src.len(),
        "copy past a buffer"
    );
    // SAFETY: both buffers hold at least `count` f32 (checked above).
    unsafe {
        cudarc::driver::result::memcpy_dtod_async(
            k.addr(dst, 0),
            k.addr(src, 0),
            count * 4,
            s.cu_stream(),
        )
    }
    .map_err(cuda("copying the residual stream"))
}
