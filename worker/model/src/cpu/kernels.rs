//! Generic CPU kernels over `f32` (the backend) and `f64` (finite-difference tests).
//! Forward and backward of each op sit side by side. All big products go through `gemm`;
//! rows/heads are parallelised with rayon.
use crate::backend::{AttnMask, AttnSpec};
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Range, Sub};

pub trait Real:
    Copy + Send + Sync + 'static + PartialOrd + Default + std::fmt::Debug
    + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> + Neg<Output = Self>
    + AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn erf(self) -> Self;
    fn max(self, o: Self) -> Self {
        if o > self { o } else { self }
    }
}
impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    fn from_f64(v: f64) -> Self { v as f32 }
    fn to_f64(self) -> f64 { self as f64 }
    fn exp(self) -> Self { f32::exp(self) }
    fn sqrt(self) -> Self { f32::sqrt(self) }
    fn erf(self) -> Self { libm::erff(self) }
}
impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    fn from_f64(v: f64) -> Self { v }
    fn to_f64(self) -> f64 { self }
    fn exp(self) -> Self { f64::exp(self) }
    fn sqrt(self) -> Self { f64::sqrt(self) }
    fn erf(self) -> Self { libm::erf(self) }
}

/// Raw pointer that may cross rayon tasks; every use writes a disjoint region.
#[derive(Clone, Copy)]
pub struct SendPtr<T>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    // A method (not field access) so closures capture the whole Send wrapper.
    #[inline]
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// C (m×n, row stride c_rs) = [C +] A·B with A(i,p) = a[i·a_rs + p·a_cs], B(p,j) = b[p·b_rs + j·b_cs].
///
/// # Safety
/// Pointers must cover the strided ranges; C must not alias A or B.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_raw<T: Real>(
    m: usize, n: usize, k: usize,
    c: *mut T, c_rs: usize,
    a: *const T, a_rs: usize, a_cs: usize,
    b: *const T, b_rs: usize, b_cs: usize,
    accumulate: bool, parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *c.add(i * c_rs + j) = T::ZERO;
                }
            }
        }
        return;
    }
    // Threads only pay off above ~64³ flops; below, rayon hand-off costs more than it saves.
    let par = if parallel && m * n * k >= 1 << 18 && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm::<T>(
        m, n, k,
        c, 1, c_rs as isize, accumulate,
        a, a_cs as isize, a_rs as isize,
        b, b_cs as isize, b_rs as isize,
        T::ONE, T::ONE, false, false, false, par,
    );
}

