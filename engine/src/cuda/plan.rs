//! What a GPU job will allocate, computed before it allocates: [`GpuPlan`] adds the model's
//! bytes, the KV cache for the job's context, the forward's workspace and the CUDA context,
//! and [`GpuPlan::check`] fails with the numbers — and the budget that would fit — when they
//! exceed the job's budget (a guard kill is for surprises, not for arithmetic). Also the
//! sizing rules the sequence uses (decode attention splits, prefill batch).

use kiln_job::units::human_bytes as human;
use kiln_kernels::cuda::decode::{ARGMAX_BLOCKS, FLASH_PREFILL_HEAD_DIMS};
use kiln_kernels::cuda::gemv::GEMV_MAX_ROWS;

use super::slabs::{self, PREFILL_OVERLAP};
use super::weights::GpuWeightBytes;
use crate::error::{EngineError, Result};
use crate::model::ModelConfig;

/// Most prompt tokens forwarded as one batch (longer prompts go in batches of this many).
pub const PREFILL_ROWS: usize = 2048;

/// Linear weights from which a model counts as large for [`short_prompt`].
pub const LARGE_MODEL_LINEAR_WEIGHTS: usize = 1 << 30;

/// Prompts of at most this many tokens go 8 rows at a time through the GEMVs (no dequantized
/// weights, no GEMM set-up); longer ones through the GEMMs: 8 for models under
/// [`LARGE_MODEL_LINEAR_WEIGHTS`] linear weights, 16 from there on. Measured on the H200
/// (2026-12-05, `kiln bench engine --device cuda --short-prompts 2,4,8,16,32,64`): an 8-row
/// GEMV batch costs about what the GEMM path's whole prompt does at 8 tokens on the
/// Qwen2.5-0.5B shape (1.43 vs 1.44 ms; 16 tokens: 2.87 vs 1.91), and a third of it on the 7B
/// shape, whose GEMM path dequantizes 13 GB of bf16 (4.3 vs 12.8 ms; 16 tokens 8.6 vs 12.8,
/// 32 tokens 17.0 vs 12.6). Single tokens always take the decode step.
pub fn short_prompt(cfg: &ModelConfig) -> usize {
    if linear_weights(cfg) >= LARGE_MODEL_LINEAR_WEIGHTS {
        2 * GEMV_MAX_ROWS
    } else {
        GEMV_MAX_ROWS
    }
}

/// Prompts of up to this many tokens take the GEMV batches while the process has not run the
/// prompt GEMMs yet ([`prompt_takes_gemvs`]): the GEMMs' one-time cost in a fresh process
/// (~160 ms on the H200) is more than 64 tokens of GEMV batches take (1.5 / 11.5 / 34 ms on the
/// tiny / 0.5B / 7B shapes).
pub const COLD_SHORT_PROMPT: usize = 64;

/// Whether a prompt of `tokens` tokens goes 8 rows at a time through the GEMVs (else through the
/// GEMMs): up to [`short_prompt`] tokens, or [`COLD_SHORT_PROMPT`] while the process has not
/// run the GEMMs (`gemm_warm`) — a job process's first prompt, a chat turn's delta.
pub fn prompt_takes_gemvs(cfg: &ModelConfig, tokens: usize, gemm_warm: bool) -> bool {
    tokens <= short_prompt(cfg) || (!gemm_warm && tokens <= COLD_SHORT_PROMPT)
}

/// Weights of the model's layer linears (q, k, v, o, gate, up, down), all layers.
pub fn linear_weights(cfg: &ModelConfig) -> usize {
    let (h, q, kv, i) = (
        cfg.hidden_size,
        cfg.q_size(),
        cfg.kv_size(),
        cfg.intermediate_size,
    );
    cfg.num_hidden_layers * (h * (q + 2 * kv) + q * h + 3 * h * i)
}

/// Most bf16 elements of W dequantized at once by the prefill GEMM (64 MiB).
pub const PREFILL_SCRATCH_ELEMS: usize = 32 << 20;

