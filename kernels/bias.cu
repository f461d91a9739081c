// Bias add and bias gradient, plus the deterministic partial-sum reduction other families use.
// CPU reference: onevision-model's linear-with-bias forward/backward (worker/model):
//   fwd: y[r, c] = bf16(y[r, c] + b[c])     (in place; used where a cuBLASLt bias epilogue is not)
//   bwd: db[c] (+)= sum_r dy[r, c]          (fp32)
// Layouts: y, dy [rows, cols] bf16 row-major; b [cols] bf16; db [cols] f32.

// grid: (rows, ceil(cols / 256)); block 256.
extern "C" __global__ void bias_add_bf16(bf16* __restrict__ y, const bf16* __restrict__ b, int rows, int cols) {
    const int r = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= rows || c >= cols) return;
    const long long i = (long long)r * cols + c;
    y[i] = tobf(bf(y[i]) + bf(b[c]));
}

// Column sums in two deterministic stages. Stage 1: grid (ceil(cols/32), splits), block (32, 8):
// block (bx, by) sums rows by, by+splits, ... of 32 columns; writes partial[by, cols].
extern "C" __global__ void bias_grad_partial_bf16(const bf16* __restrict__ dy, float* __restrict__ partial,
                                                  int rows, int cols) {
    __shared__ float sh[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (c < cols)
        for (int r = blockIdx.y * 8 + threadIdx.y; r < rows; r += gridDim.y * 8) s += bf(dy[(long long)r * cols + c]);
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) t += sh[i][threadIdx.x];
        partial[(long long)blockIdx.y * cols + c] = t;
    }
}

// Stage 2 (also used for RMSNorm weight gradients): out[c] (+)= sum_p partial[p, c], fixed order.
// grid: ceil(cols/256); block 256.
extern "C" __global__ void reduce_partials_f32(const float* __restrict__ partial, float* __restrict__ out,
                                               int nparts, int cols, int accumulate) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.f;
    for (int p = 0; p < nparts; ++p) s += partial[(long long)p * cols + c];
    out[c] = accumulate ? out[c] + s : s;
}
