//! [`CudaTrainer`]: a train step on one GPU for `--quant none`, `nvfp4-ste` and `nvfp4-full` —
//! the CPU trainer's model, loss and AdamW with bf16 activations and GEMMs (cuBLAS, f32
//! accumulation and f32 outputs) and f32 master weights, gradients and moments (or bf16
//! moments); in `nvfp4-full` the linears stay packed (`packed`).
//!
//! Layout on the GPU: every parameter lives in one flat f32 buffer (`master`), with the
//! gradient (`grads`) and the two moments at the same offsets, so the optimizer is one
//! multi-tensor AdamW launch over a single span. Parameters are ordered so that the ones a GEMM
//! reads together are adjacent: per layer the q, k and v weights (one `[qkv_cols, H]` matrix),
//! their biases, and the gate and up weights (one `[2I, H]` matrix); their weight gradients come
//! out of one GEMM each. Each step the linears are turned into bf16 working copies — the
//! straight-through NVFP4 fake-quant of each weight with its own tensor scale (`nvfp4-ste`), or
//! a plain rounding (`none`); the vocabulary projection (the embedding when tied) is rounded to
//! bf16, as the CPU keeps it dense.
//!
//! Forward per layer (N = B·T tokens): RMSNorm → q/k/v GEMM → (Qwen3: per-head q/k RMSNorm, in
//! place) → bias + RoPE into the attention group layout → scores GEMM → causal softmax → values
//! GEMM → head merge → O GEMM added into the residual (GEMM β = 1) → RMSNorm → gate/up GEMM →
//! SwiGLU → down GEMM added into the residual.
//! The final norm's output goes through the vocabulary projection and cross-entropy in chunks of
//! rows, each chunk's dlogits feeding the head's two backward GEMMs at once, so `[N × vocab]`
//! logits never exist. Backward walks the layers in reverse with the saved activations; the
//! embedding's gradient is a scatter-add.
//!
//! `--recompute` keeps only the residual stream into each layer through forward and remakes
//! the layer's other activations just before its backward.
//!
//! - `attention` — [`TrainAttention`]: the causal attention forward and backward, materialized
//!   (GEMMs + softmax kernels) or flash (`--flash-attention`: no `T × T` buffers);
//! - `layout` — the flat parameter order and each layer's offsets;
//! - `packed` — `nvfp4-full`: packed linears, per-layer dequantize, gradient and AdamW;
//! - `workspace` — the buffers of one micro-batch shape;
//! - `gemm` — the row-major GEMM on raw addresses;
//! - `passes` — forward, vocabulary projection + cross-entropy, backward;
//! - `plan` — [`TrainPlan`]: those allocations predicted from the config, checked against a
//!   budget before anything is allocated;
//! - `bench` — the GPU train benchmark (`kiln bench train --device cuda`).

mod attention;
pub mod bench;
mod gemm;
mod layout;
mod packed;
mod passes;
pub mod plan;
mod workspace;

pub use attention::{TrainAttention, TRAIN_FLASH_ATTENTION};
pub use plan::TrainPlan;
pub use workspace::LOGIT_CHUNK;

use std::sync::Arc;

use candle_core::Tensor;
use cudarc::driver::CudaSlice;
use half::bf16;
use kiln_kernels::cpu::{AdamWParams, AdamWScalars};
use kiln_kernels::cuda::decode::DevAddr;
use kiln_kernels::cuda::train::{TrainAttnShape, TrainTensor, TrainTensorTable, HEAD_NORM_MAX_DIM};
use kiln_kernels::cuda::{CudaKernels, DeviceStatus};

use super::cuda;
use crate::error::{EngineError, Result};
use crate::model::rope::Rope;
use crate::model::{ModelConfig, ModelLayout};
use crate::spec::{MomentsSpec, QuantSpec};
use crate::train::dataset::{BatchArrays, TrainSample};
use crate::train::moments::MomentVec;
use crate::train::params::{ParamStore, ParamValue};
use layout::{flat_layout, FlatParam, LayerOffsets};
use packed::PackedModel;
use workspace::Workspace;

