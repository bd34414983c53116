//! [`TrainPlan`]: what a GPU train step will allocate, from the config alone — the flat
//! parameter buffers (f32 master weights, gradients, moments), the bf16 working weights (in
//! `nvfp4-full`: the packed linears, their moments and one layer's working copy and gradient
//! scratch), and the activations and scratch of one micro-batch shape — so a job can fail
//! before allocating,
//! with the numbers and the largest `--seq-len` (or `--moments bf16`) that would fit. The
//! formulas are the trainer's allocations (`CudaTrainer::new`, `Workspace::new`); the GPU
//! tests check that [`TrainPlan::tensor_bytes`] equals what the trainer reports.

use kiln_job::units::human_bytes as human;

use super::attention::TrainAttention;
use super::layout::flat_layout;
use super::packed::{accumulator_bytes, packed_bytes};
use super::workspace::LOGIT_CHUNK;
use crate::cuda::plan::CONTEXT_BYTES;
use crate::error::{EngineError, Result};
use crate::model::{ModelConfig, ModelLayout};
use crate::spec::{MomentsSpec, QuantSpec};

/// The bytes of a GPU train step by category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainPlan {
    /// f32 master weights and the bf16 working copies of the linears and the vocabulary
    /// projection (`nvfp4-full`: the dense parameters' master weights, the packed linears'
    /// codes, one layer's working copy and the vocabulary projection's).
    pub weights: u64,
    /// `nvfp4-full`: the packed linears' block and tensor scales.
    pub scales: u64,
    /// f32 gradients.
    pub grads: u64,
    /// The two AdamW moments.
    pub optimizer_state: u64,
    /// Saved activations and shared scratch of one `batch × seq` micro-batch.
    pub activations: u64,
    /// The CUDA context, kernels and cuBLAS handles ([`CONTEXT_BYTES`]).
    pub context: u64,
    /// The mode planned for.
    pub quant: QuantSpec,
    /// The moments' element type planned for.
    pub moments: MomentsSpec,
    /// Micro-batch rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Micro-batches per optimizer step (`--grad-accum`; 1 unless
    /// [`TrainPlan::with_micro_batches`] said otherwise).
    pub micro_batches: u32,
    /// Activations recomputed per layer in backward (`--recompute`; see
    /// [`TrainPlan::with_recompute`]).
    pub recompute: bool,
    /// The attention's form planned for (materialized unless
    /// [`TrainPlan::with_flash_attention`] said otherwise).
    pub attention: TrainAttention,
}

impl TrainPlan {
    /// The plan for a model of shape `cfg` trained in mode `quant` with `moments`,
    /// micro-batches of `batch × seq`.
    pub fn new(
        cfg: &ModelConfig,
        quant: QuantSpec,
        moments: MomentsSpec,
        batch: usize,
        seq: usize,
    ) -> Result<Self> {
        let layout = ModelLayout::new(cfg)?;
        let full = quant == QuantSpec::Nvfp4Full;
        let (params, ..) = flat_layout(cfg, &layout, full)?;
        let total = params.iter().map(|p| p.offset + p.numel).max().unwrap_or(0) as u64;
        let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
        let q = cfg.q_size() as u64;
        let qkv = q + 2 * cfg.kv_size() as u64;
        let copies = if full {
            1
        } else {
            cfg.num_hidden_layers as u64
        };
        let working =
            (copies * (qkv * h + h * q + 2 * i * h + h * i) + cfg.vocab_size as u64 * h) * 2;
        let p = if full {
            Some(packed_bytes(cfg, moments)?)
        } else {
            None
        };
        let pb = |f: fn(&super::packed::PackedBytes) -> u64| p.as_ref().map_or(0, f);
        Ok(TrainPlan {
            weights: total * 4 + working + pb(|b| b.codes),
            scales: pb(|b| b.scales),
            grads: total * 4 + pb(|b| b.grad_scratch),
            optimizer_state: 2 * total * moments.bytes() + pb(|b| b.moments),
            activations: activation_bytes(
                cfg,
                (batch, seq),
                full,
                false,
                TrainAttention::Materialized,
            ),
            context: CONTEXT_BYTES,
            quant,
            moments,
            batch,
            seq,
            micro_batches: 1,
            recompute: false,
            attention: TrainAttention::Materialized,
        })
    }

