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
    /// The kind-specific parameters.
    pub spec: JobSpec,
}

/// Kind-specific parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSpec {
    /// Allocate memory in steps.
    Memtest(MemtestSpec),
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
