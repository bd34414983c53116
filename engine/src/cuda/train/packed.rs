//! `nvfp4-full` on the GPU: the NVFP4 linears stay packed (codes, block scales, tensor scale)
//! with their two moments, and nothing else of them persists. Before a layer runs (forward, and
//! again in backward) its seven linears are dequantized into one reused bf16 scratch in the
//! stacked layout the GEMMs read (q/k/v rows, gate/up rows); its weight gradients go into one
//! reused f32 scratch of the same layout (`lgrad`), and right after the layer's backward each
//! linear takes its AdamW step from there (dequantize → update → stochastic-rounding
//! requantize, fused: `kiln_adamw_nvfp4_{amax,apply}_*`). So the whole model's linear
//! gradients never exist at once.
//!
//! Clipping needs the global gradient norm before any update, so with `--clip-grad` on the
//! backward runs twice: the first pass sums every gradient's square (the layers' linear
//! gradients are dropped after), the second recomputes the linear gradients and applies them.
//! The dense parameters' gradients come from the first pass only (the second sends them to a
//! small discard buffer and skips the embedding's scatter-add).
//!
//! With gradient accumulation (`--grad-accum N`) the layers' gradients must outlive the
//! micro-batch, so they are summed into one f32 accumulator of every linear (4 bytes per
//! parameter, counted by the plan) and the linears take their step after the last micro-batch,
//! from there — one backward per micro-batch, clipped or not.

use cudarc::driver::CudaSlice;
use kiln_kernels::cpu::{AdamWParams, AdamWScalars};
use kiln_kernels::cuda::decode::DevAddr;
use kiln_kernels::cuda::ops::DeviceNvfp4;
use kiln_kernels::cuda::train::{TrainTensor, TrainTensorTable};
use kiln_kernels::cuda::{CudaKernels, DeviceStatus};

use super::super::cuda;
use super::{download_moment, moments_addr, unsupported, upload_moment, Moments};
use crate::error::Result;
use crate::model::weights::fnv1a;
use crate::model::{ModelConfig, ModelLayout};
use crate::spec::MomentsSpec;
use crate::train::moments::MomentVec;
use crate::train::params::{ParamStore, ParamValue};

/// Which stacked matrix of a layer a linear belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stack {
    Qkv,
    O,
    GateUp,
    Down,
}

/// Element offsets of one layer's stacked matrices in the gradient scratch.
#[derive(Debug, Clone, Copy)]
pub(super) struct StackOffsets {
    pub(super) qkv: usize,
    pub(super) o: usize,
    pub(super) gate_up: usize,
    pub(super) down: usize,
    /// Elements of all four.
    pub(super) total: usize,
}

impl StackOffsets {
    pub(super) fn new(cfg: &ModelConfig) -> Self {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let q = cfg.q_size();
        let qkv_n = (q + 2 * cfg.kv_size()) * h;
        let o_n = h * q;
        StackOffsets {
            qkv: 0,
            o: qkv_n,
            gate_up: qkv_n + o_n,
            down: qkv_n + o_n + 2 * i * h,
            total: qkv_n + o_n + 3 * i * h,
        }
    }

    fn of(&self, s: Stack) -> usize {
        match s {
            Stack::Qkv => self.qkv,
            Stack::O => self.o,
            Stack::GateUp => self.gate_up,
            Stack::Down => self.down,
        }
    }
}

/// One packed linear and its moments.
struct PackedLinear {
    name: String,
    w: DeviceNvfp4,
    m: Moments,
    v: Moments,
    stack: Stack,
    /// Element offset inside its stacked matrix (rows above it × columns).
    at: usize,
}

/// The packed linears of a model on the GPU and the scratch of one layer's gradients.
pub(super) struct PackedModel {
    layers: Vec<Vec<PackedLinear>>,
    /// One layer's linear weight gradients, f32, stacked as [`StackOffsets`].
    pub(super) lgrad: CudaSlice<f32>,
    /// `lgrad` as one tensor, for its sum of squares.
    lgrad_table: TrainTensorTable,
    pub(super) stacks: StackOffsets,
    /// Where the second backward pass sends the dense gradients it recomputes (norm weights,
    /// q/k/v biases): `max(H, qkv_cols)` f32.
    pub(super) discard: CudaSlice<f32>,
    moments: MomentsSpec,
    /// With gradient accumulation: every layer's linear gradients, f32, layer after layer
    /// (each [`StackOffsets::total`] long), and that buffer as one tensor for its norm.
    acc: Option<(CudaSlice<f32>, TrainTensorTable)>,
}

