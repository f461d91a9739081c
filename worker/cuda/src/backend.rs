//! `CudaBackend`: onevision-model's `Backend` trait on the GPU (feature `cuda`).
//!
//! Precision contract: activations produced here are BF16 (the CPU oracle's are F32); every op accepts
//! F32 or BF16 inputs (F32 is cast on the device first) and computes in fp32 inside the kernels, so
//! results match the CPU backend within bf16 tolerance. Gradients of weights (linear dW, RMSNorm dw,
//! embedding table, biases) are F32, for the fp32 master weights of the optimizer.
//! Tensors live in `CudaBuffer`s from the caching allocator; a clone of a device tensor aliases the same
//! memory (the only in-place op, `write_rows`, is used on the KV cache, which is never cloned).
//! Index arrays (token ids, permutations, cu_seqlens) arrive as host slices and are uploaded per call.

use std::any::Any;
use std::sync::Arc;

use half::bf16;
use onevision_model::{
    AttnMask, AttnSpec, Backend, DType, Device, DeviceBuffer, HostData, LinearGrads, ModelError, Result, Storage, Tensor,
};

use crate::blas::{Elem, Gemm, Lt};
use crate::error::CudaError;
use crate::gpu::{Args, DeviceMem, Gpu, Launch};

fn me(e: CudaError) -> ModelError {
    ModelError::Backend { backend: "cuda".into(), msg: e.to_string() }
}

fn shape_err<T>(op: &'static str, msg: String) -> Result<T> {
    Err(ModelError::Shape { op, msg })
}

#[derive(Debug)]
pub struct CudaBuffer {
    mem: DeviceMem,
    device: Device,
}