/// bf16 elements of the prompt GEMM's dequantized-weight scratch for a model of shape `cfg`:
/// its largest stacked matrix, at most [`PREFILL_SCRATCH_ELEMS`].
pub fn prefill_scratch_elems(cfg: &ModelConfig) -> usize {
    let (h, q, i) = (cfg.hidden_size, cfg.q_size(), cfg.intermediate_size);
    let qkv = q + 2 * cfg.kv_size();
    PREFILL_SCRATCH_ELEMS.min(qkv.max(2 * i).max(h) * widest_input(cfg))
}

/// The widest input (K) of the model's linears: one row of the widest matrix, the least a
/// dequantized-weight slab can hold.
pub fn widest_input(cfg: &ModelConfig) -> usize {
    cfg.hidden_size.max(cfg.intermediate_size).max(cfg.q_size())
}

/// Attention splits of a forward of `rows` tokens: up to 8 rows go through the decode
/// attention (`decode_splits`), longer prompts through the prefill attention (one split).
pub fn forward_splits(rows: usize, decode_splits: usize) -> usize {
    if rows > GEMV_MAX_ROWS {
        1
    } else {
        decode_splits
    }
}

/// The decode attention's splits the plan counts for a cache of `positions`: those of a
/// 132-SM H200, at least 264 (two per SM) so that a GPU with more SMs is covered too.
fn planned_decode_splits(cfg: &ModelConfig, positions: usize) -> usize {
    decode_chunk(positions, cfg.num_key_value_heads, 132)
        .1
        .max(264)
}

/// GPU memory the CUDA context, the loaded kernels and the cuBLAS / cuBLASLt handles take
/// besides the allocations (an allowance: on the H200, 2026-12-04, a job process with the
/// kernels loaded showed about 0.5 GiB in NVML beyond its buffers).
pub const CONTEXT_BYTES: u64 = 768 << 20;

/// Positions per split and splits of the decode attention for a cache of `capacity`
/// positions: enough splits that kv_heads × splits fills the GPU about twice, at least 32
/// positions each. Splits past the sequence's length exit at once.
pub fn decode_chunk(capacity: usize, kv_heads: usize, sm_count: u32) -> (usize, usize) {
    let want_splits = (2 * sm_count as usize).div_ceil(kv_heads.max(1)).max(1);
    let chunk = capacity.div_ceil(want_splits).div_ceil(32).max(1) * 32;
    (chunk, capacity.div_ceil(chunk).max(1))
}

/// The bytes a GPU generation will hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuPlan {
    /// The model's bytes by category.
    pub model: GpuWeightBytes,
    /// KV cache for `positions` positions.
    pub kv_cache: u64,
    /// Positions the cache is sized for.
    pub positions: usize,
    /// Activations of the decode step and of a prefill batch, the prefill GEMM's scratch,
    /// logits.
    pub workspace: u64,
    /// [`CONTEXT_BYTES`].
    pub context: u64,
}

impl GpuPlan {
    /// The plan for a model of shape `cfg`, a cache of `positions` positions and a prompt
    /// forwarded in batches of up to `prefill_rows` tokens.
    pub fn new(cfg: &ModelConfig, positions: usize, prefill_rows: usize) -> Self {
        let positions = positions.clamp(1, cfg.max_position_embeddings);
        let kv_cache = kv_bytes(cfg, positions);
        let splits = planned_decode_splits(cfg, positions);
        // a prompt takes the GEMV batches or the GEMMs depending on whether the process has
        // run the GEMMs before: the larger of the two forms it can take (one exists at a time)
        let prompt = |rows: usize| {
            if rows > 1 {
                acts_bytes(cfg, rows, forward_splits(rows, splits))
                    + prefill_scores_bytes(cfg, rows, positions)
            } else {
                0
            }
        };
        let gemvs = prompt_takes_gemvs(cfg, prefill_rows, false);
        let gemms = !prompt_takes_gemvs(cfg, prefill_rows, true);
        let as_gemvs = if gemvs {
            prompt(prefill_rows.clamp(1, GEMV_MAX_ROWS))
        } else {
            0
        };
        let as_gemms = if gemms {
            prompt(prefill_rows.min(PREFILL_ROWS))
        } else {
            0
        };
        let workspace = acts_bytes(cfg, 1, splits)
            + as_gemvs.max(as_gemms)
            + (cfg.vocab_size * 4 + ARGMAX_BLOCKS * 8) as u64;
        GpuPlan {
            model: GpuWeightBytes::of_config(cfg),
            kv_cache,
            positions,
            workspace,
            context: CONTEXT_BYTES,
        }
    }

