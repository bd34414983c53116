//! Job specifications as a job process receives them: the agent converts the protocol's
//! `JobSpec` into these and writes them, as one JSON document, to the child's stdin.

use serde::{Deserialize, Serialize};

/// Where a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceSpec {
    /// Host CPU and memory.
    Cpu,
    /// A CUDA device, by ordinal as the job process sees it (after CUDA_VISIBLE_DEVICES).
    Cuda(u32),
}

/// What the job process is asked to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRequest {
    /// The coordinator's job id.
    pub job_id: u64,
    /// The attempt number (fencing token).
    pub attempt: u32,
    /// Device chosen by the agent.
    pub device: DeviceSpec,
    /// The memory budget, in bytes (the guard enforces it; jobs may size buffers by it).
    pub budget_bytes: u64,
    /// A scratch directory owned by this job attempt.
    pub work_dir: std::path::PathBuf,
    /// Where the agent keeps multi-turn sessions (`None`: `<work_dir's parent>/sessions`).
    /// The agent lists the sessions in this directory in its heartbeats.
    #[serde(default)]
    pub sessions_dir: Option<std::path::PathBuf>,
    /// Byte budget of the session store (0: [`DEFAULT_SESSIONS_BUDGET_BYTES`]).
    #[serde(default)]
    pub sessions_budget_bytes: u64,
    /// The kind-specific parameters.
    pub spec: JobSpec,
}

/// Kind-specific parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSpec {
    /// Allocate memory in steps.
    Memtest(MemtestSpec),
    /// Generate text (optionally one turn of a session).
    Generate(GenerateSpec),
    /// Train a model.
    Train(TrainSpec),
    /// Export a checkpoint.
    Export(ExportSpec),
}

/// Parameters of a memtest job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemtestSpec {
    /// Total bytes to allocate.
    pub bytes: u64,
    /// Number of equal steps (≥ 1).
    pub steps: u32,
    /// Seconds to hold the memory after the last step.
    pub hold_secs: f64,
    /// Seconds to pause between steps.
    pub step_pause_secs: f64,
}

/// Longest duration a spec may ask for (memtest hold and pause, the guard's over_secs): a day.
pub const MAX_SECS: f64 = 86_400.0;
/// Largest memtest allocation: 16 TiB.
pub const MAX_MEMTEST_BYTES: u64 = 1 << 44;
/// Most memtest steps.
pub const MAX_MEMTEST_STEPS: u32 = 4096;

/// Session store budget when the request gives none: 1 GiB.
pub const DEFAULT_SESSIONS_BUDGET_BYTES: u64 = 1 << 30;

impl JobRequest {
    /// The session store directory: `sessions_dir`, or `sessions` next to the work directory.
    pub fn sessions_dir(&self) -> std::path::PathBuf {
        match &self.sessions_dir {
            Some(d) => d.clone(),
            None => self
                .work_dir
                .parent()
                .unwrap_or(&self.work_dir)
                .join("sessions"),
        }
    }

    /// The session store budget in bytes.
    pub fn sessions_budget(&self) -> u64 {
        if self.sessions_budget_bytes == 0 {
            DEFAULT_SESSIONS_BUDGET_BYTES
        } else {
            self.sessions_budget_bytes
        }
    }
}

/// One chat message (proto `ChatMessage`).
pub type ChatMessageSpec = ChatMessage;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
}

/// Sampling parameters (proto `Sampling`). `temperature` 0 = greedy; `top_k` 0 and `top_p`
/// 0 or 1 = off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingSpec {
    /// Softmax temperature (0 = greedy).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: u32,
    /// Nucleus threshold (0 or 1 = off).
    pub top_p: f32,
    /// Sampler seed.
    pub seed: u64,
}

/// How a generate job uses the KV cache (proto `GenerateSpec.kv`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvSpec {
    /// Prefill once, decode with the cache.
    #[default]
    Cache,
    /// Recompute the whole sequence for every token.
    Replay,
    /// Run both and report agreement and the largest logit difference.
    Ab,
}

