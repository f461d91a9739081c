// SwiGLU MLP activation, forward and backward.
// CPU reference: onevision-model's `Backend::swiglu` (worker/model); transformers:
//   out = bf16( bf16(silu(gate)) * up )        (act_fn(gate_proj(x)) * up_proj(x), both bf16 ops)
// Backward (fp32, s = sigmoid(g)):
//   dgate = dout * up * s * (1 + g * (1 - s))
//   dup   = dout * bf16(silu(g))
// Layouts: [rows, cols] bf16 with separate leading dimensions so gate and up can be the two halves of
// a fused gate_up projection output ([rows, 2*cols], ld = 2*cols).
// grid: (rows, ceil(cols / (8*blockDim.x))); block 128 (rows on x: no 65535 limit). Vector path when cols % 8 == 0 and aligned.

__device__ __forceinline__ float silu_f(float g) { return g / (1.f + __expf(-g)); }

extern "C" __global__ void swiglu_fwd_bf16(const bf16* __restrict__ gate, const bf16* __restrict__ up,
                                           bf16* __restrict__ out, int rows, int cols, long long ld_gate,
                                           long long ld_up, long long ld_out) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const bf16* g = gate + r * ld_gate;
    const bf16* u = up + r * ld_up;
    bf16* o = out + r * ld_out;
    const int c0 = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
    if ((cols & 7) == 0 && aligned16(g) && aligned16(u) && aligned16(o)) {
        if (c0 >= cols) return;
        float gf[8], uf[8], of[8];
        load8(g + c0, gf);
        load8(u + c0, uf);
#pragma unroll
        for (int i = 0; i < 8; ++i) of[i] = rbf(silu_f(gf[i])) * uf[i];
        store8(o + c0, of);
    } else {
        for (int c = c0; c < min(c0 + 8, cols); ++c) o[c] = tobf(rbf(silu_f(bf(g[c]))) * bf(u[c]));
    }
}

extern "C" __global__ void swiglu_bwd_bf16(const bf16* __restrict__ gate, const bf16* __restrict__ up,
                                           const bf16* __restrict__ dout, bf16* __restrict__ dgate,
                                           bf16* __restrict__ dup, int rows, int cols, long long ld_gate,
                                           long long ld_up, long long ld_dout, long long ld_dgate, long long ld_dup) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const bf16* g = gate + r * ld_gate;
    const bf16* u = up + r * ld_up;
    const bf16* d = dout + r * ld_dout;
    bf16* dg = dgate + r * ld_dgate;
    bf16* du = dup + r * ld_dup;
    const int c0 = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
    if ((cols & 7) == 0 && aligned16(g) && aligned16(u) && aligned16(d) && aligned16(dg) && aligned16(du)) {
        if (c0 >= cols) return;
        float gf[8], uf[8], df[8], a[8], b[8];
        load8(g + c0, gf);
        load8(u + c0, uf);
        load8(d + c0, df);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float s = 1.f / (1.f + __expf(-gf[i]));
            a[i] = df[i] * uf[i] * s * (1.f + gf[i] * (1.f - s));
            b[i] = df[i] * rbf(gf[i] * s);
        }
        store8(dg + c0, a);
        store8(du + c0, b);
    } else {
        for (int c = c0; c < min(c0 + 8, cols); ++c) {
            const float gv = bf(g[c]), uv = bf(u[c]), dv = bf(d[c]);
            const float s = 1.f / (1.f + __expf(-gv));
            dg[c] = tobf(dv * uv * s * (1.f + gv * (1.f - s)));
            du[c] = tobf(dv * rbf(gv * s));
        }
    }
}
