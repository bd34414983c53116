//! Kiln's coordinator: the gRPC server users and agents talk to, with every job, attempt,
//! event and telemetry sample kept in sled.
//!
//! - `config` — [`CoordinatorConfig`]: data directory, lease, heartbeat, retry and
//!   starvation settings (TOML).
//! - `error` — [`CoordinatorError`] (starting/running) and `ApiError` (one request).
//! - `server` — [`run`]: recovery, background loops, the gRPC services, shutdown.
//! - `store` — the sled trees and the store's durability contract.
//! - `commit` — group commit: many changes, one flush; effects released once durable.
//! - `committer` — the task that does the flushes and releases the effects.
//! - `shared` — the one owner of in-memory state (`Shared`, behind one mutex) and recovery.
//! - `jobs` — submit validation and capacity check, get, list, cancel.
//! - `agents` — registration and reconciliation, heartbeats, fenced job reports, leases,
//!   drain.
//! - `telemetry` — phase and guard sample ingestion, telemetry queries.
//! - `placement` — the scheduling pass that applies the scheduler's plan.
//! - `scheduler` — the pure placement policy (no I/O).
//! - `rpc` — thin gRPC handlers, one file per RPC family; errors → `tonic::Status`.
//! - `bench` — the scheduler benchmark (`kiln bench scheduler`) with simulated agents.
#![deny(missing_docs)]

mod agents;
pub mod bench;
mod commit;
mod committer;
mod config;
mod error;
mod jobs;
mod placement;
mod rpc;
pub mod scheduler;
mod server;
mod shared;
mod store;
mod telemetry;

pub use config::CoordinatorConfig;
pub use error::{ApiError, CoordinatorError};
pub use server::run;
pub use store::StoreError;