impl KvSpec {
    /// Parse the proto string (`""` = cache).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "cache" => Ok(KvSpec::Cache),
            "replay" => Ok(KvSpec::Replay),
            "ab" => Ok(KvSpec::Ab),
            other => Err(format!("kv must be cache, replay or ab (got {other:?})")),
        }
    }
}

/// Parameters of a generate job (proto `GenerateSpec`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerateSpec {
    /// `tiny` or a Hugging Face / Kiln checkpoint directory.
    pub model: String,
    /// A raw prompt (exactly one of `prompt` and `messages` is set).
    #[serde(default)]
    pub prompt: String,
    /// Chat messages rendered with the model's template.
    #[serde(default)]
    pub messages: Vec<ChatMessageSpec>,
    /// Most new tokens.
    pub max_tokens: u32,
    /// Sampling.
    #[serde(default)]
    pub sampling: SamplingSpec,
    /// Cache, replay or A/B.
    #[serde(default)]
    pub kv: KvSpec,
    /// Continue this session (`""` = none).
    #[serde(default)]
    pub session_id: String,
    /// `cpu`, `cuda` or `""` (whatever the agent gave).
    #[serde(default)]
    pub device: String,
}

/// How a train job treats linear layers (proto `TrainSpec.quant`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuantSpec {
    /// f32 master weights, forward through NVFP4 fake-quantization (straight-through).
    #[default]
    #[serde(rename = "nvfp4-ste")]
    Nvfp4Ste,
    /// Packed NVFP4 weights only, updated by the chunked AdamW step.
    #[serde(rename = "nvfp4-full")]
    Nvfp4Full,
    /// Full precision.
    #[serde(rename = "none")]
    None,
}

impl QuantSpec {
    /// Parse the proto string (`""` = nvfp4-ste).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "nvfp4-ste" => Ok(QuantSpec::Nvfp4Ste),
            "nvfp4-full" => Ok(QuantSpec::Nvfp4Full),
            "none" => Ok(QuantSpec::None),
            other => Err(format!(
                "quant must be nvfp4-ste, nvfp4-full or none (got {other:?})"
            )),
        }
    }

    /// The proto / CLI name.
    pub fn name(self) -> &'static str {
        match self {
            QuantSpec::Nvfp4Ste => "nvfp4-ste",
            QuantSpec::Nvfp4Full => "nvfp4-full",
            QuantSpec::None => "none",
        }
    }
}

/// Parameters of a train job (proto `TrainSpec`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    /// `tiny`, a Hugging Face directory or a Kiln checkpoint directory.
    pub model: String,
    /// JSONL chat dataset path, or `whoami` (bundled).
    pub dataset: String,
    /// Optimizer steps (the total, counting steps done before a resume).
    pub steps: u32,
    /// Most tokens per sample (longer samples are cut).
    pub seq_len: u32,
    /// Samples per step.
    pub batch: u32,
    /// AdamW learning rate.
    pub lr: f64,
    /// Linear layer treatment.
    #[serde(default)]
    pub quant: QuantSpec,
    /// Rows per chunk of the packed optimizer step (0 = 32).
    #[serde(default)]
    pub step_chunk_rows: u32,
    /// Seed (sample order, stochastic rounding).
    #[serde(default)]
    pub seed: u64,
    /// Output checkpoint directory.
    pub out_dir: String,
    /// Continue from the checkpoint in `out_dir` if there is one.
    #[serde(default)]
    pub resume: bool,
    /// `cpu`, `cuda` or `""`.
    #[serde(default)]
    pub device: String,
    /// Write a resumable checkpoint every this many steps (0 = only at the end). A job retried
    /// after LOST continues from the last one its earlier attempt wrote.
    #[serde(default)]
    pub save_every: u32,
    /// Micro-batches of `batch` samples whose gradients add up to one optimizer step (0 or 1 =
    /// no accumulation).
    #[serde(default)]
    pub grad_accum: u32,
    /// Global L2 norm the gradients are clipped to (`None` = [`DEFAULT_CLIP_GRAD`]; 0 = off).
    #[serde(default)]
    pub clip_grad: Option<f64>,
    /// Element type of the AdamW moments.
    #[serde(default)]
    pub moments: MomentsSpec,
    /// Checkpoints hold the weights only, not the AdamW moments; a run resumed from one
    /// restarts the moments from zero.
    #[serde(default)]
    pub save_only_model: bool,
    /// Recompute each layer's activations in backward instead of keeping them (GPU; less
    /// activation memory for one more forward per step).
    #[serde(default)]
    pub recompute: bool,
}

