// Rotary position embeddings: text 1D RoPE, Qwen2.5-VL M-RoPE (sections) and vision 2D RoPE,
// forward and backward. CPU reference: onevision-model's rope ops (worker/model); math in
// ../shared/reference/qwen2_5_vl.md §3.2 (vision) and §4.3 (M-RoPE).
//
// Two steps, so one apply kernel serves all three variants:
//   1. a table kernel writes cos/sin [tokens, half] f32 (half = head_dim / 2; the full HF embedding is
//      concat(freqs, freqs), so entry j serves dims j and j + half);
//   2. rope_apply_bf16 rotates q or k in place, in fp32:
//        x'[j]      = x[j] * cos - x[j+half] * sin
//        x'[j+half] = x[j+half] * cos + x[j] * sin          (rotate_half convention)
//      Backward is the same rotation by -sin (sign = -1), applied to the incoming gradient.
// Layout for apply: x[t * row_stride + h * head_dim + d], bf16; tables read as table[t * table_ld + j]
// (table_ld = half for the tables above, head_dim for full [tokens, head_dim] HF-style tables, whose
// two halves are equal); lets q and k be views into a fused
// qkv projection ([tokens, 3, heads, head_dim] for vision, row_stride = 3 * heads * head_dim).
// transformers casts cos/sin to bf16 before the text multiply; we keep them fp32 (difference below
// bf16 resolution of the output, covered by the 1e-2 tolerance).

// M-RoPE table. pos3 [3, tokens] int32 (temporal, height, width positions; text tokens have all three
// equal). inv_freq[j] = theta^(-2j/head_dim); frequencies [0,s0) use axis 0, [s0,s0+s1) axis 1, the
// rest axis 2 (Qwen2.5-VL: sections 16,24,24 of half = 64). With s0 = half this is plain 1D RoPE.
// grid: ceil(tokens*half/256); block 256.
extern "C" __global__ void mrope_table(const int* __restrict__ pos3, float* __restrict__ cos_out,
                                       float* __restrict__ sin_out, int tokens, int head_dim, int s0, int s1,
                                       float theta) {
    const int half = head_dim / 2;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)tokens * half) return;
    const int t = (int)(i / half), j = (int)(i % half);
    const int axis = j < s0 ? 0 : (j < s0 + s1 ? 1 : 2);
    // Same fp32 order of operations as transformers: inv_freq = 1 / theta^(2j/dim), angle = pos * inv_freq.
    const float inv_freq = 1.0f / powf(theta, (float)(2 * j) / (float)head_dim);
    const float angle = (float)pos3[(long long)axis * tokens + t] * inv_freq;
    float s, c;
    sincosf(angle, &s, &c);
    cos_out[i] = c;
    sin_out[i] = s;
}

// Vision 2D table. rowcol [tokens, 2] int32 (patch row, col in the un-merged grid, already permuted by
// window_index). inv_freq[j] = theta^(-2j/(head_dim/2)), j < head_dim/4; entry j < quarter uses
// row * inv_freq[j], entry quarter + j uses col * inv_freq[j] (HF: concat(row freqs, col freqs)).
extern "C" __global__ void vision_rope_table(const int* __restrict__ rowcol, float* __restrict__ cos_out,
                                             float* __restrict__ sin_out, int tokens, int head_dim, float theta) {
    const int half = head_dim / 2, quarter = head_dim / 4;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)tokens * half) return;
    const int t = (int)(i / half), j = (int)(i % half);
    const int axis = j < quarter ? 0 : 1;
    const int jj = j < quarter ? j : j - quarter;
    const float inv_freq = 1.0f / powf(theta, (float)(2 * jj) / (float)half);
    const float angle = (float)rowcol[2 * t + axis] * inv_freq;
    float s, c;
    sincosf(angle, &s, &c);
    cos_out[i] = c;
    sin_out[i] = s;
}

// In-place rotation. grid: (tokens, ceil(heads / heads_per_block)); block: (half, heads_per_block)
// with half*heads_per_block <= 1024, e.g. (64, 8) for text, (40, 8) for vision. sign: +1 fwd, -1 bwd.
extern "C" __global__ void rope_apply_bf16(bf16* __restrict__ x, const float* __restrict__ cos_t,
                                           const float* __restrict__ sin_t, int tokens, int heads, int head_dim,
                                           long long row_stride, int table_ld, float sign) {
    const int t = blockIdx.x;
    const int h = blockIdx.y * blockDim.y + threadIdx.y;
    const int half = head_dim / 2;
    const int j = threadIdx.x;
    if (t >= tokens || h >= heads || j >= half) return;
    const float c = cos_t[(long long)t * table_ld + j];
    const float s = sign * sin_t[(long long)t * table_ld + j];
    bf16* p = x + (long long)t * row_stride + (long long)h * head_dim;
    const float a = bf(p[j]), b = bf(p[j + half]);
    p[j] = tobf(a * c - b * s);
    p[j + half] = tobf(b * c + a * s);
}
