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
        #[cfg(target_arch = "x86_64")]
        if let (Some(y), Some(g), Some(u)) = (as_f32_mut(y), as_f32(g), as_f32(u)) {
            if super::packed::available() {
                // SAFETY: AVX2 and FMA are available (checked).
                return unsafe { swiglu_avx2(y, g, u) };
            }
        }
        for i in 0..y.len() {
            y[i] = silu(g[i]) * u[i];
        }
    });
    y
}

/// `s` as f32 when `T` is f32 (the kernels are generic; their AVX2 paths are f32 only).
pub(crate) fn as_f32<T: Real>(s: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32 (checked), so the slice is the same memory with the same type.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) })
}

/// `s` as mutable f32 when `T` is f32.
pub(crate) fn as_f32_mut<T: Real>(s: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: as in `as_f32`.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut f32, s.len()) })
}

/// y = g · σ(g) · u, eight lanes at a time with [`exp256`]; `expf` per element was ~2/3 of the
/// decode step's `exp` time (gate width × rows per layer), the attention softmax the rest.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_avx2(y: &mut [f32], g: &[f32], u: &[f32]) {
    use std::arch::x86_64::*;
    let body = y.len() / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    for c in (0..body).step_by(8) {
        let gv = _mm256_loadu_ps(g.as_ptr().add(c));
        let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        let silu = _mm256_div_ps(gv, _mm256_add_ps(one, e));
        _mm256_storeu_ps(y.as_mut_ptr().add(c), _mm256_mul_ps(silu, _mm256_loadu_ps(u.as_ptr().add(c))));
    }
    for i in body..y.len() {
        y[i] = silu(g[i]) * u[i];
    }
}

/// out = e^((x − sub) · mul) for every x, 8-wide with [`exp256`] on AVX2 (within 2 ulp of
/// `expf`); the sampler's exps over the vocabulary.
pub fn exp_shift_scale(x: &[f32], sub: f32, mul: f32, out: &mut Vec<f32>) {
    out.clear();
    out.reserve(x.len());
    #[cfg(target_arch = "x86_64")]
    if super::packed::available() {
        // SAFETY: AVX2 and FMA are available (checked); `out` has the capacity for x.len().
        unsafe {
            exp_shift_scale_avx2(x, sub, mul, out.as_mut_ptr());
            out.set_len(x.len());
        }
        return;
    }
    out.extend(x.iter().map(|&v| ((v - sub) * mul).exp()));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shift_scale_avx2(x: &[f32], sub: f32, mul: f32, out: *mut f32) {
    use std::arch::x86_64::*;
    let body = x.len() / 8 * 8;
    let (vs, vm) = (_mm256_set1_ps(sub), _mm256_set1_ps(mul));
    for c in (0..body).step_by(8) {
        _mm256_storeu_ps(out.add(c), exp256(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(c)), vs), vm)));
    }
    for (i, &v) in x.iter().enumerate().skip(body) {
        *out.add(i) = ((v - sub) * mul).exp();
    }
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
    if let (Some(q), Some(k), Some(v), true) = (as_f32(q), as_f32(k), as_f32(v), super::packed::available()) {
        // SAFETY: T is f32 (as_f32 checked), so the scale and the pointer are f32 too.
        let scale = *(&scale as *const T as *const f32);
        return attend_few_avx2(q, k, v, dims, blk, heads, scale, SendPtr(out.get() as *mut f32));
    }
    attend_few(q, k, v, dims, blk, heads, scale, out)
}