    /// Everything.
    pub fn total(&self) -> u64 {
        self.model.total() + self.kv_cache + self.workspace + self.context
    }

    /// Fail when the plan exceeds `budget` bytes (0: no budget).
    pub fn check(&self, budget: u64) -> Result<()> {
        if budget == 0 || self.total() <= budget {
            return Ok(());
        }
        let need = self.total();
        let gib = need.div_ceil(1 << 30);
        Err(EngineError::OverBudget(format!(
            "this generation needs {} of GPU memory but its budget is {}: weights {} (codes {}, \
             scales {}, embedding {}), KV cache {} for {} positions, workspace {}, CUDA context \
             about {}; submit with --budget-gb {gib} or more, or lower --max-tokens",
            human(need),
            human(budget),
            human(self.model.total()),
            human(self.model.weights),
            human(self.model.scales),
            human(self.model.embeddings),
            human(self.kv_cache),
            self.positions,
            human(self.workspace),
            human(self.context),
        )))
    }
}

/// Bytes of keys and values (bf16) for `positions` positions.
pub fn kv_bytes(cfg: &ModelConfig, positions: usize) -> u64 {
    (2 * 2 * cfg.num_hidden_layers * cfg.kv_size() * positions) as u64
}

/// Bytes of the prompt path's attention scores (f32) and probabilities (bf16),
/// `[kv_heads][rows][keys]` each, for a batch of `rows` tokens over up to `keys` positions:
/// only where the flash kernel is not built for the head dim (it keeps them in registers).
fn prefill_scores_bytes(cfg: &ModelConfig, rows: usize, keys: usize) -> u64 {
    if rows <= GEMV_MAX_ROWS || FLASH_PREFILL_HEAD_DIMS.contains(&cfg.head_dim) {
        return 0;
    }
    (cfg.num_key_value_heads * rows * keys * 6) as u64
}

