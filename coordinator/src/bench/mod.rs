//! The scheduler benchmark (work in progress).
