//! The agent's error type: what can stop `kiln_agent::run` before or while it serves.

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A configuration value is unusable.
    #[error("agent config: {0}")]
    InvalidConfig(String),
    /// The coordinator URL cannot be parsed.
    #[error(
        "agent config: coordinator URL {url:?} is invalid: {reason} (expected http://host:port)"
    )]
    InvalidCoordinatorUrl {
        /// The URL given.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// The coordinator address answered, but not as a Kiln coordinator (at the first
    /// connection; later the agent keeps retrying).
    #[error("coordinator {url}: {message}")]
    NotACoordinator {
        /// The URL dialed.
        url: String,
        /// What answered instead, and the fix.
        message: String,
    },
    /// The coordinator refused the agent's token at the first connection.
    #[error("coordinator {url} refused this agent: {message} (check --token / KILN_TOKEN: it must match the coordinator's)")]
    Unauthenticated {
        /// The URL dialed.
        url: String,
        /// The coordinator's message.
        message: String,
    },
    /// Specific GPUs were asked for but NVML does not work here.
    #[error("--gpus {asked:?} needs NVML, which failed to start: {reason} (use --gpus none for a CPU agent)")]
    NvmlRequired {
        /// The selection given.
        asked: Vec<u32>,
        /// NVML's error.
        reason: String,
    },
    /// A GPU index asked for does not exist.
    #[error(
        "--gpus: GPU {index} does not exist; NVML reports {count} GPU(s) (indices 0..{count})"
    )]
    NoSuchGpu {
        /// The index asked for.
        index: u32,
        /// How many GPUs NVML reports.
        count: u32,
    },
    /// NVML failed while listing a GPU.
    #[error("NVML failed reading GPU {index}: {reason}")]
    Nvml {
        /// The GPU index.
        index: u32,
        /// NVML's error.
        reason: String,
    },
    /// Host memory could not be read.
    #[error("cannot read host memory from /proc/meminfo: {0} (give --mem-limit-gb)")]
    HostMemory(std::io::Error),
    /// The work directory cannot be created.
    #[error("cannot create the agent work directory {path}: {source}")]
    WorkDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}
