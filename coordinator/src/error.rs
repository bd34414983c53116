//! Error types: [`CoordinatorError`] for starting and running the server, and [`ApiError`]
//! for one request, which `rpc/mod.rs` turns into a `tonic::Status` in one place.

use crate::store::StoreError;

/// Why the coordinator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A configuration value is invalid; the message names the field.
    #[error("invalid coordinator configuration: {0}")]
    Config(String),
    /// The store could not be opened or recovered (another coordinator may hold the data
    /// directory: stop it or choose another `data_dir`).
    #[error("cannot open the store in {dir}: {source}")]
    Open {
        /// The data directory.
        dir: std::path::PathBuf,
        /// What went wrong.
        source: StoreError,
    },
    /// The store failed while serving (a flush failed). Nothing since the last good flush was
    /// acknowledged; restart the coordinator to recover from disk.
    #[error("store failure while serving: {0}")]
    Store(#[from] StoreError),
    /// The gRPC server failed.
    #[error("gRPC server error: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A background task panicked.
    #[error("coordinator task failed: {0}")]
    Task(String),
}

/// Why one request failed; each variant maps to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// The job or agent does not exist (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// The request is not valid in the current state, e.g. cancelling a finished job
    /// (FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
    /// No known capacity can ever hold the request (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    ResourceExhausted(String),
    /// An agent with this name is already connected (ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// The coordinator cannot make the change durable (flush failed) or is shutting down
    /// (UNAVAILABLE); the client may retry against a restarted coordinator.
    #[error("{0}")]
    Unavailable(String),
    /// The store failed (INTERNAL).
    #[error("store error: {0}")]
    Store(#[from] StoreError),
}
