//! NVFP4 format and compute kernels (see the NVFP4 section of DESIGN.md).
