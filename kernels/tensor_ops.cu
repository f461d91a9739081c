// Small tensor operations the CUDA backend needs around the fused kernels: elementwise add/scale,
// row softmax, row gather/scatter (vision window permutation, image-feature scatter), strided 2-D
// copies (split/concat of the last dim, KV-cache writes).
// CPU reference: the corresponding onevision-model `Backend` methods of CpuBackend (worker/model/src/cpu):
//   add: y = a + b; add_assign: a += b; scale: y = s * x; softmax over the last dim (fp32 math) and
//   its backward dx = y * (dy - sum(dy * y)); gather_rows: out[i] = x[idx[i]];
//   gather_rows_backward: dx[idx[i]] += dy[i] (f32 accumulation); scatter_rows: out[rows[i]] = src[i];
//   copy2d: dst[r * dst_ld + c] = src[r * src_ld + c] for r < rows, c < cols (elements).
// Layouts: flat or [rows, cols] row-major; bf16 activations, f32 accumulators; idx arrays int32.

// grid: ceil(n/256); block 256 (for every flat kernel below).
extern "C" __global__ void add_bf16(const bf16* __restrict__ a, const bf16* __restrict__ b, bf16* __restrict__ y, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = tobf(bf(a[i]) + bf(b[i]));
}

extern "C" __global__ void add_assign_bf16(bf16* __restrict__ a, const bf16* __restrict__ b, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] = tobf(bf(a[i]) + bf(b[i]));
}

// f32 accumulator += bf16 or f32 gradient (b_is_bf16 selects the source type).
extern "C" __global__ void add_assign_f32(float* __restrict__ a, const void* __restrict__ b, int b_is_bf16, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    a[i] += b_is_bf16 ? bf(reinterpret_cast<const bf16*>(b)[i]) : reinterpret_cast<const float*>(b)[i];
}

extern "C" __global__ void scale_bf16(const bf16* __restrict__ x, bf16* __restrict__ y, float s, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = tobf(bf(x[i]) * s);
}

// grid: rows; block 256.
extern "C" __global__ void softmax_rows_bf16(const bf16* __restrict__ x, bf16* __restrict__ y, int rows, int cols) {
    __shared__ float sh[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const bf16* xr = x + (long long)r * cols;
    bf16* yr = y + (long long)r * cols;
    float mx = -OV_INF;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) mx = fmaxf(mx, bf(xr[c]));
    mx = block_max(mx, sh);
    float s = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += __expf(bf(xr[c]) - mx);
    s = block_sum(s, sh);
    const float inv = 1.f / s;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = tobf(__expf(bf(xr[c]) - mx) * inv);
}

extern "C" __global__ void softmax_bwd_rows_bf16(const bf16* __restrict__ dy, const bf16* __restrict__ y,
                                                 bf16* __restrict__ dx, int rows, int cols) {
    __shared__ float sh[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long off = (long long)r * cols;
    float dot = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dot += bf(dy[off + c]) * bf(y[off + c]);
    dot = block_sum(dot, sh);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dx[off + c] = tobf(bf(y[off + c]) * (bf(dy[off + c]) - dot));
}

// grid: (ceil(row_elems/256), min(n_idx, 65535)); block 256; blocks stride over rows (grid.y <= 65535). Element type by size (2 = bf16, 4 = f32).
template <typename T>
__device__ __forceinline__ void gather_rows_t(const T* src, const int* idx, T* dst, int n_idx, long long row) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= row) return;
    for (int i = blockIdx.y; i < n_idx; i += gridDim.y) dst[(long long)i * row + c] = src[(long long)idx[i] * row + c];
}
extern "C" __global__ void gather_rows_u16(const unsigned short* src, const int* idx, unsigned short* dst, int n_idx, long long row) {
    gather_rows_t(src, idx, dst, n_idx, row);
}
extern "C" __global__ void gather_rows_u32(const unsigned* src, const int* idx, unsigned* dst, int n_idx, long long row) {
    gather_rows_t(src, idx, dst, n_idx, row);
}

// dst[idx[i]] = src[i] (scatter_rows; also the inverse permutation).
template <typename T>
__device__ __forceinline__ void scatter_rows_t(const T* src, const int* idx, T* dst, int n_idx, long long row) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= row) return;
    for (int i = blockIdx.y; i < n_idx; i += gridDim.y) dst[(long long)idx[i] * row + c] = src[(long long)i * row + c];
}
extern "C" __global__ void scatter_rows_u16(const unsigned short* src, const int* idx, unsigned short* dst, int n_idx, long long row) {
    scatter_rows_t(src, idx, dst, n_idx, row);
}
extern "C" __global__ void scatter_rows_u32(const unsigned* src, const int* idx, unsigned* dst, int n_idx, long long row) {
    scatter_rows_t(src, idx, dst, n_idx, row);
}

// dx[idx[i]] += dy[i] in f32 (indices may repeat). Zero dx first.
extern "C" __global__ void gather_rows_bwd_bf16(const bf16* __restrict__ dy, const int* __restrict__ idx,
                                                float* __restrict__ dx, int n_idx, long long row) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= row) return;
    for (int i = blockIdx.y; i < n_idx; i += gridDim.y) atomicAdd(dx + (long long)idx[i] * row + c, bf(dy[(long long)i * row + c]));
}

// Zero the listed rows (scatter_rows_backward: the overwritten rows get no gradient).
extern "C" __global__ void zero_rows_u16(unsigned short* dst, const int* idx, int n_idx, long long row) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= row) return;
    for (int i = blockIdx.y; i < n_idx; i += gridDim.y) dst[(long long)idx[i] * row + c] = 0;
}

// grid: (ceil(cols/256), min(rows, 65535)); block 256.
template <typename T>
__device__ __forceinline__ void copy2d_t(const T* src, long long src_ld, T* dst, long long dst_ld, int rows, long long cols) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) dst[(long long)r * dst_ld + c] = src[(long long)r * src_ld + c];
}
extern "C" __global__ void copy2d_u16(const unsigned short* src, long long src_ld, unsigned short* dst, long long dst_ld, int rows, long long cols) {
    copy2d_t(src, src_ld, dst, dst_ld, rows, cols);
}
extern "C" __global__ void copy2d_u32(const unsigned* src, long long src_ld, unsigned* dst, long long dst_ld, int rows, long long cols) {
    copy2d_t(src, src_ld, dst, dst_ld, rows, cols);
}
