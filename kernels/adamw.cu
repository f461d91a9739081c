// AdamW with fp32 master weights and bf16 working weights, with global-norm gradient clipping.
// CPU reference: the optimizer in worker/train, = torch.optim.AdamW (decoupled weight decay) after
// torch.nn.utils.clip_grad_norm_:
//   norm = sqrt(sum over all parameters of g^2);  coef = min(1, max_norm / (norm + 1e-6))  (max_norm <= 0: 1)
//   g' = g * coef
//   p  = p * (1 - lr * wd)
//   m  = b1 m + (1 - b1) g';   v = b2 v + (1 - b2) g'^2
//   p  = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)      (bc_i = 1 - b_i^step, from the host)
//   param_bf16 = bf16(p)
// Two passes so the clip coefficient never goes through the host:
//   1. sumsq_partial_f32 per gradient buffer into its slice of `partial`, then grad_norm_finalize_f32
//      -> norm_out[0] = norm, norm_out[1] = coef;
//   2. adamw_step_bf16 per parameter buffer. A non-finite norm skips the whole update (every kernel
//      sees it), and the host reports the skipped step after reading norm_out.
// Layouts: flat f32 buffers of n elements (master, grad, m, v); param bf16 [n].

// grid: fixed (e.g. 2 * #SMs) blocks; block 256. partial[blockIdx.x] = sum of squares of its stride.
extern "C" __global__ void sumsq_partial_f32(const float* __restrict__ g, long long n, float* __restrict__ partial) {
    __shared__ float sh[32];
    float s = 0.f;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float x = g[i];
        s += x * x;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// grid: 1 block of 1024. Fixed summation order: the norm is bitwise reproducible run to run.
extern "C" __global__ void grad_norm_finalize_f32(const float* __restrict__ partial, int nparts, float max_norm,
                                                  float* __restrict__ norm_out) {
    __shared__ float sh[32];
    float s = 0.f;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) s += partial[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) {
        const float norm = sqrtf(s);
        norm_out[0] = norm;
        norm_out[1] = max_norm > 0.f ? fminf(1.f, max_norm / (norm + 1e-6f)) : 1.f;
    }
}

// grid: ceil(n / (4*256)); block 256; 4 elements per thread.
extern "C" __global__ void adamw_step_bf16(float* __restrict__ master, bf16* __restrict__ param,
                                           const float* __restrict__ grad, float* __restrict__ m,
                                           float* __restrict__ v, long long n, float lr, float beta1, float beta2,
                                           float eps, float weight_decay, float bc1, float bc2,
                                           const float* __restrict__ norm_out) {
    const float norm = norm_out[0];
    if (!isfinite(norm)) return;
    const float coef = norm_out[1];
    const float step = lr / bc1;
    const float inv_sqrt_bc2 = rsqrtf(bc2);
    const float decay = 1.f - lr * weight_decay;
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const long long i = i0 + j;
        if (i >= n) break;
        const float g = grad[i] * coef;
        float p = master[i] * decay;
        const float mi = beta1 * m[i] + (1.f - beta1) * g;
        const float vi = beta2 * v[i] + (1.f - beta2) * g * g;
        p -= step * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
        m[i] = mi;
        v[i] = vi;
        master[i] = p;
        param[i] = tobf(p);
    }
}
