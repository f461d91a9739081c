//! The `Backend` trait: every kernel the Qwen2.5-VL forward and backward passes need.
//!
//! Conventions (shared by the CPU oracle and the CUDA implementation):
//! * Tensors are contiguous row-major; "rows" means all dims but the last.
//! * Ops return new tensors; the only in-place op is [`Backend::write_rows`] (KV cache).
//! * Activations are F32; weights may be F32 or BF16 (`linear` upcasts BF16 weights).
//! * Every forward op `foo` has `foo_backward` next to it, taking the upstream gradient and the
//!   forward inputs (recompute-style), returning gradients for each differentiable input.
use crate::error::Result;
use crate::tensor::{DType, Device, Tensor};

/// Which keys each query may attend to.
#[derive(Clone, Debug, PartialEq)]
pub enum AttnMask {
    /// Non-causal block-diagonal attention: rows `cu_seqlens[i]..cu_seqlens[i+1]` attend only to
    /// each other (vision full/window attention). Requires batch 1 and q, k of the same length.
    Segments(Vec<usize>),
    /// Causal attention with a KV cache: query row `i` sits at cache slot `q_offset + i` and attends
    /// keys `j` with `key_start[b] <= j <= q_offset + i` (`key_start` skips left padding; empty = 0).
    Causal { q_offset: usize, key_start: Vec<usize> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct AttnSpec {
    /// Multiplies q·kᵀ (1/√head_dim).
    pub scale: f32,
    pub mask: AttnMask,
    /// Number of valid key rows (≤ k.shape[1]); later rows (unused cache slots) are ignored.
    pub kv_len: usize,
}

pub struct LinearGrads {
    pub dx: Tensor,
    pub dw: Tensor,
    pub db: Option<Tensor>,
}

pub trait Backend: Send + Sync {
    fn name(&self) -> &str;
    fn device(&self) -> Device;

    // ---- data movement ----
    /// Copy a host tensor to this backend's device (identity on CPU).
    fn to_device(&self, t: &Tensor) -> Result<Tensor>;
    /// Copy to host memory.
    fn to_host(&self, t: &Tensor) -> Result<Tensor>;
    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor>;
    /// Zero-filled F32 tensor on the device.
    fn zeros(&self, shape: &[usize]) -> Result<Tensor>;
    /// Write `src` [B, T, ...] into `dst` [B, S, ...] at slots `offset..offset+T` of dim 1 (KV cache).
    fn write_rows(&self, dst: &mut Tensor, offset: usize, src: &Tensor) -> Result<()>;

    // ---- linear algebra ----
    /// y = x·Wᵀ (+ b): x [.., K], w [N, K] (F32 or BF16), b [N] → [.., N].
    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor>;
    /// dx = dy·W, dW = dyᵀ·x, db = Σ_rows dy.
    fn linear_backward(&self, dy: &Tensor, x: &Tensor, w: &Tensor, has_bias: bool) -> Result<LinearGrads>;
    /// Batched matmul: a [.., M, K] (or [.., K, M] if `trans_a`), b [.., K, N] (or [.., N, K]) → [.., M, N].
    /// Leading dims must match (b may also be rank 2, shared by all batches).
    fn matmul(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor>;
    /// Returns (da, db) for `matmul(a, b, trans_a, trans_b)`.
    fn matmul_backward(&self, dy: &Tensor, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<(Tensor, Tensor)>;

    // ---- elementwise ----
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// a += b in place (gradient accumulation, e.g. tied embeddings).
    fn add_assign(&self, a: &mut Tensor, b: &Tensor) -> Result<()>;
    fn scale(&self, x: &Tensor, s: f32) -> Result<Tensor>;
    /// silu(gate) ⊙ up.
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;
    /// Returns (d_gate, d_up).
    fn swiglu_backward(&self, dy: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)>;
    /// Exact GELU: x·Φ(x) with erf.
    fn gelu(&self, x: &Tensor) -> Result<Tensor>;
    fn gelu_backward(&self, dy: &Tensor, x: &Tensor) -> Result<Tensor>;

    // ---- normalisation ----
    /// y = w ⊙ x·rsqrt(mean(x²)+eps) over the last dim.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor>;
    /// Returns (dx, dw).
    fn rms_norm_backward(&self, dy: &Tensor, x: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)>;
    /// Softmax over the last dim.
    fn softmax(&self, x: &Tensor) -> Result<Tensor>;
    /// Takes the forward *output* y.
    fn softmax_backward(&self, dy: &Tensor, y: &Tensor) -> Result<Tensor>;

    // ---- rotary embeddings ----
    /// x [R, H, D] (or [B, T, H, D] with R = B·T), cos/sin [R, D]:
    /// y = x⊙cos + rotate_half(x)⊙sin, rotate_half(x) = concat(−x[D/2:], x[:D/2]).
    /// Text M-RoPE and vision 2D RoPE differ only in their tables (see `crate::rope`).
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor>;
    fn rope_backward(&self, dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor>;

    // ---- attention ----
    /// q [B, T, Hq, D], k/v [B, S, Hkv, D] (Hq multiple of Hkv: GQA) → [B, T, Hq, D].
    /// Softmax in f32; a query with no visible key yields zeros.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<Tensor>;
    /// Returns (dq, dk, dv); dk/dv sum over the query heads sharing a KV head.
    fn attention_backward(&self, dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<(Tensor, Tensor, Tensor)>;

    // ---- indexing ----
    /// Rows of `table` [V, H] (F32 or BF16) → F32 [n, H]. Out-of-range ids are an error.
    fn embedding(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor>;
    /// d_table [vocab, H] = Σ over positions of dy rows (scatter-add). For a tied head add
    /// `linear_backward(..).dw` to it with `add_assign`.
    fn embedding_backward(&self, dy: &Tensor, ids: &[u32], vocab: usize) -> Result<Tensor>;
    /// out[i] = x[idx[i]] over rows of x [N, ..] (window permutation and its inverse).
    fn gather_rows(&self, x: &Tensor, idx: &[usize]) -> Result<Tensor>;
    /// dx [n_rows, ..] with dx[idx[i]] += dy[i].
    fn gather_rows_backward(&self, dy: &Tensor, idx: &[usize], n_rows: usize) -> Result<Tensor>;
    /// out = x with out[rows[i]] = src[i] (image features into the token embeddings).
    fn scatter_rows(&self, x: &Tensor, rows: &[usize], src: &Tensor) -> Result<Tensor>;
    /// Returns (dx, dsrc): dx = dy with the scattered rows zeroed, dsrc[i] = dy[rows[i]].
    fn scatter_rows_backward(&self, dy: &Tensor, rows: &[usize]) -> Result<(Tensor, Tensor)>;
    /// Split the last dim into pieces of the given widths (fused qkv).
    fn split_last(&self, x: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>>;
    /// Concatenate along the last dim (the backward of `split_last`, and vice versa).
    fn concat_last(&self, xs: &[&Tensor]) -> Result<Tensor>;
}
