// Embedding lookup, forward and backward.
// CPU reference: onevision-model's `Backend::embedding` / its backward (worker/model), i.e.
//   fwd: out[t, :] = table[ids[t], :]
//   bwd: dtable[ids[t], :] += dout[t, :]   (a tied LM head adds its own gradient to the same buffer)
// Layouts: ids [n_tokens] int32; table [vocab, hidden] bf16 row-major; out/dout [n_tokens, hidden] bf16;
// dtable [vocab, hidden] f32 (accumulated, never zeroed here).
// Invalid ids (outside [0, vocab)) produce a zero row and set *bad_id = 1 (read by the host, which
// reports the error: the CPU backend rejects such ids, the GPU must not read out of bounds).

// grid: n_tokens blocks; block: any multiple of 32 (128 recommended).
extern "C" __global__ void embedding_fwd_bf16(const int* __restrict__ ids, const bf16* __restrict__ table,
                                              bf16* __restrict__ out, int n_tokens, int hidden, int vocab,
                                              int* __restrict__ bad_id) {
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    const int id = ids[t];
    bf16* dst = out + (long long)t * hidden;
    if (id < 0 || id >= vocab) {
        if (threadIdx.x == 0) atomicExch(bad_id, 1);
        for (int c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = tobf(0.f);
        return;
    }
    const bf16* src = table + (long long)id * hidden;
    if ((hidden & 7) == 0 && aligned16(src) && aligned16(dst)) {
        const uint4* s4 = reinterpret_cast<const uint4*>(src);
        uint4* d4 = reinterpret_cast<uint4*>(dst);
        for (int c = threadIdx.x; c < hidden / 8; c += blockDim.x) d4[c] = s4[c];
    } else {
        for (int c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = src[c];
    }
}

// grid: n_tokens blocks. fp32 atomics: repeated ids (common: padding, frequent tokens) accumulate in
// arbitrary order, so the result is reproducible only up to fp32 rounding (documented in docs/cuda.md).
extern "C" __global__ void embedding_bwd_f32(const int* __restrict__ ids, const bf16* __restrict__ dout,
                                             float* __restrict__ dtable, int n_tokens, int hidden, int vocab) {
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    const int id = ids[t];
    if (id < 0 || id >= vocab) return;
    const bf16* g = dout + (long long)t * hidden;
    float* d = dtable + (long long)id * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) atomicAdd(d + c, bf(g[c]));
}