    /// The plan when each layer's activations are recomputed just before its backward
    /// (`--recompute`): the residual stream into every layer is kept, the rest of the saved
    /// activations only for one layer at a time.
    pub fn with_recompute(mut self, cfg: &ModelConfig, on: bool) -> Self {
        self.recompute = on;
        self.replan_activations(cfg)
    }

    /// The plan when the attention runs as the flash kernels where they are built for the
    /// model's head dim ([`TrainAttention::for_config`]): no `[B·nh·T × T]` buffers, a
    /// log-sum-exp per query row and layer instead.
    pub fn with_flash_attention(mut self, cfg: &ModelConfig, on: bool) -> Self {
        self.attention = TrainAttention::for_config(cfg, on);
        self.replan_activations(cfg)
    }

    fn replan_activations(mut self, cfg: &ModelConfig) -> Self {
        let full = self.quant == QuantSpec::Nvfp4Full;
        let (shape, re, att) = ((self.batch, self.seq), self.recompute, self.attention);
        self.activations = activation_bytes(cfg, shape, full, re, att);
        self
    }

    /// This plan's options (micro-batches, recompute, attention) at `seq` tokens a row and
    /// with `moments`.
    fn at(&self, cfg: &ModelConfig, seq: usize, moments: MomentsSpec) -> Result<Self> {
        Ok(TrainPlan::new(cfg, self.quant, moments, self.batch, seq)?
            .with_micro_batches(cfg, self.micro_batches)
            .with_recompute(cfg, self.recompute)
            .with_flash_attention(cfg, self.attention == TrainAttention::Flash))
    }

    /// The plan when each step accumulates `n` micro-batches: in `nvfp4-full` every linear's
    /// gradient then outlives its micro-batch in an f32 accumulator (4 bytes a parameter,
    /// under gradients); the other modes accumulate into the gradients they hold anyway.
    pub fn with_micro_batches(mut self, cfg: &ModelConfig, n: u32) -> Self {
        if self.quant == QuantSpec::Nvfp4Full && n > 1 && self.micro_batches <= 1 {
            self.grads += accumulator_bytes(cfg);
        }
        self.micro_batches = n.max(1);
        self
    }

    /// Tensor bytes (what the trainer reports; no context).
    pub fn tensor_bytes(&self) -> u64 {
        self.weights + self.scales + self.grads + self.optimizer_state + self.activations
    }

    /// Everything the job will hold on the GPU.
    pub fn total(&self) -> u64 {
        self.tensor_bytes() + self.context
    }

    /// Fail when the plan exceeds `budget` bytes, naming each category, the largest `seq` at
    /// this batch that fits, and whether bf16 moments would make room.
    pub fn check(&self, cfg: &ModelConfig, budget: u64) -> Result<()> {
        if self.total() <= budget {
            return Ok(());
        }
        let mut ways = Vec::new();
        match largest_seq(cfg, self, self.seq, budget) {
            Some(s) => ways.push(format!("--seq-len {s} (at --batch {})", self.batch)),
            None => ways.push("no --seq-len at this --batch".into()),
        }
        if self.moments == MomentsSpec::F32 {
            let bf = self.at(cfg, self.seq, MomentsSpec::Bf16)?;
            if bf.total() <= budget {
                ways.push("--moments bf16 at this --seq-len".into());
            }
        }
        Err(EngineError::InvalidArgument(format!(
            "this training needs {} on the GPU (weights {}, scales {}, gradients {}, optimizer state {}, activations {} for {}×{} tokens, CUDA context {}) but the budget is {}; what would fit: {}",
            human(self.total()),
            human(self.weights),
            human(self.scales),
            human(self.grads),
            human(self.optimizer_state),
            human(self.activations),
            self.batch,
            self.seq,
            human(self.context),
            human(budget),
            ways.join(", or ")
        )))
    }
}

/// The largest sequence length up to `seq` whose plan — `like`'s mode, moments, batch,
/// micro-batches, recompute and attention — fits `budget`, if any.
pub fn largest_seq(cfg: &ModelConfig, like: &TrainPlan, seq: usize, budget: u64) -> Option<usize> {
    let fits = |s: usize| {
        like.at(cfg, s, like.moments)
            .map(|p| p.total() <= budget)
            .unwrap_or(false)
    };
    if !fits(2) {
        return None;
    }
    // Bytes grow with seq: binary search the last length that fits.
    let (mut lo, mut hi) = (2usize, seq);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo)
}

