//! The contract between a Kiln agent and the job processes it starts, and nothing else: the
//! agent links this crate, not the engine, so it carries no model code.
//!
//! - `spec`: the job request a job process reads as JSON on its stdin ([`spec::JobRequest`]).
//! - `report`: what a job process tells its agent: report lines on stdout and the outcome file
//!   written before it exits.
//! - `memory`: readings a job process takes of itself (RSS, page size) and the wall clock.
//! - `sessions`: the on-disk layout of an agent's session store (file names, listing).
//! - `phase`: phases reported from inside an exec job over the agent's phase socket.
//! - `units`: bytes as people read them.
#![deny(missing_docs)]

pub mod memory;
pub mod phase;
pub mod report;
pub mod sessions;
pub mod spec;
pub mod units;