/// The bf16 working copies of one layer's linears.
pub(super) struct LayerWeights {
    qkv: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    gate_up: CudaSlice<bf16>,
    down: CudaSlice<bf16>,
}

/// One micro-batch on the host: `batch` rows of `seq` tokens.
#[derive(Debug, Clone)]
pub struct HostBatch {
    /// Rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Input ids `[batch·seq]`.
    pub ids: Vec<u32>,
    /// Next-token targets `[batch·seq]`.
    pub target: Vec<u32>,
    /// Loss weight per position (0 outside the loss; inside, 1 / the step's loss tokens).
    pub weight: Vec<f32>,
    /// Input tokens that are not padding.
    pub input_tokens: usize,
}

impl HostBatch {
    /// The micro-batch of `samples`, each assistant target weighted `1 / denom` (the step's
    /// assistant tokens over all its micro-batches).
    pub fn new(samples: &[&TrainSample], pad: u32, denom: usize) -> Result<Self> {
        let a = BatchArrays::new(samples, pad)?;
        let w = 1.0 / denom.max(1) as f32;
        Ok(HostBatch {
            batch: a.batch,
            seq: a.seq,
            weight: a.mask.iter().map(|&m| m * w).collect(),
            input_tokens: a.input_tokens,
            ids: a.input,
            target: a.target,
        })
    }
}

/// What one GPU step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuStepStats {
    /// The step's loss (the weighted sum over its micro-batches).
    pub loss: f32,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f32,
}

/// Bytes on the GPU by category (the phases' tensor bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuTrainBytes {
    /// f32 master weights and their bf16 working copies (and in `nvfp4-full` the packed
    /// linears' E2M1 codes).
    pub weights: u64,
    /// The packed linears' block and tensor scales (`nvfp4-full`; 0 otherwise).
    pub scales: u64,
    /// f32 gradients.
    pub grads: u64,
    /// AdamW moments.
    pub optimizer_state: u64,
    /// Saved activations and scratch of the current micro-batch shape.
    pub activations: u64,
}

/// A model being trained on one GPU.
pub struct CudaTrainer {
    k: Arc<CudaKernels>,
    cfg: ModelConfig,
    quant: QuantSpec,
    params: Vec<FlatParam>,
    layers: Vec<LayerOffsets>,
    embed: usize,
    norm: usize,
    lm_head: Option<usize>,
    master: CudaSlice<f32>,
    grads: CudaSlice<f32>,
    m: Moments,
    v: Moments,
    table: TrainTensorTable,
    inv_freq: CudaSlice<f32>,
    weights: Vec<LayerWeights>,
    /// bf16 vocabulary projection `[V, H]` (the embedding's copy when tied).
    head: CudaSlice<bf16>,
    status: DeviceStatus,
    sumsq: CudaSlice<f64>,
    loss: CudaSlice<f64>,
    work: Option<Workspace>,
    /// `nvfp4-full`: the packed linears.
    packed: Option<PackedModel>,
    /// The step in flight's optimizer settings: hyper-parameters, 1-based step, clip norm.
    opt: (AdamWParams, u64, f32),
    /// The micro-batch in flight (rows, tokens per row).
    current: (usize, usize),
    /// Activations recomputed per layer in backward (`--recompute`).
    recompute: bool,
    /// The attention's form ([`CudaTrainer::set_flash_attention`]).
    attention: TrainAttention,
    seed: u64,
}

/// Whether the flash train attention kernels loaded; if not, logs why (the caller keeps the
/// materialized attention).
fn flash_kernels_loaded(k: &CudaKernels) -> bool {
    match k.train_flash_load_error() {
        None => true,
        Some(e) => {
            tracing::warn!(
                "the flash train attention is unavailable, using the materialized one: {e}"
            );
            false
        }
    }
}

