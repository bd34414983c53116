//! Kiln's coordinator.