/// [`attend_few`] for f32 with AVX2/FMA intrinsics. Where the time went in the compiled generic
/// loop (perf, decode at 32 rows: attention ≈ 25 % of a step, `expf` another 7 %): reducing
/// each 8-wide dot product to a scalar (one per key and head), a scalar `expf` per score, and
/// the P·V sums, whose output rows went through memory for every key (store-bound). Here four
/// heads' dot products with a key are reduced together (three `hadd`s) with the row maxima
/// kept on the way, the softmax is one 8-wide `exp` pass, and P·V accumulates in registers
/// (normalised once at the end). Probe (32 rows × 128 keys, 8/2 heads of 32, one thread):
/// 53 → 18 ns per (row, KV head, key). Head dims that are not a multiple of 8 take the
/// generic loop.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_few_avx2(q: &[f32], k: &[f32], v: &[f32], dims: &AttnDims, blk: &Block, heads: Range<usize>, scale: f32, out: SendPtr<f32>) {
    use std::arch::x86_64::*;
    let d = dims.d;
    if !d.is_multiple_of(8) {
        return attend_few(q, k, v, dims, blk, heads, scale, out);
    }
    let kvh = heads.start / (dims.hq / dims.hkv);
    let (nk, nh) = (blk.k1 - blk.k0, heads.len());
    // Key/value row j of this block and KV head: base + j·stride.
    let first = ((blk.bb * dims.s + blk.k0) * dims.hkv + kvh) * d;
    let (kb, vb, stride) = (k.as_ptr().add(first), v.as_ptr().add(first), dims.hkv * d);
    // Unnormalised probabilities p[h·nk + j], each head's score maximum and 1 / Σ.
    let mut p = vec![0f32; nh * nk];
    let (mut mx, mut inv) = (vec![f32::NEG_INFINITY; nh], vec![0f32; nh]);
    for i in 0..blk.q1 - blk.q0 {
        let qo = ((blk.bb * dims.t + blk.q0 + i) * dims.hq + heads.start) * d;
        let visible = blk.causal_shift.map_or(nk, |sh| (sh + blk.q0 + i + 1).saturating_sub(blk.k0).min(nk));
        let qh = |hh: usize| q.as_ptr().add(qo + hh * d);
        let pp = p.as_mut_ptr();
        mx.fill(f32::NEG_INFINITY);
        // Scores, four heads at a time.
        let mut h0 = 0;
        while h0 + 4 <= nh {
            let (q0, q1, q2, q3) = (qh(h0), qh(h0 + 1), qh(h0 + 2), qh(h0 + 3));
            let mut m4 = _mm_set1_ps(f32::NEG_INFINITY);
            for j in 0..visible {
                let kj = kb.add(j * stride);
                let (mut a0, mut a1, mut a2, mut a3) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
                for c in (0..d).step_by(8) {
                    let kv = _mm256_loadu_ps(kj.add(c));
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0.add(c)), kv, a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1.add(c)), kv, a1);
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2.add(c)), kv, a2);
                    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3.add(c)), kv, a3);
                }
                // [a0 a1 a2 a3] per 128-bit half after three pairwise adds, then the halves.
                let t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
                let sc = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t)), _mm_set1_ps(scale));
                m4 = _mm_max_ps(m4, sc);
                let row = pp.add(h0 * nk + j);
                _mm_store_ss(row, sc);
                _mm_store_ss(row.add(nk), _mm_shuffle_ps::<1>(sc, sc));
                _mm_store_ss(row.add(2 * nk), _mm_shuffle_ps::<2>(sc, sc));
                _mm_store_ss(row.add(3 * nk), _mm_shuffle_ps::<3>(sc, sc));
            }
            _mm_storeu_ps(mx.as_mut_ptr().add(h0), m4);
            h0 += 4;
        }
        for (hh, m) in mx.iter_mut().enumerate().skip(h0) {
            let qp = qh(hh);
            for j in 0..visible {
                let kj = kb.add(j * stride);
                let mut a = _mm256_setzero_ps();
                for c in (0..d).step_by(8) {
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), _mm256_loadu_ps(kj.add(c)), a);
                }
                let sc = hsum256(a) * scale;
                *pp.add(hh * nk + j) = sc;
                *m = m.max(sc);
            }
        }
        // Softmax over the visible keys (masked keys are never read); 1/Σ is applied to O.
        for hh in 0..nh {
            let sum = exp_shifted_avx2(&mut p[hh * nk..hh * nk + visible], mx[hh]);
            inv[hh] = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        }
        // O[h] = Σ_j P[h, j] · V[j] / Σ_h, in registers: two heads at a time, 8-wide strips of
        // up to 32 columns (each value strip loaded once for both heads).
        let o = out.get().add(qo);
        let pr = p.as_ptr();
        let mut h0 = 0;
        while h0 < nh {
            let h1 = (h0 + 1).min(nh - 1);
            let (p0, p1, s) = (pr.add(h0 * nk), pr.add(h1 * nk), [inv[h0], inv[h1]]);
            let o1 = (h1 > h0).then(|| o.add(h1 * d));
            let mut c0 = 0;
            while c0 < d {
                let w = ((d - c0) / 8).min(4);
                let (vc, o0, o1) = (vb.add(c0), o.add(h0 * d + c0), o1.map(|o1| o1.add(c0)));
                match w {
                    4 => pv_strip::<4>(p0, p1, s, vc, stride, visible, o0, o1),
                    3 => pv_strip::<3>(p0, p1, s, vc, stride, visible, o0, o1),
                    2 => pv_strip::<2>(p0, p1, s, vc, stride, visible, o0, o1),
                    _ => pv_strip::<1>(p0, p1, s, vc, stride, visible, o0, o1),
                }
                c0 += w * 8;
            }
            h0 += 2;
        }
    }
}