impl DeviceBuffer for CudaBuffer {
    fn device(&self) -> Device {
        self.device
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A device input in the dtype a kernel needs; `_keep` owns a converted copy while it is used.
struct In {
    ptr: u64,
    _keep: Option<Tensor>,
}

pub struct CudaBackend {
    gpu: Arc<Gpu>,
    lt: Lt,
    name: String,
}

fn grid1(n: usize, per_block: usize) -> u32 {
    n.div_ceil(per_block).max(1) as u32
}

fn ycap(n: usize) -> u32 {
    n.clamp(1, 65535) as u32
}

impl CudaBackend {
    /// Opens GPU `ordinal`; errors (NoDriver, no cuBLASLt) are actionable messages, never panics.
    pub fn new(ordinal: usize) -> std::result::Result<Self, CudaError> {
        let gpu = Gpu::new(ordinal)?;
        let lt = Lt::new(gpu.clone())?;
        let name = format!("cuda:{ordinal} ({})", gpu.arch().sm());
        Ok(CudaBackend { gpu, lt, name })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn dev(&self) -> Device {
        Device::Cuda(self.gpu.ordinal())
    }

    fn ptr(&self, t: &Tensor, op: &'static str) -> Result<u64> {
        match t.storage() {
            Storage::Device(b) => b
                .as_any()
                .downcast_ref::<CudaBuffer>()
                .map(|c| c.mem.ptr())
                .ok_or_else(|| ModelError::Device { op, backend: "cuda".into(), expected: self.dev(), found: t.device() }),
            Storage::Host(_) => Err(ModelError::Device { op, backend: "cuda".into(), expected: self.dev(), found: Device::Cpu }),
        }
    }

    fn empty(&self, shape: &[usize], dtype: DType) -> Result<(Tensor, u64)> {
        let n: usize = shape.iter().product();
        let mem = self.gpu.alloc(n * dtype.size_in_bytes()).map_err(me)?;
        let p = mem.ptr();
        Ok((Tensor::from_device(shape, dtype, Arc::new(CudaBuffer { mem, device: self.dev() })), p))
    }

    fn zeroed(&self, shape: &[usize], dtype: DType) -> Result<(Tensor, u64)> {
        let (t, p) = self.empty(shape, dtype)?;
        self.gpu.memset_zero(p, t.numel() * dtype.size_in_bytes()).map_err(me)?;
        Ok((t, p))
    }

    fn launch(&self, family: &'static str, name: &str, cfg: Launch, args: Args) -> Result<()> {
        self.gpu.launch(family, name, cfg, args).map_err(me)
    }

    fn as_dtype(&self, t: &Tensor, dtype: DType, op: &'static str) -> Result<In> {
        if t.dtype() == dtype {
            return Ok(In { ptr: self.ptr(t, op)?, _keep: None });
        }
        let c = self.cast(t, dtype)?;
        Ok(In { ptr: self.ptr(&c, op)?, _keep: Some(c) })
    }

    fn bf(&self, t: &Tensor, op: &'static str) -> Result<In> {
        self.as_dtype(t, DType::BF16, op)
    }

    fn upload_i32(&self, v: &[i32]) -> Result<DeviceMem> {
        if v.is_empty() {
            return self.gpu.alloc(4).map_err(me);
        }
        self.gpu.upload(v).map_err(me)
    }

    fn idx(&self, op: &'static str, idx: &[usize], bound: usize) -> Result<DeviceMem> {
        if let Some(bad) = idx.iter().find(|&&i| i >= bound) {
            return Err(ModelError::Invalid(format!("{op}: index {bad} out of range for {bound} rows")));
        }
        let v: Vec<i32> = idx.iter().map(|&i| i as i32).collect();
        self.upload_i32(&v)
    }

    fn gemm(&self, g: &Gemm, a: u64, b: u64, c: u64) -> Result<()> {
        self.lt.gemm(g, a, b, c).map_err(me)
    }

    #[allow(clippy::too_many_arguments)]
    fn copy2d(&self, dtype: DType, src: u64, src_ld: usize, dst: u64, dst_ld: usize, rows: usize, cols: usize) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let name = if dtype == DType::BF16 { "copy2d_u16" } else { "copy2d_u32" };
        let cfg = Launch { grid: (grid1(cols, 256), ycap(rows), 1), block: (256, 1, 1), smem: 0 };
        self.launch("tensor_ops", name, cfg, Args::new().ptr(src).i64(src_ld as i64).ptr(dst).i64(dst_ld as i64).i32(rows as i32).i64(cols as i64))
    }

    /// Forward attention; returns (out, lse, keep-alive metadata) for reuse by the backward.
    fn attn_fwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<(Tensor, Tensor, AttnMeta)> {
        let m = AttnMeta::new(self, q, k, v, spec)?;
        let (qi, ki, vi) = (self.bf(q, "attention")?, self.bf(k, "attention")?, self.bf(v, "attention")?);
        let (out, op) = self.zeroed(q.shape(), DType::BF16)?;
        let (lse, lp) = self.empty(&[m.hq, m.total_q], DType::F32)?;
        let d = m.d;
        let smem = (3 * 64 * (d + 8) * 2) as u32;
        let name = if d == 128 { "attn_fwd_hd128_bf16" } else { "attn_fwd_hd80_bf16" };
        let cfg = Launch { grid: (grid1(m.max_q, 64), m.hq as u32, m.n_seqs as u32), block: (128, 1, 1), smem };
        let args = Args::new()
            .ptr(qi.ptr).ptr(ki.ptr).ptr(vi.ptr).ptr(op).ptr(lp)
            .ptr(m.cu_q.ptr()).ptr(m.cu_k.ptr())
            .i32(m.total_q as i32).i32(m.hq as i32).i32(m.hkv as i32)
            .i64((m.hq * d) as i64).i64((m.hkv * d) as i64).i64((m.hkv * d) as i64).i64((m.hq * d) as i64)
            .f32(spec.scale).i32(m.causal as i32).i32(m.causal_offset as i32)
            .opt(m.k_start.as_ref().map(|b| b.ptr())).opt(m.k_lens.as_ref().map(|b| b.ptr()));
        self.launch("attention", name, cfg, args)?;
        Ok((out, lse, m))
    }
}

/// Sequence layout of one attention call, in the form the kernels take (cu_seqlens and friends).
struct AttnMeta {
    d: usize,
    hq: usize,
    hkv: usize,
    total_q: usize,
    n_seqs: usize,
    max_q: usize,
    max_k: usize,
    causal: bool,
    causal_offset: usize,
    cu_q: DeviceMem,
    cu_k: DeviceMem,
    k_start: Option<DeviceMem>,
    k_lens: Option<DeviceMem>,
}

impl AttnMeta {
    fn new(be: &CudaBackend, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<Self> {
        if q.rank() != 4 || k.rank() != 4 || k.shape() != v.shape() {
            return shape_err("attention", format!("q [B,T,Hq,D], k/v [B,S,Hkv,D] expected; got q {:?} k {:?} v {:?}", q.shape(), k.shape(), v.shape()));
        }
        let (b, t, hq, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
        let (s, hkv) = (k.dim(1), k.dim(2));
        if k.dim(0) != b || k.dim(3) != d || hkv == 0 || hq % hkv != 0 {
            return shape_err("attention", format!("q {:?} and k {:?} disagree (GQA needs Hq % Hkv == 0)", q.shape(), k.shape()));
        }
        if d != 128 && d != 80 {
            return Err(ModelError::Invalid(format!("attention: the CUDA kernels support head_dim 128 and 80, got {d}")));
        }
        if spec.kv_len > s {
            return shape_err("attention", format!("kv_len {} > key rows {s}", spec.kv_len));
        }
        match &spec.mask {
            AttnMask::Segments(cu) => {
                if b != 1 || t != s || cu.first() != Some(&0) || cu.last() != Some(&t) || cu.windows(2).any(|w| w[1] < w[0]) {
                    return shape_err("attention", format!("Segments needs batch 1, q and k of equal length and cu_seqlens 0..={t} ascending; got {cu:?}"));
                }
                let cu32: Vec<i32> = cu.iter().map(|&x| x as i32).collect();
                let max = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
                Ok(AttnMeta {
                    d, hq, hkv, total_q: t, n_seqs: cu.len().saturating_sub(1), max_q: max, max_k: max, causal: false, causal_offset: 0,
                    cu_q: be.upload_i32(&cu32)?, cu_k: be.upload_i32(&cu32)?, k_start: None, k_lens: None,
                })
            }
            AttnMask::Causal { q_offset, key_start } => {
                if !key_start.is_empty() && key_start.len() != b {
                    return shape_err("attention", format!("key_start has {} entries for batch {b}", key_start.len()));
                }
                let cu_q: Vec<i32> = (0..=b).map(|i| (i * t) as i32).collect();
                let cu_k: Vec<i32> = (0..=b).map(|i| (i * s) as i32).collect();
                let lens: Vec<i32> = vec![spec.kv_len as i32; b];
                let ks: Option<DeviceMem> = if key_start.is_empty() {
                    None
                } else {
                    Some(be.upload_i32(&key_start.iter().map(|&x| x as i32).collect::<Vec<_>>())?)
                };
                Ok(AttnMeta {
                    d, hq, hkv, total_q: b * t, n_seqs: b, max_q: t, max_k: spec.kv_len, causal: true, causal_offset: *q_offset,
                    cu_q: be.upload_i32(&cu_q)?, cu_k: be.upload_i32(&cu_k)?, k_start: ks, k_lens: Some(be.upload_i32(&lens)?),
                })
            }
        }
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn device(&self) -> Device {
        self.dev()
    }

    fn to_device(&self, t: &Tensor) -> Result<Tensor> {
        match t.storage() {
            Storage::Device(_) => {
                self.ptr(t, "to_device")?;
                Ok(t.clone())
            }
            Storage::Host(h) => {
                let mem = match &h.data {
                    HostData::F32(v) => self.gpu.upload(v).map_err(me)?,
                    HostData::BF16(v) => self.gpu.upload(v).map_err(me)?,
                };
                Ok(Tensor::from_device(t.shape(), t.dtype(), Arc::new(CudaBuffer { mem, device: self.dev() })))
            }
        }
    }

    fn to_host(&self, t: &Tensor) -> Result<Tensor> {
        if let Storage::Host(_) = t.storage() {
            return Ok(t.clone());
        }
        let p = self.ptr(t, "to_host")?;
        match t.dtype() {
            DType::F32 => Tensor::from_f32(t.shape(), self.gpu.download::<f32>(p, t.numel()).map_err(me)?),
            DType::BF16 => Tensor::from_bf16(t.shape(), self.gpu.download::<bf16>(p, t.numel()).map_err(me)?),
        }
    }

    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        if x.dtype() == dtype {
            return Ok(x.clone());
        }
        if let Storage::Host(_) = x.storage() {
            return x.to_dtype(dtype);
        }
        let src = self.ptr(x, "cast")?;
        let (out, dst) = self.empty(x.shape(), dtype)?;
        let n = x.numel();
        let name = if dtype == DType::BF16 { "cast_f32_to_bf16" } else { "cast_bf16_to_f32" };
        self.launch("cast", name, Launch::linear(n.div_ceil(8), 256), Args::new().ptr(src).ptr(dst).i64(n as i64))?;
        Ok(out)
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(self.zeroed(shape, DType::F32)?.0)
    }

    fn write_rows(&self, dst: &mut Tensor, offset: usize, src: &Tensor) -> Result<()> {
        if dst.rank() < 2 || src.rank() != dst.rank() || src.dim(0) != dst.dim(0) || src.shape()[2..] != dst.shape()[2..] || offset + src.dim(1) > dst.dim(1) {
            return shape_err("write_rows", format!("cannot write {:?} into {:?} at offset {offset}", src.shape(), dst.shape()));
        }
        let inner: usize = dst.shape()[2..].iter().product();
        let (b, s, t) = (dst.dim(0), dst.dim(1), src.dim(1));
        let si = self.as_dtype(src, dst.dtype(), "write_rows")?;
        let dp = self.ptr(dst, "write_rows")? + (offset * inner * dst.dtype().size_in_bytes()) as u64;
        self.copy2d(dst.dtype(), si.ptr, t * inner, dp, s * inner, b, t * inner)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        if w.rank() != 2 || x.last_dim() != w.dim(1) || b.is_some_and(|b| b.numel() != w.dim(0)) {
            return shape_err("linear", format!("x {:?}, w {:?}, b {:?}", x.shape(), w.shape(), b.map(|b| b.shape().to_vec())));
        }
        let (m, n, k) = (x.rows(), w.dim(0), w.dim(1));
        let (xi, wi) = (self.bf(x, "linear")?, self.bf(w, "linear")?);
        let bi = match b {
            Some(b) => Some(self.bf(b, "linear")?),
            None => None,
        };
        let mut shape = x.shape().to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = n;
        let (y, yp) = self.empty(&shape, DType::BF16)?;
        self.gemm(&Gemm::linear(m, n, k, Elem::BF16, Elem::BF16, bi.as_ref().map(|b| b.ptr)), xi.ptr, wi.ptr, yp)?;
        Ok(y)
    }

    fn linear_backward(&self, dy: &Tensor, x: &Tensor, w: &Tensor, has_bias: bool) -> Result<LinearGrads> {
        let (m, n, k) = (x.rows(), w.dim(0), w.dim(1));
        if dy.rows() != m || dy.last_dim() != n || x.last_dim() != k {
            return shape_err("linear_backward", format!("dy {:?}, x {:?}, w {:?}", dy.shape(), x.shape(), w.shape()));
        }
        let (dyi, xi, wi) = (self.bf(dy, "linear_backward")?, self.bf(x, "linear_backward")?, self.bf(w, "linear_backward")?);
        let (dx, dxp) = self.empty(x.shape(), DType::BF16)?;
        // dx[M,K] = dy[M,N] W[N,K]
        let g = Gemm { m, n: k, k: n, trans_a: false, trans_b: false, ab_type: Elem::BF16, c_type: Elem::BF16, alpha: 1.0, beta: 0.0, bias: None, batch: None };
        self.gemm(&g, dyi.ptr, wi.ptr, dxp)?;
        // dW[N,K] = dy^T[N,M] x[M,K], fp32 for the master weights.
        let (dw, dwp) = self.empty(w.shape(), DType::F32)?;
        let g = Gemm { m: n, n: k, k: m, trans_a: true, trans_b: false, ab_type: Elem::BF16, c_type: Elem::F32, alpha: 1.0, beta: 0.0, bias: None, batch: None };
        self.gemm(&g, dyi.ptr, xi.ptr, dwp)?;
        let db = if has_bias {
            let splits = m.div_ceil(256).clamp(1, 128);
            let (part, pp) = self.empty(&[splits, n], DType::F32)?;
            let cfg = Launch { grid: (grid1(n, 32), splits as u32, 1), block: (32, 8, 1), smem: 0 };
            self.launch("bias", "bias_grad_partial_bf16", cfg, Args::new().ptr(dyi.ptr).ptr(pp).i32(m as i32).i32(n as i32))?;
            let (db, dbp) = self.empty(&[n], DType::F32)?;
            self.launch("bias", "reduce_partials_f32", Launch::linear(n, 256), Args::new().ptr(pp).ptr(dbp).i32(splits as i32).i32(n as i32).i32(0))?;
            drop(part);
            Some(db)
        } else {
            None
        };
        Ok(LinearGrads { dx, dw, db })
    }

    fn matmul(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        let (batch, shared, m, k, n) = matmul_dims(a, b, trans_a, trans_b)?;
        let (ai, bi) = (self.bf(a, "matmul")?, self.bf(b, "matmul")?);
        let mut shape = a.shape()[..a.rank() - 2].to_vec();
        shape.extend([m, n]);
        let (y, yp) = self.empty(&shape, DType::BF16)?;
        let sb = if shared { 0 } else { (k * n) as i64 };
        let g = Gemm { m, n, k, trans_a, trans_b, ab_type: Elem::BF16, c_type: Elem::BF16, alpha: 1.0, beta: 0.0, bias: None, batch: Some((batch, (m * k) as i64, sb, (m * n) as i64)) };
        self.gemm(&g, ai.ptr, bi.ptr, yp)?;
        Ok(y)
    }

    fn matmul_backward(&self, dy: &Tensor, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<(Tensor, Tensor)> {
        let (batch, shared, m, k, n) = matmul_dims(a, b, trans_a, trans_b)?;
        if dy.numel() != batch * m * n {
            return shape_err("matmul_backward", format!("dy {:?} for output [{batch}, {m}, {n}]", dy.shape()));
        }
        let (dyi, ai, bi) = (self.bf(dy, "matmul_backward")?, self.bf(a, "matmul_backward")?, self.bf(b, "matmul_backward")?);
        let sb = if shared { 0 } else { (k * n) as i64 };
        let (da, dap) = self.empty(a.shape(), DType::BF16)?;
        // dA = dy op(B)^T (A untransposed) or its transpose.
        let g = if !trans_a {
            Gemm { m, n: k, k: n, trans_a: false, trans_b: !trans_b, ab_type: Elem::BF16, c_type: Elem::BF16, alpha: 1.0, beta: 0.0, bias: None, batch: Some((batch, (m * n) as i64, sb, (m * k) as i64)) }
        } else {
            Gemm { m: k, n: m, k: n, trans_a: trans_b, trans_b: true, ab_type: Elem::BF16, c_type: Elem::BF16, alpha: 1.0, beta: 0.0, bias: None, batch: Some((batch, sb, (m * n) as i64, (m * k) as i64)) }
        };
        if !trans_a {
            self.gemm(&g, dyi.ptr, bi.ptr, dap)?;
        } else {
            self.gemm(&g, bi.ptr, dyi.ptr, dap)?;
        }
        // dB: per batch op(A)^T dy (or dy^T op(A)); a shared B sums over the batch (beta = 1).
        let (db, dbp) = self.zeroed(b.shape(), if shared { DType::F32 } else { DType::BF16 })?;
        let c_type = if shared { Elem::F32 } else { Elem::BF16 };
        let (sa, sd) = ((m * k) as i64, (m * n) as i64);
        let reps = if shared { batch } else { 1 };
        for r in 0..reps {
            let (aoff, doff) = if shared { ((r as i64 * sa * 2) as u64, (r as i64 * sd * 2) as u64) } else { (0, 0) };
            let bat = if shared { None } else { Some((batch, 0i64, 0i64, sb)) };
            let beta = if shared { 1.0 } else { 0.0 };
            if !trans_b {
                let mut g = Gemm { m: k, n, k: m, trans_a: !trans_a, trans_b: false, ab_type: Elem::BF16, c_type, alpha: 1.0, beta, bias: None, batch: None };
                g.batch = bat.map(|(c, _, _, s)| (c, sa, sd, s));
                self.gemm(&g, ai.ptr + aoff, dyi.ptr + doff, dbp)?;
            } else {
                let mut g = Gemm { m: n, n: k, k: m, trans_a: true, trans_b: trans_a, ab_type: Elem::BF16, c_type, alpha: 1.0, beta, bias: None, batch: None };
                g.batch = bat.map(|(c, _, _, s)| (c, sd, sa, s));
                self.gemm(&g, dyi.ptr + doff, ai.ptr + aoff, dbp)?;
            }
        }
        Ok((da, db))
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if a.shape() != b.shape() {
            return shape_err("add", format!("{:?} vs {:?}", a.shape(), b.shape()));
        }
        let (ai, bi) = (self.bf(a, "add")?, self.bf(b, "add")?);
        let (y, yp) = self.empty(a.shape(), DType::BF16)?;
        let n = a.numel();
        self.launch("tensor_ops", "add_bf16", Launch::linear(n, 256), Args::new().ptr(ai.ptr).ptr(bi.ptr).ptr(yp).i64(n as i64))?;
        Ok(y)
    }

    fn add_assign(&self, a: &mut Tensor, b: &Tensor) -> Result<()> {
        if a.shape() != b.shape() {
            return shape_err("add_assign", format!("{:?} vs {:?}", a.shape(), b.shape()));
        }
        let ap = self.ptr(a, "add_assign")?;
        let n = a.numel();
        match a.dtype() {
            DType::F32 => {
                let bp = self.ptr(b, "add_assign")?;
                let is_bf = (b.dtype() == DType::BF16) as i32;
                self.launch("tensor_ops", "add_assign_f32", Launch::linear(n, 256), Args::new().ptr(ap).ptr(bp).i32(is_bf).i64(n as i64))
            }
            DType::BF16 => {
                let bi = self.bf(b, "add_assign")?;
                self.launch("tensor_ops", "add_assign_bf16", Launch::linear(n, 256), Args::new().ptr(ap).ptr(bi.ptr).i64(n as i64))
            }
        }
    }

    fn scale(&self, x: &Tensor, s: f32) -> Result<Tensor> {
        let xi = self.bf(x, "scale")?;
        let (y, yp) = self.empty(x.shape(), DType::BF16)?;
        let n = x.numel();
        self.launch("tensor_ops", "scale_bf16", Launch::linear(n, 256), Args::new().ptr(xi.ptr).ptr(yp).f32(s).i64(n as i64))?;
        Ok(y)
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if gate.shape() != up.shape() {
            return shape_err("swiglu", format!("{:?} vs {:?}", gate.shape(), up.shape()));
        }
        let (gi, ui) = (self.bf(gate, "swiglu")?, self.bf(up, "swiglu")?);
        let (y, yp) = self.empty(gate.shape(), DType::BF16)?;
        let (rows, cols) = (gate.rows(), gate.last_dim());
        let cfg = Launch { grid: (rows.max(1) as u32, grid1(cols, 8 * 128), 1), block: (128, 1, 1), smem: 0 };
        let c = cols as i64;
        self.launch("swiglu", "swiglu_fwd_bf16", cfg, Args::new().ptr(gi.ptr).ptr(ui.ptr).ptr(yp).i32(rows as i32).i32(cols as i32).i64(c).i64(c).i64(c))?;
        Ok(y)
    }

    fn swiglu_backward(&self, dy: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
        if gate.shape() != up.shape() || dy.shape() != up.shape() {
            return shape_err("swiglu_backward", format!("dy {:?} gate {:?} up {:?}", dy.shape(), gate.shape(), up.shape()));
        }
        let (di, gi, ui) = (self.bf(dy, "swiglu_backward")?, self.bf(gate, "swiglu_backward")?, self.bf(up, "swiglu_backward")?);
        let (dg, dgp) = self.empty(gate.shape(), DType::BF16)?;
        let (du, dup) = self.empty(gate.shape(), DType::BF16)?;
        let (rows, cols) = (gate.rows(), gate.last_dim());
        let cfg = Launch { grid: (rows.max(1) as u32, grid1(cols, 8 * 128), 1), block: (128, 1, 1), smem: 0 };
        let c = cols as i64;
        let args = Args::new().ptr(gi.ptr).ptr(ui.ptr).ptr(di.ptr).ptr(dgp).ptr(dup).i32(rows as i32).i32(cols as i32).i64(c).i64(c).i64(c).i64(c).i64(c);
        self.launch("swiglu", "swiglu_bwd_bf16", cfg, args)?;
        Ok((dg, du))
    }

    fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        let xi = self.bf(x, "gelu")?;
        let (y, yp) = self.empty(x.shape(), DType::BF16)?;
        let (rows, cols) = (x.rows(), x.last_dim());
        self.launch("gelu", "gelu_fwd_bf16", Launch::linear(x.numel().div_ceil(8), 256), Args::new().ptr(xi.ptr).null().ptr(yp).i32(rows as i32).i32(cols as i32))?;
        Ok(y)
    }

    fn gelu_backward(&self, dy: &Tensor, x: &Tensor) -> Result<Tensor> {
        if dy.shape() != x.shape() {
            return shape_err("gelu_backward", format!("{:?} vs {:?}", dy.shape(), x.shape()));
        }
        let (di, xi) = (self.bf(dy, "gelu_backward")?, self.bf(x, "gelu_backward")?);
        let (dx, dxp) = self.empty(x.shape(), DType::BF16)?;
        let (rows, cols) = (x.rows(), x.last_dim());
        self.launch("gelu", "gelu_bwd_bf16", Launch::linear(x.numel().div_ceil(8), 256), Args::new().ptr(xi.ptr).null().ptr(di.ptr).ptr(dxp).i32(rows as i32).i32(cols as i32))?;
        Ok(dx)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        if w.numel() != x.last_dim() {
            return shape_err("rms_norm", format!("x {:?}, w {:?}", x.shape(), w.shape()));
        }
        let (xi, wi) = (self.bf(x, "rms_norm")?, self.bf(w, "rms_norm")?);
        let (y, yp) = self.empty(x.shape(), DType::BF16)?;
        let (rows, cols) = (x.rows(), x.last_dim());
        let cfg = Launch { grid: (rows.max(1) as u32, 1, 1), block: (256, 1, 1), smem: 0 };
        self.launch("rmsnorm", "rmsnorm_fwd_bf16", cfg, Args::new().ptr(xi.ptr).null().ptr(wi.ptr).ptr(yp).null().null().i32(rows as i32).i32(cols as i32).f32(eps))?;
        Ok(y)
    }

    fn rms_norm_backward(&self, dy: &Tensor, x: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        if w.numel() != x.last_dim() || dy.shape() != x.shape() {
            return shape_err("rms_norm_backward", format!("dy {:?}, x {:?}, w {:?}", dy.shape(), x.shape(), w.shape()));
        }
        let (di, xi, wi) = (self.bf(dy, "rms_norm_backward")?, self.bf(x, "rms_norm_backward")?, self.bf(w, "rms_norm_backward")?);
        let (rows, cols) = (x.rows(), x.last_dim());
        // Recompute rstd (the trait passes forward inputs, not saved statistics).
        let (_y, yp) = self.empty(x.shape(), DType::BF16)?;
        let (_rstd, rp) = self.empty(&[rows.max(1)], DType::F32)?;
        let cfg = Launch { grid: (rows.max(1) as u32, 1, 1), block: (256, 1, 1), smem: 0 };
        self.launch("rmsnorm", "rmsnorm_fwd_bf16", cfg, Args::new().ptr(xi.ptr).null().ptr(wi.ptr).ptr(yp).null().ptr(rp).i32(rows as i32).i32(cols as i32).f32(eps))?;
        let blocks = rows.clamp(1, 2 * self.gpu.sm_count() as usize);
        let (dx, dxp) = self.empty(x.shape(), DType::BF16)?;
        let (_part, pp) = self.empty(&[blocks, cols], DType::F32)?;
        let cfg = Launch { grid: (blocks as u32, 1, 1), block: (256, 1, 1), smem: (cols * 4) as u32 };
        self.launch("rmsnorm", "rmsnorm_bwd_bf16", cfg, Args::new().ptr(xi.ptr).ptr(wi.ptr).ptr(di.ptr).ptr(rp).null().ptr(dxp).ptr(pp).i32(rows as i32).i32(cols as i32))?;
        let (dw, dwp) = self.empty(w.shape(), DType::F32)?;
        self.launch("bias", "reduce_partials_f32", Launch::linear(cols, 256), Args::new().ptr(pp).ptr(dwp).i32(blocks as i32).i32(cols as i32).i32(0))?;
        Ok((dx, dw))
    }

    fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        let xi = self.bf(x, "softmax")?;
        let (y, yp) = self.empty(x.shape(), DType::BF16)?;
        let (rows, cols) = (x.rows(), x.last_dim());
        let cfg = Launch { grid: (rows.max(1) as u32, 1, 1), block: (256, 1, 1), smem: 0 };
        self.launch("tensor_ops", "softmax_rows_bf16", cfg, Args::new().ptr(xi.ptr).ptr(yp).i32(rows as i32).i32(cols as i32))?;
        Ok(y)
    }

    fn softmax_backward(&self, dy: &Tensor, y: &Tensor) -> Result<Tensor> {
        if dy.shape() != y.shape() {
            return shape_err("softmax_backward", format!("{:?} vs {:?}", dy.shape(), y.shape()));
        }
        let (di, yi) = (self.bf(dy, "softmax_backward")?, self.bf(y, "softmax_backward")?);
        let (dx, dxp) = self.empty(y.shape(), DType::BF16)?;
        let (rows, cols) = (y.rows(), y.last_dim());
        let cfg = Launch { grid: (rows.max(1) as u32, 1, 1), block: (256, 1, 1), smem: 0 };
        self.launch("tensor_ops", "softmax_bwd_rows_bf16", cfg, Args::new().ptr(di.ptr).ptr(yi.ptr).ptr(dxp).i32(rows as i32).i32(cols as i32))?;
        Ok(dx)
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        self.rope_impl("rope", x, cos, sin, 1.0)
    }

    fn rope_backward(&self, dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        self.rope_impl("rope_backward", dy, cos, sin, -1.0)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<Tensor> {
        if let Some(out) = self.try_decode_attention(q, k, v, spec)? {
            return Ok(out);
        }
        Ok(self.attn_fwd(q, k, v, spec)?.0)
    }

    fn attention_backward(&self, dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<(Tensor, Tensor, Tensor)> {
        if dout.shape() != q.shape() {
            return shape_err("attention_backward", format!("dout {:?} vs q {:?}", dout.shape(), q.shape()));
        }
        // Recompute O and lse (activation recomputation: nothing from the forward is kept).
        let (out, lse, m) = self.attn_fwd(q, k, v, spec)?;
        let (qi, ki, vi, di) = (self.bf(q, "attention_backward")?, self.bf(k, "attention_backward")?, self.bf(v, "attention_backward")?, self.bf(dout, "attention_backward")?);
        let (op, lp) = (self.ptr(&out, "attention_backward")?, self.ptr(&lse, "attention_backward")?);
        let d = m.d;
        let (_dd, ddp) = self.empty(&[m.hq, m.total_q], DType::F32)?;
        let warps = m.total_q * m.hq;
        self.launch("attention", "attn_bwd_preprocess_bf16", Launch::linear(warps * 32, 128), Args::new().ptr(op).ptr(di.ptr).ptr(ddp).i32(m.total_q as i32).i32(m.hq as i32).i32(d as i32).i64((m.hq * d) as i64).i64((m.hq * d) as i64))?;
        let (_dqa, dqap) = self.zeroed(&[m.total_q, m.hq, d], DType::F32)?;
        let (dk, dkp) = self.zeroed(k.shape(), DType::BF16)?;
        let (dv, dvp) = self.zeroed(v.shape(), DType::BF16)?;
        let smem = ((4 * 64 * (d + 8) + 64 * 72) * 2 + 2 * 64 * 4) as u32;
        let name = if d == 128 { "attn_bwd_hd128_bf16" } else { "attn_bwd_hd80_bf16" };
        let cfg = Launch { grid: (grid1(m.max_k, 64), m.hkv as u32, m.n_seqs as u32), block: (128, 1, 1), smem };
        let (qs, ks) = ((m.hq * d) as i64, (m.hkv * d) as i64);
        let args = Args::new()
            .ptr(qi.ptr).ptr(ki.ptr).ptr(vi.ptr).ptr(di.ptr).ptr(lp).ptr(ddp).ptr(dqap).ptr(dkp).ptr(dvp)
            .ptr(m.cu_q.ptr()).ptr(m.cu_k.ptr()).i32(m.total_q as i32).i32(m.hq as i32).i32(m.hkv as i32)
            .i64(qs).i64(ks).i64(ks).i64(qs).i64(ks).i64(ks)
            .f32(spec.scale).i32(m.causal as i32).i32(m.causal_offset as i32)
            .opt(m.k_start.as_ref().map(|b| b.ptr())).opt(m.k_lens.as_ref().map(|b| b.ptr()));
        self.launch("attention", name, cfg, args)?;
        let (dq, dqp) = self.empty(q.shape(), DType::BF16)?;
        let n = m.total_q * m.hq * d;
        self.launch("attention", "attn_bwd_dq_convert_bf16", Launch::linear(n, 256), Args::new().ptr(dqap).ptr(dqp).i32(m.total_q as i32).i32(m.hq as i32).i32(d as i32).i64(qs))?;
        Ok((dq, dk, dv))
    }

    fn embedding(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        if table.rank() != 2 {
            return shape_err("embedding", format!("table must be [V, H], got {:?}", table.shape()));
        }
        let (v, h) = (table.dim(0), table.dim(1));
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
            return Err(ModelError::Invalid(format!("token id {bad} is outside the vocabulary of {v} embeddings")));
        }
        let ti = self.bf(table, "embedding")?;
        let idm = self.upload_i32(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>())?;
        let flag = self.gpu.alloc_zeroed(4).map_err(me)?;
        let (y, yp) = self.empty(&[ids.len(), h], DType::BF16)?;
        if !ids.is_empty() {
            let cfg = Launch { grid: (ids.len() as u32, 1, 1), block: (128, 1, 1), smem: 0 };
            self.launch("embedding", "embedding_fwd_bf16", cfg, Args::new().ptr(idm.ptr()).ptr(ti.ptr).ptr(yp).i32(ids.len() as i32).i32(h as i32).i32(v as i32).ptr(flag.ptr()))?;
        }
        Ok(y)
    }

    fn embedding_backward(&self, dy: &Tensor, ids: &[u32], vocab: usize) -> Result<Tensor> {
        let h = dy.last_dim();
        if dy.rows() != ids.len() {
            return shape_err("embedding_backward", format!("dy {:?} for {} ids", dy.shape(), ids.len()));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(ModelError::Invalid(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let di = self.bf(dy, "embedding_backward")?;
        let idm = self.upload_i32(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>())?;
        let (dt, dtp) = self.zeroed(&[vocab, h], DType::F32)?;
        if !ids.is_empty() {
            let cfg = Launch { grid: (ids.len() as u32, 1, 1), block: (128, 1, 1), smem: 0 };
            self.launch("embedding", "embedding_bwd_f32", cfg, Args::new().ptr(idm.ptr()).ptr(di.ptr).ptr(dtp).i32(ids.len() as i32).i32(h as i32).i32(vocab as i32))?;
        }
        Ok(dt)
    }

    fn gather_rows(&self, x: &Tensor, idx: &[usize]) -> Result<Tensor> {
        if x.rank() < 1 {
            return shape_err("gather_rows", "x must have rank >= 1".into());
        }
        let n = x.dim(0);
        let row = x.numel().checked_div(n).unwrap_or(0);
        let im = self.idx("gather_rows", idx, n)?;
        let mut shape = x.shape().to_vec();
        shape[0] = idx.len();
        let (y, yp) = self.empty(&shape, x.dtype())?;
        if !idx.is_empty() && row > 0 {
            let name = if x.dtype() == DType::BF16 { "gather_rows_u16" } else { "gather_rows_u32" };
            let cfg = Launch { grid: (grid1(row, 256), ycap(idx.len()), 1), block: (256, 1, 1), smem: 0 };
            self.launch("tensor_ops", name, cfg, Args::new().ptr(self.ptr(x, "gather_rows")?).ptr(im.ptr()).ptr(yp).i32(idx.len() as i32).i64(row as i64))?;
        }
        Ok(y)
    }

    fn gather_rows_backward(&self, dy: &Tensor, idx: &[usize], n_rows: usize) -> Result<Tensor> {
        if dy.rank() < 1 || dy.dim(0) != idx.len() {
            return shape_err("gather_rows_backward", format!("dy {:?} for {} indices", dy.shape(), idx.len()));
        }
        let row = if idx.is_empty() { 0 } else { dy.numel() / idx.len() };
        let im = self.idx("gather_rows_backward", idx, n_rows)?;
        let di = self.bf(dy, "gather_rows_backward")?;
        let mut shape = dy.shape().to_vec();
        shape[0] = n_rows;
        let (dx, dxp) = self.zeroed(&shape, DType::F32)?;
        if !idx.is_empty() && row > 0 {
            let cfg = Launch { grid: (grid1(row, 256), ycap(idx.len()), 1), block: (256, 1, 1), smem: 0 };
            self.launch("tensor_ops", "gather_rows_bwd_bf16", cfg, Args::new().ptr(di.ptr).ptr(im.ptr()).ptr(dxp).i32(idx.len() as i32).i64(row as i64))?;
        }
        Ok(dx)
    }

    fn scatter_rows(&self, x: &Tensor, rows: &[usize], src: &Tensor) -> Result<Tensor> {
        if x.rank() < 1 || src.rank() != x.rank() || src.dim(0) != rows.len() || src.shape()[1..] != x.shape()[1..] {
            return shape_err("scatter_rows", format!("x {:?}, src {:?}, {} rows", x.shape(), src.shape(), rows.len()));
        }
        let n = x.dim(0);
        let row = x.numel().checked_div(n).unwrap_or(0);
        let im = self.idx("scatter_rows", rows, n)?;
        let si = self.as_dtype(src, x.dtype(), "scatter_rows")?;
        let (y, yp) = self.empty(x.shape(), x.dtype())?;
        self.gpu.copy(yp, self.ptr(x, "scatter_rows")?, x.numel() * x.dtype().size_in_bytes()).map_err(me)?;
        if !rows.is_empty() && row > 0 {
            let name = if x.dtype() == DType::BF16 { "scatter_rows_u16" } else { "scatter_rows_u32" };
            let cfg = Launch { grid: (grid1(row, 256), ycap(rows.len()), 1), block: (256, 1, 1), smem: 0 };
            self.launch("tensor_ops", name, cfg, Args::new().ptr(si.ptr).ptr(im.ptr()).ptr(yp).i32(rows.len() as i32).i64(row as i64))?;
        }
        Ok(y)
    }

    fn scatter_rows_backward(&self, dy: &Tensor, rows: &[usize]) -> Result<(Tensor, Tensor)> {
        if dy.rank() < 1 {
            return shape_err("scatter_rows_backward", "dy must have rank >= 1".into());
        }
        let n = dy.dim(0);
        let row = dy.numel().checked_div(n).unwrap_or(0);
        let im = self.idx("scatter_rows_backward", rows, n)?;
        let di = self.bf(dy, "scatter_rows_backward")?;
        let (dx, dxp) = self.empty(dy.shape(), DType::BF16)?;
        self.gpu.copy(dxp, di.ptr, dy.numel() * 2).map_err(me)?;
        if !rows.is_empty() && row > 0 {
            let cfg = Launch { grid: (grid1(row, 256), ycap(rows.len()), 1), block: (256, 1, 1), smem: 0 };
            self.launch("tensor_ops", "zero_rows_u16", cfg, Args::new().ptr(dxp).ptr(im.ptr()).i32(rows.len() as i32).i64(row as i64))?;
        }
        let dsrc = self.gather_rows(&dy.clone(), rows)?;
        Ok((dx, dsrc))
    }

    fn split_last(&self, x: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>> {
        let last = x.last_dim();
        if sizes.iter().sum::<usize>() != last {
            return shape_err("split_last", format!("sizes {sizes:?} do not sum to {last}"));
        }
        let rows = x.rows();
        let es = x.dtype().size_in_bytes();
        let xp = self.ptr(x, "split_last")?;
        let mut out = Vec::with_capacity(sizes.len());
        let mut off = 0;
        for &s in sizes {
            let mut shape = x.shape().to_vec();
            *shape.last_mut().unwrap_or(&mut 0) = s;
            let (t, tp) = self.empty(&shape, x.dtype())?;
            self.copy2d(x.dtype(), xp + (off * es) as u64, last, tp, s, rows, s)?;
            off += s;
            out.push(t);
        }
        Ok(out)
    }

    fn concat_last(&self, xs: &[&Tensor]) -> Result<Tensor> {
        let first = xs.first().ok_or_else(|| ModelError::Invalid("concat_last of nothing".into()))?;
        let rows = first.rows();
        let lead = &first.shape()[..first.rank().saturating_sub(1)];
        if xs.iter().any(|t| &t.shape()[..t.rank().saturating_sub(1)] != lead) {
            return shape_err("concat_last", format!("leading dims differ: {:?}", xs.iter().map(|t| t.shape().to_vec()).collect::<Vec<_>>()));
        }
        let dtype = if xs.iter().all(|t| t.dtype() == DType::F32) { DType::F32 } else { DType::BF16 };
        let total: usize = xs.iter().map(|t| t.last_dim()).sum();
        let mut shape = lead.to_vec();
        shape.push(total);
        let (y, yp) = self.empty(&shape, dtype)?;
        let es = dtype.size_in_bytes();
        let mut off = 0;
        for t in xs {
            let ti = self.as_dtype(t, dtype, "concat_last")?;
            let w = t.last_dim();
            self.copy2d(dtype, ti.ptr, w, yp + (off * es) as u64, total, rows, w)?;
            off += w;
        }
        Ok(y)
    }
}

impl CudaBackend {
    /// Residual add fused into RMSNorm, one pass (`rmsnorm_fwd_bf16` with `residual`/`h_out`, a path
    /// the `Backend` trait has no op for): h = x + residual, y = rms_norm(h, w). Returns (y, h), BF16.
    /// Used by `onevision bench elementwise` to measure the fused kernel against copy bandwidth.
    pub fn rms_norm_residual(&self, x: &Tensor, residual: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        if w.numel() != x.last_dim() || residual.shape() != x.shape() {
            return shape_err("rms_norm_residual", format!("x {:?}, residual {:?}, w {:?}", x.shape(), residual.shape(), w.shape()));
        }
        let (xi, ri, wi) = (self.bf(x, "rms_norm_residual")?, self.bf(residual, "rms_norm_residual")?, self.bf(w, "rms_norm_residual")?);
        let (y, yp) = self.empty(x.shape(), DType::BF16)?;
        let (h, hp) = self.empty(x.shape(), DType::BF16)?;
        let (rows, cols) = (x.rows(), x.last_dim());
        let cfg = Launch { grid: (rows.max(1) as u32, 1, 1), block: (256, 1, 1), smem: 0 };
        self.launch("rmsnorm", "rmsnorm_fwd_bf16", cfg, Args::new().ptr(xi.ptr).ptr(ri.ptr).ptr(wi.ptr).ptr(yp).ptr(hp).null().i32(rows as i32).i32(cols as i32).f32(eps))?;
        Ok((y, h))
    }

    /// One query token per sequence over a KV cache (generation): the split-K decode kernel, which reads
    /// each K/V row once per kv-head group. None when the shapes are not the decode case.
    fn try_decode_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<Option<Tensor>> {
        let AttnMask::Causal { q_offset, key_start } = &spec.mask else { return Ok(None) };
        if q.rank() != 4 || k.rank() != 4 || k.shape() != v.shape() || q.dim(1) != 1 || q.dim(3) != 128 || k.dim(3) != 128 || k.dim(0) != q.dim(0) {
            return Ok(None);
        }
        let (b, hq, s, hkv) = (q.dim(0), q.dim(2), k.dim(1), k.dim(2));
        if hkv == 0 || hq % hkv != 0 || hq / hkv > 8 || spec.kv_len > s || (!key_start.is_empty() && key_start.len() != b) {
            return Ok(None);
        }
        let len = (q_offset + 1).min(spec.kv_len);
        let lens = self.upload_i32(&vec![len as i32; b])?;
        let ks = if key_start.is_empty() { None } else { Some(self.upload_i32(&key_start.iter().map(|&x| x as i32).collect::<Vec<_>>())?) };
        let splits = len.div_ceil(512).clamp(1, 16);
        let (qi, ki, vi) = (self.bf(q, "attention")?, self.bf(k, "attention")?, self.bf(v, "attention")?);
        let (_po, pop) = self.empty(&[b, hq, splits, 128], DType::F32)?;
        let (_pml, pmlp) = self.empty(&[b, hq, splits, 2], DType::F32)?;
        let cfg = Launch { grid: (splits as u32, hkv as u32, b as u32), block: (128, 1, 1), smem: 0 };
        let args = Args::new().ptr(qi.ptr).ptr(ki.ptr).ptr(vi.ptr).ptr(lens.ptr()).opt(ks.as_ref().map(|m| m.ptr())).ptr(pop).ptr(pmlp)
            .i32(hq as i32).i32(hkv as i32).i32(s as i32).f32(spec.scale);
        self.launch("decode_attention", "decode_attn_split_hd128_bf16", cfg, args)?;
        let (out, op) = self.empty(q.shape(), DType::BF16)?;
        let cfg = Launch { grid: (hq as u32, b as u32, 1), block: (128, 1, 1), smem: 0 };
        self.launch("decode_attention", "decode_attn_combine_hd128_bf16", cfg, Args::new().ptr(pop).ptr(pmlp).ptr(op).i32(hq as i32).i32(splits as i32))?;
        Ok(Some(out))
    }

    fn rope_impl(&self, op: &'static str, x: &Tensor, cos: &Tensor, sin: &Tensor, sign: f32) -> Result<Tensor> {
        if x.rank() < 2 {
            return shape_err(op, format!("x must be [.., H, D], got {:?}", x.shape()));
        }
        let d = x.last_dim();
        let h = x.dim(x.rank() - 2);
        let rows = x.numel().checked_div(h * d).unwrap_or(0);
        if d & 1 == 1 || d / 2 > 1024 || cos.shape() != [rows, d] || sin.shape() != [rows, d] {
            return shape_err(op, format!("x {:?} needs even head_dim and cos/sin [{rows}, {d}]; got cos {:?} sin {:?}", x.shape(), cos.shape(), sin.shape()));
        }
        let xi = self.bf(x, op)?;
        let (ci, si) = (self.as_dtype(cos, DType::F32, op)?, self.as_dtype(sin, DType::F32, op)?);
        let (y, yp) = self.empty(x.shape(), DType::BF16)?;
        self.gpu.copy(yp, xi.ptr, x.numel() * 2).map_err(me)?;
        if rows > 0 {
            let hpb = (1024 / (d / 2)).clamp(1, 8).min(h);
            let cfg = Launch { grid: (rows as u32, grid1(h, hpb), 1), block: ((d / 2) as u32, hpb as u32, 1), smem: 0 };
            let args = Args::new().ptr(yp).ptr(ci.ptr).ptr(si.ptr).i32(rows as i32).i32(h as i32).i32(d as i32).i64((h * d) as i64).i32(d as i32).f32(sign);
            self.launch("rope", "rope_apply_bf16", cfg, args)?;
        }
        Ok(y)
    }
}

/// (batch, b shared across batch, m, k, n), as the CPU backend defines matmul.
fn matmul_dims(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<(usize, bool, usize, usize, usize)> {
    if a.rank() < 2 || b.rank() < 2 {
        return shape_err("matmul", format!("a {:?} and b {:?} need rank >= 2", a.shape(), b.shape()));
    }
    let (ar, br) = (a.rank(), b.rank());
    let (m, k) = if ta { (a.dim(ar - 1), a.dim(ar - 2)) } else { (a.dim(ar - 2), a.dim(ar - 1)) };
    let (kb, n) = if tb { (b.dim(br - 1), b.dim(br - 2)) } else { (b.dim(br - 2), b.dim(br - 1)) };
    let batch: usize = a.shape()[..ar - 2].iter().product();
    let shared = br == 2;
    if k != kb || (!shared && b.shape()[..br - 2] != a.shape()[..ar - 2]) {
        return shape_err("matmul", format!("a {:?} (trans {ta}) and b {:?} (trans {tb}) do not multiply", a.shape(), b.shape()));
    }
    Ok((batch, shared, m, k, n))
}