/// Number of rows per rayon task so that each task has ≥ ~16k elements of work.
fn rows_per_task(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

// ---------------------------------------------------------------- linear / matmul

/// y[m,n] = x[m,k]·w[n,k]ᵀ + b.
pub fn linear<T: Real>(x: &[T], m: usize, k: usize, w: &[T], n: usize, b: Option<&[T]>) -> Vec<T> {
    let mut y = vec![T::ZERO; m * n];
    if let Some(b) = b {
        for row in y.chunks_mut(n) {
            row.copy_from_slice(b);
        }
    }
    if m <= 4 && n * k >= 1 << 16 && rayon::current_num_threads() > 1 {
        // Decode-sized products stream W once; gemm's thin-matrix path runs on one thread, so
        // split W's rows (output columns) across threads, each a serial gemm.
        let cols = (n / (4 * rayon::current_num_threads())).max(64);
        let yp = SendPtr(y.as_mut_ptr());
        (0..n.div_ceil(cols)).into_par_iter().for_each(|c| unsafe {
            let j0 = c * cols;
            let nc = cols.min(n - j0);
            gemm_raw(m, nc, k, yp.get().add(j0), n, x.as_ptr(), k, 1, w.as_ptr().add(j0 * k), 1, k, b.is_some(), false);
        });
        return y;
    }
    unsafe { gemm_raw(m, n, k, y.as_mut_ptr(), n, x.as_ptr(), k, 1, w.as_ptr(), 1, k, b.is_some(), true) };
    y
}

/// (dx [m,k], dw [n,k], db [n]).
pub fn linear_backward<T: Real>(dy: &[T], x: &[T], m: usize, k: usize, w: &[T], n: usize, has_bias: bool) -> (Vec<T>, Vec<T>, Option<Vec<T>>) {
    let mut dx = vec![T::ZERO; m * k];
    // dx = dy[m,n]·w[n,k]
    unsafe { gemm_raw(m, k, n, dx.as_mut_ptr(), k, dy.as_ptr(), n, 1, w.as_ptr(), k, 1, false, true) };
    let mut dw = vec![T::ZERO; n * k];
    // dw = dyᵀ[n,m]·x[m,k]
    unsafe { gemm_raw(n, k, m, dw.as_mut_ptr(), k, dy.as_ptr(), 1, n, x.as_ptr(), k, 1, false, true) };
    let db = has_bias.then(|| {
        let mut db = vec![T::ZERO; n];
        for row in dy.chunks(n) {
            for (a, &g) in db.iter_mut().zip(row) {
                *a += g;
            }
        }
        db
    });
    (dx, dw, db)
}

/// Batched matmul; `a` is [batch, M, K] (or [batch, K, M] if ta), `b` is [batch_b, K, N] (or
/// [batch_b, N, K] if tb) with batch_b ∈ {1, batch}.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(a: &[T], b: &[T], batch: usize, b_shared: bool, m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<T> {
    let mut y = vec![T::ZERO; batch * m * n];
    let (a_rs, a_cs) = if ta { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if tb { (1, k) } else { (n, 1) };
    let yp = SendPtr(y.as_mut_ptr());
    let run = |i: usize, par: bool| unsafe {
        let bo = if b_shared { 0 } else { i * k * n };
        gemm_raw(m, n, k, yp.get().add(i * m * n), n, a.as_ptr().add(i * m * k), a_rs, a_cs, b.as_ptr().add(bo), b_rs, b_cs, false, par);
    };
    if batch == 1 {
        run(0, true);
    } else {
        (0..batch).into_par_iter().for_each(|i| run(i, false));
    }
    y
}

// ---------------------------------------------------------------- elementwise

pub fn silu<T: Real>(g: T) -> T {
    g / (T::ONE + (-g).exp())
}

pub fn swiglu<T: Real>(gate: &[T], up: &[T]) -> Vec<T> {
    let mut y = vec![T::ZERO; gate.len()];
    y.par_chunks_mut(16384).zip(gate.par_chunks(16384).zip(up.par_chunks(16384))).for_each(|(y, (g, u))| {
        for i in 0..y.len() {
            y[i] = silu(g[i]) * u[i];
        }
    });
    y
}

pub fn swiglu_backward<T: Real>(dy: &[T], gate: &[T], up: &[T]) -> (Vec<T>, Vec<T>) {
    let mut dg = vec![T::ZERO; gate.len()];
    let mut du = vec![T::ZERO; gate.len()];
    for i in 0..gate.len() {
        let g = gate[i];
        let s = T::ONE / (T::ONE + (-g).exp());
        du[i] = dy[i] * g * s;
        dg[i] = dy[i] * up[i] * (s + g * s * (T::ONE - s));
    }
    (dg, du)
}

pub fn gelu<T: Real>(x: &[T]) -> Vec<T> {
    let half = T::from_f64(0.5);
    let r = T::from_f64(std::f64::consts::FRAC_1_SQRT_2);
    let mut y = vec![T::ZERO; x.len()];
    y.par_chunks_mut(16384).zip(x.par_chunks(16384)).for_each(|(y, x)| {
        for i in 0..y.len() {
            y[i] = half * x[i] * (T::ONE + (x[i] * r).erf());
        }
    });
    y
}

pub fn gelu_backward<T: Real>(dy: &[T], x: &[T]) -> Vec<T> {
    let half = T::from_f64(0.5);
    let r = T::from_f64(std::f64::consts::FRAC_1_SQRT_2);
    let inv_sqrt_2pi = T::from_f64(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    x.iter()
        .zip(dy)
        .map(|(&x, &g)| {
            let cdf = half * (T::ONE + (x * r).erf());
            let pdf = inv_sqrt_2pi * (-(half * x * x)).exp();
            g * (cdf + x * pdf)
        })
        .collect()
}

// ---------------------------------------------------------------- normalisation

pub fn rms_norm<T: Real>(x: &[T], d: usize, w: &[T], eps: T) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    let rpt = rows_per_task(d);
    y.par_chunks_mut(rpt * d).zip(x.par_chunks(rpt * d)).for_each(|(y, x)| {
        for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
            let mut ss = T::ZERO;
            for &v in xr {
                ss += v * v;
            }
            let r = T::ONE / (ss / T::from_f64(d as f64) + eps).sqrt();
            for i in 0..d {
                yr[i] = w[i] * (xr[i] * r);
            }
        }
    });
    y
}

