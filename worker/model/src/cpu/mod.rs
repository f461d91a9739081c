//! The CPU backend: the numerical oracle for CUDA and what tests and the local runner use.
pub mod hot;
pub mod kernels;
pub mod packed;

use crate::backend::{AttnMask, AttnSpec, Backend, LinearGrads};
use crate::error::{shape_err, ModelError, Result};
use crate::tensor::{DType, Device, HostData, Tensor};
use kernels::AttnDims;
use rayon::prelude::*;
use std::borrow::Cow;

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

/// Products with at most this many rows (decode steps, small prefills) use the packed kernel
/// (`packed`): measured faster than gemm from 2 rows up to a few hundred. Bigger ones (training)
/// stay on gemm, so a trainer's weights are not packed after every update.
const PACKED_MAX_ROWS: usize = 256;

fn f32s<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a [f32]> {
    match t.host().map_err(|_| ModelError::Device { op, backend: "cpu".into(), expected: Device::Cpu, found: t.device() })? {
        HostData::F32(v) => Ok(v),
        HostData::BF16(_) => Err(ModelError::DType { op, dtype: DType::BF16, msg: "activations must be F32 on the CPU backend".into() }),
    }
}

/// Weights may be BF16: upcast (borrowed when already F32).
fn weights<'a>(op: &'static str, t: &'a Tensor) -> Result<Cow<'a, [f32]>> {
    match t.host().map_err(|_| ModelError::Device { op, backend: "cpu".into(), expected: Device::Cpu, found: t.device() })? {
        HostData::F32(v) => Ok(Cow::Borrowed(v)),
        HostData::BF16(v) => {
            let mut out = vec![0f32; v.len()];
            out.par_chunks_mut(65536).zip(v.par_chunks(65536)).for_each(|(o, i)| {
                for (a, b) in o.iter_mut().zip(i) {
                    *a = b.to_f32();
                }
            });
            Ok(Cow::Owned(out))
        }
    }
}

fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return shape_err(op, format!("shapes differ: {:?} vs {:?}", a.shape(), b.shape()));
    }
    Ok(())
}

fn with_last(shape: &[usize], last: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    if let Some(l) = s.last_mut() {
        *l = last;
    }
    s
}

/// Rows of `x` as [n, row_len] with n = dim 0.
fn row_split(op: &'static str, x: &Tensor) -> Result<(usize, usize)> {
    if x.rank() == 0 {
        return shape_err(op, "scalar has no rows");
    }
    let n = x.dim(0);
    Ok((n, x.numel().checked_div(n).unwrap_or(0)))
}

