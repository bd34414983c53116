//! [`CudaTrainer`]: a train step on one GPU for `--quant none` and `--quant nvfp4-ste` — the
//! CPU trainer's model, loss and AdamW with bf16 activations and GEMMs (cuBLAS, f32
//! accumulation and f32 outputs) and f32 master weights, gradients and moments (or bf16
//! moments).
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
//! Forward per layer (N = B·T tokens): RMSNorm → q/k/v GEMM → bias + RoPE into the attention
//! group layout → scores GEMM → causal softmax → values GEMM → head merge → O GEMM added into the
//! residual (GEMM β = 1) → RMSNorm → gate/up GEMM → SwiGLU → down GEMM added into the residual.
//! The final norm's output goes through the vocabulary projection and cross-entropy in chunks of
//! rows, each chunk's dlogits feeding the head's two backward GEMMs at once, so `[N × vocab]`
//! logits never exist. Backward walks the layers in reverse with the saved activations; the
//! embedding's gradient is a scatter-add.
//!
//! Not here yet: Qwen3's q/k norm, `nvfp4-full`, activation recomputation.

use std::sync::Arc;

use candle_core::Tensor;
use cudarc::driver::CudaSlice;
use half::bf16;
use kiln_kernels::cpu::{AdamWParams, AdamWScalars};
use kiln_kernels::cuda::blas::StridedGemm;
use kiln_kernels::cuda::decode::DevAddr;
use kiln_kernels::cuda::train::{TrainAttnShape, TrainTensor, TrainTensorTable};
use kiln_kernels::cuda::{CudaKernels, DeviceStatus};

use super::cuda;
use crate::error::{EngineError, Result};
use crate::model::rope::Rope;
use crate::model::{ModelConfig, ModelLayout};
use crate::spec::{MomentsSpec, QuantSpec};
use crate::train::dataset::{BatchArrays, TrainSample};
use crate::train::moments::MomentVec;
use crate::train::params::{ParamStore, ParamValue};

/// Rows of logits made at once by the vocabulary projection (bounds its scratch to
/// `LOGIT_CHUNK × vocab × 6` bytes).
pub const LOGIT_CHUNK: usize = 1024;

/// One parameter in the flat buffers.
#[derive(Debug, Clone)]
struct FlatParam {
    name: String,
    shape: Vec<usize>,
    offset: usize,
    numel: usize,
    /// Fake-quantized in `nvfp4-ste` mode (an NVFP4 linear's weight).
    nvfp4: bool,
}

/// Offsets of one layer's parameters in the flat buffers.
#[derive(Debug, Clone, Copy)]
struct LayerOffsets {
    input_norm: usize,
    /// q, k, v weights, adjacent: `[qkv_cols, H]`.
    qkv: usize,
    /// q, k, v biases, adjacent (Qwen2).
    qkv_bias: Option<usize>,
    o: usize,
    post_norm: usize,
    /// gate, up weights, adjacent: `[2I, H]`.
    gate_up: usize,
    down: usize,
}

/// The bf16 working copies of one layer's linears.
struct LayerWeights {
    qkv: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    gate_up: CudaSlice<bf16>,
    down: CudaSlice<bf16>,
}

/// Activations one layer saves for its backward.
struct LayerActs {
    /// Residual stream into the layer, f32 `[N, H]`.
    h_in: CudaSlice<f32>,
    xn1: CudaSlice<bf16>,
    rstd1: CudaSlice<f32>,
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    /// Attention probabilities `[B·nh·T, T]`.
    p: CudaSlice<bf16>,
    /// Merged attention output `[N, nh·hd]`.
    attn: CudaSlice<bf16>,
    /// Residual stream after attention.
    h_mid: CudaSlice<f32>,
    xn2: CudaSlice<bf16>,
    rstd2: CudaSlice<f32>,
    /// Gate/up GEMM output `[N, 2I]`.
    gu: CudaSlice<f32>,
    /// SwiGLU output `[N, I]`.
    a: CudaSlice<bf16>,
}