/// A moment buffer in its element type.
enum Moments {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

fn unsupported(what: String) -> EngineError {
    EngineError::InvalidArgument(format!("GPU training: {what}"))
}

impl CudaTrainer {
    /// Whether the GPU trainer can train a model of shape `cfg` (every `--quant` mode, with or
    /// without accumulation and recomputation, runs; what can be refused is a shape).
    pub fn check_supported(cfg: &ModelConfig) -> Result<()> {
        if cfg.qk_norm() && cfg.attention_bias {
            return Err(unsupported(
                "a model with both q/k norm and q/k/v biases does not train on the GPU yet; use --device cpu".into(),
            ));
        }
        if cfg.qk_norm() && cfg.head_dim > HEAD_NORM_MAX_DIM {
            return Err(unsupported(format!(
                "q/k norm over head_dim {} (at most {HEAD_NORM_MAX_DIM} on the GPU); use --device cpu",
                cfg.head_dim
            )));
        }
        let h = cfg.hidden_size;
        if !(h.is_multiple_of(16)
            && cfg.head_dim.is_multiple_of(16)
            && cfg.intermediate_size.is_multiple_of(16))
        {
            return Err(unsupported(format!(
                "hidden ({h}), head_dim ({}) and intermediate ({}) must be multiples of 16",
                cfg.head_dim, cfg.intermediate_size
            )));
        }
        if h > 8192 {
            return Err(unsupported(format!("hidden size {h} is above 8192")));
        }
        Ok(())
    }

