// Flash-style attention, forward and backward (FlashAttention-2 algorithm), bf16 in, fp32 accumulate,
// on bf16 tensor cores (mma.sync m16n8k16 + ldmatrix: valid on sm_80 and sm_90).
// CPU reference: onevision-model's `Backend::attention` (worker/model) =
//   O = softmax(scale * Q K^T + mask) V per (sequence, head), softmax in fp32, then bf16;
//   GQA: query head h reads kv head h / (n_heads / n_kv_heads);
//   variable-length: sequences packed along tokens, segment s = tokens [cu[s], cu[s+1]) (text: one
//   segment per sample; vision: cu_window_seqlens or cu_seqlens of §3.6, non-causal);
//   causal (text): query i of a segment sees keys j <= i + causal_offset (0 in training; the cache slot
//   of query 0 when decoding/prefilling after a prefix: Backend's AttnMask::Causal { q_offset });
//   optional k_start[s]: keys j < k_start[s] are masked (left padding); optional k_len[s] overrides
//   cu_k[s+1] - cu_k[s] (a [B, S_max] cache holding kv_len valid rows: cu_k = b * S_max).
// Layouts (token-major, head_dim contiguous; strides in elements so q/k/v can be views of a fused qkv):
//   q[(cu_q[s] + i) * q_stride + h * D + d], k/v likewise with kv head and k_stride/v_stride,
//   o[(cu_q[s] + i) * o_stride + h * D + d]; lse[h * total_q + token] f32 (natural log, saved for bwd;
//   +inf for a row that sees no key, which makes its backward contribution exactly zero).
// Requirements checked by the host: D in {80, 128}; strides multiple of 8 and bases 16-byte aligned
// (cp.async 16 B); dynamic shared memory as returned by the host helpers (up to 80 KB: the host raises
// CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES).
// Launch: fwd grid (ceil(max_len_q / 64), n_heads, n_seqs), 128 threads;
//         bwd grid (ceil(max_len_k / 64), n_kv_heads, n_seqs), 128 threads (each block loops over the
//         query heads of its kv group, so dK/dV need no atomics); dQ accumulates in f32 via atomics.

#define ATT_BM 64
#define ATT_BN 64
#define ATT_THREADS 128

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    // src-size 0 zero-fills the 16 bytes: rows past the segment end read as zeros.
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group 0;\n" ::);
}