fn attn_dims(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<AttnDims> {
    if q.rank() != 4 || k.rank() != 4 || k.shape() != v.shape() {
        return shape_err(op, format!("need q [B,T,Hq,D], k=v [B,S,Hkv,D]; got q {:?} k {:?} v {:?}", q.shape(), k.shape(), v.shape()));
    }
    let (b, t, hq, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let (s, hkv) = (k.dim(1), k.dim(2));
    if k.dim(0) != b || k.dim(3) != d || hkv == 0 || hq % hkv != 0 {
        return shape_err(op, format!("q {:?} incompatible with k {:?} (batch, head_dim, or Hq not a multiple of Hkv)", q.shape(), k.shape()));
    }
    if spec.kv_len > s {
        return shape_err(op, format!("kv_len {} exceeds key rows {s}", spec.kv_len));
    }
    match &spec.mask {
        AttnMask::Segments(cu) => {
            if b != 1 || t != s || spec.kv_len != s || cu.first() != Some(&0) || cu.last() != Some(&t) || cu.windows(2).any(|w| w[1] < w[0]) {
                return shape_err(op, format!("segment attention needs batch 1, T == S == kv_len and cu_seqlens from 0 to {t} non-decreasing; got B={b} T={t} S={s} cu={cu:?}"));
            }
        }
        AttnMask::Causal { key_start, .. } => {
            if !key_start.is_empty() && key_start.len() != b {
                return shape_err(op, format!("key_start has {} entries for batch {b}", key_start.len()));
            }
        }
    }
    Ok(AttnDims { b, t, s, hq, hkv, d })
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn to_device(&self, t: &Tensor) -> Result<Tensor> {
        t.host().map_err(|_| ModelError::Backend { backend: "cpu".into(), msg: format!("cannot read a {:?} tensor; copy it to host with its own backend", t.device()) })?;
        Ok(t.clone())
    }
    fn to_host(&self, t: &Tensor) -> Result<Tensor> {
        self.to_device(t)
    }
    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        x.to_dtype(dtype)
    }
    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::zeros(shape))
    }
    fn write_rows(&self, dst: &mut Tensor, offset: usize, src: &Tensor) -> Result<()> {
        if dst.rank() < 2 || src.rank() != dst.rank() || src.dim(0) != dst.dim(0) || src.shape()[2..] != dst.shape()[2..] || offset + src.dim(1) > dst.dim(1) {
            return shape_err("write_rows", format!("cannot write {:?} into {:?} at offset {offset}", src.shape(), dst.shape()));
        }
        let inner: usize = dst.shape()[2..].iter().product();
        let (b, s, t) = (dst.dim(0), dst.dim(1), src.dim(1));
        let sv = f32s("write_rows", src)?.to_vec();
        let dv = dst.as_f32_mut()?;
        for bb in 0..b {
            let d0 = (bb * s + offset) * inner;
            dv[d0..d0 + t * inner].copy_from_slice(&sv[bb * t * inner..(bb + 1) * t * inner]);
        }
        Ok(())
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let xs = f32s("linear", x)?;
        if w.rank() != 2 || x.last_dim() != w.dim(1) {
            return shape_err("linear", format!("x {:?} · wᵀ with w {:?}: inner dims differ", x.shape(), w.shape()));
        }
        let (n, k) = (w.dim(0), w.dim(1));
        let bv = match b {
            Some(b) if b.shape() != [n] => return shape_err("linear", format!("bias {:?} for output width {n}", b.shape())),
            Some(b) => Some(weights("linear", b)?),
            None => None,
        };
        let wh = w.host()?;
        if x.rows() <= PACKED_MAX_ROWS && packed::available() {
            let pw = w.derived(|| match wh {
                HostData::BF16(v) => packed::PackedWeight::new_bf16(v, n, k),
                HostData::F32(v) => packed::PackedWeight::new(v, n, k),
            });
            if let Some(pw) = pw.filter(|p| p.dims() == (n, k)) {
                return Tensor::from_f32(&with_last(x.shape(), n), packed::linear(xs, x.rows(), pw, bv.as_deref()));
            }
        }
        if let HostData::BF16(wb) = wh {
            return Tensor::from_f32(&with_last(x.shape(), n), linear_bf16(xs, x.rows(), k, wb, n, bv.as_deref()));
        }
        let wv = weights("linear", w)?;
        Tensor::from_f32(&with_last(x.shape(), n), kernels::linear(xs, x.rows(), k, &wv, n, bv.as_deref()))
    }
    fn linear_backward(&self, dy: &Tensor, x: &Tensor, w: &Tensor, has_bias: bool) -> Result<LinearGrads> {
        let (n, k) = (w.dim(0), w.dim(1));
        if dy.last_dim() != n || x.last_dim() != k || dy.rows() != x.rows() {
            return shape_err("linear_backward", format!("dy {:?}, x {:?}, w {:?}", dy.shape(), x.shape(), w.shape()));
        }
        let wv = weights("linear_backward", w)?;
        let (dx, dw, db) = kernels::linear_backward(f32s("linear_backward", dy)?, f32s("linear_backward", x)?, x.rows(), k, &wv, n, has_bias);
        Ok(LinearGrads {
            dx: Tensor::from_f32(x.shape(), dx)?,
            dw: Tensor::from_f32(&[n, k], dw)?,
            db: db.map(|d| Tensor::from_f32(&[n], d)).transpose()?,
        })
    }
    fn matmul(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        let (batch, shared, m, k, n) = matmul_dims(a, b, trans_a, trans_b)?;
        let bv = weights("matmul", b)?;
        let y = kernels::matmul(f32s("matmul", a)?, &bv, batch, shared, m, k, n, trans_a, trans_b);
        let mut shape = a.shape()[..a.rank() - 2].to_vec();
        shape.extend([m, n]);
        Tensor::from_f32(&shape, y)
    }
    fn matmul_backward(&self, dy: &Tensor, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<(Tensor, Tensor)> {
        let (batch, shared, m, k, n) = matmul_dims(a, b, trans_a, trans_b)?;
        let (dyv, av) = (f32s("matmul_backward", dy)?, f32s("matmul_backward", a)?);
        let bv = weights("matmul_backward", b)?;
        if dy.numel() != batch * m * n {
            return shape_err("matmul_backward", format!("dy {:?} for output [{batch}, {m}, {n}]", dy.shape()));
        }
        let (da, db) = kernels::matmul_backward(dyv, av, &bv, batch, shared, m, k, n, trans_a, trans_b);
        Ok((Tensor::from_f32(a.shape(), da)?, Tensor::from_f32(b.shape(), db)?))
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        same_shape("add", a, b)?;
        let (av, bv) = (f32s("add", a)?, f32s("add", b)?);
        let mut y = vec![0f32; av.len()];
        y.par_chunks_mut(16384).zip(av.par_chunks(16384).zip(bv.par_chunks(16384))).for_each(|(y, (a, b))| {
            for i in 0..y.len() {
                y[i] = a[i] + b[i];
            }
        });
        Tensor::from_f32(a.shape(), y)
    }
    fn add_assign(&self, a: &mut Tensor, b: &Tensor) -> Result<()> {
        same_shape("add_assign", a, b)?;
        let bv = f32s("add_assign", b)?.to_vec();
        for (x, y) in a.as_f32_mut()?.iter_mut().zip(&bv) {
            *x += y;
        }
        Ok(())
    }
    fn scale(&self, x: &Tensor, s: f32) -> Result<Tensor> {
        Tensor::from_f32(x.shape(), f32s("scale", x)?.iter().map(|v| v * s).collect())
    }
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        same_shape("swiglu", gate, up)?;
        Tensor::from_f32(gate.shape(), kernels::swiglu(f32s("swiglu", gate)?, f32s("swiglu", up)?))
    }
    fn swiglu_backward(&self, dy: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
        same_shape("swiglu_backward", gate, up)?;
        same_shape("swiglu_backward", dy, up)?;
        let (dg, du) = kernels::swiglu_backward(f32s("swiglu_backward", dy)?, f32s("swiglu_backward", gate)?, f32s("swiglu_backward", up)?);
        Ok((Tensor::from_f32(gate.shape(), dg)?, Tensor::from_f32(gate.shape(), du)?))
    }
    fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        Tensor::from_f32(x.shape(), kernels::gelu(f32s("gelu", x)?))
    }
    fn gelu_backward(&self, dy: &Tensor, x: &Tensor) -> Result<Tensor> {
        same_shape("gelu_backward", dy, x)?;
        Tensor::from_f32(x.shape(), kernels::gelu_backward(f32s("gelu_backward", dy)?, f32s("gelu_backward", x)?))
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        if w.shape() != [x.last_dim()] {
            return shape_err("rms_norm", format!("weight {:?} for input {:?}", w.shape(), x.shape()));
        }
        let wv = weights("rms_norm", w)?;
        Tensor::from_f32(x.shape(), kernels::rms_norm(f32s("rms_norm", x)?, x.last_dim(), &wv, eps))
    }
    fn rms_norm_backward(&self, dy: &Tensor, x: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        same_shape("rms_norm_backward", dy, x)?;
        if w.shape() != [x.last_dim()] {
            return shape_err("rms_norm_backward", format!("weight {:?} for input {:?}", w.shape(), x.shape()));
        }
        let wv = weights("rms_norm_backward", w)?;
        let (dx, dw) = kernels::rms_norm_backward(f32s("rms_norm_backward", dy)?, f32s("rms_norm_backward", x)?, x.last_dim(), &wv, eps);
        Ok((Tensor::from_f32(x.shape(), dx)?, Tensor::from_f32(w.shape(), dw)?))
    }
    fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = f32s("softmax", x)?.to_vec();
        kernels::softmax_rows(&mut y, x.last_dim());
        Tensor::from_f32(x.shape(), y)
    }
    fn softmax_backward(&self, dy: &Tensor, y: &Tensor) -> Result<Tensor> {
        same_shape("softmax_backward", dy, y)?;
        Tensor::from_f32(y.shape(), kernels::softmax_backward(f32s("softmax_backward", dy)?, f32s("softmax_backward", y)?, y.last_dim()))
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (rows, h, d) = rope_dims("rope", x, cos, sin)?;
        Tensor::from_f32(x.shape(), kernels::rope(f32s("rope", x)?, rows, h, d, f32s("rope", cos)?, f32s("rope", sin)?))
    }
    fn rope_backward(&self, dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (rows, h, d) = rope_dims("rope_backward", dy, cos, sin)?;
        Tensor::from_f32(dy.shape(), kernels::rope_backward(f32s("rope_backward", dy)?, rows, h, d, f32s("rope_backward", cos)?, f32s("rope_backward", sin)?))
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<Tensor> {
        let dims = attn_dims("attention", q, k, v, spec)?;
        Tensor::from_f32(q.shape(), kernels::attention(f32s("attention", q)?, f32s("attention", k)?, f32s("attention", v)?, dims, spec))
    }
    fn attention_backward(&self, dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<(Tensor, Tensor, Tensor)> {
        let dims = attn_dims("attention_backward", q, k, v, spec)?;
        same_shape("attention_backward", dout, q)?;
        let (dq, dk, dv) = kernels::attention_backward(
            f32s("attention_backward", dout)?, f32s("attention_backward", q)?, f32s("attention_backward", k)?, f32s("attention_backward", v)?, dims, spec,
        );
        Ok((Tensor::from_f32(q.shape(), dq)?, Tensor::from_f32(k.shape(), dk)?, Tensor::from_f32(v.shape(), dv)?))
    }

    fn embedding(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        if table.rank() != 2 {
            return shape_err("embedding", format!("table must be [V, H], got {:?}", table.shape()));
        }
        let (v, h) = (table.dim(0), table.dim(1));
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
            return Err(ModelError::Invalid(format!("token id {bad} is outside the vocabulary of {v} embeddings")));
        }
        let mut out = vec![0f32; ids.len() * h];
        match table.host()? {
            HostData::F32(t) => out.chunks_mut(h.max(1)).zip(ids).for_each(|(o, &i)| o.copy_from_slice(&t[i as usize * h..(i as usize + 1) * h])),
            HostData::BF16(t) => out.chunks_mut(h.max(1)).zip(ids).for_each(|(o, &i)| {
                for (a, b) in o.iter_mut().zip(&t[i as usize * h..(i as usize + 1) * h]) {
                    *a = b.to_f32();
                }
            }),
        }
        Tensor::from_f32(&[ids.len(), h], out)
    }
    fn embedding_backward(&self, dy: &Tensor, ids: &[u32], vocab: usize) -> Result<Tensor> {
        let h = dy.last_dim();
        if dy.rows() != ids.len() {
            return shape_err("embedding_backward", format!("dy {:?} for {} ids", dy.shape(), ids.len()));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(ModelError::Invalid(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let g = f32s("embedding_backward", dy)?;
        let mut out = vec![0f32; vocab * h];
        for (r, &i) in ids.iter().enumerate() {
            for (a, b) in out[i as usize * h..(i as usize + 1) * h].iter_mut().zip(&g[r * h..(r + 1) * h]) {
                *a += b;
            }
        }
        Tensor::from_f32(&[vocab, h], out)
    }
    fn gather_rows(&self, x: &Tensor, idx: &[usize]) -> Result<Tensor> {
        let (n, w) = row_split("gather_rows", x)?;
        if let Some(&bad) = idx.iter().find(|&&i| i >= n) {
            return shape_err("gather_rows", format!("index {bad} out of range for {n} rows"));
        }
        let xv = f32s("gather_rows", x)?;
        let mut out = vec![0f32; idx.len() * w];
        for (o, &i) in out.chunks_mut(w.max(1)).zip(idx) {
            o.copy_from_slice(&xv[i * w..(i + 1) * w]);
        }
        let mut shape = x.shape().to_vec();
        shape[0] = idx.len();
        Tensor::from_f32(&shape, out)
    }
    fn gather_rows_backward(&self, dy: &Tensor, idx: &[usize], n_rows: usize) -> Result<Tensor> {
        let (m, w) = row_split("gather_rows_backward", dy)?;
        if m != idx.len() || idx.iter().any(|&i| i >= n_rows) {
            return shape_err("gather_rows_backward", format!("dy {:?} with {} indices into {n_rows} rows", dy.shape(), idx.len()));
        }
        let g = f32s("gather_rows_backward", dy)?;
        let mut out = vec![0f32; n_rows * w];
        for (r, &i) in idx.iter().enumerate() {
            for (a, b) in out[i * w..(i + 1) * w].iter_mut().zip(&g[r * w..(r + 1) * w]) {
                *a += b;
            }
        }
        let mut shape = dy.shape().to_vec();
        shape[0] = n_rows;
        Tensor::from_f32(&shape, out)
    }
    fn scatter_rows(&self, x: &Tensor, rows: &[usize], src: &Tensor) -> Result<Tensor> {
        let (n, w) = row_split("scatter_rows", x)?;
        let (m, ws) = row_split("scatter_rows", src)?;
        if m != rows.len() || ws != w || rows.iter().any(|&r| r >= n) {
            return shape_err("scatter_rows", format!("cannot scatter src {:?} into x {:?} at {} rows", src.shape(), x.shape(), rows.len()));
        }
        let mut out = f32s("scatter_rows", x)?.to_vec();
        let s = f32s("scatter_rows", src)?;
        for (i, &r) in rows.iter().enumerate() {
            out[r * w..(r + 1) * w].copy_from_slice(&s[i * w..(i + 1) * w]);
        }
        Tensor::from_f32(x.shape(), out)
    }
    fn scatter_rows_backward(&self, dy: &Tensor, rows: &[usize]) -> Result<(Tensor, Tensor)> {
        let (n, w) = row_split("scatter_rows_backward", dy)?;
        if rows.iter().any(|&r| r >= n) {
            return shape_err("scatter_rows_backward", format!("row index out of range for {n} rows"));
        }
        let mut dx = f32s("scatter_rows_backward", dy)?.to_vec();
        let mut ds = vec![0f32; rows.len() * w];
        for (i, &r) in rows.iter().enumerate() {
            ds[i * w..(i + 1) * w].copy_from_slice(&dx[r * w..(r + 1) * w]);
        }
        for &r in rows {
            dx[r * w..(r + 1) * w].iter_mut().for_each(|v| *v = 0.0);
        }
        let mut shape = dy.shape().to_vec();
        shape[0] = rows.len();
        Ok((Tensor::from_f32(dy.shape(), dx)?, Tensor::from_f32(&shape, ds)?))
    }
    fn split_last(&self, x: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>> {
        let d = x.last_dim();
        if sizes.iter().sum::<usize>() != d {
            return shape_err("split_last", format!("sizes {sizes:?} do not sum to last dim {d} of {:?}", x.shape()));
        }
        let xv = f32s("split_last", x)?;
        let rows = x.rows();
        let mut off = 0;
        let mut out = Vec::with_capacity(sizes.len());
        for &s in sizes {
            let mut v = Vec::with_capacity(rows * s);
            for r in 0..rows {
                v.extend_from_slice(&xv[r * d + off..r * d + off + s]);
            }
            out.push(Tensor::from_f32(&with_last(x.shape(), s), v)?);
            off += s;
        }
        Ok(out)
    }
    fn concat_last(&self, xs: &[&Tensor]) -> Result<Tensor> {
        let first = xs.first().ok_or_else(|| ModelError::Invalid("concat_last of zero tensors".into()))?;
        let rows = first.rows();
        if xs.iter().any(|t| t.rows() != rows || t.shape()[..t.rank() - 1] != first.shape()[..first.rank() - 1]) {
            return shape_err("concat_last", format!("leading dims differ: {:?}", xs.iter().map(|t| t.shape().to_vec()).collect::<Vec<_>>()));
        }
        let d: usize = xs.iter().map(|t| t.last_dim()).sum();
        let parts = xs.iter().map(|t| f32s("concat_last", t)).collect::<Result<Vec<_>>>()?;
        let mut v = Vec::with_capacity(rows * d);
        for r in 0..rows {
            for (t, p) in xs.iter().zip(&parts) {
                let w = t.last_dim();
                v.extend_from_slice(&p[r * w..(r + 1) * w]);
            }
        }
        Tensor::from_f32(&with_last(first.shape(), d), v)
    }
}

/// x·Wᵀ with BF16 weights: W is upcast one block of output rows at a time inside each task,
/// so a 7B MLP weight never exists as a full f32 copy and the conversion runs in parallel.
fn linear_bf16(x: &[f32], m: usize, k: usize, w: &[half::bf16], n: usize, b: Option<&[f32]>) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if let Some(b) = b {
        for row in y.chunks_mut(n.max(1)) {
            row.copy_from_slice(b);
        }
    }
    // ~1 MiB of f32 weights per block keeps the block in L2 while gemm streams x.
    let rows = (262_144 / k.max(1)).clamp(16, n.max(16));
    let yp = kernels::SendPtr(y.as_mut_ptr());
    (0..n.div_ceil(rows)).into_par_iter().for_each(|c| {
        let j0 = c * rows;
        let nc = rows.min(n - j0);
        let wf: Vec<f32> = w[j0 * k..(j0 + nc) * k].iter().map(|v| v.to_f32()).collect();
        // SAFETY: each task writes only output columns j0..j0+nc of every row.
        unsafe { kernels::gemm_raw(m, nc, k, yp.get().add(j0), n, x.as_ptr(), k, 1, wf.as_ptr(), 1, k, b.is_some(), false) };
    });
    y
}

fn rope_dims(op: &'static str, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(usize, usize, usize)> {
    if x.rank() < 2 {
        return shape_err(op, format!("x must be [.., H, D], got {:?}", x.shape()));
    }
    let d = x.last_dim();
    let h = x.dim(x.rank() - 2);
    let rows = x.numel().checked_div(h * d).unwrap_or(0);
    if !d.is_multiple_of(2) || cos.shape() != [rows, d] || sin.shape() != [rows, d] {
        return shape_err(op, format!("x {:?} needs even head_dim and cos/sin [{rows}, {d}]; got cos {:?} sin {:?}", x.shape(), cos.shape(), sin.shape()));
    }
    Ok((rows, h, d))
}

/// (batch, b shared across batch, m, k, n).
fn matmul_dims(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<(usize, bool, usize, usize, usize)> {
    if a.rank() < 2 || b.rank() < 2 {
        return shape_err("matmul", format!("operands must be at least 2-D: {:?}, {:?}", a.shape(), b.shape()));
    }
    let (ar, br) = (a.rank(), b.rank());
    let (m, k) = if ta { (a.dim(ar - 1), a.dim(ar - 2)) } else { (a.dim(ar - 2), a.dim(ar - 1)) };
    let (kb, n) = if tb { (b.dim(br - 1), b.dim(br - 2)) } else { (b.dim(br - 2), b.dim(br - 1)) };
    let batch: usize = a.shape()[..ar - 2].iter().product();
    let shared = br == 2;
    if kb != k || (!shared && b.shape()[..br - 2] != a.shape()[..ar - 2]) {
        return shape_err("matmul", format!("cannot multiply {:?}{} by {:?}{}", a.shape(), if ta { "ᵀ" } else { "" }, b.shape(), if tb { "ᵀ" } else { "" }));
    }
    Ok((batch, shared, m, k, n))
}
