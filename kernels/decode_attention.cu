// Decode attention over the KV cache (one new query token per sequence), split-K ("flash decoding").
// CPU reference: onevision-model's attention with a KV cache (worker/model), i.e. for sequence b and
// head h:  out[b,h,:] = softmax(scale * q[b,h,:] . K[b,kvh,0:len_b,:]^T) V[b,kvh,0:len_b,:],
// kvh = h / (n_heads / n_kv_heads), keys k_start_b <= j < len_b (the cache holds only past and current
// tokens; the current token's k/v are written at slot len_b - 1 before this runs; k_start skips left
// padding, null = 0).
// Layouts: q [batch, n_heads, 128] bf16; k_cache/v_cache [batch, max_len, n_kv_heads, 128] bf16 (the
// model's KvCache layout, token-major: each key row is 256 contiguous bytes); lengths [batch] int32;
// out [batch, n_heads, 128] bf16.
// Workspace: part_o [batch, n_heads, splits, 128] f32 (unnormalised), part_ml [batch, n_heads, splits, 2]
// f32 (running max in the log2 domain, sum). Head dim 128 only (decoding is text-only).
// One block handles all G = n_heads / n_kv_heads (<= 8) query heads of a kv head, so each K/V row is
// read from HBM once per group: the kernel is bandwidth-bound by design.

#define DEC_D 128
#define DEC_WARPS 4
#define DEC_MAXG 8

// grid: (splits, n_kv_heads, batch); block: 128 threads.
extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32)
decode_attn_split_hd128_bf16(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                             const bf16* __restrict__ v_cache, const int* __restrict__ lengths,
                             const int* __restrict__ k_start, float* __restrict__ part_o,
                             float* __restrict__ part_ml, int n_heads, int n_kv_heads, int max_len, float scale) {
    __shared__ float sm_m[DEC_WARPS][DEC_MAXG];
    __shared__ float sm_l[DEC_WARPS][DEC_MAXG];
    __shared__ float sm_o[DEC_WARPS][DEC_MAXG][DEC_D];
    const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, splits = gridDim.x;
    const int G = n_heads / n_kv_heads;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int len = min(lengths[b], max_len);
    const int first = k_start ? max(0, k_start[b]) : 0;
    const int per = (max(0, len - first) + splits - 1) / splits;
    const int j0 = first + split * per, j1 = min(len, j0 + per);
    const float sl2 = scale * OV_LOG2E;

    // Each lane owns 4 consecutive dims (8-byte loads); q pre-scaled into the log2 domain.
    float qv[DEC_MAXG][4];
#pragma unroll
    for (int g = 0; g < DEC_MAXG; ++g) {
        if (g < G) {
            const bf16* qp = q + ((long long)b * n_heads + kvh * G + g) * DEC_D + lane * 4;
            const bf162 a = reinterpret_cast<const bf162*>(qp)[0], c = reinterpret_cast<const bf162*>(qp)[1];
            qv[g][0] = __low2float(a) * sl2; qv[g][1] = __high2float(a) * sl2;
            qv[g][2] = __low2float(c) * sl2; qv[g][3] = __high2float(c) * sl2;
        }
    }
    float m[DEC_MAXG], l[DEC_MAXG], acc[DEC_MAXG][4];
#pragma unroll
    for (int g = 0; g < DEC_MAXG; ++g) { m[g] = -OV_INF; l[g] = 0.f; acc[g][0] = acc[g][1] = acc[g][2] = acc[g][3] = 0.f; }

    for (int j = j0 + warp; j < j1; j += DEC_WARPS) {
        const long long row = ((long long)b * max_len + j) * n_kv_heads + kvh;
        const bf16* kp = k_cache + row * DEC_D + lane * 4;
        const bf16* vp = v_cache + row * DEC_D + lane * 4;
        const bf162 k01 = reinterpret_cast<const bf162*>(kp)[0], k23 = reinterpret_cast<const bf162*>(kp)[1];
        const bf162 v01 = reinterpret_cast<const bf162*>(vp)[0], v23 = reinterpret_cast<const bf162*>(vp)[1];
        const float kf[4] = {__low2float(k01), __high2float(k01), __low2float(k23), __high2float(k23)};
        const float vf[4] = {__low2float(v01), __high2float(v01), __low2float(v23), __high2float(v23)};
#pragma unroll
        for (int g = 0; g < DEC_MAXG; ++g) {
            if (g >= G) break;
            float s = qv[g][0] * kf[0] + qv[g][1] * kf[1] + qv[g][2] * kf[2] + qv[g][3] * kf[3];
            s = warp_sum(s);
            const float m_new = fmaxf(m[g], s);
            const float alpha = exp2f(m[g] - m_new);  // m = -inf on the first key: alpha = 0
            const float p = exp2f(s - m_new);
            l[g] = l[g] * alpha + p;
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[g][i] = acc[g][i] * alpha + p * vf[i];
            m[g] = m_new;
        }
    }
#pragma unroll
    for (int g = 0; g < DEC_MAXG; ++g) {
        if (g >= G) break;
        if (lane == 0) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
#pragma unroll
        for (int i = 0; i < 4; ++i) sm_o[warp][g][lane * 4 + i] = acc[g][i];
    }
    __syncthreads();
    // Merge the 4 warps: thread t handles (g, d) pairs.
    for (int idx = threadIdx.x; idx < G * DEC_D; idx += blockDim.x) {
        const int g = idx / DEC_D, d = idx % DEC_D;
        float M = -OV_INF;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) M = fmaxf(M, sm_m[w][g]);
        float L = 0.f, O = 0.f;
        if (M != -OV_INF) {
#pragma unroll
            for (int w = 0; w < DEC_WARPS; ++w) {
                const float f = exp2f(sm_m[w][g] - M);
                L += sm_l[w][g] * f;
                O += sm_o[w][g][d] * f;
            }
        }
        const long long hs = ((long long)b * n_heads + kvh * G + g) * splits + split;
        part_o[hs * DEC_D + d] = O;
        if (d == 0) { part_ml[2 * hs] = M; part_ml[2 * hs + 1] = L; }
    }
}

// grid: (n_heads, batch); block: 128 threads (one per dim).
extern "C" __global__ void decode_attn_combine_hd128_bf16(const float* __restrict__ part_o,
                                                          const float* __restrict__ part_ml, bf16* __restrict__ out,
                                                          int n_heads, int splits) {
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    if (d >= DEC_D) return;
    const long long base = ((long long)b * n_heads + h) * splits;
    float M = -OV_INF;
    for (int s = 0; s < splits; ++s) M = fmaxf(M, part_ml[2 * (base + s)]);
    float L = 0.f, O = 0.f;
    if (M != -OV_INF) {
        for (int s = 0; s < splits; ++s) {
            const float f = exp2f(part_ml[2 * (base + s)] - M);
            L += part_ml[2 * (base + s) + 1] * f;
            O += part_o[(base + s) * DEC_D + d] * f;
        }
    }
    out[((long long)b * n_heads + h) * DEC_D + d] = tobf(L > 0.f ? O / L : 0.f);
}