__device__ __forceinline__ void mma16816(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void ldsm_x4(unsigned r[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned r[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

// A operand (16x16, element (r,k) at base[r*ld + k]).
__device__ __forceinline__ void load_a(unsigned a[4], const bf16* base, int ld, int lane) {
    ldsm_x4(a, base + (lane & 15) * ld + (lane >> 4) * 8);
}
// B operands for two adjacent n-tiles (n 0-7, 8-15) of one k16 step, element (k,n) at base[n*ld + k]
// (B stored n-major, e.g. K rows when computing Q K^T).
__device__ __forceinline__ void load_b2(unsigned b0[2], unsigned b1[2], const bf16* base, int ld, int lane) {
    unsigned r[4];
    ldsm_x4(r, base + ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8);
    b0[0] = r[0]; b0[1] = r[1]; b1[0] = r[2]; b1[1] = r[3];
}
// Same, element (k,n) at base[k*ld + n] (B stored k-major, e.g. V rows when computing P V).
__device__ __forceinline__ void load_b2_t(unsigned b0[2], unsigned b1[2], const bf16* base, int ld, int lane) {
    unsigned r[4];
    ldsm_x4_t(r, base + ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8);
    b0[0] = r[0]; b0[1] = r[1]; b1[0] = r[2]; b1[1] = r[3];
}

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    bf162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// Copies rows [row0, row0+64) x D of a token-major tensor into smem [64][D+8]; rows >= len are zeros.
template <int D>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, long long stride, int row0, int len, int tid) {
    constexpr int CH = D / 8;
    constexpr int LD = D + 8;
    for (int i = tid; i < ATT_BM * CH; i += ATT_THREADS) {
        const int r = i / CH, c = (i % CH) * 8;
        const bool valid = row0 + r < len;
        const bf16* g = valid ? src + (long long)(row0 + r) * stride + c : src;
        cp_async16(dst + r * LD + c, g, valid);
    }
}

template <int D>
__device__ __forceinline__ void attn_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                         const bf16* __restrict__ v, bf16* __restrict__ o, float* __restrict__ lse,
                                         const int* __restrict__ cu_q, const int* __restrict__ cu_k, int total_q,
                                         int n_heads, int n_kv_heads, long long q_stride, long long k_stride,
                                         long long v_stride, long long o_stride, float scale, int causal,
                                         int causal_offset, const int* __restrict__ k_start,
                                         const int* __restrict__ k_lens) {
    constexpr int LD = D + 8, KT = D / 16, NT = D / 8;
    extern __shared__ __align__(16) unsigned char att_smem[];
    bf16* Qs = reinterpret_cast<bf16*>(att_smem);
    bf16* Ks = Qs + ATT_BM * LD;
    bf16* Vs = Ks + ATT_BN * LD;

    const int seq = blockIdx.z, h = blockIdx.y;
    const int q0 = cu_q[seq], q_len = cu_q[seq + 1] - q0;
    const int k0 = cu_k[seq], k_len = k_lens ? k_lens[seq] : cu_k[seq + 1] - k0;
    const int kmin = k_start ? k_start[seq] : 0;
    const int m_start = blockIdx.x * ATT_BM;
    if (m_start >= q_len) return;
    const int kvh = h / (n_heads / n_kv_heads);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int offset = causal_offset;

    load_tile<D>(Qs, q + (long long)q0 * q_stride + h * D, q_stride, m_start, q_len, tid);
    cp_async_wait_all();
    __syncthreads();
    unsigned qf[KT][4];
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) load_a(qf[kk], Qs + warp * 16 * LD + kk * 16, LD, lane);

    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float m_run[2] = {-OV_INF, -OV_INF}, l_run[2] = {0.f, 0.f};
    const float sl2 = scale * OV_LOG2E;
    const int row_a = m_start + warp * 16 + (lane >> 2);  // rows row_a and row_a + 8

    int n_end = k_len;
    if (causal) n_end = min(k_len, max(0, m_start + ATT_BM + offset));
    for (int n_start = (kmin / ATT_BN) * ATT_BN; n_start < n_end; n_start += ATT_BN) {
        __syncthreads();  // everyone is done with the previous K/V tile
        load_tile<D>(Ks, k + (long long)k0 * k_stride + kvh * D, k_stride, n_start, k_len, tid);
        load_tile<D>(Vs, v + (long long)k0 * v_stride + kvh * D, v_stride, n_start, k_len, tid);
        cp_async_wait_all();
        __syncthreads();

        float s[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                unsigned b0[2], b1[2];
                load_b2(b0, b1, Ks + np * 16 * LD + kk * 16, LD, lane);
                mma16816(s[2 * np], qf[kk], b0);
                mma16816(s[2 * np + 1], qf[kk], b1);
            }
        }
        // Mask, then online softmax in the log2 domain (scale folded into one multiply).
        float mx[2] = {-OV_INF, -OV_INF};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = n_start + nt * 8 + (lane & 3) * 2 + (e & 1);
                const int row = row_a + (e >> 1) * 8;
                const bool ok = col < k_len && col >= kmin && (!causal || col <= row + offset);
                s[nt][e] = ok ? s[nt][e] * sl2 : -OV_INF;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
            }
        }
        float alpha[2], base[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m_run[r], mx[r]);
            base[r] = m_new == -OV_INF ? 0.f : m_new;  // fully masked so far: keep exp2 finite
            alpha[r] = exp2f(m_run[r] - base[r]);
            m_run[r] = m_new;
            l_run[r] *= alpha[r];
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[nt][e] = exp2f(s[nt][e] - base[e >> 1]);
                l_run[e >> 1] += s[nt][e];  // per-thread partial; the quad is summed once at the end
            }
        }
#pragma unroll
        for (int i = 0; i < NT; ++i) {
            acc[i][0] *= alpha[0]; acc[i][1] *= alpha[0];
            acc[i][2] *= alpha[1]; acc[i][3] *= alpha[1];
        }
        // O += P V: the S accumulators of two adjacent n-tiles are exactly an A fragment (FA2 trick).
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            unsigned a[4];
            a[0] = pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < NT / 2; ++dp) {
                unsigned b0[2], b1[2];
                load_b2_t(b0, b1, Vs + kk * 16 * LD + dp * 16, LD, lane);
                mma16816(acc[2 * dp], a, b0);
                mma16816(acc[2 * dp + 1], a, b1);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
        l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row_a + r * 8;
        if (row >= q_len) continue;
        const float inv = l_run[r] > 0.f ? 1.f / l_run[r] : 0.f;
        bf16* orow = o + (long long)(q0 + row) * o_stride + h * D;
#pragma unroll
        for (int dn = 0; dn < NT; ++dn) {
            const int d = dn * 8 + (lane & 3) * 2;
            *reinterpret_cast<bf162*>(orow + d) = __floats2bfloat162_rn(acc[dn][2 * r] * inv, acc[dn][2 * r + 1] * inv);
        }
        if ((lane & 3) == 0)
            lse[(long long)h * total_q + q0 + row] = l_run[r] > 0.f ? (m_run[r] + log2f(l_run[r])) * OV_LN2 : OV_INF;
    }
}

