//! CUDA backend: NVRTC-compiled kernels, cuBLASLt, NCCL