/// (dx, dw). With r = rsqrt(mean(x²)+eps): dx = r·(w⊙dy) − r³/d · x · Σ(w⊙dy⊙x); dw = Σ_rows dy⊙x·r.
pub fn rms_norm_backward<T: Real>(dy: &[T], x: &[T], d: usize, w: &[T], eps: T) -> (Vec<T>, Vec<T>) {
    let mut dx = vec![T::ZERO; x.len()];
    let mut dw = vec![T::ZERO; d];
    let df = T::from_f64(d as f64);
    for ((dxr, xr), gr) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
        let mut ss = T::ZERO;
        for &v in xr {
            ss += v * v;
        }
        let r = T::ONE / (ss / df + eps).sqrt();
        let mut dot = T::ZERO;
        for i in 0..d {
            dot += w[i] * gr[i] * xr[i];
            dw[i] += gr[i] * xr[i] * r;
        }
        let c = r * r * r / df * dot;
        for i in 0..d {
            dxr[i] = r * w[i] * gr[i] - c * xr[i];
        }
    }
    (dx, dw)
}

pub fn softmax_rows<T: Real>(x: &mut [T], d: usize) {
    let rpt = rows_per_task(d);
    x.par_chunks_mut(rpt * d).for_each(|c| {
        for r in c.chunks_mut(d) {
            softmax_in_place(r);
        }
    });
}

/// Softmax of one row; an all −∞ row becomes zeros (no visible key).
#[inline(always)]
pub fn softmax_in_place<T: Real>(r: &mut [T]) {
    let mut mx = T::NEG_INF;
    for &v in r.iter() {
        mx = mx.max(v);
    }
    if mx == T::NEG_INF {
        r.iter_mut().for_each(|v| *v = T::ZERO);
        return;
    }
    let mut s = T::ZERO;
    for v in r.iter_mut() {
        *v = (*v - mx).exp();
        s += *v;
    }
    let inv = T::ONE / s;
    for v in r.iter_mut() {
        *v = *v * inv;
    }
}

/// dx = y ⊙ (dy − Σ dy⊙y).
pub fn softmax_backward<T: Real>(dy: &[T], y: &[T], d: usize) -> Vec<T> {
    let mut dx = vec![T::ZERO; y.len()];
    for ((dxr, yr), gr) in dx.chunks_mut(d).zip(y.chunks(d)).zip(dy.chunks(d)) {
        let mut dot = T::ZERO;
        for i in 0..d {
            dot += gr[i] * yr[i];
        }
        for i in 0..d {
            dxr[i] = yr[i] * (gr[i] - dot);
        }
    }
    dx
}

// ---------------------------------------------------------------- rotary

