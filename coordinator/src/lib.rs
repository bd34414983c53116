//! Kiln's coordinator.
pub mod scheduler;
