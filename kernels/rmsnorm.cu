// RMSNorm with fused residual add, forward and backward.
// CPU reference: onevision-model's `Backend::rms_norm` (+ residual add) and its backward; math as in
// transformers' Qwen2RMSNorm (../shared/reference/qwen2_5_vl.md §3):
//   h = x + residual                      (bf16 add, rounded: the residual stream is bf16)
//   r = rsqrt(mean(h_f32^2) + eps)
//   y = w * bf16(h_f32 * r)               (weight multiply in fp32, result rounded to bf16)
// Backward (n = cols, xh = h*r, g = dy*w, both fp32):
//   dh = r * (g - xh * mean(g * xh)) + dres     (dres: gradient arriving through the residual stream)
//   dw = sum_rows dy * bf16(xh)
// Layouts: x, residual, y, h_out, dy, dres, dh: [rows, cols] bf16 row-major; w [cols] bf16;
// rstd [rows] f32 (saved for backward); dw_partial [gridDim.x, cols] f32, reduced by
// bias.cu:reduce_partials_f32 (deterministic, no atomics).


// grid: rows blocks; block: 256..1024 threads. residual/h_out may be null (plain RMSNorm).
extern "C" __global__ void rmsnorm_fwd_bf16(const bf16* __restrict__ x, const bf16* __restrict__ residual,
                                            const bf16* __restrict__ w, bf16* __restrict__ y,
                                            bf16* __restrict__ h_out, float* __restrict__ rstd,
                                            int rows, int cols, float eps) {
    __shared__ float sh[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const long long off = (long long)row * cols;
    const bool vec = (cols & 7) == 0 && aligned16(x + off) && aligned16(y + off) && aligned16(w) &&
                     (residual == nullptr || aligned16(residual + off)) && (h_out == nullptr || aligned16(h_out + off));
    float ss = 0.f;
    if (vec) {
        for (int c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
            float a[8];
            load8(x + off + c, a);
            if (residual) {
                float b[8];
                load8(residual + off + c, b);
#pragma unroll
                for (int i = 0; i < 8; ++i) a[i] = rbf(a[i] + b[i]);
                if (h_out) store8(h_out + off + c, a);
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) ss += a[i] * a[i];
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float a = bf(x[off + c]);
            if (residual) {
                a = rbf(a + bf(residual[off + c]));
                if (h_out) h_out[off + c] = tobf(a);
            }
            ss += a * a;
        }
    }
    ss = block_sum(ss, sh);
    const float r = rsqrtf(ss / (float)cols + eps);
    if (threadIdx.x == 0 && rstd) rstd[row] = r;
    // Second pass re-reads x (+residual) from L2 rather than holding a row in registers: rows up to
    // 3584 x 2 B fit easily in L2 and this keeps register use flat for any width.
    if (vec) {
        for (int c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
            float a[8], ww[8], o[8];
            load8(x + off + c, a);
            if (residual) {
                float b[8];
                load8(residual + off + c, b);
#pragma unroll
                for (int i = 0; i < 8; ++i) a[i] = rbf(a[i] + b[i]);
            }
            load8(w + c, ww);
#pragma unroll
            for (int i = 0; i < 8; ++i) o[i] = ww[i] * rbf(a[i] * r);
            store8(y + off + c, o);
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float a = bf(x[off + c]);
            if (residual) a = rbf(a + bf(residual[off + c]));
            y[off + c] = tobf(bf(w[c]) * rbf(a * r));
        }
    }
}

// grid: min(rows, #SMs * k) blocks, each walks rows blockIdx.x, +gridDim.x, ... and accumulates its dw
// partial in shared memory (cols floats; dynamic smem = cols * 4 bytes). dres may be null.
extern "C" __global__ void rmsnorm_bwd_bf16(const bf16* __restrict__ h, const bf16* __restrict__ w,
                                            const bf16* __restrict__ dy, const float* __restrict__ rstd,
                                            const bf16* __restrict__ dres, bf16* __restrict__ dh,
                                            float* __restrict__ dw_partial, int rows, int cols) {
    extern __shared__ float dw_acc[];
    __shared__ float sh[32];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dw_acc[c] = 0.f;
    __syncthreads();
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long off = (long long)row * cols;
        const float r = rstd[row];
        float dot = 0.f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float xh = bf(h[off + c]) * r;
            const float g = bf(dy[off + c]);
            dot += g * bf(w[c]) * xh;
            dw_acc[c] += g * rbf(xh);
        }
        dot = block_sum(dot, sh) / (float)cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float xh = bf(h[off + c]) * r;
            float d = r * (bf(dy[off + c]) * bf(w[c]) - xh * dot);
            if (dres) d += bf(dres[off + c]);
            dh[off + c] = tobf(d);
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dw_partial[(long long)blockIdx.x * cols + c] = dw_acc[c];
}