#define ATT_FWD_ARGS                                                                                      \
    const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v, bf16 *__restrict__ o, \
        float *__restrict__ lse, const int *__restrict__ cu_q, const int *__restrict__ cu_k, int total_q,     \
        int n_heads, int n_kv_heads, long long q_stride, long long k_stride, long long v_stride,            \
        long long o_stride, float scale, int causal, int causal_offset, const int *__restrict__ k_start,   \
        const int *__restrict__ k_lens
#define ATT_FWD_PASS q, k, v, o, lse, cu_q, cu_k, total_q, n_heads, n_kv_heads, q_stride, k_stride, v_stride, o_stride, scale, causal, causal_offset, k_start, k_lens

extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_fwd_hd128_bf16(ATT_FWD_ARGS) { attn_fwd<128>(ATT_FWD_PASS); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_fwd_hd80_bf16(ATT_FWD_ARGS) { attn_fwd<80>(ATT_FWD_PASS); }

// Backward preprocessing: dd[h * total_q + t] = sum_d dO[t,h,d] * O[t,h,d] (fp32). One warp per (t, h).
// grid: ceil(total_q * n_heads / 4); block 128.
extern "C" __global__ void attn_bwd_preprocess_bf16(const bf16* __restrict__ o, const bf16* __restrict__ dout,
                                                    float* __restrict__ dd, int total_q, int n_heads, int head_dim,
                                                    long long o_stride, long long do_stride) {
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= (long long)total_q * n_heads) return;
    const int t = (int)(w / n_heads), h = (int)(w % n_heads);
    const bf16* op = o + (long long)t * o_stride + h * head_dim;
    const bf16* dp = dout + (long long)t * do_stride + h * head_dim;
    float s = 0.f;
    for (int d = lane; d < head_dim; d += 32) s += bf(op[d]) * bf(dp[d]);
    s = warp_sum(s);
    if (lane == 0) dd[(long long)h * total_q + t] = s;
}