/// x [rows, h, d], cos/sin [rows, d]: y = x⊙cos + rotate_half(x)⊙sin.
pub fn rope<T: Real>(x: &[T], rows: usize, h: usize, d: usize, cos: &[T], sin: &[T]) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    let half = d / 2;
    let per = h * d;
    let rpt = rows_per_task(per);
    y.par_chunks_mut(rpt * per).zip(x.par_chunks(rpt * per)).enumerate().for_each(|(ci, (y, x))| {
        for (ri, (yr, xr)) in y.chunks_mut(per).zip(x.chunks(per)).enumerate() {
            let row = ci * rpt + ri;
            let c = &cos[row * d..row * d + d];
            let s = &sin[row * d..row * d + d];
            for (yh, xh) in yr.chunks_mut(d).zip(xr.chunks(d)) {
                for i in 0..half {
                    yh[i] = xh[i] * c[i] - xh[i + half] * s[i];
                    yh[i + half] = xh[i + half] * c[i + half] + xh[i] * s[i + half];
                }
            }
        }
    });
    debug_assert_eq!(rows * per, x.len());
    y
}

/// dx = cos⊙dy + rotate_halfᵀ(sin⊙dy), rotate_halfᵀ(z) = concat(z[D/2:], −z[:D/2]).
/// (Equal to rope with −sin when the table repeats in both halves, as both Qwen tables do.)
pub fn rope_backward<T: Real>(dy: &[T], rows: usize, h: usize, d: usize, cos: &[T], sin: &[T]) -> Vec<T> {
    let mut dx = vec![T::ZERO; dy.len()];
    let half = d / 2;
    for row in 0..rows {
        let c = &cos[row * d..row * d + d];
        let s = &sin[row * d..row * d + d];
        for hh in 0..h {
            let o = (row * h + hh) * d;
            let g = &dy[o..o + d];
            let out = &mut dx[o..o + d];
            for i in 0..half {
                out[i] = g[i] * c[i] + g[i + half] * s[i + half];
                out[i + half] = g[i + half] * c[i + half] - g[i] * s[i];
            }
        }
    }
    dx
}

// ---------------------------------------------------------------- attention

/// Geometry of an attention call: q [b, t, hq, d], k/v [b, s, hkv, d].
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub s: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
}

/// One block of work: batch `bb`, query rows [q0,q1), key rows [k0,k1), causal limit
/// (key j visible to query i iff j ≤ i + causal_shift) or none.
#[derive(Clone, Copy, Debug)]
struct Block {
    bb: usize,
    q0: usize,
    q1: usize,
    k0: usize,
    k1: usize,
    causal_shift: Option<usize>,
}

/// Query-chunk size: bounds the score buffer to Q_CHUNK × keys (large vision segments), and in
/// causal blocks keys past the chunk's last query are skipped entirely.
const Q_CHUNK: usize = 64;

fn query_chunks(blk: Block) -> Vec<Block> {
    let mut out = Vec::with_capacity((blk.q1 - blk.q0).div_ceil(Q_CHUNK));
    let mut q0 = blk.q0;
    while q0 < blk.q1 {
        let q1 = (q0 + Q_CHUNK).min(blk.q1);
        let k1 = match blk.causal_shift {
            Some(s) => blk.k1.min(s + q1),
            None => blk.k1,
        };
        out.push(Block { q0, q1, k0: blk.k0.min(k1), k1, ..blk });
        q0 = q1;
    }
    out
}

/// Independent attention problems: one per segment, or one per batch row (causal).
fn blocks(dims: &AttnDims, spec: &AttnSpec) -> Vec<Block> {
    let mut out = Vec::new();
    match &spec.mask {
        AttnMask::Segments(cu) => {
            for w in cu.windows(2) {
                if w[1] > w[0] {
                    out.push(Block { bb: 0, q0: w[0], q1: w[1], k0: w[0], k1: w[1], causal_shift: None });
                }
            }
        }
        AttnMask::Causal { q_offset, key_start } => {
            for bb in 0..dims.b {
                let ks = key_start.get(bb).copied().unwrap_or(0);
                if dims.t > 0 {
                    let k1 = (q_offset + dims.t).min(spec.kv_len);
                    out.push(Block { bb, q0: 0, q1: dims.t, k0: ks.min(k1), k1, causal_shift: Some(*q_offset) });
                }
            }
        }
    }
    out
}

