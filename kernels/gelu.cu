// Exact (erf) GELU with optional fused bias, forward and backward: the vision merger's activation.
// CPU reference: onevision-model's `Backend::gelu` (worker/model); math:
//   z = x + b;  y = 0.5 * z * (1 + erf(z / sqrt(2)))
//   dz = dy * (0.5 * (1 + erf(z / sqrt(2))) + z * exp(-z^2 / 2) / sqrt(2 pi))
// The bias add is rounded to bf16 first (in PyTorch the Linear output with bias is a bf16 tensor).
// Layouts: x, y, dy, dx [rows, cols] bf16 row-major; bias [cols] bf16 or null.
// grid: ceil(rows*cols / (8*256)); block 256; 8 elements per thread.

__device__ __forceinline__ float gelu_f(float z) { return 0.5f * z * (1.f + erff(z * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_grad_f(float z) {
    return 0.5f * (1.f + erff(z * 0.70710678118654752f)) + z * __expf(-0.5f * z * z) * 0.3989422804014327f;
}

extern "C" __global__ void gelu_fwd_bf16(const bf16* __restrict__ x, const bf16* __restrict__ bias,
                                         bf16* __restrict__ y, int rows, int cols) {
    const long long n = (long long)rows * cols;
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    for (long long i = i0; i < min(i0 + 8, n); ++i) {
        float z = bf(x[i]);
        if (bias) z = rbf(z + bf(bias[i % cols]));
        y[i] = tobf(gelu_f(z));
    }
}

extern "C" __global__ void gelu_bwd_bf16(const bf16* __restrict__ x, const bf16* __restrict__ bias,
                                         const bf16* __restrict__ dy, bf16* __restrict__ dx, int rows, int cols) {
    const long long n = (long long)rows * cols;
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    for (long long i = i0; i < min(i0 + 8, n); ++i) {
        float z = bf(x[i]);
        if (bias) z = rbf(z + bf(bias[i % cols]));
        dx[i] = tobf(bf(dy[i]) * gelu_grad_f(z));
    }
}