template <int D>
__device__ __forceinline__ void attn_bwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                         const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                         const float* __restrict__ lse, const float* __restrict__ dd,
                                         float* __restrict__ dq_acc, bf16* __restrict__ dk, bf16* __restrict__ dv,
                                         const int* __restrict__ cu_q, const int* __restrict__ cu_k, int total_q,
                                         int n_heads, int n_kv_heads, long long q_stride, long long k_stride,
                                         long long v_stride, long long do_stride, long long dk_stride,
                                         long long dv_stride, float scale, int causal, int causal_offset,
                                         const int* __restrict__ k_start, const int* __restrict__ k_lens) {
    constexpr int LD = D + 8, KT = D / 16, NT = D / 8, LDS = ATT_BN + 8;
    extern __shared__ __align__(16) unsigned char att_smem[];
    bf16* Ks = reinterpret_cast<bf16*>(att_smem);
    bf16* Vs = Ks + ATT_BN * LD;
    bf16* Qs = Vs + ATT_BN * LD;
    bf16* dOs = Qs + ATT_BM * LD;
    bf16* dSs = dOs + ATT_BM * LD;  // [BM q][LDS] bf16, dS in q-major order for the dQ product
    float* lse_s = reinterpret_cast<float*>(dSs + ATT_BM * LDS);
    float* dd_s = lse_s + ATT_BM;

    const int seq = blockIdx.z, kvh = blockIdx.y;
    const int q0 = cu_q[seq], q_len = cu_q[seq + 1] - q0;
    const int k0 = cu_k[seq], k_len = k_lens ? k_lens[seq] : cu_k[seq + 1] - k0;
    const int kmin = k_start ? k_start[seq] : 0;
    const int n_start = blockIdx.x * ATT_BN;
    if (n_start >= k_len) return;
    const int group = n_heads / n_kv_heads;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int offset = causal_offset;
    const float sl2 = scale * OV_LOG2E;

    load_tile<D>(Ks, k + (long long)k0 * k_stride + kvh * D, k_stride, n_start, k_len, tid);
    load_tile<D>(Vs, v + (long long)k0 * v_stride + kvh * D, v_stride, n_start, k_len, tid);

    float dk_acc[NT][4], dv_acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[i][e] = dv_acc[i][e] = 0.f;

    const int kv_a = n_start + warp * 16 + (lane >> 2);  // this thread's kv rows: kv_a, kv_a + 8
    // First query tile that can see this kv block (causal): q >= kv - offset.
    const int m_first = causal ? max(0, ((n_start - offset) / ATT_BM) * ATT_BM) : 0;

    for (int hg = 0; hg < group; ++hg) {
        const int h = kvh * group + hg;
        for (int m_start = m_first; m_start < q_len; m_start += ATT_BM) {
            __syncthreads();  // previous iteration's readers of Qs/dOs/dSs are done
            load_tile<D>(Qs, q + (long long)q0 * q_stride + h * D, q_stride, m_start, q_len, tid);
            load_tile<D>(dOs, dout + (long long)q0 * do_stride + h * D, do_stride, m_start, q_len, tid);
            for (int i = tid; i < ATT_BM; i += ATT_THREADS) {
                const bool ok = m_start + i < q_len;
                lse_s[i] = ok ? lse[(long long)h * total_q + q0 + m_start + i] : OV_INF;
                dd_s[i] = ok ? dd[(long long)h * total_q + q0 + m_start + i] : 0.f;
            }
            cp_async_wait_all();
            __syncthreads();

            // S^T = K Q^T (rows: this warp's 16 kv, cols: 64 q), then P^T.
            float p[8][4];
#pragma unroll
            for (int i = 0; i < 8; ++i) p[i][0] = p[i][1] = p[i][2] = p[i][3] = 0.f;
            // Not unrolled: with dK/dV accumulators live (2 x D/8 x 4 floats), unrolling these two
            // head-dim loops pushes ptxas past 255 registers into spills.
#pragma unroll 1
            for (int kk = 0; kk < KT; ++kk) {
                unsigned a[4];
                load_a(a, Ks + warp * 16 * LD + kk * 16, LD, lane);
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    unsigned b0[2], b1[2];
                    load_b2(b0, b1, Qs + np * 16 * LD + kk * 16, LD, lane);
                    mma16816(p[2 * np], a, b0);
                    mma16816(p[2 * np + 1], a, b1);
                }
            }
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int ql = nt * 8 + (lane & 3) * 2 + (e & 1);
                    const int kv = kv_a + (e >> 1) * 8;
                    const int qi = m_start + ql;
                    const bool ok = kv < k_len && kv >= kmin && qi < q_len && (!causal || kv <= qi + offset);
                    p[nt][e] = ok ? exp2f(p[nt][e] * sl2 - lse_s[ql] * OV_LOG2E) : 0.f;
                }
            }
            // dV += P^T dO
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                unsigned a[4];
                a[0] = pack_bf16x2(p[2 * kk][0], p[2 * kk][1]);
                a[1] = pack_bf16x2(p[2 * kk][2], p[2 * kk][3]);
                a[2] = pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]);
                a[3] = pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
                for (int dp = 0; dp < NT / 2; ++dp) {
                    unsigned b0[2], b1[2];
                    load_b2_t(b0, b1, dOs + kk * 16 * LD + dp * 16, LD, lane);
                    mma16816(dv_acc[2 * dp], a, b0);
                    mma16816(dv_acc[2 * dp + 1], a, b1);
                }
            }
            // dP^T = V dO^T, then dS^T = P^T * (dP^T - dd[q]) in place.
            float ds[8][4];
#pragma unroll
            for (int i = 0; i < 8; ++i) ds[i][0] = ds[i][1] = ds[i][2] = ds[i][3] = 0.f;
#pragma unroll 1
            for (int kk = 0; kk < KT; ++kk) {
                unsigned a[4];
                load_a(a, Vs + warp * 16 * LD + kk * 16, LD, lane);
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    unsigned b0[2], b1[2];
                    load_b2(b0, b1, dOs + np * 16 * LD + kk * 16, LD, lane);
                    mma16816(ds[2 * np], a, b0);
                    mma16816(ds[2 * np + 1], a, b1);
                }
            }
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int ql = nt * 8 + (lane & 3) * 2 + (e & 1);
                    ds[nt][e] = p[nt][e] * (ds[nt][e] - dd_s[ql]);
                    const int kvl = warp * 16 + (lane >> 2) + (e >> 1) * 8;
                    dSs[ql * LDS + kvl] = tobf(ds[nt][e]);
                }
            }
            // dK += dS^T Q (scale applied once at the end)
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                unsigned a[4];
                a[0] = pack_bf16x2(ds[2 * kk][0], ds[2 * kk][1]);
                a[1] = pack_bf16x2(ds[2 * kk][2], ds[2 * kk][3]);
                a[2] = pack_bf16x2(ds[2 * kk + 1][0], ds[2 * kk + 1][1]);
                a[3] = pack_bf16x2(ds[2 * kk + 1][2], ds[2 * kk + 1][3]);
