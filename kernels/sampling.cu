// Token sampling on device: temperature, top-k, top-p (nucleus), greedy.
// CPU reference: the sampler in worker/model (generation) with the same semantics:
//   temperature <= 0 or top_k == 1: argmax (lowest index on ties);
//   otherwise z = logits / temperature; keep tokens with z >= tau, where tau is the largest threshold
//   such that (top_k > 0) at least top_k tokens have z >= tau, and (top_p < 1) the kept softmax mass is
//   >= top_p; sample from softmax over the kept set using u = uniform(seed, row, step) in [0, 1),
//   scanning the vocabulary in index order (inverse CDF).
//   Ties at the threshold keep every tied token (may keep more than top_k when logits are equal).
// Thresholds are found by bisection on the value axis (a sort of 152k logits per row would cost more
// than the whole decode step); 40 halvings of [min, max] leave the interval below float resolution.
// Layouts: logits [rows, vocab] f32 (row stride ld); out [rows] int32. One block of 1024 per row.
// RNG: splitmix64 hash of (seed, row, step): counter-based, so a rerun with the same seed reproduces.

#define SMP_THREADS 1024

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

__device__ __forceinline__ float count_ge(const float* x, int vocab, float t, float* sh) {
    float c = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += x[i] >= t ? 1.f : 0.f;
    return block_sum(c, sh);
}

__device__ __forceinline__ float mass_ge(const float* x, int vocab, float t, float mx, float inv_temp, float* sh) {
    float s = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += x[i] >= t ? __expf((x[i] - mx) * inv_temp) : 0.f;
    return block_sum(s, sh);
}

// grid: rows; block: 1024.
extern "C" __global__ void __launch_bounds__(SMP_THREADS)
sample_tokens_f32(const float* __restrict__ logits, long long ld, int* __restrict__ out, int rows, int vocab,
                  float temperature, int top_k, float top_p, unsigned long long seed, unsigned long long step) {
    __shared__ float sh[32];
    __shared__ float sh_scan[SMP_THREADS];
    __shared__ int sh_idx[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* x = logits + (long long)r * ld;
    const int tid = threadIdx.x;

    // Max (and its lowest index, for greedy) and min.
    float mx = -OV_INF, mn = OV_INF;
    int arg = 0x7fffffff;
    for (int i = tid; i < vocab; i += blockDim.x) {
        const float v = x[i];
        if (v > mx) { mx = v; arg = i; }
        mn = fminf(mn, v);
    }
    const float gmax = block_max(mx, sh);
    const float gmin = -block_max(-mn, sh);
    if (temperature <= 0.f || top_k == 1) {
        // Lowest index among the maxima.
        int cand = mx == gmax ? arg : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) cand = min(cand, __shfl_xor_sync(0xffffffffu, cand, o));
        __syncthreads();
        if ((tid & 31) == 0) sh_idx[tid >> 5] = cand;
        __syncthreads();
        if (tid < 32) {
            int c = tid < (int)(blockDim.x >> 5) ? sh_idx[tid] : 0x7fffffff;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) c = min(c, __shfl_xor_sync(0xffffffffu, c, o));
            if (tid == 0) out[r] = c;
        }
        return;
    }
    const float inv_temp = 1.f / temperature;
    float tau = gmin;  // keep everything by default
    if (top_k > 0 && top_k < vocab) {
        // Largest t with count(x >= t) >= top_k: invariant count(lo) >= k, count(hi) < k (or hi = max).
        float lo = gmin, hi = gmax;
        if (count_ge(x, vocab, hi, sh) < (float)top_k) {
            for (int it = 0; it < 40 && lo < hi; ++it) {
                const float mid = 0.5f * (lo + hi);
                if (mid <= lo || mid >= hi) break;
                if (count_ge(x, vocab, mid, sh) >= (float)top_k) lo = mid; else hi = mid;
            }
            tau = lo;
        } else {
            tau = hi;
        }
    }
    if (top_p < 1.f) {
        const float total = mass_ge(x, vocab, gmin, gmax, inv_temp, sh);
        const float target = top_p * total;
        float lo = tau, hi = gmax;
        if (mass_ge(x, vocab, hi, gmax, inv_temp, sh) < target) {
            for (int it = 0; it < 40 && lo < hi; ++it) {
                const float mid = 0.5f * (lo + hi);
                if (mid <= lo || mid >= hi) break;
                if (mass_ge(x, vocab, mid, gmax, inv_temp, sh) >= target) lo = mid; else hi = mid;
            }
            tau = lo;
        } else {
            tau = hi;
        }
    }
    // Inverse CDF over kept tokens in index order: each thread owns a contiguous slice.
    const int per = (vocab + blockDim.x - 1) / blockDim.x;
    const int b0 = tid * per, b1 = min(vocab, b0 + per);
    float local = 0.f;
    for (int i = b0; i < b1; ++i) local += x[i] >= tau ? __expf((x[i] - gmax) * inv_temp) : 0.f;
    sh_scan[tid] = local;
    __syncthreads();
    // Inclusive Hillis-Steele scan over 1024 slice sums.
    for (int off = 1; off < (int)blockDim.x; off <<= 1) {
        const float add = tid >= off ? sh_scan[tid - off] : 0.f;
        __syncthreads();
        sh_scan[tid] += add;
        __syncthreads();
    }
    const float total = sh_scan[blockDim.x - 1];
    const unsigned long long h = splitmix64(seed ^ splitmix64(((unsigned long long)r << 32) ^ step));
    const float u = (float)(h >> 40) * (1.0f / 16777216.0f);  // 24 random bits -> [0, 1)
    const float target = u * total;
    const float before = tid == 0 ? 0.f : sh_scan[tid - 1];
    if (target >= before && target < sh_scan[tid] && b0 < b1) {
        float acc = before;
        int pick = -1, last = -1;
        for (int i = b0; i < b1; ++i) {
            if (x[i] < tau) continue;
            last = i;
            acc += __expf((x[i] - gmax) * inv_temp);
            if (target < acc) { pick = i; break; }
        }
        out[r] = pick >= 0 ? pick : last;  // rounding at the slice end: take its last kept token
    }
    // Rounding can leave target >= total; the last kept token then wins.
    if (tid == blockDim.x - 1 && !(target < total)) {
        for (int i = vocab - 1; i >= 0; --i)
            if (x[i] >= tau) { out[r] = i; break; }
    }
}