/// Bytes of the packed state by category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PackedBytes {
    /// E2M1 codes.
    pub(super) codes: u64,
    /// E4M3 block scales and f32 tensor scales.
    pub(super) scales: u64,
    /// Both moments.
    pub(super) moments: u64,
    /// The layer gradient scratch and the discard buffer (f32).
    pub(super) grad_scratch: u64,
    /// With gradient accumulation: the accumulator of every linear's gradient (f32).
    pub(super) grad_acc: u64,
}

/// The bytes [`PackedModel::new`] allocates for a model of shape `cfg` (the plan's formula).
pub(super) fn packed_bytes(cfg: &ModelConfig, moments: MomentsSpec) -> Result<PackedBytes> {
    let layout = ModelLayout::new(cfg)?;
    let mut elems = 0u64;
    let mut tensors = 0u64;
    for l in layout.layers() {
        for s in l.linears() {
            if s.nvfp4 {
                let w = s.weight();
                elems += w.shape.iter().product::<usize>() as u64;
                tensors += 1;
            }
        }
    }
    let qkv_cols = cfg.q_size() + 2 * cfg.kv_size();
    Ok(PackedBytes {
        codes: elems / 2,
        // one E4M3 scale per 16 elements, one f32 tensor scale per tensor
        scales: elems / 16 + 4 * tensors,
        moments: 2 * elems * moments.bytes(),
        grad_scratch: 4 * StackOffsets::new(cfg).total as u64
            + 4 * cfg.hidden_size.max(qkv_cols) as u64,
        grad_acc: 0,
    })
}

/// The bytes of the gradient accumulator [`PackedModel::enable_accumulation`] allocates.
pub(super) fn accumulator_bytes(cfg: &ModelConfig) -> u64 {
    4 * (cfg.num_hidden_layers * StackOffsets::new(cfg).total) as u64
}

impl PackedModel {
    /// Upload `store`'s packed linears (and their moments) layer by layer.
    pub(super) fn new(k: &CudaKernels, cfg: &ModelConfig, store: &ParamStore) -> Result<Self> {
        let layout = ModelLayout::new(cfg)?;
        let stacks = StackOffsets::new(cfg);
        let moments = store.moments();
        let s = k.stream();
        let h = cfg.hidden_size;
        let mut layers = Vec::new();
        for l in layout.layers() {
            let (q, kv, i) = (cfg.q_size(), cfg.kv_size(), cfg.intermediate_size);
            let parts = [
                (&l.q_proj, Stack::Qkv, 0),
                (&l.k_proj, Stack::Qkv, q * h),
                (&l.v_proj, Stack::Qkv, (q + kv) * h),
                (&l.o_proj, Stack::O, 0),
                (&l.gate_proj, Stack::GateUp, 0),
                (&l.up_proj, Stack::GateUp, i * h),
                (&l.down_proj, Stack::Down, 0),
            ];
            let mut lins = Vec::new();
            for (spec, stack, at) in parts {
                let name = spec.weight().name;
                let p = store
                    .param(&name)
                    .ok_or_else(|| unsupported(format!("the parameter store has no {name}")))?;
                let ParamValue::Packed(t) = &p.value else {
                    return Err(unsupported(format!(
                        "{name} is dense; nvfp4-full keeps every decoder linear packed"
                    )));
                };
                let w = k.upload_nvfp4(t)?;
                let n = t.rows * t.cols;
                let alloc = || -> Result<Moments> {
                    Ok(match moments {
                        MomentsSpec::F32 => Moments::F32(
                            s.alloc_zeros::<f32>(n)
                                .map_err(cuda("allocating packed moments"))?,
                        ),
                        MomentsSpec::Bf16 => Moments::Bf16(
                            s.alloc_zeros::<half::bf16>(n)
                                .map_err(cuda("allocating packed moments"))?,
                        ),
                    })
                };
                let (mut m, mut v) = (alloc()?, alloc()?);
                upload_moment(s, &p.exp_avg, &mut m, 0..n)?;
                upload_moment(s, &p.exp_avg_sq, &mut v, 0..n)?;
                lins.push(PackedLinear {
                    name,
                    w,
                    m,
                    v,
                    stack,
                    at,
                });
            }
            layers.push(lins);
        }
        let lgrad = s
            .alloc_zeros::<f32>(stacks.total)
            .map_err(cuda("allocating the layer gradient scratch"))?;
        let lgrad_table = k.train_tensor_table(
            &[TrainTensor {
                w: 0,
                g: k.addr(&lgrad, 0),
                m: 0,
                v: 0,
                n: stacks.total as i64,
            }],
            false,
        )?;
        let discard = s
            .alloc_zeros::<f32>(h.max(cfg.q_size() + 2 * cfg.kv_size()))
            .map_err(cuda("allocating the discard buffer"))?;
        Ok(PackedModel {
            layers,
            lgrad,
            lgrad_table,
            stacks,
            discard,
            moments,
            acc: None,
        })
    }

