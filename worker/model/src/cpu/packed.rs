//! `y = x·Wᵀ (+ b)` for few-row products (decoding, small prefills) with W re-laid out once.
//!
//! gemm packs both operands on every call. In a decode step W is reused call after call while x
//! has only a few dozen rows, so that per-call packing and its loop control cost about as much as
//! the arithmetic. Here W is packed once per weight version, into panels of [`NR`] output columns
//! stored K-major, and an AVX2/FMA micro-kernel computes 6 × 16 tiles of y streaming each panel
//! linearly from L1. The packed copy is cached on the weight tensor (`Tensor::derived`), so a
//! weight update (a new tensor, or a write through `as_f32_mut`) drops it.
//!
//! Each output element is a sum over k in a fixed order (blocks of [`KC`], in order), whatever the
//! number of rows, the row's place in a tile or the number of threads: a row's result does not
//! depend on what it is batched with.
use super::kernels::SendPtr;
use half::bf16;
use rayon::prelude::*;

/// Output columns per panel (two AVX registers).
pub const NR: usize = 16;
/// Rows per micro-kernel tile: 6 × 2 accumulators + 2 weight registers + 1 broadcast fit the 16
/// AVX registers.
const MR: usize = 6;
/// K per block: a 256 × 16 panel block is 16 KiB, and stays in L1 while all row tiles use it.
const KC: usize = 256;

/// W [n, k] (row-major, PyTorch `[out, in]`) as panels of [`NR`] columns: element (j, p) at
/// `(j / NR)·k·NR + p·NR + j % NR`; the last panel is zero-padded. BF16 weights stay BF16 (the
/// kernel widens them exactly), so packing never doubles a BF16 model.
#[derive(Debug)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    panels: Panels,
}

#[derive(Debug)]
enum Panels {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

/// A weight element the kernel can widen to f32 (exactly, for both types).
pub trait Elem: Copy + Default + Send + Sync + 'static {
    fn f32(self) -> f32;
}
impl Elem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}
impl Elem for bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

fn pack<T: Elem>(w: &[T], n: usize, k: usize) -> Vec<T> {
    assert_eq!(w.len(), n * k, "weight of {} values is not [{n}, {k}]", w.len());
    let mut panels = vec![T::default(); n.div_ceil(NR) * k * NR];
    // Serial on purpose: this runs inside the tensor's `OnceLock` initialiser, and a rayon join
    // there could let this thread pick up another task that waits on the same lock.
    panels.chunks_mut((k * NR).max(1)).enumerate().for_each(|(pj, panel)| {
        for jj in 0..NR.min(n - pj * NR) {
            let row = &w[(pj * NR + jj) * k..(pj * NR + jj + 1) * k];
            for (p, &v) in row.iter().enumerate() {
                panel[p * NR + jj] = v;
            }
        }
    });
    panels
}

impl PackedWeight {
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        PackedWeight { n, k, panels: Panels::F32(pack(w, n, k)) }
    }
    pub fn new_bf16(w: &[bf16], n: usize, k: usize) -> Self {
        PackedWeight { n, k, panels: Panels::BF16(pack(w, n, k)) }
    }

    /// (n, k) of the weight it was packed from.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }
}

/// Whether this CPU runs the packed kernel (x86-64 with AVX2 and FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// y [m, n] = x [m, k] · Wᵀ (+ b). On a CPU without AVX2/FMA a portable loop over the same layout
/// gives the same sums (the backend does not pack there: gemm is faster than that loop).
pub fn linear(x: &[f32], m: usize, w: &PackedWeight, b: Option<&[f32]>) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "x of {} values is not [{m}, {k}]", x.len());
    let mut y = vec![0f32; m * n];
    if let Some(b) = b {
        assert_eq!(b.len(), n, "bias of {} values for {n} outputs", b.len());
        for row in y.chunks_mut(n.max(1)) {
            row.copy_from_slice(b);
        }
    }
    if m == 0 || n == 0 {
        return y;
    }
    let panels = n.div_ceil(NR);
    let yp = SendPtr(y.as_mut_ptr());
    let run = |first: usize, end: usize| {
        for pj in first..end {
            let (j0, cols, r) = (pj * NR, NR.min(n - pj * NR), pj * k * NR..(pj + 1) * k * NR);
            // SAFETY: panel `pj` writes only columns j0..j0 + cols of each row of y, which no
            // other panel touches; x and the panel cover the ranges read.
            unsafe {
                match &w.panels {
                    Panels::F32(p) => panel(x, m, k, &p[r], yp.get(), n, j0, cols, b.is_some()),
                    Panels::BF16(p) => panel(x, m, k, &p[r], yp.get(), n, j0, cols, b.is_some()),
                }
            }
        }
    };
    let threads = rayon::current_num_threads();
    // Below ~64³ multiply-adds a rayon hand-off costs more than the second thread saves.
    if threads > 1 && panels > 1 && m * n * k >= 1 << 18 {
        let tasks = threads.min(panels);
        (0..tasks).into_par_iter().for_each(|t| run(t * panels / tasks, (t + 1) * panels / tasks));
    } else {
        run(0, panels);
    }
    y
}

