//! `EngineError`: every way loading a model, tokenizing, rendering a chat, generating or using
//! a session can fail. Each message names the problem and, where there is one, the fix.

use std::path::PathBuf;

/// Errors of the engine (loading, tokenizer, chat template, forward, generation, sessions,
/// training, export).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted ("reading", "writing", …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A `.safetensors` file is truncated or corrupt (bad header, offsets past the end…).
    #[error("{path}: {reason}")]
    CorruptSafetensors {
        /// The file.
        path: PathBuf,
        /// What the reader found ("not a valid safetensors file (…); it may be truncated or
        /// corrupt …") and what to do.
        reason: String,
    },
    /// The checkpoint has no tensor of this name.
    #[error("tensor {name} is missing from the checkpoint in {dir}; the checkpoint does not match config.json (wrong architecture or an incomplete download?)")]
    MissingTensor {
        /// The tensor name the architecture needs.
        name: String,
        /// The model directory.
        dir: PathBuf,
    },
    /// A tensor does not have the shape the config implies.
    #[error("tensor {name} has shape {got:?}, but config.json implies {expected:?}")]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A tensor has an element type Kiln cannot use in that place.
    #[error("tensor {name} has dtype {dtype}; expected {expected}")]
    UnsupportedDtype {
        /// The tensor name.
        name: String,
        /// Its dtype as safetensors names it.
        dtype: String,
        /// What would be accepted there.
        expected: &'static str,
    },
    /// `config.json` names an architecture Kiln does not implement.
    #[error("unknown architecture {name:?}; supported: {}", supported.join(", "))]
    UnknownArchitecture {
        /// The name from config.json (`architectures[0]` or `model_type`).
        name: String,
        /// What Kiln supports.
        supported: Vec<&'static str>,
    },
    /// `config.json` (or another JSON file of the model) is missing a field or malformed.
    #[error("bad model config {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The prompt (or the conversation so far) does not fit in the model's context.
    #[error("prompt is {tokens} tokens but the model's context holds {max_context} (with {reserve} reserved for the reply); shorten the prompt, lower --max-tokens or start a new session")]
    PromptTooLong {
        /// Tokens the prompt (plus the conversation so far) needs.
        tokens: usize,
        /// The model's context length (`max_position_embeddings`).
        max_context: usize,
        /// Tokens reserved for generation (at least 1).
        reserve: usize,
    },
    /// The tokenizer could not be loaded or could not encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// An invalid argument (sampling parameters, session id, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A session cannot be used (unknown, saved by another model, over the budget…).
    #[error("session {id}: {message}")]
    Session {
        /// The session id.
        id: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// A training dataset cannot be used (missing file, malformed line, no assistant turn…).
    #[error("dataset {path}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Dataset {
        /// The dataset path (or `whoami`).
        path: String,
        /// The 1-based line, when one line is at fault.
        line: Option<usize>,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A training checkpoint cannot be resumed or written.
    #[error("checkpoint {path}: {message}")]
    TrainCheckpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// An exported model did not load back equal to its source.
    #[error("export verification failed for tensor {name}: {message}")]
    ExportMismatch {
        /// The tensor.
        name: String,
        /// How it differs.
        message: String,
    },
    /// A GPU job would need more memory than its budget (the message has the numbers and the
    /// budget that would fit).
    #[error("over budget: {0}")]
    OverBudget(String),
    /// The GPU cannot be used for this job (no CUDA, no such device, an unsupported model).
    #[error("GPU unavailable: {0}")]
    GpuUnavailable(String),
    /// A tensor operation failed (a bug or an inconsistent model; the message says where).
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// An NVFP4 kernel rejected its input.
    #[error(transparent)]
    Kernel(#[from] kiln_kernels::KernelError),
}

impl EngineError {
    /// Wrap an I/O error with the operation and path.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// A config error about `path`.
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        EngineError::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The former name of [`EngineError`] (from when it lived in `model/`).
pub type ModelError = EngineError;

/// Result alias of the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
