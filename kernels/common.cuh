// Shared device helpers, prepended by onevision-cuda to every kernel family before NVRTC compiles it
// (see worker/cuda/src/sources.rs). NVRTC-only: no host headers; cuda_bf16.h comes from the CUDA
// headers (PyPI wheel nvidia-cuda-runtime-cu12 or a toolkit).
//
// Conventions for every family:
//   * bf16 = __nv_bfloat16; all arithmetic in fp32, rounded to bf16 only where the PyTorch reference
//     (transformers, bf16 autocast-free) rounds, so that the CPU oracle's f32 results match within bf16.
//   * Row-major, contiguous last dimension unless a stride parameter says otherwise; element counts
//     are `long long` where a tensor can exceed 2^31 elements (vocab x hidden, flat parameters).
//   * Every entry point is extern "C" with a plain-C signature so the host launches it by name.
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;

#define OV_INF __int_as_float(0x7f800000)
#define OV_LOG2E 1.4426950408889634f
#define OV_LN2 0.6931471805599453f

__device__ __forceinline__ float bf(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 tobf(float x) { return __float2bfloat16_rn(x); }
// Rounds through bf16 and back: models a PyTorch op whose bf16 output feeds the next op.
__device__ __forceinline__ float rbf(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; every thread gets the result. `sh` needs 32 floats. Safe to call repeatedly
// (the leading barrier protects `sh` from the previous call's readers).
__device__ __forceinline__ float block_sum(float v, float* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = lane < nw ? sh[lane] : 0.f;
    return warp_sum(t);
}

__device__ __forceinline__ float block_max(float v, float* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = lane < nw ? sh[lane] : -OV_INF;
    return warp_max(t);
}

// 8 x bf16 in one 16-byte transaction (callers check 16-byte alignment and length % 8 == 0).
struct bf16x8 { bf162 h[4]; };

__device__ __forceinline__ void load8(const bf16* p, float* f) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const bf162* h = reinterpret_cast<const bf162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) { float2 t = __bfloat1622float2(h[i]); f[2 * i] = t.x; f[2 * i + 1] = t.y; }
}

__device__ __forceinline__ void store8(bf16* p, const float* f) {
    uint4 u;
    bf162* h = reinterpret_cast<bf162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = u;
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}