/// Buffers for one micro-batch shape (B, T), shared by the layers or saved per layer.
struct Workspace {
    batch: usize,
    seq: usize,
    ids: CudaSlice<i32>,
    target: CudaSlice<i32>,
    weight: CudaSlice<f32>,
    layers: Vec<LayerActs>,
    /// Residual stream out of the last layer.
    h_out: CudaSlice<f32>,
    xnf: CudaSlice<bf16>,
    rstdf: CudaSlice<f32>,
    /// GEMM outputs reused by every layer.
    qkv: CudaSlice<f32>,
    scores: CudaSlice<f32>,
    o: CudaSlice<f32>,
    /// The residual's gradient and its bf16 copy (GEMM input).
    dh: CudaSlice<f32>,
    dh_bf16: CudaSlice<bf16>,
    /// f32 GEMM output of the widest input gradient (`[N, max(H, I, nh·hd)]`).
    dx: CudaSlice<f32>,
    /// bf16 gradients fed to backward GEMMs: `[N, max(2I, qkv_cols)]`.
    dmid: CudaSlice<bf16>,
    /// Attention backward: dO (group layout, bf16), dP (f32), dS (bf16), dQ / dK / dV (f32).
    d_o: CudaSlice<bf16>,
    dp: CudaSlice<f32>,
    ds: CudaSlice<bf16>,
    dq: CudaSlice<f32>,
    dk: CudaSlice<f32>,
    dv: CudaSlice<f32>,
    /// One chunk of logits and their gradient.
    logits: CudaSlice<f32>,
    dlogits: CudaSlice<bf16>,
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
    /// f32 master weights and their bf16 working copies.
    pub weights: u64,
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
}

/// A moment buffer in its element type.
enum Moments {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

fn unsupported(what: String) -> EngineError {
    EngineError::InvalidArgument(format!("GPU training: {what}"))
}

/// Row-major GEMM `C[m×n] (+)= op(A)[m×k] · op(B)[k×n]` on bf16 inputs with an f32 output, as
/// cuBLAS's column-major call `Cᵀ = op(B)ᵀ · op(A)ᵀ`. `a_t`: A is stored `[k, m]`; `b_t`: B is
/// stored `[n, k]`. `batch` > 1 strides A, B and C by the given element counts.
#[derive(Debug, Clone, Copy)]
struct Mm {
    m: usize,
    n: usize,
    k: usize,
    a: DevAddr,
    a_t: bool,
    b: DevAddr,
    b_t: bool,
    c: DevAddr,
    alpha: f32,
    beta: f32,
    batch: usize,
    strides: (usize, usize, usize),
}

impl Mm {
    /// `(m, n, k)`, A and whether it is stored transposed, B likewise, C.
    fn new(
        (m, n, k): (usize, usize, usize),
        (a, a_t): (DevAddr, bool),
        (b, b_t): (DevAddr, bool),
        c: DevAddr,
    ) -> Self {
        Mm {
            m,
            n,
            k,
            a,
            a_t,
            b,
            b_t,
            c,
            alpha: 1.0,
            beta: 0.0,
            batch: 1,
            strides: (0, 0, 0),
        }
    }

    fn accumulate(self) -> Self {
        Mm { beta: 1.0, ..self }
    }

    fn batched(self, batch: usize, strides: (usize, usize, usize)) -> Self {
        Mm {
            batch,
            strides,
            ..self
        }
    }