#pragma unroll
                for (int dp = 0; dp < NT / 2; ++dp) {
                    unsigned b0[2], b1[2];
                    load_b2_t(b0, b1, Qs + kk * 16 * LD + dp * 16, LD, lane);
                    mma16816(dk_acc[2 * dp], a, b0);
                    mma16816(dk_acc[2 * dp + 1], a, b1);
                }
            }
            __syncthreads();  // dSs complete
            // dQ[q, :] += scale * dS[q, kv] K[kv, :]; this warp: q rows warp*16 .. +16 of the tile.
            const int qrow_a = m_start + warp * 16 + (lane >> 2);
#pragma unroll 1
            for (int dp = 0; dp < NT / 2; ++dp) {
                float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int kk = 0; kk < 4; ++kk) {
                    unsigned a[4], b0[2], b1[2];
                    load_a(a, dSs + warp * 16 * LDS + kk * 16, LDS, lane);
                    load_b2_t(b0, b1, Ks + kk * 16 * LD + dp * 16, LD, lane);
                    mma16816(c0, a, b0);
                    mma16816(c1, a, b1);
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = qrow_a + (e >> 1) * 8;
                    if (qi >= q_len) continue;
                    float* dst = dq_acc + ((long long)(q0 + qi) * n_heads + h) * D + dp * 16 + (lane & 3) * 2 + (e & 1);
                    atomicAdd(dst, c0[e] * scale);
                    atomicAdd(dst + 8, c1[e] * scale);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int kv = kv_a + r * 8;
        if (kv >= k_len) continue;
        bf16* dkrow = dk + (long long)(k0 + kv) * dk_stride + kvh * D;
        bf16* dvrow = dv + (long long)(k0 + kv) * dv_stride + kvh * D;
#pragma unroll
        for (int dn = 0; dn < NT; ++dn) {
            const int d = dn * 8 + (lane & 3) * 2;
            *reinterpret_cast<bf162*>(dkrow + d) = __floats2bfloat162_rn(dk_acc[dn][2 * r] * scale, dk_acc[dn][2 * r + 1] * scale);
            *reinterpret_cast<bf162*>(dvrow + d) = __floats2bfloat162_rn(dv_acc[dn][2 * r], dv_acc[dn][2 * r + 1]);
        }
    }
}

#define ATT_BWD_ARGS                                                                                          \
    const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,                      \
        const bf16 *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ dd,            \
        float *__restrict__ dq_acc, bf16 *__restrict__ dk, bf16 *__restrict__ dv, const int *__restrict__ cu_q, \
        const int *__restrict__ cu_k, int total_q, int n_heads, int n_kv_heads, long long q_stride,             \
        long long k_stride, long long v_stride, long long do_stride, long long dk_stride, long long dv_stride,  \
        float scale, int causal, int causal_offset, const int *__restrict__ k_start, const int *__restrict__ k_lens
#define ATT_BWD_PASS q, k, v, dout, lse, dd, dq_acc, dk, dv, cu_q, cu_k, total_q, n_heads, n_kv_heads, q_stride, \
                     k_stride, v_stride, do_stride, dk_stride, dv_stride, scale, causal, causal_offset, k_start, k_lens

extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_bwd_hd128_bf16(ATT_BWD_ARGS) { attn_bwd<128>(ATT_BWD_PASS); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_bwd_hd80_bf16(ATT_BWD_ARGS) { attn_bwd<80>(ATT_BWD_PASS); }

// dQ: f32 accumulator [total_q, n_heads, D] (zeroed by the host before bwd) -> bf16 with dq_stride.
// grid: ceil(total_q * n_heads * D / 256); block 256.
extern "C" __global__ void attn_bwd_dq_convert_bf16(const float* __restrict__ dq_acc, bf16* __restrict__ dq,
                                                    int total_q, int n_heads, int head_dim, long long dq_stride) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long row_len = (long long)n_heads * head_dim;
    if (i >= (long long)total_q * row_len) return;
    const long long t = i / row_len, c = i % row_len;
    dq[t * dq_stride + c] = tobf(dq_acc[i]);
}