    /// Upload `store`'s parameters (dense f32: `none` / `nvfp4-ste`) and moments to the GPU.
    pub fn new(k: Arc<CudaKernels>, cfg: &ModelConfig, store: &ParamStore) -> Result<Self> {
        let quant = store.quant();
        Self::check_supported(cfg)?;
        let layout = ModelLayout::new(cfg)?;
        let full = quant == QuantSpec::Nvfp4Full;
        let (params, layers, embed, norm, lm_head) = flat_layout(cfg, &layout, full)?;
        let total = params.iter().map(|p| p.offset + p.numel).max().unwrap_or(0);
        let s = k.stream().clone();
        let alloc_f32 = |n: usize, what: &'static str| s.alloc_zeros::<f32>(n).map_err(cuda(what));
        let mut master = alloc_f32(total, "allocating the master weights")?;
        let grads = alloc_f32(total, "allocating the gradients")?;
        let moments = store.moments();
        let alloc_m = |what: &'static str| -> Result<Moments> {
            Ok(match moments {
                MomentsSpec::F32 => Moments::F32(alloc_f32(total, what)?),
                MomentsSpec::Bf16 => {
                    Moments::Bf16(s.alloc_zeros::<bf16>(total).map_err(cuda(what))?)
                }
            })
        };
        let (mut m, mut v) = (
            alloc_m("allocating moments")?,
            alloc_m("allocating moments")?,
        );
        for fp in &params {
            let p = store
                .param(&fp.name)
                .ok_or_else(|| unsupported(format!("the parameter store has no {}", fp.name)))?;
            let ParamValue::Dense(var) = &p.value else {
                return Err(unsupported(format!(
                    "{} is packed but the layout expected it dense",
                    fp.name
                )));
            };
            let host = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let range = fp.offset..fp.offset + fp.numel;
            s.memcpy_htod(&host, &mut master.slice_mut(range.clone()))
                .map_err(cuda("uploading a master weight"))?;
            upload_moment(&s, &p.exp_avg, &mut m, range.clone())?;
            upload_moment(&s, &p.exp_avg_sq, &mut v, range)?;
        }
        let (ma, va) = (moments_addr(&k, &m), moments_addr(&k, &v));
        let table = k.train_tensor_table(
            &[TrainTensor {
                w: k.addr(&master, 0),
                g: k.addr(&grads, 0),
                m: ma,
                v: va,
                n: total as i64,
            }],
            moments == MomentsSpec::Bf16,
        )?;
        let rope = Rope::new(cfg);
        let inv_freq = s
            .clone_htod(rope.inv_freq())
            .map_err(cuda("uploading the RoPE frequencies"))?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let qkv_cols = cfg.q_size() + 2 * cfg.kv_size();
        let alloc_bf16 = |n: usize| {
            s.alloc_zeros::<bf16>(n)
                .map_err(cuda("allocating the bf16 working weights"))
        };
        let packed = if full {
            Some(PackedModel::new(&k, cfg, store)?)
        } else {
            None
        };
        // nvfp4-full: one layer's working copy, refilled before each layer runs.
        let copies = if full { 1 } else { layers.len() };
        let weights = (0..copies)
            .map(|_| {
                Ok(LayerWeights {
                    qkv: alloc_bf16(qkv_cols * h)?,
                    o: alloc_bf16(h * cfg.q_size())?,
                    gate_up: alloc_bf16(2 * i * h)?,
                    down: alloc_bf16(h * i)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = alloc_bf16(cfg.vocab_size * h)?;
        let status = k.alloc_status()?;
        let sumsq = s
            .alloc_zeros::<f64>(1)
            .map_err(cuda("allocating scalars"))?;
        let loss = s
            .alloc_zeros::<f64>(1)
            .map_err(cuda("allocating scalars"))?;
        Ok(CudaTrainer {
            k,
            cfg: cfg.clone(),
            quant,
            params,
            layers,
            embed,
            norm,
            lm_head,
            master,
            grads,
            m,
            v,
            table,
            inv_freq,
            weights,
            head,
            status,
            sumsq,
            loss,
            work: None,
            packed,
            opt: (AdamWParams::default(), 1, 0.0),
            current: (0, 0),
            recompute: false,
            attention: TrainAttention::Materialized,
            seed: 0,
        })
    }

    /// Bytes by category on the GPU now.
    pub fn bytes(&self) -> GpuTrainBytes {
        let total = self.master.len() as u64;
        let bf16_weights: u64 = self
            .weights
            .iter()
            .map(|w| (w.qkv.len() + w.o.len() + w.gate_up.len() + w.down.len()) as u64 * 2)
            .sum::<u64>()
            + self.head.len() as u64 * 2;
        let moment = |m: &Moments| match m {
            Moments::F32(b) => b.len() as u64 * 4,
            Moments::Bf16(b) => b.len() as u64 * 2,
        };
        let p = self.packed.as_ref().map(PackedModel::bytes);
        let pb = |f: fn(&packed::PackedBytes) -> u64| p.as_ref().map_or(0, f);
        GpuTrainBytes {
            weights: total * 4 + bf16_weights + pb(|b| b.codes),
            scales: pb(|b| b.scales),
            grads: total * 4 + pb(|b| b.grad_scratch) + pb(|b| b.grad_acc),
            optimizer_state: moment(&self.m) + moment(&self.v) + pb(|b| b.moments),
            activations: self.work.as_ref().map_or(0, Workspace::bytes),
        }
    }

    fn addr<T>(&self, s: &CudaSlice<T>) -> DevAddr {
        self.k.addr(s, 0)
    }

    fn master_at(&self, off: usize) -> DevAddr {
        self.k.addr(&self.master, off)
    }

    fn grad_at(&self, off: usize) -> DevAddr {
        self.k.addr(&self.grads, off)
    }

    /// Make the bf16 working copies of the linears (fake-quantized in `nvfp4-ste` mode) and
    /// of the vocabulary projection.
    fn prepare_weights(&mut self) -> Result<()> {
        let (h, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let q_size = self.cfg.q_size();
        // nvfp4-full dequantizes each layer just before it runs instead.
        let dense_layers = if self.packed.is_some() {
            0
        } else {
            self.layers.len()
        };
        for l in 0..dense_layers {
            let off = self.layers[l];
            let qkv_n = (q_size + 2 * self.cfg.kv_size()) * h;
            let dst = [
                (off.qkv, self.addr(&self.weights[l].qkv), qkv_n),
                (off.o, self.addr(&self.weights[l].o), h * q_size),
                (off.gate_up, self.addr(&self.weights[l].gate_up), 2 * i * h),
                (off.down, self.addr(&self.weights[l].down), h * i),
            ];
            for (src, out, n) in dst {
                self.working_copy(src, out, n)?;
            }
        }
        let head_src = self.lm_head.unwrap_or(self.embed);
        let n = self.cfg.vocab_size * h;
        // The vocabulary projection stays dense, as on the CPU: rounded to bf16.
        // SAFETY: master holds the head's n f32 at head_src; head holds n bf16.
        unsafe {
            self.k
                .train_f32_to_bf16_async(self.master_at(head_src), self.addr(&self.head), n)?;
        }
        Ok(())
    }

    /// The bf16 copy of the linears starting at flat offset `src` (`n` elements, possibly
    /// several adjacent linears, each fake-quantized with its own tensor scale).
    fn working_copy(&mut self, src: usize, out: DevAddr, n: usize) -> Result<()> {
        let parts: Vec<(usize, usize, bool)> = self
            .params
            .iter()
            .filter(|p| p.offset >= src && p.offset < src + n)
            .map(|p| (p.offset, p.numel, p.nvfp4))
            .collect();
        for (off, numel, nvfp4) in parts {
            let dst = out + ((off - src) * 2) as u64;
            let x = self.master_at(off);
            // SAFETY: master holds numel f32 at off (16-element aligned: sizes are multiples
            // of 16), the working copy numel bf16 from dst.
            unsafe {
                if self.quant == QuantSpec::Nvfp4Ste && nvfp4 {
                    self.k.amax_f32_at_async(x, numel, &mut self.status)?;
                    self.k
                        .train_fakequant_bf16_async(x, &self.status, dst, numel)?;
                } else {
                    self.k.train_f32_to_bf16_async(x, dst, numel)?;
                }
            }
        }
        Ok(())
    }

    /// Allocate the activations and scratch for micro-batches of up to `batch × seq` once
    /// (what [`TrainPlan`] counts), instead of growing them as longer batches arrive.
    pub fn reserve(&mut self, batch: usize, seq: usize) -> Result<()> {
        self.ensure_workspace(batch, seq)
    }

    /// Make sure the workspace holds a `batch × seq` micro-batch (smaller ones use a prefix of
    /// every buffer: all layouts are compact for the shape in flight); grow it otherwise.
    fn ensure_workspace(&mut self, batch: usize, seq: usize) -> Result<()> {
        let (cb, cs) = self.work.as_ref().map_or((0, 0), |w| (w.batch, w.seq));
        if batch <= cb && seq <= cs {
            return Ok(());
        }
        self.work = None;
        self.work = Some(Workspace::new(
            &self.k,
            &self.cfg,
            self.layers.len(),
            (batch.max(cb), seq.max(cs)),
            self.packed.is_some(),
            self.recompute,
            self.attention,
        )?);
        Ok(())
    }

    /// Steps of `n` micro-batches each follow: in `nvfp4-full` with `n > 1` this allocates
    /// the gradient accumulator (what [`TrainPlan::with_micro_batches`] counts), so call it
    /// before [`CudaTrainer::reserve`] in a budgeted run. The other modes need nothing.
    pub fn set_micro_batches(&mut self, n: usize) -> Result<()> {
        match &mut self.packed {
            Some(p) if n > 1 => p.enable_accumulation(&self.k),
            _ => Ok(()),
        }
    }

    /// Keep only each layer's input through forward and recompute the rest of its activations
    /// just before its backward (`--recompute`: one more forward per step, in exchange for one
    /// layer's activations instead of all of them; what [`TrainPlan::with_recompute`]
    /// counts). Call it before [`CudaTrainer::reserve`].
    pub fn set_recompute(&mut self, on: bool) {
        if on != self.recompute {
            self.recompute = on;
            self.work = None;
        }
    }

    /// Run the attention as the flash kernels where they are built for the model's head dim
    /// (no `[B·nh·T × T]` scores, probabilities or their gradients; what
    /// [`TrainPlan::with_flash_attention`] counts), as GEMMs and softmax kernels otherwise.
    /// Call it before [`CudaTrainer::reserve`]. If the flash kernels did not load (an
    /// optional module), the materialized form serves and the reason is logged.
    pub fn set_flash_attention(&mut self, on: bool) {
        let on = on && flash_kernels_loaded(&self.k);
        let form = TrainAttention::for_config(&self.cfg, on);
        if form != self.attention {
            self.attention = form;
            self.work = None;
        }
    }

    /// The attention's form in use.
    pub fn attention(&self) -> TrainAttention {
        self.attention
    }

    /// The seed of the bf16 moments' stochastic rounding (the run's `--seed`).
    pub fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
    }

    fn shape(&self, batch: usize, seq: usize) -> TrainAttnShape {
        TrainAttnShape {
            batch,
            seq,
            heads: self.cfg.num_attention_heads,
            kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// One optimizer step over `micro` micro-batches: gradients summed over them (each
    /// batch's weights already divide by the whole step's loss tokens), clipped to the global
    /// norm `clip` (0: off), AdamW with `hp` at 1-based `step`.
    pub fn step(
        &mut self,
        micro: &[HostBatch],
        hp: AdamWParams,
        step: u64,
        clip: f32,
    ) -> Result<GpuStepStats> {
        self.set_micro_batches(micro.len())?;
        self.begin_step(hp, step, clip)?;
        for b in micro {
            self.forward(b)?;
            self.backward()?;
        }
        self.finish_step()
    }

    /// Start step `step` (1-based) with AdamW `hp` and gradient clipping to `clip` (0: off):
    /// zero the gradients and the loss, make the working weights. (In `nvfp4-full` the
    /// linears take their step during [`CudaTrainer::backward`], so the settings are needed
    /// now.)
    pub fn begin_step(&mut self, hp: AdamWParams, step: u64, clip: f32) -> Result<()> {
        self.opt = (hp, step, clip);
        let s = self.k.stream().clone();
        s.memset_zeros(&mut self.grads)
            .map_err(cuda("zeroing the gradients"))?;
        s.memset_zeros(&mut self.loss)
            .map_err(cuda("zeroing the loss"))?;
        s.memset_zeros(&mut self.sumsq)
            .map_err(cuda("zeroing the gradient norm"))?;
        if let Some(p) = &mut self.packed {
            p.zero_accumulator(&self.k)?;
        }
        self.prepare_weights()
    }

    /// Wait for everything queued (before a phase sample).
    pub fn sync(&self) -> Result<()> {
        self.k
            .stream()
            .synchronize()
            .map_err(cuda("waiting for the GPU"))
    }

    /// `(free, total)` device memory (cuMemGetInfo).
    pub fn mem_info(&self) -> Result<(u64, u64)> {
        let (free, total) = self
            .k
            .context()
            .mem_get_info()
            .map_err(cuda("cuMemGetInfo"))?;
        Ok((free as u64, total as u64))
    }

    /// The optimizer after the step's micro-batches: gradient norm, clipping, AdamW with the
    /// settings [`CudaTrainer::begin_step`] took; reads the loss and the norm back.
    pub fn finish_step(&mut self) -> Result<GpuStepStats> {
        let (hp, step, clip) = self.opt;
        let s = self.k.stream().clone();
        let sc = AdamWScalars::new(hp, step, self.seed);
        // With clipping, nvfp4-full's first backward pass has summed every gradient already.
        let summed = self.sums_in_backward();
        let sumsq = self.addr(&self.sumsq);
        // SAFETY: the table names master, grads and the moments, all live and `total` long;
        // the accumulator lives with the packed model.
        unsafe {
            if !summed {
                self.k.train_grad_sumsq_async(&self.table, sumsq)?;
            }
            // nvfp4-full with accumulation: the linears step now, from the accumulator.
            if let Some(p) = self.packed.as_mut().filter(|p| p.accumulates()) {
                p.add_acc_sumsq(&self.k, sumsq)?;
                for l in 0..p.layer_count() {
                    p.step_layer(
                        &self.k,
                        l,
                        hp,
                        step,
                        self.seed,
                        (sumsq, clip),
                        &mut self.status,
                    )?;
                }
            }
            self.k.train_adamw_async(&self.table, sumsq, &sc, clip)?;
        }
        let loss = s.clone_dtoh(&self.loss).map_err(cuda("reading the loss"))?[0];
        let sumsq = s
            .clone_dtoh(&self.sumsq)
            .map_err(cuda("reading the gradient norm"))?[0];
        let grad_norm = sumsq.sqrt() as f32;
        if !(loss.is_finite() && grad_norm.is_finite()) {
            return Err(EngineError::InvalidArgument(format!(
                "the loss is {loss} and the gradient norm {grad_norm} at step {step}; training diverged — lower the learning rate"
            )));
        }
        Ok(GpuStepStats {
            loss: loss as f32,
            grad_norm,
        })
    }

    /// Forward of one micro-batch through the loss (the head's backward GEMMs included: its
    /// dlogits are consumed chunk by chunk), adding into the loss.
    pub fn forward(&mut self, b: &HostBatch) -> Result<()> {
        let n = b.batch * b.seq;
        if b.ids.len() != n || b.target.len() != n || b.weight.len() != n {
            return Err(EngineError::InvalidArgument(format!(
                "a {}×{} micro-batch needs {n} ids, targets and weights (got {}, {}, {})",
                b.batch,
                b.seq,
                b.ids.len(),
                b.target.len(),
                b.weight.len()
            )));
        }
        if n == 0 || b.seq > self.cfg.max_position_embeddings {
            return Err(EngineError::InvalidArgument(format!(
                "a {}×{} micro-batch: it needs at least one token and at most {} per row (the model's context)",
                b.batch, b.seq, self.cfg.max_position_embeddings
            )));
        }
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = b.ids.iter().chain(&b.target).find(|&&t| t >= vocab) {
            return Err(EngineError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        self.ensure_workspace(b.batch, b.seq)?;
        self.current = (b.batch, b.seq);
        let s = self.k.stream().clone();
        {
            let w = self.work.as_mut().expect("ensured");
            let ids: Vec<i32> = b.ids.iter().map(|&x| x as i32).collect();
            let tgt: Vec<i32> = b.target.iter().map(|&x| x as i32).collect();
            s.memcpy_htod(&ids, &mut w.ids)
                .map_err(cuda("uploading the batch"))?;
            s.memcpy_htod(&tgt, &mut w.target)
                .map_err(cuda("uploading the batch"))?;
            s.memcpy_htod(&b.weight, &mut w.weight)
                .map_err(cuda("uploading the batch"))?;
        }
        self.forward_layers(b.batch, b.seq)?;
        self.head_and_loss(n)
    }

    /// Backward of the micro-batch [`CudaTrainer::forward`] just ran, adding into the
    /// gradients.
    pub fn backward(&mut self) -> Result<()> {
        let (batch, seq) = self.current;
        if batch == 0 {
            return Err(unsupported("backward before any forward".into()));
        }
        match &self.packed {
            None => return self.backward_layers(batch, seq, passes::Pass::Dense),
            Some(p) if p.accumulates() => {
                return self.backward_layers(batch, seq, passes::Pass::Accumulate)
            }
            Some(_) => {}
        }
        if self.sums_in_backward() {
            // Clipping needs the global norm before any update: sum first, then apply.
            self.backward_layers(batch, seq, passes::Pass::SumOnly)?;
            // SAFETY: the table names the dense gradients, complete after the first pass.
            unsafe {
                self.k
                    .train_grad_sumsq_async(&self.table, self.addr(&self.sumsq))?;
            }
            self.backward_layers(batch, seq, passes::Pass::Apply)
        } else {
            self.backward_layers(batch, seq, passes::Pass::SumAndApply)
        }
    }

    /// The gradients summed since the step began (before clipping), by parameter name: what
    /// the CPU trainer's [`crate::train::cpu_gradients`] gives for the same batches.
    pub fn gradients(&self) -> Result<Vec<(String, Vec<f32>)>> {
        let all = self
            .k
            .stream()
            .clone_dtoh(&self.grads)
            .map_err(cuda("downloading the gradients"))?;
        Ok(self
            .params
            .iter()
            .map(|fp| {
                (
                    fp.name.clone(),
                    all[fp.offset..fp.offset + fp.numel].to_vec(),
                )
            })
            .collect())
    }

    /// Whether the step's whole gradient norm is summed during backward: `nvfp4-full` with
    /// clipping and without accumulation, whose first backward pass sums before the second
    /// applies.
    fn sums_in_backward(&self) -> bool {
        self.packed.as_ref().is_some_and(|p| !p.accumulates()) && self.opt.2 > 0.0
    }

    /// Copy the master weights (packed weights in `nvfp4-full`) and, with `moments`, the AdamW
    /// moments back into `store` (for checkpoints and export; a `--save-only-model`
    /// checkpoint leaves the moments on the GPU).
    pub fn download_into(&self, store: &mut ParamStore, moments: bool) -> Result<()> {
        if let Some(p) = &self.packed {
            p.download_into(&self.k, store, moments)?;
        }
        let s = self.k.stream();
        let master = s
            .clone_dtoh(&self.master)
            .map_err(cuda("downloading the master weights"))?;
        let mv = if moments {
            Some((
                download_moment(&self.k, &self.m)?,
                download_moment(&self.k, &self.v)?,
            ))
        } else {
            None
        };
        for fp in &self.params {
            let p = store
                .param_mut(&fp.name)
                .ok_or_else(|| unsupported(format!("the parameter store has no {}", fp.name)))?;
            let range = fp.offset..fp.offset + fp.numel;
            if let ParamValue::Dense(var) = &p.value {
                var.set(&Tensor::from_vec(
                    master[range.clone()].to_vec(),
                    fp.shape.as_slice(),
                    var.device(),
                )?)?;
            }
            if let Some((m, v)) = &mv {
                let kind = p.exp_avg.kind();
                p.exp_avg = MomentVec::from_f32(m[range.clone()].to_vec(), kind);
                p.exp_avg_sq = MomentVec::from_f32(v[range].to_vec(), kind);
            }
        }
        Ok(())
    }
}

fn moments_addr(k: &CudaKernels, m: &Moments) -> DevAddr {
    match m {
        Moments::F32(b) => k.addr(b, 0),
        Moments::Bf16(b) => k.addr(b, 0),
    }
}

/// Upload `host` into `dev[range]` (allocated zeroed). A fresh run's moments are zeros: those
/// are skipped without reading them into a copy (a 14B model's are tens of GB).
fn upload_moment(
    s: &Arc<cudarc::driver::CudaStream>,
    host: &MomentVec,
    dev: &mut Moments,
    range: std::ops::Range<usize>,
) -> Result<()> {
    if host.is_all_zero() {
        return Ok(());
    }
    let vals = host.to_f32();
    match dev {
        Moments::F32(b) => s.memcpy_htod(&vals, &mut b.slice_mut(range)),
        Moments::Bf16(b) => {
            let h: Vec<bf16> = vals.iter().map(|&x| bf16::from_f32(x)).collect();
            s.memcpy_htod(&h, &mut b.slice_mut(range))
        }
    }
    .map_err(cuda("uploading the moments"))
}

fn download_moment(k: &CudaKernels, m: &Moments) -> Result<Vec<f32>> {
    let s = k.stream();
    Ok(match m {
        Moments::F32(b) => s.clone_dtoh(b).map_err(cuda("downloading the moments"))?,
        Moments::Bf16(b) => s
            .clone_dtoh(b)
            .map_err(cuda("downloading the moments"))?
            .iter()
            .map(|x| x.to_f32())
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_shapes_are_refused_with_the_way_out() {
        let cfg = crate::tiny::config().unwrap();
        assert!(CudaTrainer::check_supported(&cfg).is_ok());
        // Qwen3 trains; q/k norm together with q/k/v biases (no released model) does not.
        let qwen3 = ModelConfig::qwen3_8b();
        assert!(CudaTrainer::check_supported(&qwen3).is_ok());
        let mut both = qwen3.clone();
        both.attention_bias = true;
        let e = CudaTrainer::check_supported(&both).unwrap_err();
        assert!(e.to_string().contains("q/k norm"), "{e}");
        assert!(e.to_string().contains("--device cpu"), "{e}");
    }
}