    /// Allocate the gradient accumulator (once; gradient accumulation needs it).
    pub(super) fn enable_accumulation(&mut self, k: &CudaKernels) -> Result<()> {
        if self.acc.is_some() {
            return Ok(());
        }
        let n = self.layers.len() * self.stacks.total;
        let acc = k
            .stream()
            .alloc_zeros::<f32>(n)
            .map_err(cuda("allocating the gradient accumulator"))?;
        let table = k.train_tensor_table(
            &[TrainTensor {
                w: 0,
                g: k.addr(&acc, 0),
                m: 0,
                v: 0,
                n: n as i64,
            }],
            false,
        )?;
        self.acc = Some((acc, table));
        Ok(())
    }

    /// Whether the gradient accumulator is allocated.
    pub(super) fn accumulates(&self) -> bool {
        self.acc.is_some()
    }

    /// Queue zeros into the accumulator (the start of a step).
    pub(super) fn zero_accumulator(&mut self, k: &CudaKernels) -> Result<()> {
        if let Some((acc, _)) = &mut self.acc {
            k.stream()
                .memset_zeros(acc)
                .map_err(cuda("zeroing the gradient accumulator"))?;
        }
        Ok(())
    }

    /// The gradient address of layer `l`'s `stack` in the accumulator.
    pub(super) fn acc_of(&self, k: &CudaKernels, l: usize, stack: Stack) -> DevAddr {
        let (acc, _) = self.acc.as_ref().expect("accumulation enabled");
        k.addr(acc, l * self.stacks.total + self.stacks.of(stack))
    }

    /// Queue `sumsq += Σ acc²`.
    ///
    /// # Safety
    /// `sumsq` is one live f64.
    pub(super) unsafe fn add_acc_sumsq(&self, k: &CudaKernels, sumsq: DevAddr) -> Result<()> {
        let (_, table) = self.acc.as_ref().expect("accumulation enabled");
        // SAFETY: the table names the accumulator, live with self.
        unsafe { k.train_grad_sumsq_async(table, sumsq)? };
        Ok(())
    }

    /// Layers.
    pub(super) fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Bytes held, by category.
    pub(super) fn bytes(&self) -> PackedBytes {
        let mut b = PackedBytes {
            codes: 0,
            scales: 0,
            moments: 0,
            grad_scratch: (self.lgrad.len() + self.discard.len()) as u64 * 4,
            grad_acc: self.acc.as_ref().map_or(0, |(a, _)| a.len() as u64 * 4),
        };
        for p in self.layers.iter().flatten() {
            b.codes += p.w.packed.len() as u64;
            b.scales += (p.w.scales.len() + 4) as u64;
            b.moments += moment_bytes(&p.m) + moment_bytes(&p.v);
        }
        b
    }

