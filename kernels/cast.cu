// Casts between f32 and bf16 (round to nearest even), and a scaled f32 accumulate.
// CPU reference: `half::bf16::from_f32` / `to_f32` as used by onevision-model's tensor casts.
// Layouts: flat, n elements. grid: ceil(n / (8*256)); block 256; 8 elements per thread.

extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ x, bf16* __restrict__ y, long long n) {
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 + 8 <= n && aligned16(x + i0) && aligned16(y + i0)) {
        const float4 a = *reinterpret_cast<const float4*>(x + i0);
        const float4 b = *reinterpret_cast<const float4*>(x + i0 + 4);
        const float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        store8(y + i0, f);
        return;
    }
    for (long long i = i0; i < min(i0 + 8, n); ++i) y[i] = tobf(x[i]);
}

extern "C" __global__ void cast_bf16_to_f32(const bf16* __restrict__ x, float* __restrict__ y, long long n) {
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 + 8 <= n && aligned16(x + i0) && aligned16(y + i0)) {
        float f[8];
        load8(x + i0, f);
        *reinterpret_cast<float4*>(y + i0) = make_float4(f[0], f[1], f[2], f[3]);
        *reinterpret_cast<float4*>(y + i0 + 4) = make_float4(f[4], f[5], f[6], f[7]);
        return;
    }
    for (long long i = i0; i < min(i0 + 8, n); ++i) y[i] = bf(x[i]);
}

// y += alpha * x (f32): gradient accumulation across micro-batches.
extern "C" __global__ void axpy_f32(const float* __restrict__ x, float* __restrict__ y, float alpha, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += alpha * x[i];
}