/// All rows of y for one panel: K in blocks of [`KC`] (in order), rows in tiles of [`MR`].
///
/// # Safety
/// `c` points at y [m, n]; columns j0..j0+cols < n.
#[allow(clippy::too_many_arguments)]
unsafe fn panel<T: Elem>(x: &[f32], m: usize, k: usize, wp: &[T], c: *mut f32, n: usize, j0: usize, cols: usize, bias: bool) {
    let mut k0 = 0;
    while k0 < k {
        let kc = KC.min(k - k0);
        let accumulate = bias || k0 > 0;
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(MR);
            let t = Tile { x: x.as_ptr().add(i * k + k0), x_rs: k, w: wp.as_ptr().add(k0 * NR), kc, c: c.add(i * n + j0), c_rs: n, cols, accumulate };
            t.run(rows);
            i += rows;
        }
        k0 += kc;
    }
}

/// One micro-kernel call: C[rows, cols] (+)= X[rows, kc] · P[kc, NR] (the first `cols` columns).
struct Tile<T> {
    x: *const f32,
    x_rs: usize,
    w: *const T,
    kc: usize,
    c: *mut f32,
    c_rs: usize,
    cols: usize,
    accumulate: bool,
}

impl<T: Elem> Tile<T> {
    unsafe fn run(&self, rows: usize) {
        #[cfg(target_arch = "x86_64")]
        if available() {
            match rows {
                6 => return avx2::tile::<T, 6>(self),
                5 => return avx2::tile::<T, 5>(self),
                4 => return avx2::tile::<T, 4>(self),
                3 => return avx2::tile::<T, 3>(self),
                2 => return avx2::tile::<T, 2>(self),
                _ => return avx2::tile::<T, 1>(self),
            }
        }
        self.portable(rows)
    }