    /// Queue the dequantize of layer `l`'s linears into the stacked bf16 matrices at `dst`
    /// (`[qkv, o, gate_up, down]` base addresses).
    ///
    /// # Safety
    /// Each `dst` matrix holds its stack's elements in bf16 and is live until the work runs.
    pub(super) unsafe fn dequantize_layer(
        &self,
        k: &CudaKernels,
        l: usize,
        dst: [DevAddr; 4],
    ) -> Result<()> {
        for p in &self.layers[l] {
            let base = match p.stack {
                Stack::Qkv => dst[0],
                Stack::O => dst[1],
                Stack::GateUp => dst[2],
                Stack::Down => dst[3],
            };
            // SAFETY: the caller's contract; p.at + p's elements lie inside its stack.
            unsafe { k.dequantize_bf16_to_async(&p.w, base + 2 * p.at as u64)? };
        }
        Ok(())
    }

    /// The gradient address of `stack` in the scratch.
    pub(super) fn grad_of(&self, k: &CudaKernels, stack: Stack) -> DevAddr {
        k.addr(&self.lgrad, self.stacks.of(stack))
    }

    /// Queue `sumsq += Σ lgrad²`.
    ///
    /// # Safety
    /// `sumsq` is one live f64.
    pub(super) unsafe fn add_sumsq(&self, k: &CudaKernels, sumsq: DevAddr) -> Result<()> {
        // SAFETY: the table names lgrad, live with self.
        unsafe { k.train_grad_sumsq_async(&self.lgrad_table, sumsq)? };
        Ok(())
    }

    /// Queue AdamW on layer `l`'s linears from its gradients — the scratch, or with
    /// accumulation the layer's part of the accumulator — (clipped to `max_norm` by `sumsq`),
    /// exactly as `ParamStore::adamw_step` steps packed weights: the weight's
    /// stochastic rounding seeded by `seed ^ fnv1a(name)`, bf16 moments' by the run's
    /// `sr_seed ^ fnv1a(name)`. With `lr == 0` only the moments change (the weights stay
    /// bit-identical, as on the CPU).
    ///
    /// # Safety
    /// `sumsq` is one live f64 holding the step's sum of squares (complete when clipping).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn step_layer(
        &mut self,
        k: &CudaKernels,
        l: usize,
        hp: AdamWParams,
        step: u64,
        seed: u64,
        (sumsq, max_norm): (DevAddr, f32),
        status: &mut DeviceStatus,
    ) -> Result<()> {
        let run = AdamWScalars::new(hp, step, seed);
        let bf16 = self.moments == MomentsSpec::Bf16;
        let stacks = self.stacks;
        let g0 = match &self.acc {
            Some((acc, _)) => k.addr(acc, l * stacks.total),
            None => k.addr(&self.lgrad, 0),
        };
        for p in &mut self.layers[l] {
            let name_hash = fnv1a(&p.name);
            let wsc = AdamWScalars::new(hp, step, seed ^ name_hash);
            let grad = g0 + 4 * (stacks.of(p.stack) + p.at) as u64;
            let (m, v) = (moments_addr(k, &p.m), moments_addr(k, &p.v));
            // SAFETY: grad covers p's elements inside lgrad; m and v hold p's elements.
            unsafe {
                k.train_adamw_nvfp4_async(
                    &mut p.w,
                    grad,
                    (m, v),
                    bf16,
                    &wsc,
                    run.sr_seed ^ name_hash,
                    (sumsq, max_norm),
                    hp.lr == 0.0,
                    status,
                )?;
            }
        }
        Ok(())
    }

    /// Copy the packed weights (and, with `moments`, their moments) back into `store`.
    pub(super) fn download_into(
        &self,
        k: &CudaKernels,
        store: &mut ParamStore,
        moments: bool,
    ) -> Result<()> {
        for p in self.layers.iter().flatten() {
            let t = k.download_nvfp4(&p.w)?;
            let dst = store
                .param_mut(&p.name)
                .ok_or_else(|| unsupported(format!("the parameter store has no {}", p.name)))?;
            dst.value = ParamValue::Packed(t);
            if moments {
                let (m, v) = (download_moment(k, &p.m)?, download_moment(k, &p.v)?);
                let kind = dst.exp_avg.kind();
                dst.exp_avg = MomentVec::from_f32(m, kind);
                dst.exp_avg_sq = MomentVec::from_f32(v, kind);
            }
        }
        Ok(())
    }
}

fn moment_bytes(m: &Moments) -> u64 {
    match m {
        Moments::F32(b) => b.len() as u64 * 4,
        Moments::Bf16(b) => b.len() as u64 * 2,
    }
}
