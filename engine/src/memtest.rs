//! The memtest job: allocate `bytes` in `steps` steps (device memory through cudarc on a CUDA
//! device, touched host pages on the CPU), report a phase after each step, hold, free, succeed.
//! (Filled in by the control-plane work.)