/// The gradient clipping threshold a train job uses when it does not say.
pub const DEFAULT_CLIP_GRAD: f64 = 1.0;

impl TrainSpec {
    /// The clipping threshold this job uses (0 = off).
    pub fn clip_grad(&self) -> f64 {
        self.clip_grad.unwrap_or(DEFAULT_CLIP_GRAD)
    }

    /// Micro-batches per optimizer step (≥ 1).
    pub fn micro_batches(&self) -> u32 {
        self.grad_accum.max(1)
    }
}

/// Element type of a train job's AdamW moments (proto `TrainSpec.moments`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MomentsSpec {
    /// f32: 8 bytes per parameter.
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// bf16 (rounded to nearest even after each update): 4 bytes per parameter.
    #[serde(rename = "bf16")]
    Bf16,
}

impl MomentsSpec {
    /// Parse the proto string (`""` = f32).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "f32" => Ok(MomentsSpec::F32),
            "bf16" => Ok(MomentsSpec::Bf16),
            other => Err(format!("moments must be f32 or bf16 (got {other:?})")),
        }
    }

    /// The proto / CLI name.
    pub fn name(self) -> &'static str {
        match self {
            MomentsSpec::F32 => "f32",
            MomentsSpec::Bf16 => "bf16",
        }
    }

    /// Bytes per moment element.
    pub fn bytes(self) -> u64 {
        match self {
            MomentsSpec::F32 => 4,
            MomentsSpec::Bf16 => 2,
        }
    }
}

/// Export formats (proto `ExportSpec.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExportFormat {
    /// bf16 safetensors in the Hugging Face layout.
    #[serde(rename = "safetensors")]
    Safetensors,
    /// NVFP4, ModelOpt layout.
    #[serde(rename = "nvfp4-modelopt")]
    Nvfp4ModelOpt,
    /// NVFP4, compressed-tensors layout.
    #[serde(rename = "nvfp4-compressed-tensors")]
    Nvfp4CompressedTensors,
}

impl ExportFormat {
    /// Parse the proto string.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "safetensors" => Ok(ExportFormat::Safetensors),
            "nvfp4-modelopt" => Ok(ExportFormat::Nvfp4ModelOpt),
            "nvfp4-compressed-tensors" => Ok(ExportFormat::Nvfp4CompressedTensors),
            other => Err(format!(
                "format must be safetensors, nvfp4-modelopt or nvfp4-compressed-tensors (got {other:?})"
            )),
        }
    }

    /// The proto / CLI name.
    pub fn name(self) -> &'static str {
        match self {
            ExportFormat::Safetensors => "safetensors",
            ExportFormat::Nvfp4ModelOpt => "nvfp4-modelopt",
            ExportFormat::Nvfp4CompressedTensors => "nvfp4-compressed-tensors",
        }
    }
}

/// Parameters of an export job (proto `ExportSpec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportSpec {
    /// Checkpoint (or model) directory to export; `tiny` exports the bundled model.
    pub checkpoint: String,
    /// Output format.
    pub format: ExportFormat,
    /// Output directory.
    pub out_dir: String,
}