/// Bytes of the activations of a forward of `rows` tokens (`Acts`); over 8 rows the bf16
/// buffers of the GEMM path (h, q, attn, gate/up, act) and the GEMM scratch instead of the f32
/// h, gate/up and act.
fn acts_bytes(cfg: &ModelConfig, rows: usize, splits: usize) -> u64 {
    let (h, q, i) = (cfg.hidden_size, cfg.q_size(), cfg.intermediate_size);
    let qkv = q + 2 * cfg.kv_size();
    let parts = rows * cfg.num_attention_heads * splits * (cfg.head_dim + 2);
    // over 8 rows h, gu and act live in bf16 only (one-element f32 placeholders)
    let (f32s, bf16s) = if rows > GEMV_MAX_ROWS {
        (
            rows * (2 * h + qkv + 2 * q) + 3 + parts,
            rows * (h + 2 * q + 3 * i)
                + slabs::buffers(PREFILL_OVERLAP) * prefill_scratch_elems(cfg),
        )
    } else {
        (rows * (3 * h + qkv + 2 * q + 3 * i) + parts, 0)
    };
    (f32s * 4 + bf16s * 2) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_splits_fill_the_gpu_and_cover_the_capacity() {
        let (chunk, splits) = decode_chunk(384, 2, 132);
        assert_eq!(chunk % 32, 0);
        assert!(chunk * splits >= 384);
        let (chunk, splits) = decode_chunk(32_768, 4, 132);
        assert!(
            splits * 4 >= 132 && chunk * splits >= 32_768,
            "{chunk} {splits}"
        );
        assert_eq!(decode_chunk(1, 2, 132), (32, 1));
    }

    #[test]
    fn a_budget_too_small_fails_with_the_numbers_and_the_budget_that_fits() {
        let cfg = ModelConfig::qwen2_5_0_5b();
        let plan = GpuPlan::new(&cfg, 384, 128);
        assert!(
            plan.total() > 400 << 20 && plan.total() < 2 << 30,
            "{plan:?}"
        );
        plan.check(4 << 30).unwrap();
        plan.check(0).unwrap();
        let e = plan.check(256 << 20).unwrap_err().to_string();
        assert!(e.contains("budget is 256.0 MiB"), "{e}");
        assert!(e.contains("--budget-gb"), "{e}");
        assert!(e.contains("KV cache") && e.contains("384 positions"), "{e}");
        let long = GpuPlan::new(&cfg, 32_768, 2048);
        assert!(long.kv_cache == kv_bytes(&cfg, 32_768) && long.kv_cache > plan.kv_cache);
    }

    #[test]
    fn short_prompts_are_longer_for_large_models() {
        let (small, large) = (ModelConfig::qwen2_5_0_5b(), ModelConfig::qwen2_5_7b());
        // 24 × (896 × 1152 + 896² + 3 × 896 × 4864) and 28 × (3584 × 4608 + 3584² + 3 ×
        // 3584 × 18944)
        assert_eq!(linear_weights(&small), 357_826_560);
        assert_eq!(linear_weights(&large), 6_525_288_448);
        assert_eq!(short_prompt(&small), 8);
        assert_eq!(short_prompt(&large), 16);
        // a 12-token prompt takes the GEMV batches on the 7B shape; on the 0.5B shape the
        // GEMMs once the process has run them, the GEMV batches before
        assert!(prompt_takes_gemvs(&large, 12, true) && prompt_takes_gemvs(&large, 16, true));
        assert!(!prompt_takes_gemvs(&small, 12, true) && prompt_takes_gemvs(&small, 12, false));
        assert!(prompt_takes_gemvs(&small, 64, false) && !prompt_takes_gemvs(&small, 65, false));
        assert!(!prompt_takes_gemvs(&large, 17, true));
        // the plan holds the larger of the forms a prompt can take
        assert_eq!(
            GpuPlan::new(&large, 64, 12).workspace,
            GpuPlan::new(&large, 64, 8).workspace
        );
        assert!(GpuPlan::new(&small, 64, 12).workspace > GpuPlan::new(&small, 64, 8).workspace);
        let long = 4096;
        assert!(
            GpuPlan::new(&small, long, 12).workspace >= GpuPlan::new(&small, long, 8).workspace
        );
    }

    #[test]
    fn short_prompts_are_planned_with_the_decode_attentions_splits() {
        // up to 8 prompt rows go through the decode attention: its partial outputs and
        // max/sum per row, head and split (f32)
        let cfg = ModelConfig::qwen2_5_7b();
        let positions = 4096;
        let splits = planned_decode_splits(&cfg, positions);
        let one = GpuPlan::new(&cfg, positions, 1).workspace;
        let eight = GpuPlan::new(&cfg, positions, 8).workspace;
        let parts = (8 * cfg.num_attention_heads * splits * (cfg.head_dim + 2) * 4) as u64;
        assert!(eight >= one + parts, "{eight} < {one} + {parts}");
    }

    #[test]
    fn prompt_scores_are_planned_only_where_the_flash_kernel_does_not_run() {
        let cfg = ModelConfig::qwen2_5_0_5b();
        assert_eq!(prefill_scores_bytes(&cfg, 2048, 4096), 0);
        let mut wide = cfg.clone();
        wide.head_dim = 256;
        let (with, without) = (
            GpuPlan::new(&wide, 4096, 2048),
            GpuPlan::new(&wide, 4096, 8),
        );
        assert_eq!(
            prefill_scores_bytes(&wide, 8, 4096),
            0,
            "decode-sized batches"
        );
        let scores = (wide.num_key_value_heads * 2048 * 4096 * 6) as u64;
        assert!(
            with.workspace >= without.workspace + scores,
            "{with:?} {without:?}"
        );
    }
}
