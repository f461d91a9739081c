// Fused LM head + cross-entropy over vocabulary chunks: full [tokens, vocab] logits never exist.
// CPU reference: the causal-LM loss in worker/train (HF semantics, ../shared/reference/qwen2_5_vl.md §7):
//   logits = bf16(h W^T) / temperature (fp32), lse = logsumexp(logits), loss_t = lse_t - logits[t, y_t],
//   tokens with label == ignore_index (-100) contribute 0; labels are already shifted by the host.
//   GRPO reuses it for token log-probs: logp_t = -loss_t (temperature = sampling temperature).
// Host loop per chunk [c0, c0 + C) of the vocabulary (C ~ 8192..32768):
//   forward : cuBLASLt logits_c = h W[c0:c0+C]^T (f32 out) -> ce_chunk_update_f32
//   then    : ce_finalize_f32 -> loss, lse
//   backward: recompute logits_c -> ce_chunk_grad_bf16 (G_c = (softmax - onehot) * dloss / T)
//             -> cuBLASLt dh += G_c W_c, dW_c += G_c^T h.
// Layouts: logits_c [rows, C] f32 with leading dimension ld; labels [rows] int32 (absolute vocab ids);
// run_max/run_sum/target/lse/loss/dloss [rows] f32; grad_c [rows, C] bf16 with leading dimension ldg.
// round_bf16 = 1 rounds each logit to bf16 first (HF: bf16 lm_head output, then .float()).

// grid: ceil(rows/256); block 256.
extern "C" __global__ void ce_init_f32(float* __restrict__ run_max, float* __restrict__ run_sum,
                                       float* __restrict__ target, int rows) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    run_max[r] = -OV_INF;
    run_sum[r] = 0.f;
    target[r] = 0.f;
}

// grid: rows; block 256..1024. Online logsumexp merge: (m, s) <- (max(m, m_c), s e^{m-M} + s_c e^{m_c-M}).
extern "C" __global__ void ce_chunk_update_f32(const float* __restrict__ logits, long long ld,
                                               const int* __restrict__ labels, float* __restrict__ run_max,
                                               float* __restrict__ run_sum, float* __restrict__ target, int rows,
                                               int chunk, int chunk_start, float inv_temp, int round_bf16) {
    __shared__ float sh[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* x = logits + (long long)r * ld;
    float mx = -OV_INF;
    for (int c = threadIdx.x; c < chunk; c += blockDim.x) {
        const float v = (round_bf16 ? rbf(x[c]) : x[c]) * inv_temp;
        mx = fmaxf(mx, v);
    }
    mx = block_max(mx, sh);
    float s = 0.f;
    for (int c = threadIdx.x; c < chunk; c += blockDim.x) {
        const float v = (round_bf16 ? rbf(x[c]) : x[c]) * inv_temp;
        s += __expf(v - mx);
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) {
        const float m_old = run_max[r], s_old = run_sum[r];
        const float M = fmaxf(m_old, mx);
        float S = 0.f;
        if (M != -OV_INF) S = (m_old == -OV_INF ? 0.f : s_old * __expf(m_old - M)) + s * __expf(mx - M);
        run_max[r] = M;
        run_sum[r] = S;
        const int y = labels[r];
        if (y >= chunk_start && y < chunk_start + chunk) {
            const float v = x[y - chunk_start];
            target[r] = (round_bf16 ? rbf(v) : v) * inv_temp;
        }
    }
}

// grid: ceil(rows/256); block 256. loss = lse - target (0 for ignored rows), lse kept for backward.
extern "C" __global__ void ce_finalize_f32(const float* __restrict__ run_max, const float* __restrict__ run_sum,
                                           const float* __restrict__ target, const int* __restrict__ labels,
                                           float* __restrict__ loss, float* __restrict__ lse, int rows,
                                           int ignore_index) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float l = run_max[r] + logf(run_sum[r]);
    lse[r] = l;
    loss[r] = labels[r] == ignore_index ? 0.f : l - target[r];
}

// d loss_t / d logit = (softmax - onehot) / T, times the upstream dloss[t] (e.g. 1/num_valid_tokens).
// grid: (rows, ceil(C / 1024)); block 256; 4 columns per thread.
extern "C" __global__ void ce_chunk_grad_bf16(const float* __restrict__ logits, long long ld,
                                              const int* __restrict__ labels, const float* __restrict__ lse,
                                              const float* __restrict__ dloss, bf16* __restrict__ grad,
                                              long long ldg, int rows, int chunk, int chunk_start, float inv_temp,
                                              int round_bf16, int ignore_index) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int y = labels[r];
    const float scale = y == ignore_index ? 0.f : dloss[r] * inv_temp;
    const float l = lse[r];
    const float* x = logits + (long long)r * ld;
    bf16* g = grad + (long long)r * ldg;
    const int c0 = (blockIdx.y * blockDim.x + threadIdx.x) * 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int c = c0 + i;
        if (c >= chunk) break;
        const float v = (round_bf16 ? rbf(x[c]) : x[c]) * inv_temp;
        float p = __expf(v - l);
        if (c + chunk_start == y) p -= 1.f;
        g[c] = tobf(p * scale);
    }
}