/// Scaled, masked, softmaxed scores P [nq, nk] for one head of one block.
unsafe fn probs<T: Real>(q: *const T, k: *const T, dims: &AttnDims, blk: &Block, h: usize, scale: T) -> Vec<T> {
    let (nq, nk, d) = (blk.q1 - blk.q0, blk.k1 - blk.k0, dims.d);
    let kvh = h / (dims.hq / dims.hkv);
    let mut p = vec![T::ZERO; nq * nk];
    let qp = q.add(((blk.bb * dims.t + blk.q0) * dims.hq + h) * d);
    let kp = k.add(((blk.bb * dims.s + blk.k0) * dims.hkv + kvh) * d);
    gemm_raw(nq, nk, d, p.as_mut_ptr(), nk, qp, dims.hq * d, 1, kp, 1, dims.hkv * d, false, false);
    for i in 0..nq {
        let row = &mut p[i * nk..(i + 1) * nk];
        let lim = blk.causal_shift.map(|sh| sh + blk.q0 + i);
        for (j, v) in row.iter_mut().enumerate() {
            if lim.is_some_and(|l| blk.k0 + j > l) {
                *v = T::NEG_INF;
            } else {
                *v = *v * scale;
            }
        }
        softmax_in_place(row);
    }
    p
}

/// Blocks with at most this many queries (decode steps) skip gemm: two products with one row
/// cost gemm more in set-up than in arithmetic.
const FEW_QUERIES: usize = 4;

/// Σ a·b with eight partial sums, so the f32 loop vectorises (a single running sum is a
/// dependency chain the compiler may not reorder).
#[inline(always)]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = T::ZERO;
    for (x, y) in ar.iter().zip(br) {
        s += *x * *y;
    }
    // In order: a pairwise tree measured slower here (the rollout bench, 2 threads: 4.9–5.9k vs
    // 6.6–6.8k tokens/s), the compiler vectorises this form better.
    for a in acc {
        s += a;
    }
    s
}

/// `attention` for the query heads `heads` (those sharing one KV head) of a block with few
/// queries: each key and value row is read once for all of them; scores by direct dot products,
/// the output as a P-weighted sum of value rows (masked keys have P = 0 and are skipped).
///
/// # Safety
/// `out` points at the [b, t, hq, d] output; the block and heads are in range and share a KV head.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn attend_few<T: Real>(q: &[T], k: &[T], v: &[T], dims: &AttnDims, blk: &Block, heads: Range<usize>, scale: T, out: SendPtr<T>) {
    let d = dims.d;
    let kvh = heads.start / (dims.hq / dims.hkv);
    let (nk, nh) = (blk.k1 - blk.k0, heads.len());
    let key = |j: usize| ((blk.bb * dims.s + blk.k0 + j) * dims.hkv + kvh) * d;
    // Scores of every head in the group: p[hh·nk + j].
    let mut p = vec![T::ZERO; nh * nk];
    for i in 0..blk.q1 - blk.q0 {
        let qo = ((blk.bb * dims.t + blk.q0 + i) * dims.hq + heads.start) * d;
        let visible = blk.causal_shift.map_or(nk, |sh| (sh + blk.q0 + i + 1).saturating_sub(blk.k0).min(nk));
        for j in 0..nk {
            if j < visible {
                let kj = &k[key(j)..key(j) + d];
                for hh in 0..nh {
                    p[hh * nk + j] = dot(&q[qo + hh * d..qo + (hh + 1) * d], kj) * scale;
                }
            } else {
                for hh in 0..nh {
                    p[hh * nk + j] = T::NEG_INF;
                }
            }
        }
        for row in p.chunks_mut(nk.max(1)) {
            softmax_in_place(row);
        }
        let o = std::slice::from_raw_parts_mut(out.get().add(qo), nh * d);
        for j in 0..visible {
            let vj = &v[key(j)..key(j) + d];
            for (hh, oh) in o.chunks_mut(d).enumerate() {
                let pj = p[hh * nk + j];
                for (a, &b) in oh.iter_mut().zip(vj) {
                    *a += pj * b;
                }
            }
        }
    }
}