    fn run(self, k: &CudaKernels) -> Result<()> {
        let lda = if self.a_t { self.m } else { self.k };
        let ldb = if self.b_t { self.k } else { self.n };
        let g = StridedGemm {
            transa: self.b_t,
            transb: self.a_t,
            m: self.n,
            n: self.m,
            k: self.k,
            alpha: self.alpha,
            beta: self.beta,
            a: (self.b, ldb, self.strides.1),
            b: (self.a, lda, self.strides.0),
            c: (self.c, self.n, self.strides.2),
            c_f32: true,
            batch: self.batch,
        };
        // SAFETY: the trainer sizes every buffer for the shapes it passes (see Workspace).
        unsafe { k.gemm_bf16_strided_batched_async(&g) }?;
        Ok(())
    }
}

impl CudaTrainer {
    /// Whether the GPU trainer can train a model of shape `cfg` in mode `quant`.
    pub fn check_supported(cfg: &ModelConfig, quant: QuantSpec) -> Result<()> {
        if quant == QuantSpec::Nvfp4Full {
            return Err(unsupported(
                "--quant nvfp4-full does not run on the GPU yet; use nvfp4-ste or none, or --device cpu".into(),
            ));
        }
        if cfg.qk_norm() {
            return Err(unsupported(
                "models with q/k norm (Qwen3) do not train on the GPU yet; use --device cpu".into(),
            ));
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
        Self::check_supported(cfg, quant)?;
        let layout = ModelLayout::new(cfg)?;
        let (params, layers, embed, norm, lm_head) = flat_layout(cfg, &layout)?;
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
                .params()
                .iter()
                .find(|p| p.name == fp.name)
                .ok_or_else(|| unsupported(format!("the parameter store has no {}", fp.name)))?;
            let ParamValue::Dense(var) = &p.value else {
                return Err(unsupported(format!("{} is packed (nvfp4-full)", fp.name)));
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
        let weights = (0..layers.len())
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
        GpuTrainBytes {
            weights: total * 4 + bf16_weights,
            grads: total * 4,
            optimizer_state: moment(&self.m) + moment(&self.v),
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
        for l in 0..self.layers.len() {
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

    fn ensure_workspace(&mut self, batch: usize, seq: usize) -> Result<()> {
        if self
            .work
            .as_ref()
            .is_some_and(|w| w.batch == batch && w.seq == seq)
        {
            return Ok(());
        }
        self.work = None;
        self.work = Some(Workspace::new(
            &self.k,
            &self.cfg,
            self.layers.len(),
            batch,
            seq,
        )?);
        Ok(())
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
        let s = self.k.stream().clone();
        s.memset_zeros(&mut self.grads)
            .map_err(cuda("zeroing the gradients"))?;
        s.memset_zeros(&mut self.loss)
            .map_err(cuda("zeroing the loss"))?;
        s.memset_zeros(&mut self.sumsq)
            .map_err(cuda("zeroing the gradient norm"))?;
        self.prepare_weights()?;
        for b in micro {
            self.micro_batch(b)?;
        }
        let sc = AdamWScalars::new(hp, step, 0);
        // SAFETY: the table names master, grads and the moments, all live and `total` long.
        unsafe {
            self.k
                .train_grad_sumsq_async(&self.table, self.addr(&self.sumsq))?;
            self.k
                .train_adamw_async(&self.table, self.addr(&self.sumsq), &sc, clip)?;
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

    /// Forward and backward of one micro-batch, adding into the gradients and the loss.
    fn micro_batch(&mut self, b: &HostBatch) -> Result<()> {
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
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = b.ids.iter().chain(&b.target).find(|&&t| t >= vocab) {
            return Err(EngineError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        self.ensure_workspace(b.batch, b.seq)?;
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
        self.forward(b.batch, b.seq)?;
        self.head_and_loss(n)?;
        self.backward(b.batch, b.seq)
    }

    fn forward(&mut self, batch: usize, seq: usize) -> Result<()> {
        let k = &*self.k;
        let w = self.work.as_ref().expect("ensured");
        let cfg = &self.cfg;
        let sh = self.shape(batch, seq);
        let n = sh.tokens();
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (nh, kvh, rep) = (sh.heads, sh.kv_heads, sh.rep());
        let qkv_cols = sh.qkv_cols();
        let eps = cfg.rms_norm_eps as f32;
        let scale = 1.0 / (hd as f32).sqrt();
        let s = k.stream();
        // SAFETY (whole function): every buffer comes from Workspace::new for this (B, T) or
        // from the trainer's own allocations, sized as each launcher's contract says.
        unsafe {
            k.train_embed_fwd_async(
                self.addr(&w.ids),
                self.master_at(self.embed),
                self.addr(&w.layers[0].h_in),
                n,
                h,
            )?;
            for l in 0..self.layers.len() {
                let (off, lw, a) = (self.layers[l], &self.weights[l], &w.layers[l]);
                k.train_rmsnorm_fwd_async(
                    self.addr(&a.h_in),
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
                k.train_qkv_fwd_async(
                    sh,
                    self.addr(&w.qkv),
                    off.qkv_bias.map_or(0, |o| self.master_at(o)),
                    self.addr(&self.inv_freq),
                    self.addr(&a.q),
                    self.addr(&a.k),
                    self.addr(&a.v),
                )?;
                let groups = batch * kvh;
                let rt = rep * seq;
                // S = Q·Kᵀ per group, then P = causal softmax, O = P·V.
                Mm::new(
                    (rt, seq, hd),
                    (self.addr(&a.q), false),
                    (self.addr(&a.k), true),
                    self.addr(&w.scores),
                )
                .batched(groups, (rt * hd, seq * hd, rt * seq))
                .run(k)?;
                k.train_causal_softmax_async(
                    self.addr(&w.scores),
                    self.addr(&a.p),
                    groups * rt,
                    seq,
                    scale,
                )?;
                Mm::new(
                    (rt, hd, seq),
                    (self.addr(&a.p), false),
                    (self.addr(&a.v), false),
                    self.addr(&w.o),
                )
                .batched(groups, (rt * seq, seq * hd, rt * hd))
                .run(k)?;
                k.train_merge_heads_async(sh, self.addr(&w.o), self.addr(&a.attn))?;
                // h_mid = h_in + attn · Woᵀ
                copy_f32(s, &a.h_mid, &a.h_in, k)?;
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
                // h_out = h_mid + a · Wdownᵀ, the next layer's input.
                let next = match w.layers.get(l + 1) {
                    Some(nx) => &nx.h_in,
                    None => &w.h_out,
                };
                copy_f32(s, next, &a.h_mid, k)?;
                Mm::new(
                    (n, h, i),
                    (self.addr(&a.a), false),
                    (self.addr(&lw.down), true),
                    self.addr(next),
                )
                .accumulate()
                .run(k)?;
            }
            k.train_rmsnorm_fwd_async(
                self.addr(&w.h_out),
                self.master_at(self.norm),
                self.addr(&w.xnf),
                self.addr(&w.rstdf),
                n,
                h,
                eps,
            )?;
        }
        Ok(())
    }

    /// The vocabulary projection and cross-entropy in chunks of rows; each chunk's dlogits go
    /// straight into the head's backward GEMMs: `dx` (the final norm's output gradient) and
    /// the head's (or the tied embedding's) weight gradient.
    fn head_and_loss(&mut self, n: usize) -> Result<()> {
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

    fn backward(&mut self, batch: usize, seq: usize) -> Result<()> {
        let kk = self.k.clone();
        kk.stream()
            .memset_zeros(&mut self.work.as_mut().expect("ensured").dh)
            .map_err(cuda("zeroing the residual gradient"))?;
        let k = &*kk;
        let w = self.work.as_ref().expect("ensured");
        let cfg = &self.cfg;
        let sh = self.shape(batch, seq);
        let n = sh.tokens();
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (nh, kvh, rep) = (sh.heads, sh.kv_heads, sh.rep());
        let qkv_cols = sh.qkv_cols();
        let scale = 1.0 / (hd as f32).sqrt();
        // SAFETY (whole function): as in forward.
        unsafe {
            // Final norm: dh = its input gradient (dx from the head).
            k.train_rmsnorm_bwd_async(
                self.addr(&w.h_out),
                self.master_at(self.norm),
                self.addr(&w.rstdf),
                self.addr(&w.dx),
                self.addr(&w.dh),
                self.grad_at(self.norm),
                n,
                h,
            )?;
            for l in (0..self.layers.len()).rev() {
                let (off, lw, a) = (self.layers[l], &self.weights[l], &w.layers[l]);
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
                    self.grad_at(off.down),
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
                    self.grad_at(off.gate_up),
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
                    self.grad_at(off.post_norm),
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
                    self.grad_at(off.o),
                )
                .accumulate()
                .run(k)?;
                k.train_split_heads_async(sh, self.addr(&w.dx), self.addr(&w.d_o))?;
                let groups = batch * kvh;
                let rt = rep * seq;
                // dP = dO·Vᵀ; dV = Pᵀ·dO; dS = softmax backward; dQ = dS·K; dK = dSᵀ·Q.
                Mm::new(
                    (rt, seq, hd),
                    (self.addr(&w.d_o), false),
                    (self.addr(&a.v), true),
                    self.addr(&w.dp),
                )
                .batched(groups, (rt * hd, seq * hd, rt * seq))
                .run(k)?;
                Mm::new(
                    (seq, hd, rt),
                    (self.addr(&a.p), true),
                    (self.addr(&w.d_o), false),
                    self.addr(&w.dv),
                )
                .batched(groups, (rt * seq, rt * hd, seq * hd))
                .run(k)?;
                k.train_softmax_bwd_async(
                    self.addr(&a.p),
                    self.addr(&w.dp),
                    self.addr(&w.ds),
                    groups * rt,
                    seq,
                    scale,
                )?;
                Mm::new(
                    (rt, hd, seq),
                    (self.addr(&w.ds), false),
                    (self.addr(&a.k), false),
                    self.addr(&w.dq),
                )
                .batched(groups, (rt * seq, seq * hd, rt * hd))
                .run(k)?;
                Mm::new(
                    (seq, hd, rt),
                    (self.addr(&w.ds), true),
                    (self.addr(&a.q), false),
                    self.addr(&w.dk),
                )
                .batched(groups, (rt * seq, rt * hd, seq * hd))
                .run(k)?;
                k.train_qkv_bwd_async(
                    sh,
                    self.addr(&w.dq),
                    self.addr(&w.dk),
                    self.addr(&w.dv),
                    self.addr(&self.inv_freq),
                    self.addr(&w.dmid),
                    off.qkv_bias.map_or(0, |o| self.grad_at(o)),
                )?;
                Mm::new(
                    (qkv_cols, h, n),
                    (self.addr(&w.dmid), true),
                    (self.addr(&a.xn1), false),
                    self.grad_at(off.qkv),
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
                    self.addr(&a.h_in),
                    self.master_at(off.input_norm),
                    self.addr(&a.rstd1),
                    self.addr(&w.dx),
                    self.addr(&w.dh),
                    self.grad_at(off.input_norm),
                    n,
                    h,
                )?;
            }
            k.train_embed_bwd_async(
                self.addr(&w.ids),
                self.addr(&w.dh),
                self.grad_at(self.embed),
                n,
                h,
            )?;
        }
        Ok(())
    }

    /// Copy the master weights and moments back into `store` (for checkpoints and export).
    pub fn download_into(&self, store: &mut ParamStore) -> Result<()> {
        let s = self.k.stream();
        let master = s
            .clone_dtoh(&self.master)
            .map_err(cuda("downloading the master weights"))?;
        let (m, v) = (
            download_moment(&self.k, &self.m)?,
            download_moment(&self.k, &self.v)?,
        );
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
            let kind = p.exp_avg.kind();
            p.exp_avg = MomentVec::from_f32(m[range.clone()].to_vec(), kind);
            p.exp_avg_sq = MomentVec::from_f32(v[range].to_vec(), kind);
        }
        Ok(())
    }
}

/// `dst = src` (f32 buffers of the same length), on the stream.
fn copy_f32(
    s: &Arc<cudarc::driver::CudaStream>,
    dst: &CudaSlice<f32>,
    src: &CudaSlice<f32>,
    k: &CudaKernels,
) -> Result<()> {
    // SAFETY: both buffers hold the same number of f32 (one workspace shape).
    unsafe {
        cudarc::driver::result::memcpy_dtod_async(
            k.addr(dst, 0),
            k.addr(src, 0),
            src.len() * 4,
            s.cu_stream(),
        )
    }
    .map_err(cuda("copying the residual stream"))
}

fn moments_addr(k: &CudaKernels, m: &Moments) -> DevAddr {
    match m {
        Moments::F32(b) => k.addr(b, 0),
        Moments::Bf16(b) => k.addr(b, 0),
    }
}

fn upload_moment(
    s: &Arc<cudarc::driver::CudaStream>,
    host: &MomentVec,
    dev: &mut Moments,
    range: std::ops::Range<usize>,
) -> Result<()> {
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

type FlatLayout = (
    Vec<FlatParam>,
    Vec<LayerOffsets>,
    usize,
    usize,
    Option<usize>,
);

/// The flat order of `layout`'s parameters (see the module doc) and each layer's offsets.
fn flat_layout(cfg: &ModelConfig, layout: &ModelLayout) -> Result<FlatLayout> {
    let mut params: Vec<FlatParam> = Vec::new();
    let mut next = 0usize;
    let mut push = |name: &str, shape: &[usize], nvfp4: bool| -> usize {
        let numel: usize = shape.iter().product();
        let offset = next;
        // 16-element alignment (every tensor the trainer makes is a multiple of 16 long).
        next = (next + numel).next_multiple_of(16);
        params.push(FlatParam {
            name: name.to_string(),
            shape: shape.to_vec(),
            offset,
            numel,
            nvfp4,
        });
        offset
    };
    let embed = push(&layout.embed().name, &layout.embed().shape, false);
    let mut layers = Vec::new();
    for l in layout.layers() {
        let input_norm = push(&l.input_norm.name, &l.input_norm.shape, false);
        let lin = |s: &crate::model::LinearSpec| (s.weight(), s.nvfp4);
        let (q, qn) = lin(&l.q_proj);
        let qkv = push(&q.name, &q.shape, qn);
        for spec in [&l.k_proj, &l.v_proj] {
            let (w, nv) = lin(spec);
            push(&w.name, &w.shape, nv);
        }
        let qkv_bias = if cfg.attention_bias {
            let mut first = None;
            for spec in [&l.q_proj, &l.k_proj, &l.v_proj] {
                let b = spec
                    .bias_tensor()
                    .ok_or_else(|| unsupported(format!("{} has no bias", spec.prefix)))?;
                let off = push(&b.name, &b.shape, false);
                first.get_or_insert(off);
            }
            first
        } else {
            None
        };
        let (o, on) = lin(&l.o_proj);
        let o = push(&o.name, &o.shape, on);
        let post_norm = push(
            &l.post_attention_norm.name,
            &l.post_attention_norm.shape,
            false,
        );
        let (g, gn) = lin(&l.gate_proj);
        let gate_up = push(&g.name, &g.shape, gn);
        let (u, un) = lin(&l.up_proj);
        push(&u.name, &u.shape, un);
        let (d, dn) = lin(&l.down_proj);
        let down = push(&d.name, &d.shape, dn);
        layers.push(LayerOffsets {
            input_norm,
            qkv,
            qkv_bias,
            o,
            post_norm,
            gate_up,
            down,
        });
    }
    let norm = push(&layout.norm().name, &layout.norm().shape, false);
    let lm_head = layout.lm_head().map(|h| {
        let w = h.weight();
        push(&w.name, &w.shape, h.nvfp4)
    });
    // Every parameter of the layout is in the flat order exactly once.
    let want = layout.params().len()
        + layout
            .layers()
            .iter()
            .map(|l| {
                [
                    &l.q_proj,
                    &l.k_proj,
                    &l.v_proj,
                    &l.o_proj,
                    &l.gate_proj,
                    &l.up_proj,
                    &l.down_proj,
                ]
                .iter()
                .filter(|s| s.bias_tensor().is_some())
                .count()
            })
            .sum::<usize>();
    if params.len() != want {
        return Err(unsupported(format!(
            "the flat layout has {} parameters, the model {want}",
            params.len()
        )));
    }
    Ok((params, layers, embed, norm, lm_head))
}

impl Workspace {
    fn new(
        k: &CudaKernels,
        cfg: &ModelConfig,
        layers: usize,
        batch: usize,
        seq: usize,
    ) -> Result<Self> {
        let s = k.stream();
        let n = batch * seq;
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (nh, kvh) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let qkv_cols = (nh + 2 * kvh) * hd;
        let scores = batch * nh * seq * seq;
        let f = |len: usize| {
            s.alloc_zeros::<f32>(len.max(1))
                .map_err(cuda("allocating training activations"))
        };
        let b = |len: usize| {
            s.alloc_zeros::<bf16>(len.max(1))
                .map_err(cuda("allocating training activations"))
        };
        let acts = (0..layers)
            .map(|_| {
                Ok(LayerActs {
                    h_in: f(n * h)?,
                    xn1: b(n * h)?,
                    rstd1: f(n)?,
                    q: b(n * nh * hd)?,
                    k: b(n * kvh * hd)?,
                    v: b(n * kvh * hd)?,
                    p: b(scores)?,
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
            layers: acts,
            h_out: f(n * h)?,
            xnf: b(n * h)?,
            rstdf: f(n)?,
            qkv: f(n * qkv_cols)?,
            scores: f(scores)?,
            o: f(n * nh * hd)?,
            dh: f(n * h)?,
            dh_bf16: b(n * h)?,
            dx: f(n * h.max(i).max(nh * hd))?,
            dmid: b(n * (2 * i).max(qkv_cols))?,
            d_o: b(n * nh * hd)?,
            dp: f(scores)?,
            ds: b(scores)?,
            dq: f(n * nh * hd)?,
            dk: f(n * kvh * hd)?,
            dv: f(n * kvh * hd)?,
            logits: f(chunk * cfg.vocab_size)?,
            dlogits: b(chunk * cfg.vocab_size)?,
        })
    }

    fn bytes(&self) -> u64 {
        let f = |s: &CudaSlice<f32>| s.len() as u64 * 4;
        let b = |s: &CudaSlice<bf16>| s.len() as u64 * 2;
        let per_layer: u64 = self
            .layers
            .iter()
            .map(|a| {
                f(&a.h_in)
                    + b(&a.xn1)
                    + f(&a.rstd1)
                    + b(&a.q)
                    + b(&a.k)
                    + b(&a.v)
                    + b(&a.p)
                    + b(&a.attn)
                    + f(&a.h_mid)
                    + b(&a.xn2)
                    + f(&a.rstd2)
                    + f(&a.gu)
                    + b(&a.a)
            })
            .sum();
        per_layer
            + self.ids.len() as u64 * 8
            + f(&self.weight)
            + f(&self.h_out)
            + b(&self.xnf)
            + f(&self.rstdf)
            + f(&self.qkv)
            + f(&self.scores)
            + f(&self.o)
            + f(&self.dh)
            + b(&self.dh_bf16)
            + f(&self.dx)
            + b(&self.dmid)
            + b(&self.d_o)
            + f(&self.dp)
            + b(&self.ds)
            + f(&self.dq)
            + f(&self.dk)
            + f(&self.dv)
            + f(&self.logits)
            + b(&self.dlogits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flat_layout_keeps_gemm_partners_adjacent_and_covers_every_parameter() {
        for cfg in [crate::tiny::config().unwrap(), ModelConfig::qwen2_5_7b()] {
            let layout = ModelLayout::new(&cfg).unwrap();
            let (params, layers, embed, _norm, lm_head) = flat_layout(&cfg, &layout).unwrap();
            assert_eq!(embed, 0);
            let h = cfg.hidden_size;
            for l in &layers {
                // k follows q, v follows k: one [qkv_cols, H] matrix.
                let names: Vec<&FlatParam> = params
                    .iter()
                    .filter(|p| {
                        p.offset >= l.qkv
                            && p.offset < l.qkv + (cfg.q_size() + 2 * cfg.kv_size()) * h
                    })
                    .collect();
                assert_eq!(names.len(), 3, "{names:?}");
                assert!(names[0].name.ends_with("q_proj.weight"));
                assert!(names[2].name.ends_with("v_proj.weight"));
                let up = params
                    .iter()
                    .find(|p| p.offset == l.gate_up + cfg.intermediate_size * h)
                    .unwrap();
                assert!(up.name.ends_with("up_proj.weight"), "{}", up.name);
                assert_eq!(l.qkv_bias.is_some(), cfg.attention_bias);
            }
            assert_eq!(lm_head.is_some(), !cfg.tie_word_embeddings);
            // No overlaps, 16-element aligned.
            let mut spans: Vec<(usize, usize)> =
                params.iter().map(|p| (p.offset, p.numel)).collect();
            spans.sort();
            for w in spans.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0);
            }
            assert!(params.iter().all(|p| p.offset % 16 == 0));
        }
    }

    #[test]
    fn unsupported_modes_and_shapes_are_refused_with_the_way_out() {
        let cfg = crate::tiny::config().unwrap();
        let e = CudaTrainer::check_supported(&cfg, QuantSpec::Nvfp4Full)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nvfp4-full") && e.contains("--device cpu"),
            "{e}"
        );
        assert!(CudaTrainer::check_supported(&cfg, QuantSpec::Nvfp4Ste).is_ok());
    }
}