/// o0 (+)= s0 · Σ_j p0[j] · V[j, 0..8W] and, for a pair, o1 (+)= s1 · Σ_j p1[j] · V[j, 0..8W],
/// with the 2·W accumulators in registers (value rows `vs` apart).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_strip<const W: usize>(p0: *const f32, p1: *const f32, s: [f32; 2], v: *const f32, vs: usize, keys: usize, o0: *mut f32, o1: Option<*mut f32>) {
    use std::arch::x86_64::*;
    let mut a = [_mm256_setzero_ps(); W];
    let mut b = [_mm256_setzero_ps(); W];
    for j in 0..keys {
        let vj = v.add(j * vs);
        let (x0, x1) = (_mm256_broadcast_ss(&*p0.add(j)), _mm256_broadcast_ss(&*p1.add(j)));
        for c in 0..W {
            let vv = _mm256_loadu_ps(vj.add(c * 8));
            a[c] = _mm256_fmadd_ps(x0, vv, a[c]);
            b[c] = _mm256_fmadd_ps(x1, vv, b[c]);
        }
    }
    let (s0, s1) = (_mm256_set1_ps(s[0]), _mm256_set1_ps(s[1]));
    for c in 0..W {
        _mm256_storeu_ps(o0.add(c * 8), _mm256_fmadd_ps(a[c], s0, _mm256_loadu_ps(o0.add(c * 8))));
        if let Some(o1) = o1 {
            _mm256_storeu_ps(o1.add(c * 8), _mm256_fmadd_ps(b[c], s1, _mm256_loadu_ps(o1.add(c * 8))));
        }
    }
}

/// r ← e^(r − max) in place with [`exp256`]; returns Σ. A row whose max is −∞ (no finite
/// score) becomes zeros with Σ = 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(r: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    if max == f32::NEG_INFINITY {
        r.fill(0.0);
        return 0.0;
    }
    let (body, ptr) = (r.len() / 8 * 8, r.as_mut_ptr());
    let (vmx, mut vs) = (_mm256_set1_ps(max), _mm256_setzero_ps());
    for c in (0..body).step_by(8) {
        let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(ptr.add(c)), vmx));
        _mm256_storeu_ps(ptr.add(c), e);
        vs = _mm256_add_ps(vs, e);
    }
    let mut s = hsum256(vs);
    for x in &mut r[body..] {
        *x = (*x - max).exp();
        s += *x;
    }
    s
}