/// [`attend_few`], compiled for AVX2 when the CPU has it and `T` is f32 (the release build
/// targets baseline x86-64, whose 4-wide SSE halves the throughput of these loops).
#[allow(clippy::too_many_arguments)]
unsafe fn attend_few_dispatch<T: Real>(q: &[T], k: &[T], v: &[T], dims: &AttnDims, blk: &Block, heads: Range<usize>, scale: T, out: SendPtr<T>) {
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() && super::packed::available() {
        // SAFETY: T is f32 (checked above), so these are the same slices and pointer.
        let f = |s: &[T]| std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len());
        let scale = *(&scale as *const T as *const f32);
        return attend_few_avx2(f(q), f(k), f(v), dims, blk, heads, scale, SendPtr(out.get() as *mut f32));
    }
    attend_few(q, k, v, dims, blk, heads, scale, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_few_avx2(q: &[f32], k: &[f32], v: &[f32], dims: &AttnDims, blk: &Block, heads: Range<usize>, scale: f32, out: SendPtr<f32>) {
    // Hand-written FMA intrinsics for the dot products and P·V sums measured no faster than
    // these loops compiled for AVX2 (attention stayed ~19 % of a decode step): the time goes to
    // the per-key work (score, exp, value row), not to the vector arithmetic.
    attend_few(q, k, v, dims, blk, heads, scale, out)
}

pub fn attention<T: Real>(q: &[T], k: &[T], v: &[T], dims: AttnDims, spec: &AttnSpec) -> Vec<T> {
    let d = dims.d;
    let mut out = vec![T::ZERO; dims.b * dims.t * dims.hq * d];
    let op = SendPtr(out.as_mut_ptr());
    let blks: Vec<Block> = blocks(&dims, spec).into_iter().flat_map(query_chunks).collect();
    let scale = T::from_f64(spec.scale as f64);
    // One task per head, or per KV head (its query heads together) for few-query blocks.
    let group = dims.hq / dims.hkv;
    let tasks: Vec<(usize, usize)> = (0..blks.len())
        .flat_map(|bi| {
            let step = if blks[bi].q1 - blks[bi].q0 <= FEW_QUERIES { group } else { 1 };
            (0..dims.hq).step_by(step).map(move |h| (bi, h))
        })
        .collect();
    tasks.par_iter().for_each(|&(bi, h)| unsafe {
        let blk = &blks[bi];
        let (nq, nk) = (blk.q1 - blk.q0, blk.k1 - blk.k0);
        if nq <= FEW_QUERIES {
            return attend_few_dispatch(q, k, v, &dims, blk, h..h + group, scale, op);
        }
        let kvh = h / (dims.hq / dims.hkv);
        let p = probs(q.as_ptr(), k.as_ptr(), &dims, blk, h, scale);
        let vp = v.as_ptr().add(((blk.bb * dims.s + blk.k0) * dims.hkv + kvh) * d);
        let o = op.get().add(((blk.bb * dims.t + blk.q0) * dims.hq + h) * d);
        gemm_raw(nq, d, nk, o, dims.hq * d, p.as_ptr(), nk, 1, vp, dims.hkv * d, 1, false, false);
    });
    out
}

/// (dq, dk, dv). Each task owns one (segment or batch row, kv head) and walks its query chunks
/// serially, so dk/dv writes never race and score buffers stay Q_CHUNK × keys.
pub fn attention_backward<T: Real>(dout: &[T], q: &[T], k: &[T], v: &[T], dims: AttnDims, spec: &AttnSpec) -> (Vec<T>, Vec<T>, Vec<T>) {
    let d = dims.d;
    let mut dq = vec![T::ZERO; q.len()];
    let mut dk = vec![T::ZERO; k.len()];
    let mut dv = vec![T::ZERO; v.len()];
    let (dqp, dkp, dvp) = (SendPtr(dq.as_mut_ptr()), SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
    let blks = blocks(&dims, spec);
    let scale = T::from_f64(spec.scale as f64);
    let group = dims.hq / dims.hkv;
    let tasks: Vec<(usize, usize)> = (0..blks.len()).flat_map(|bi| (0..dims.hkv).map(move |g| (bi, g))).collect();
    tasks.par_iter().for_each(|&(bi, kvh)| unsafe {
        let qrs = dims.hq * d;
        let krs = dims.hkv * d;
        for blk in query_chunks(blks[bi]) {
            let (nq, nk) = (blk.q1 - blk.q0, blk.k1 - blk.k0);
            let koff = ((blk.bb * dims.s + blk.k0) * dims.hkv + kvh) * d;
            for h in kvh * group..(kvh + 1) * group {
                let p = probs(q.as_ptr(), k.as_ptr(), &dims, &blk, h, scale);
                let qoff = ((blk.bb * dims.t + blk.q0) * dims.hq + h) * d;
                // dP = dO·Vᵀ
                let mut ds = vec![T::ZERO; nq * nk];
                gemm_raw(nq, nk, d, ds.as_mut_ptr(), nk, dout.as_ptr().add(qoff), qrs, 1, v.as_ptr().add(koff), 1, krs, false, false);
                // dS = P ⊙ (dP − Σ_j P dP) · scale
                for i in 0..nq {
                    let pr = &p[i * nk..(i + 1) * nk];
                    let dr = &mut ds[i * nk..(i + 1) * nk];
                    let mut dot = T::ZERO;
                    for j in 0..nk {
                        dot += pr[j] * dr[j];
                    }
                    for j in 0..nk {
                        dr[j] = pr[j] * (dr[j] - dot) * scale;
                    }
                }
                // dQ = dS·K ; dK += dSᵀ·Q ; dV += Pᵀ·dO
                gemm_raw(nq, d, nk, dqp.get().add(qoff), qrs, ds.as_ptr(), nk, 1, k.as_ptr().add(koff), krs, 1, false, false);
                gemm_raw(nk, d, nq, dkp.get().add(koff), krs, ds.as_ptr(), 1, nk, q.as_ptr().add(qoff), qrs, 1, true, false);
                gemm_raw(nk, d, nq, dvp.get().add(koff), krs, p.as_ptr(), 1, nk, dout.as_ptr().add(qoff), qrs, 1, true, false);
            }
        }
    });
    (dq, dk, dv)
}

/// Gradients of `matmul`: d op(A) = dY·op(B)ᵀ, d op(B) = op(A)ᵀ·dY, transposes folded back;
/// a shared `b` accumulates over the batch.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward<T: Real>(dy: &[T], a: &[T], b: &[T], batch: usize, b_shared: bool, m: usize, k: usize, n: usize, ta: bool, tb: bool) -> (Vec<T>, Vec<T>) {
    let mut da = vec![T::ZERO; a.len()];
    let mut db = vec![T::ZERO; b.len()];
    for i in 0..batch {
        let dyi = &dy[i * m * n..(i + 1) * m * n];
        let ai = &a[i * m * k..(i + 1) * m * k];
        let bo = if b_shared { 0 } else { i * k * n };
        let bi = &b[bo..bo + k * n];
        // d op(A) [m,k] = dY [m,n] · op(B)ᵀ [n,k]; op(B)ᵀ is b read with the opposite flag.
        let dopa = matmul(dyi, bi, 1, true, m, n, k, false, !tb);
        for r in 0..m {
            for c in 0..k {
                let dst = if ta { c * m + r } else { r * k + c };
                da[i * m * k + dst] = dopa[r * k + c];
            }
        }
        // d op(B) [k,n] = op(A)ᵀ [k,m] · dY [m,n]
        let dopb = matmul(ai, dyi, 1, true, k, m, n, !ta, false);
        for r in 0..k {
            for c in 0..n {
                let dst = if tb { bo + c * k + r } else { bo + r * n + c };
                db[dst] += dopb[r * n + c];
            }
        }
    }
    (da, db)
}
