//! CUDA side of onevision: the kernels in `kernels/` (embedded, compiled at run time with NVRTC for the
//! device's architecture and cached on disk), the kernel check (`onevision kernels check`, no GPU
//! needed), and behind the `cuda` feature the GPU backend (driver, caching allocator, cuBLASLt, NCCL).
//!
//! Everything is loaded dynamically (cudarc `dynamic-loading`), so this crate builds and its tests run
//! on machines without CUDA; functions that need a library return a typed error saying how to get it.

pub mod alloc;
#[cfg(feature = "cuda")]
pub mod backend;
pub mod blas;
pub mod check;
pub mod compile;
pub mod error;
pub mod gpu;
pub mod nccl;
pub mod nccl_comm;
pub mod ops;
pub mod sources;
pub mod toolchain;

pub use check::{kernels_check, KernelReport, Resources};
pub use compile::{compile_family, Arch, Compiled, Compiler, Output};
pub use error::{CudaError, Result};
#[cfg(feature = "cuda")]
pub use backend::CudaBackend;
