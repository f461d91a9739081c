//! Typed errors for the CUDA crate. Messages say what to do next, because most failures here are
//! environment problems (no NVRTC, no driver) rather than bugs.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "NVRTC (libnvrtc.so) not found: run `scripts/setup-cuda-compile` (installs it under \
         $ONEVISION_CACHE, where it is found automatically) or set ONEVISION_NVRTC_LIB to a CUDA 12 \
         libnvrtc.so; searched: {searched}"
    )]
    NvrtcNotFound { searched: String },

    #[error("failed to load {path}: {reason}")]
    LibraryLoad { path: PathBuf, reason: String },

    #[error("unsupported architecture `{0}`: expected sm_XY with XY >= 80 (e.g. sm_80, sm_90)")]
    BadArch(String),

    #[error("NVRTC failed to compile kernel family `{family}` for {arch} ({status}):\n{log}")]
    Compile { family: String, arch: String, status: String, log: String },

    #[error("NVRTC call {call} failed: {status}")]
    Nvrtc { call: &'static str, status: String },

    #[error("ptxas ({path}) failed for `{family}` on {arch}: {message}")]
    Ptxas { path: PathBuf, family: String, arch: String, message: String },

    #[error("kernel cache I/O at {path}: {source}")]
    CacheIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("kernel family `{family}` compiled but exports no kernels (no `.entry` in PTX)")]
    NoEntries { family: String },

    #[error("no CUDA driver (libcuda.so.1) on this machine: the CUDA backend needs an NVIDIA GPU and driver")]
    NoDriver,

    #[error("CUDA driver error in {call}: {message}")]
    Driver { call: &'static str, message: String },

    #[error("cuBLASLt error in {call}: {message}")]
    Blas { call: &'static str, message: String },

    #[error("NCCL error in {call}: {message}")]
    Nccl { call: &'static str, message: String },

    #[error("invalid argument: {0}")]
    Invalid(String),

    #[error("device out of memory: requested {requested} bytes, {cached} bytes cached and released, retry failed: {message}")]
    OutOfMemory { requested: usize, cached: usize, message: String },
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;