/// The sum of the eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum256(a: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// e^x for eight lanes: Cephes' `expf` (x = n·ln 2 + r, |r| ≤ ln 2 / 2, degree-6 polynomial
/// for e^r, 2ⁿ built in the exponent bits), within 2 ulp of the exact value over [-87, 88]. Inputs below
/// -87 give e^-87 ≈ 1.6e-38 (used only on x − max ≤ 0, where such terms are negligible
/// beside the max's 1); NaN is not expected.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn exp256(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)));
    // r = x − n·ln 2 in two parts (Cody–Waite), exact for |n| ≤ 128.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    // Cephes' coefficients as published (the last, 5.0000001201e-1, rounds to 0.5 in f32).
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
    let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
    _mm256_mul_ps(y, pow2n)
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

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    /// exp256 against f64 `exp` over the range the softmax uses (x − max ≤ 0) and beyond:
    /// relative error within 2 ulp (2 × 2⁻²³ ≈ 2.4e-7), Cephes' bound for this polynomial.
    #[test]
    fn exp256_is_within_two_ulp() {
        if !super::super::packed::available() {
            return;
        }
        let xs: Vec<f32> = (0..200_000).map(|i| -87.0 + i as f32 * (175.0 / 200_000.0)).chain([0.0, -0.0, 1e-30, -1e-30]).collect();
        let mut worst = 0f64;
        for c in xs.chunks(8) {
            let mut lanes = [0f32; 8];
            lanes[..c.len()].copy_from_slice(c);
            let mut got = [0f32; 8];
            // SAFETY: AVX2 and FMA are available (checked above).
            unsafe {
                use std::arch::x86_64::*;
                _mm256_storeu_ps(got.as_mut_ptr(), super::exp256(_mm256_loadu_ps(lanes.as_ptr())));
            }
            for (x, y) in c.iter().zip(got) {
                let want = (*x as f64).exp();
                worst = worst.max(((y as f64 - want) / want).abs());
            }
        }
        assert!(worst <= 2.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
    }

    /// The f32 swiglu (8-wide `exp` on AVX2) against f64 over large and tiny gates and a
    /// length with a remainder: within 1e-6 relative (a few f32 roundings: exp, add, divide,
    /// two products).
    #[test]
    fn f32_swiglu_matches_f64() {
        // Inputs exactly representable in f32, so both sides see the same gates.
        let g: Vec<f64> = (0..1003).map(|i| ((i as f64 - 501.0) * 0.23) as f32 as f64).chain([95.0, -95.0, 0.0]).collect();
        let u: Vec<f64> = (0..g.len()).map(|i| 1.0 + (i % 7) as f64 * 0.5).collect();
        let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let y32 = super::swiglu(&f(&g), &f(&u));
        let want = super::swiglu(&g, &u);
        for ((a, b), x) in y32.iter().zip(&want).zip(&g) {
            let err = (*a as f64 - b).abs() / b.abs().max(1e-30);
            assert!(err < 1e-6 || (*a as f64 - b).abs() < 1e-35, "gate {x}: {a} vs {b}");
        }
    }

    /// The sampler's exps against f64 `exp` of the same f32 argument: within 3 ulp (exp256's 2
    /// plus the final rounding), remainder included.
    #[test]
    fn exp_shift_scale_matches_expf() {
        let x: Vec<f32> = (0..2051).map(|i| (i as f32 - 1500.0) * 0.05).collect();
        let mut out = vec![1.0; 3];
        super::exp_shift_scale(&x, 25.0, 0.7, &mut out);
        assert_eq!(out.len(), x.len());
        for (o, &v) in out.iter().zip(&x) {
            // The argument as the f32 code forms it; the exp itself is what is checked.
            let want = (((v - 25.0) * 0.7f32) as f64).exp();
            assert!(((*o as f64 - want) / want).abs() <= 3.0 * f32::EPSILON as f64, "{v}: {o} vs {want}");
        }
    }
}
