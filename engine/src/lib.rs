//! Kiln's engine: what a job does once the agent has started its process.
//!
//! - `spec`: the job specifications a job process receives (JSON on stdin).
//! - `report`: what a job process tells its agent (JSON lines on stdout): phases, logs,
//!   tokens, progress, the result.
//! - `memory`: process and device memory readings for phase samples.
//! - `memtest`: the memtest job.

pub mod memory;
pub mod memtest;
pub mod report;
pub mod spec;