    /// The same sums as the AVX2 kernel, one lane at a time (FMA rounding aside).
    unsafe fn portable(&self, rows: usize) {
        for i in 0..rows {
            let mut acc = [0f32; NR];
            for p in 0..self.kc {
                let xv = *self.x.add(i * self.x_rs + p);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = xv.mul_add((*self.w.add(p * NR + j)).f32(), *a);
                }
            }
            self.store(i, &acc);
        }
    }

    #[inline(always)]
    unsafe fn store(&self, i: usize, acc: &[f32; NR]) {
        let c = self.c.add(i * self.c_rs);
        for (j, &a) in acc.iter().take(self.cols).enumerate() {
            *c.add(j) = if self.accumulate { *c.add(j) + a } else { a };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Elem, Tile, NR};
    use half::bf16;
    use std::any::TypeId;
    use std::arch::x86_64::*;

    /// Eight weights at `p` widened to f32 (BF16: the 16 bits become the top of an f32, exact).
    #[inline(always)]
    unsafe fn load8<T: Elem>(p: *const T) -> __m256 {
        if TypeId::of::<T>() == TypeId::of::<bf16>() {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; the tile's pointers cover its ranges.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<T: Elem, const R: usize>(t: &Tile<T>) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for p in 0..t.kc {
            let w0 = load8(t.w.add(p * NR));
            let w1 = load8(t.w.add(p * NR + 8));
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*t.x.add(i * t.x_rs + p));
                a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let c = t.c.add(i * t.c_rs);
            if t.cols == NR {
                let (mut lo, mut hi) = (a[0], a[1]);
                if t.accumulate {
                    lo = _mm256_add_ps(lo, _mm256_loadu_ps(c));
                    hi = _mm256_add_ps(hi, _mm256_loadu_ps(c.add(8)));
                }
                _mm256_storeu_ps(c, lo);
                _mm256_storeu_ps(c.add(8), hi);
            } else {
                let mut buf = [0f32; NR];
                _mm256_storeu_ps(buf.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(buf.as_mut_ptr().add(8), a[1]);
                t.store(i, &buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 reference: the oracle both kernels are held to.
    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, b: Option<&[f32]>) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
                y[i * n + j] = s + b.map_or(0.0, |b| b[j] as f64);
            }
        }
        y
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| (((i + seed) * 2654435761) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn matches_f64_reference_on_ragged_shapes() {
        // Rows across tile edges (1..13 with MR = 6), columns off the panel width, K across the
        // KC block edge; with and without bias.
        for &(m, k, n) in &[(1, 1, 1), (5, 7, 3), (6, 16, 16), (7, 255, 17), (13, 257, 33), (32, 520, 100), (2, 64, 1), (70, 300, 48)] {
            for bias in [false, true] {
                let (x, w, b) = (values(m * k, 1), values(n * k, 2), values(n, 3));
                let b = bias.then_some(&b[..]);
                let y = linear(&x, m, &PackedWeight::new(&w, n, k), b);
                let r = reference(&x, m, k, &w, n, b);
                // f32 sums of k products of values in [-1, 1]: error ≤ k·ε·Σ|x·w| ≈ k²·1.2e-7
                // worst case; 1e-6·k (bounded by the random-walk size far below) is ample and
                // still catches any misplaced or missing term (≥ 1e-3 here).
                let tol = 1e-6 * k as f64 + 1e-6;
                for (i, (a, e)) in y.iter().zip(&r).enumerate() {
                    assert!((*a as f64 - e).abs() <= tol, "m{m} k{k} n{n} bias {bias}: y[{i}] = {a}, expected {e}");
                }
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        let (m, k, n) = (13, 300, 40);
        let (x, w) = (values(m * k, 4), values(n * k, 5));
        let pw = PackedWeight::new(&w, n, k);
        let all = linear(&x, m, &pw, None);
        for i in 0..m {
            let one = linear(&x[i * k..(i + 1) * k], 1, &pw, None);
            assert_eq!(one, all[i * n..(i + 1) * n], "row {i}");
        }
    }

    #[test]
    fn portable_loop_matches_the_avx2_kernel() {
        let (m, k, n) = (9, 270, 20);
        let (x, w) = (values(m * k, 6), values(n * k, 7));
        let pw = PackedWeight::new(&w, n, k);
        let fast = linear(&x, m, &pw, None);
        let Panels::F32(panels) = &pw.panels else { unreachable!("packed from f32") };
        let mut slow = vec![0f32; m * n];
        for pj in 0..n.div_ceil(NR) {
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                let t = Tile {
                    x: x[k0..].as_ptr(),
                    x_rs: k,
                    w: panels[pj * k * NR + k0 * NR..].as_ptr(),
                    kc,
                    c: slow[pj * NR..].as_mut_ptr(),
                    c_rs: n,
                    cols: NR.min(n - pj * NR),
                    accumulate: k0 > 0,
                };
                unsafe { t.portable(m) };
                k0 += kc;
            }
        }
        // Same terms in the same order; both use fused multiply-adds, so the sums agree exactly.
        assert_eq!(fast, slow);
    }

    #[test]
    fn bf16_panels_give_exactly_the_f32_result() {
        // Weights exactly representable in BF16: widening is exact, so the sums are identical.
        for &(m, k, n) in &[(1, 5, 3), (8, 300, 37), (40, 64, 16)] {
            let x = values(m * k, 8);
            let w: Vec<f32> = values(n * k, 9).iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let b = values(n, 10);
            let f = linear(&x, m, &PackedWeight::new(&w, n, k), Some(&b));
            assert_eq!(linear(&x, m, &PackedWeight::new_bf16(&wb, n, k), Some(&b)), f, "m{m} k{k} n{n}");
        }
    }
}