/// The bytes `Workspace::new` allocates for `batch × seq` (the same buffers, term by term);
/// with `recompute`, one layer's saved activations instead of every layer's.
pub(super) fn activation_bytes(
    cfg: &ModelConfig,
    (batch, seq): (usize, usize),
    packed: bool,
    recompute: bool,
    attention: TrainAttention,
) -> u64 {
    let n = (batch * seq) as u64;
    let (h, i, hd) = (
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
        cfg.head_dim as u64,
    );
    let (nh, kvh) = (
        cfg.num_attention_heads as u64,
        cfg.num_key_value_heads as u64,
    );
    let qkv_cols = (nh + 2 * kvh) * hd;
    // the form's buffers, one element where the form has none (as Workspace allocates)
    let scores = attention.score_elems(cfg, (batch, seq)).max(1) as u64;
    let rows = attention.row_elems(cfg, (batch, seq)).max(1) as u64;
    let out = attention.out_elems(cfg, batch * seq).max(1) as u64;
    let chunk = (LOGIT_CHUNK as u64).min(n);
    let v = cfg.vocab_size as u64;
    // xn1, rstd1, q, k, v, p, lse, attn, h_mid, xn2, rstd2, gu, a
    let per_layer = 2 * n * h
        + 4 * n
        + 2 * n * nh * hd
        + 2 * 2 * n * kvh * hd
        + 2 * scores
        + 4 * rows
        + 2 * n * nh * hd
        + 4 * n * h
        + 2 * n * h
        + 4 * n
        + 4 * n * 2 * i
        + 2 * n * i
        // Qwen3: the per-head q/k norm's saved x̂ and r
        + if cfg.qk_norm() {
            (2 * hd + 4) * n * (nh + kvh)
        } else {
            0
        };
    // ids + target (i32), dh_top, weight, xnf, rstdf, qkv, scores, o, dh, dh_bf16, dx, dmid,
    // d_o, dp, ds, dq, dk, dv, dd, logits, dlogits
    let shared = 8 * n
        + 4 * if packed { n * h } else { 1 }
        + 4 * n
        + 2 * n * h
        + 4 * n
        + 4 * n * qkv_cols
        + 4 * scores
        + 4 * out
        + 4 * n * h
        + 2 * n * h
        + 4 * n * h.max(i).max(nh * hd)
        + 2 * n * (2 * i).max(qkv_cols)
        + 2 * n * nh * hd
        + 4 * scores
        + 2 * scores
        + 4 * n * nh * hd
        + 2 * 4 * n * kvh * hd
        + 4 * rows
        + 4 * chunk * v
        + 2 * chunk * v;
    let layers = cfg.num_hidden_layers as u64;
    let sets = if recompute { layers.min(1) } else { layers };
    // the residual stream into every layer and out of the last
    let residual = (layers + 1) * 4 * n * h;
    sets * per_layer + residual + shared
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_bf16_halve_the_optimizer_state_and_activations_grow_with_the_sequence() {
        let cfg = ModelConfig::qwen2_5_7b();
        let f = TrainPlan::new(&cfg, QuantSpec::Nvfp4Ste, MomentsSpec::F32, 1, 192).unwrap();
        let b = TrainPlan::new(&cfg, QuantSpec::Nvfp4Ste, MomentsSpec::Bf16, 1, 192).unwrap();
        assert_eq!(f.optimizer_state, 2 * b.optimizer_state);
        assert_eq!(f.optimizer_state, 2 * f.grads);
        assert_eq!((f.weights, f.grads), (b.weights, b.grads));
        // 7.6 B parameters: 4 bytes of master and 4 of gradient each, and 8 of moments.
        let params = f.grads / 4;
        assert!((7_000_000_000..8_000_000_000).contains(&params), "{params}");
        let long = TrainPlan::new(&cfg, QuantSpec::Nvfp4Ste, MomentsSpec::F32, 1, 384).unwrap();
        assert!(long.activations > f.activations);
        // The attention probabilities grow with seq²: doubling seq more than doubles them.
        let longer = TrainPlan::new(&cfg, QuantSpec::Nvfp4Ste, MomentsSpec::F32, 1, 4096).unwrap();
        let lx2 = TrainPlan::new(&cfg, QuantSpec::Nvfp4Ste, MomentsSpec::F32, 1, 8192).unwrap();
        assert!(lx2.activations > 2 * longer.activations);
    }

    #[test]
    fn nvfp4_full_plans_a_14b_full_fine_tune_inside_108_gib() {
        let cfg = ModelConfig::qwen2_5_14b();
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let full = TrainPlan::new(&cfg, QuantSpec::Nvfp4Full, MomentsSpec::Bf16, 1, 192).unwrap();
        let ste = TrainPlan::new(&cfg, QuantSpec::Nvfp4Ste, MomentsSpec::Bf16, 1, 192).unwrap();
        assert!(gib(full.total()) < 108.0, "{:.1} GiB", gib(full.total()));
        assert!(gib(ste.total()) > 160.0, "{:.1} GiB", gib(ste.total()));
        // 14.7 B parameters: the 13.2 B linear ones packed at 4.5 bits, their bf16 moments 4
        // bytes each.
        let linear = full.scales * 16;
        assert!(
            (13_000_000_000..13_500_000_000).contains(&linear),
            "{linear}"
        );
        assert!(full.optimizer_state > 4 * linear);
        // Only one layer's linear gradients at a time.
        assert!(full.grads < ste.grads / 8);
        // f32 moments would not fit; the check says so and names bf16 moments.
        let f32m = TrainPlan::new(&cfg, QuantSpec::Nvfp4Full, MomentsSpec::F32, 1, 192).unwrap();
        let e = f32m.check(&cfg, 108 << 30).unwrap_err().to_string();
        assert!(e.contains("--moments bf16"), "{e}");
        assert!(full.check(&cfg, 108 << 30).is_ok());
    }

    #[test]
    fn nvfp4_full_plans_a_qwen3_8b_step_with_f32_moments_inside_108_gib() {
        let cfg = ModelConfig::qwen3_8b();
        let p = TrainPlan::new(&cfg, QuantSpec::Nvfp4Full, MomentsSpec::F32, 1, 192).unwrap();
        let gib = p.total() as f64 / (1u64 << 30) as f64;
        eprintln!("Qwen3-8B nvfp4-full f32 1×192: {gib:.2} GiB ({p:?})");
        assert!(p.check(&cfg, 108 << 30).is_ok(), "{gib:.1} GiB");
        // The q/k norms' saved activations are in the plan: 36 layers × 192 tokens × 40 heads.
        let mut no_norm = cfg.clone();
        no_norm.architecture = crate::model::Architecture::Qwen2;
        let q2 = TrainPlan::new(&no_norm, QuantSpec::Nvfp4Full, MomentsSpec::F32, 1, 192).unwrap();
        assert_eq!(
            p.activations - q2.activations,
            36 * 192 * 40 * (2 * 128 + 4)
        );
    }

    #[test]
    fn accumulating_nvfp4_full_gradients_costs_four_bytes_a_linear_parameter() {
        let cfg = ModelConfig::qwen3_8b();
        let one = TrainPlan::new(&cfg, QuantSpec::Nvfp4Full, MomentsSpec::Bf16, 1, 192).unwrap();
        let four = one.with_micro_batches(&cfg, 4);
        // Four bytes for each of the 6.95 B linear parameters (16 per block scale byte).
        let extra = four.grads - one.grads;
        assert_eq!(extra, accumulator_bytes(&cfg));
        let linear = one.scales * 16;
        assert!(
            extra.abs_diff(4 * linear) < linear / 100,
            "{extra} vs {linear}"
        );
        assert_eq!(four.micro_batches, 4);
        // Idempotent, and the other modes hold whole gradients anyway.
        assert_eq!(four.with_micro_batches(&cfg, 4).grads, four.grads);
        let ste = TrainPlan::new(&cfg, QuantSpec::Nvfp4Ste, MomentsSpec::Bf16, 1, 192).unwrap();
        assert_eq!(ste.with_micro_batches(&cfg, 4).grads, ste.grads);
        // Over budget, what would fit keeps the accumulator in the sums.
        let e = four.check(&cfg, one.total()).unwrap_err().to_string();
        assert!(e.contains("budget"), "{e}");
    }

    #[test]
    fn recompute_keeps_one_layer_of_activations_and_every_layer_input() {
        let cfg = ModelConfig::qwen2_5_0_5b();
        let keep = TrainPlan::new(&cfg, QuantSpec::Nvfp4Ste, MomentsSpec::F32, 8, 512).unwrap();
        let re = keep.with_recompute(&cfg, true);
        assert!(re.recompute && !keep.recompute);
        // 24 layers' saved activations become one layer's: 23 sets fewer.
        assert_eq!((keep.activations - re.activations) % 23, 0);
        assert!(re.activations < keep.activations / 4, "{re:?} vs {keep:?}");
        assert_eq!(re.with_recompute(&cfg, false).activations, keep.activations);
        // What would fit is found with recompute kept.
        let budget = re.total();
        assert!(re.check(&cfg, budget).is_ok());
        let e = keep.check(&cfg, budget).unwrap_err().to_string();
        assert!(e.contains("--seq-len"), "{e}");
    }

    #[test]
    fn flash_attention_drops_the_score_buffers_where_its_kernels_are_built() {
        let cfg = ModelConfig::qwen2_5_0_5b();
        let plan = |seq, flash| {
            TrainPlan::new(&cfg, QuantSpec::Nvfp4Ste, MomentsSpec::F32, 8, seq)
                .unwrap()
                .with_flash_attention(&cfg, flash)
        };
        let (mat, flash) = (plan(512, false), plan(512, true));
        assert_eq!(flash.attention, TrainAttention::Flash);
        // 24 layers of bf16 probabilities and the shared f32 scores, dP and bf16 dS, each
        // [8·14·512 × 512], less the log-sum-exp per layer and D (f32 [8·14·512]) and the
        // group-layout f32 output.
        let (scores, rows) = (8 * 14 * 512 * 512u64, 8 * 14 * 512u64);
        let out = 8 * 512 * 14 * 64u64;
        let saved = 24 * (2 * scores - 2) + (4 + 4 + 2) * (scores - 1) + 4 * (out - 1);
        let added = 25 * 4 * (rows - 1);
        assert_eq!(mat.activations - flash.activations, saved - added);
        // without the T × T terms, doubling seq at most doubles the activations
        assert!(plan(1024, true).activations <= 2 * flash.activations);
        assert!(plan(1024, false).activations > 2 * mat.activations);
        // what would fit is searched with the same attention
        let e = flash.check(&cfg, mat.total() - 1);
        assert!(e.is_ok(), "{e:?}");
        // a 16,384-token row: refused materialized (the probabilities alone ~180 GB), fits flash
        let long = |flash| {
            TrainPlan::new(&cfg, QuantSpec::Nvfp4Ste, MomentsSpec::F32, 1, 16_384)
                .unwrap()
                .with_flash_attention(&cfg, flash)
        };
        let e = long(false).check(&cfg, 100 << 30).unwrap_err().to_string();
        assert!(e.contains("--seq-len"), "{e}");
        long(true).check(&cfg, 100 << 30).unwrap();
        // a head dim without a flash kernel keeps the materialized form
        let mut wide = cfg.clone();
        wide.head_dim = 256;
        let p = TrainPlan::new(&wide, QuantSpec::Nvfp4Ste, MomentsSpec::F32, 8, 512)
            .unwrap()
            .with_flash_attention(&wide, true);
        assert_eq!(p.attention, TrainAttention::Materialized);
    }

    #[test]
    fn over_budget_names_every_category_and_what_would_fit() {
        let cfg = ModelConfig::qwen2_5_7b();
        let p = TrainPlan::new(&cfg, QuantSpec::Nvfp4Ste, MomentsSpec::F32, 8, 2048).unwrap();
        // Short by a quarter of the optimizer state: bf16 moments (half of it) make room.
        let budget = p.total() - p.optimizer_state / 4;
        let e = p.check(&cfg, budget).unwrap_err().to_string();
        for word in [
            "weights",
            "gradients",
            "optimizer state",
            "activations",
            "budget",
            "--seq-len",
        ] {
            assert!(e.contains(word), "{word} missing: {e}");
        }
        let s = largest_seq(&cfg, &p, 2048, budget).unwrap();
        assert!((2..2048).contains(&s));
        assert!(
            TrainPlan::new(&cfg, QuantSpec::Nvfp4Ste, MomentsSpec::F32, 8, s)
                .unwrap()
                .total()
                <= budget
        );
        assert!(
            TrainPlan::new(&cfg, QuantSpec::Nvfp4Ste, MomentsSpec::F32, 8, s + 1)
                .unwrap()
                .total()
                > budget
        );
        assert!(e.contains("--moments bf16"), "{e}");
        // Within budget: fine. Below the fixed bytes: no --seq-len fits.
        assert!(p.check(&cfg, p.total()).is_ok());
        let e = p.check(&cfg, p.grads).unwrap_err().to_string();
        assert!(e.contains("no --seq-len"), "{e}");
    }
}
