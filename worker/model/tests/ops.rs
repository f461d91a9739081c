//! Forward ops against naive references and every backward against central finite
//! differences in f64 (the kernels are generic; the backend runs the same code in f32).
mod common;
use common::rand_vec;
use onevision_model::cpu::kernels::{self, AttnDims};
use onevision_model::rope::{mrope_tables, vision_rope_tables};
use onevision_model::{AttnMask, AttnSpec, Backend, CpuBackend, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rv(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Checks `analytic` = ∂/∂x Σ dy⊙f(x) by central differences (eps 1e-6 in f64: truncation
/// ~1e-12, rounding ~1e-10, so 1e-6 relative tolerance leaves a wide margin while any wrong
/// term is O(1)).
fn fd_check(name: &str, f: &dyn Fn(&[f64]) -> Vec<f64>, x: &[f64], dy: &[f64], analytic: &[f64]) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let eps = 1e-6;
    let loss = |x: &[f64]| f(x).iter().zip(dy).map(|(a, b)| a * b).sum::<f64>();
    let scale = analytic.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        xp[i] = x[i] + eps;
        let lp = loss(&xp);
        xp[i] = x[i] - eps;
        let lm = loss(&xp);
        xp[i] = x[i];
        let num = (lp - lm) / (2.0 * eps);
        assert!((num - analytic[i]).abs() <= 1e-6 * scale, "{name}[{i}]: numeric {num} vs analytic {}", analytic[i]);
    }
}

#[test]
fn linear_backward_fd() {
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let (m, k, n) = (5, 7, 4);
    let (x, w, b, dy) = (rv(&mut r, m * k), rv(&mut r, n * k), rv(&mut r, n), rv(&mut r, m * n));
    let (dx, dw, db) = kernels::linear_backward(&dy, &x, m, k, &w, n, true);
    fd_check("linear dx", &|x| kernels::linear(x, m, k, &w, n, Some(&b)), &x, &dy, &dx);
    fd_check("linear dw", &|w| kernels::linear(&x, m, k, w, n, Some(&b)), &w, &dy, &dw);
    fd_check("linear db", &|b| kernels::linear(&x, m, k, &w, n, Some(b)), &b, &dy, &db.unwrap());
    // Forward against the definition.
    let y = kernels::linear(&x, m, k, &w, n, Some(&b));
    for i in 0..m {
        for j in 0..n {
            let want: f64 = b[j] + (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum::<f64>();
            assert!((y[i * n + j] - want).abs() < 1e-12);
        }
    }
}

/// Decode-sized products (≤ 4 rows, large weight) take the row-split path: same results.
#[test]
fn thin_linear_path_matches_definition() {
    let mut r = ChaCha8Rng::seed_from_u64(12);
    for m in [1, 3, 4, 5] {
        let (k, n) = (64, 1100);
        let (x, w, b) = (rv(&mut r, m * k), rv(&mut r, n * k), rv(&mut r, n));
        let y = kernels::linear(&x, m, k, &w, n, Some(&b));
        for i in 0..m {
            for j in 0..n {
                let want: f64 = b[j] + (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum::<f64>();
                assert!((y[i * n + j] - want).abs() < 1e-12, "m={m} ({i},{j})");
            }
        }
    }
}

#[test]
fn matmul_all_transposes_fd() {
    let mut r = ChaCha8Rng::seed_from_u64(2);
    let (batch, m, k, n) = (3, 4, 5, 6);
    for shared in [false, true] {
        for ta in [false, true] {
            for tb in [false, true] {
                let a = rv(&mut r, batch * m * k);
                let b = rv(&mut r, if shared { k * n } else { batch * k * n });
                let dy = rv(&mut r, batch * m * n);
                let y = kernels::matmul(&a, &b, batch, shared, m, k, n, ta, tb);
                for bi in 0..batch {
                    for i in 0..m {
                        for j in 0..n {
                            let bo = if shared { 0 } else { bi * k * n };
                            let want: f64 = (0..k)
                                .map(|p| {
                                    let av = if ta { a[bi * m * k + p * m + i] } else { a[bi * m * k + i * k + p] };
                                    let bv = if tb { b[bo + j * k + p] } else { b[bo + p * n + j] };
                                    av * bv
                                })
                                .sum();
                            assert!((y[bi * m * n + i * n + j] - want).abs() < 1e-12, "ta={ta} tb={tb}");
                        }
                    }
                }
                let (da, db) = kernels::matmul_backward(&dy, &a, &b, batch, shared, m, k, n, ta, tb);
                let tag = format!("matmul ta={ta} tb={tb} shared={shared}");
                fd_check(&format!("{tag} da"), &|a| kernels::matmul(a, &b, batch, shared, m, k, n, ta, tb), &a, &dy, &da);
                fd_check(&format!("{tag} db"), &|b| kernels::matmul(&a, b, batch, shared, m, k, n, ta, tb), &b, &dy, &db);
            }
        }
    }
}

#[test]
fn rms_norm_forward_and_backward_fd() {
    let mut r = ChaCha8Rng::seed_from_u64(3);
    let (rows, d) = (4, 6);
    let (x, w, dy) = (rv(&mut r, rows * d), rv(&mut r, d), rv(&mut r, rows * d));
    let eps = 1e-6;
    let y = kernels::rms_norm(&x, d, &w, eps);
    let ms: f64 = x[..d].iter().map(|v| v * v).sum::<f64>() / d as f64;
    assert!((y[2] - w[2] * x[2] / (ms + eps).sqrt()).abs() < 1e-12);
    let (dx, dw) = kernels::rms_norm_backward(&dy, &x, d, &w, eps);
    fd_check("rms dx", &|x| kernels::rms_norm(x, d, &w, eps), &x, &dy, &dx);
    fd_check("rms dw", &|w| kernels::rms_norm(&x, d, w, eps), &w, &dy, &dw);
}

#[test]
fn rope_variants_forward_and_backward_fd() {
    let mut r = ChaCha8Rng::seed_from_u64(4);
    // Text M-RoPE (3 axes, sections [1,1,2] of head_dim 8) and vision 2D tables.
    let (cos_t, sin_t) = mrope_tables(&[[0, 0, 0], [3, 4, 5], [7, 7, 9]], 8, 10000.0, &[1, 1, 2]).unwrap();
    let (cos_v, sin_v) = vision_rope_tables(&[[1, 2, 2]], 8, 2);
    for (name, cos, sin, rows) in [("mrope", cos_t, sin_t, 3), ("vision", cos_v, sin_v, 4)] {
        let (h, d) = (2, 8);
        let cos: Vec<f64> = cos.iter().map(|&v| v as f64).collect();
        let sin: Vec<f64> = sin.iter().map(|&v| v as f64).collect();
        let (x, dy) = (rv(&mut r, rows * h * d), rv(&mut r, rows * h * d));
        let y = kernels::rope(&x, rows, h, d, &cos, &sin);
        // Definition: rotate pairs (i, i+d/2).
        for row in 0..rows {
            for hh in 0..h {
                for i in 0..d / 2 {
                    let o = (row * h + hh) * d;
                    let want = x[o + i] * cos[row * d + i] - x[o + i + d / 2] * sin[row * d + i];
                    assert!((y[o + i] - want).abs() < 1e-12, "{name}");
                }
            }
        }
        let dx = kernels::rope_backward(&dy, rows, h, d, &cos, &sin);
        fd_check(name, &|x| kernels::rope(x, rows, h, d, &cos, &sin), &x, &dy, &dx);
    }
}

#[test]
fn swiglu_gelu_softmax_backward_fd() {
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let n = 12;
    let (g, u, dy) = (rv(&mut r, n).iter().map(|v| v * 4.0).collect::<Vec<_>>(), rv(&mut r, n), rv(&mut r, n));
    let (dg, du) = kernels::swiglu_backward(&dy, &g, &u);
    fd_check("swiglu dgate", &|g| kernels::swiglu(g, &u), &g, &dy, &dg);
    fd_check("swiglu dup", &|u| kernels::swiglu(&g, u), &u, &dy, &du);
    let y = kernels::gelu(&g);
    // GELU(1) = 0.8413447460685429 (exact erf).
    assert!((kernels::gelu(&[1.0f64])[0] - 0.841_344_746_068_542_9).abs() < 1e-15);
    assert_eq!(y.len(), n);
    fd_check("gelu", &|x| kernels::gelu(x), &g, &dy, &kernels::gelu_backward(&dy, &g));
    let d = 4;
    let sm = |x: &[f64]| {
        let mut y = x.to_vec();
        kernels::softmax_rows(&mut y, d);
        y
    };
    let y = sm(&g);
    assert!((y[..d].iter().sum::<f64>() - 1.0).abs() < 1e-14);
    fd_check("softmax", &sm, &g, &dy, &kernels::softmax_backward(&dy, &y, d));
}

/// Naive attention in f64: explicit visibility rule per (query, key).
fn naive_attention(q: &[f64], k: &[f64], v: &[f64], dm: AttnDims, spec: &AttnSpec) -> Vec<f64> {
    let mut out = vec![0.0; q.len()];
    let visible = |bb: usize, i: usize, j: usize| -> bool {
        if j >= spec.kv_len {
            return false;
        }
        match &spec.mask {
            AttnMask::Segments(cu) => cu.windows(2).any(|w| w[0] <= i && i < w[1] && w[0] <= j && j < w[1]),
            AttnMask::Causal { q_offset, key_start } => j <= q_offset + i && j >= key_start.get(bb).copied().unwrap_or(0),
        }
    };
    for bb in 0..dm.b {
        for h in 0..dm.hq {
            let kvh = h / (dm.hq / dm.hkv);
            for i in 0..dm.t {
                let qo = ((bb * dm.t + i) * dm.hq + h) * dm.d;
                let mut s: Vec<(usize, f64)> = (0..dm.s)
                    .filter(|&j| visible(bb, i, j))
                    .map(|j| {
                        let ko = ((bb * dm.s + j) * dm.hkv + kvh) * dm.d;
                        (j, (0..dm.d).map(|e| q[qo + e] * k[ko + e]).sum::<f64>() * spec.scale as f64)
                    })
                    .collect();
                if s.is_empty() {
                    continue;
                }
                let mx = s.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x.1 - mx).exp()).sum();
                for (j, sc) in s.iter_mut() {
                    let p = (*sc - mx).exp() / z;
                    let vo = ((bb * dm.s + *j) * dm.hkv + kvh) * dm.d;
                    for e in 0..dm.d {
                        out[qo + e] += p * v[vo + e];
                    }
                }
            }
        }
    }
    out
}

fn attention_cases() -> Vec<(AttnDims, AttnSpec)> {
    vec![
        // Prefill over a cache with spare slots, left padding in batch 1, GQA 4:2, >1 query chunk.
        (
            AttnDims { b: 2, t: 70, s: 80, hq: 4, hkv: 2, d: 4 },
            AttnSpec { scale: 0.5, mask: AttnMask::Causal { q_offset: 0, key_start: vec![0, 3] }, kv_len: 70 },
        ),
        // Decode-style: 2 new queries after 5 cached keys.
        (
            AttnDims { b: 2, t: 2, s: 9, hq: 4, hkv: 1, d: 4 },
            AttnSpec { scale: 0.7, mask: AttnMask::Causal { q_offset: 5, key_start: vec![2, 0] }, kv_len: 7 },
        ),
        // One query per row (a decode step), head_dim 20 = two 8-wide dot chunks + a remainder,
        // a row whose only visible key is the newest one.
        (
            AttnDims { b: 3, t: 1, s: 24, hq: 4, hkv: 2, d: 20 },
            AttnSpec { scale: 0.3, mask: AttnMask::Causal { q_offset: 20, key_start: vec![0, 5, 20] }, kv_len: 21 },
        ),
        // The same with head_dim 16: the 8-wide AVX2 path on CPUs that have it; two queries.
        (
            AttnDims { b: 2, t: 2, s: 12, hq: 4, hkv: 2, d: 16 },
            AttnSpec { scale: 0.3, mask: AttnMask::Causal { q_offset: 9, key_start: vec![0, 4] }, kv_len: 11 },
        ),
        // A decode step at head_dim 72 (Qwen's 128 is too slow for the finite differences).
        (
            AttnDims { b: 2, t: 1, s: 10, hq: 4, hkv: 2, d: 72 },
            AttnSpec { scale: 0.2, mask: AttnMask::Causal { q_offset: 8, key_start: vec![0, 3] }, kv_len: 9 },
        ),
        // Decode steps through the AVX2 path with four query heads per KV head (the four-head
        // score reduction) and with six (four + two single heads); 19 and 13 keys leave
        // remainders after the 8-wide softmax chunks.
        (
            AttnDims { b: 2, t: 1, s: 20, hq: 4, hkv: 1, d: 16 },
            AttnSpec { scale: 0.4, mask: AttnMask::Causal { q_offset: 18, key_start: vec![0, 6] }, kv_len: 19 },
        ),
        (
            AttnDims { b: 1, t: 1, s: 14, hq: 12, hkv: 2, d: 8 },
            AttnSpec { scale: 0.35, mask: AttnMask::Causal { q_offset: 12, key_start: vec![0] }, kv_len: 13 },
        ),
        // Seven query heads per KV head (Qwen2.5-VL-7B's 28/4): an unpaired head in P·V, and
        // head_dim 24 (a three-register strip).
        (
            AttnDims { b: 2, t: 1, s: 11, hq: 7, hkv: 1, d: 24 },
            AttnSpec { scale: 0.3, mask: AttnMask::Causal { q_offset: 9, key_start: vec![0, 2] }, kv_len: 10 },
        ),
        // Segments and causal rows longer than one 64-query chunk (small heads for FD speed).
        (
            AttnDims { b: 1, t: 75, s: 75, hq: 2, hkv: 1, d: 2 },
            AttnSpec { scale: 0.5, mask: AttnMask::Segments(vec![0, 70, 75]), kv_len: 75 },
        ),
        (
            AttnDims { b: 1, t: 70, s: 72, hq: 2, hkv: 1, d: 2 },
            AttnSpec { scale: 0.5, mask: AttnMask::Causal { q_offset: 0, key_start: vec![1] }, kv_len: 70 },
        ),
        // Vision: variable-length non-causal segments, one empty.
        (
            AttnDims { b: 1, t: 10, s: 10, hq: 2, hkv: 2, d: 4 },
            AttnSpec { scale: 0.5, mask: AttnMask::Segments(vec![0, 4, 4, 9, 10]), kv_len: 10 },
        ),
    ]
}

#[test]
fn attention_matches_naive_and_backward_fd() {
    let mut r = ChaCha8Rng::seed_from_u64(6);
    for (dm, spec) in attention_cases() {
        let q = rv(&mut r, dm.b * dm.t * dm.hq * dm.d);
        let k = rv(&mut r, dm.b * dm.s * dm.hkv * dm.d);
        let v = rv(&mut r, dm.b * dm.s * dm.hkv * dm.d);
        let y = kernels::attention(&q, &k, &v, dm, &spec);
        let want = naive_attention(&q, &k, &v, dm, &spec);
        let err = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-12, "{spec:?}: forward err {err}");
        // The f32 kernel (the backend's; 8-wide AVX2 for few-query blocks when the CPU has it).
        // Outputs are convex combinations of values in [-1, 1] with f32 scores and exps: 1e-5.
        let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let y32 = kernels::attention(&f(&q), &f(&k), &f(&v), dm, &spec);
        let err = y32.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-5, "{spec:?}: f32 forward err {err}");
        // The first (largest) case is checked forward-only to keep the test fast.
        if q.len() > 1000 {
            continue;
        }
        let dy = rv(&mut r, q.len());
        let (dq, dk, dv) = kernels::attention_backward(&dy, &q, &k, &v, dm, &spec);
        fd_check("attn dq", &|q| kernels::attention(q, &k, &v, dm, &spec), &q, &dy, &dq);
        fd_check("attn dk", &|k| kernels::attention(&q, k, &v, dm, &spec), &k, &dy, &dk);
        fd_check("attn dv", &|v| kernels::attention(&q, &k, v, dm, &spec), &v, &dy, &dv);
    }
    // Causal prefill with padding and GQA, small enough for full finite differences.
    let dm = AttnDims { b: 2, t: 5, s: 6, hq: 4, hkv: 2, d: 3 };
    let spec = AttnSpec { scale: 0.6, mask: AttnMask::Causal { q_offset: 0, key_start: vec![0, 2] }, kv_len: 5 };
    let (q, k, v) = (rv(&mut r, 2 * 5 * 4 * 3), rv(&mut r, 2 * 6 * 2 * 3), rv(&mut r, 2 * 6 * 2 * 3));
    let dy = rv(&mut r, q.len());
    assert!(kernels::attention(&q, &k, &v, dm, &spec).iter().zip(naive_attention(&q, &k, &v, dm, &spec)).all(|(a, b)| (a - b).abs() < 1e-12));
    let (dq, dk, dv) = kernels::attention_backward(&dy, &q, &k, &v, dm, &spec);
    fd_check("causal dq", &|q| kernels::attention(q, &k, &v, dm, &spec), &q, &dy, &dq);
    fd_check("causal dk", &|k| kernels::attention(&q, k, &v, dm, &spec), &k, &dy, &dk);
    fd_check("causal dv", &|v| kernels::attention(&q, &k, v, dm, &spec), &v, &dy, &dv);
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    a.as_f32().unwrap().iter().zip(b.as_f32().unwrap()).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Index ops are linear: their backward must be the exact adjoint, ⟨dy, f(x)⟩ = ⟨f*(dy), x⟩.
#[test]
fn index_ops_backward_are_adjoints() {
    let be = CpuBackend;
    let mut r = ChaCha8Rng::seed_from_u64(7);
    let t = |r: &mut ChaCha8Rng, s: &[usize]| Tensor::from_f32(s, rand_vec(r, s.iter().product())).unwrap();
    // Embedding with repeated ids.
    let table = t(&mut r, &[6, 3]);
    let ids = [4u32, 1, 4, 0];
    let y = be.embedding(&table, &ids).unwrap();
    let dy = t(&mut r, &[4, 3]);
    assert!((dot(&dy, &y) - dot(&be.embedding_backward(&dy, &ids, 6).unwrap(), &table)).abs() < 1e-5);
    assert!(be.embedding(&table, &[6]).is_err(), "out-of-vocabulary id must be an error");
    // Window permutation (gather) and its inverse.
    let x = t(&mut r, &[5, 2, 2]);
    let idx = [3usize, 0, 4, 1, 2];
    let y = be.gather_rows(&x, &idx).unwrap();
    let dy = t(&mut r, &[5, 2, 2]);
    assert!((dot(&dy, &y) - dot(&be.gather_rows_backward(&dy, &idx, 5).unwrap(), &x)).abs() < 1e-5);
    let mut inv = [0usize; 5];
    for (i, &w) in idx.iter().enumerate() {
        inv[w] = i;
    }
    assert_eq!(be.gather_rows(&y, &inv).unwrap().as_f32().unwrap(), x.as_f32().unwrap());
    // Scatter of image features: linear in (x, src) jointly.
    let x = t(&mut r, &[6, 3]);
    let src = t(&mut r, &[2, 3]);
    let rows = [1usize, 4];
    let y = be.scatter_rows(&x, &rows, &src).unwrap();
    let dy = t(&mut r, &[6, 3]);
    let (dx, ds) = be.scatter_rows_backward(&dy, &rows).unwrap();
    assert!((dot(&dy, &y) - dot(&dx, &x) - dot(&ds, &src)).abs() < 1e-5);
    assert_eq!(&y.as_f32().unwrap()[3..6], &src.as_f32().unwrap()[..3]);
    // split/concat are each other's adjoint and inverse.
    let x = t(&mut r, &[3, 7]);
    let parts = be.split_last(&x, &[2, 5]).unwrap();
    assert_eq!(be.concat_last(&[&parts[0], &parts[1]]).unwrap().as_f32().unwrap(), x.as_f32().unwrap());
    assert!(be.split_last(&x, &[2, 4]).is_err());
}

/// Tied embeddings: loss = Σ c ⊙ (E[ids]·Eᵀ). Gradient = embedding_backward(dx of the head
/// input) + dW of the head. The loss is quadratic in E, so central differences are exact up to
/// f32 rounding (eps 1e-2, tolerance 2e-3 relative).
#[test]
fn tied_embedding_accumulates_lookup_and_head_gradients() {
    let be = CpuBackend;
    let mut r = ChaCha8Rng::seed_from_u64(8);
    let (v, h) = (5, 3);
    let e = Tensor::from_f32(&[v, h], rand_vec(&mut r, v * h)).unwrap();
    let ids = [2u32, 0, 2];
    let c = Tensor::from_f32(&[3, v], rand_vec(&mut r, 3 * v)).unwrap();
    let loss = |e: &Tensor| {
        let x = be.embedding(e, &ids).unwrap();
        dot(&be.linear(&x, e, None).unwrap(), &c)
    };
    let x = be.embedding(&e, &ids).unwrap();
    let g = be.linear_backward(&c, &x, &e, false).unwrap();
    let mut grad = be.embedding_backward(&g.dx, &ids, v).unwrap();
    be.add_assign(&mut grad, &g.dw).unwrap();
    let gv = grad.as_f32().unwrap();
    let scale = gv.iter().fold(1f32, |m, x| m.max(x.abs()));
    for i in 0..v * h {
        let mut p = e.to_f32_vec().unwrap();
        p[i] += 1e-2;
        let lp = loss(&Tensor::from_f32(&[v, h], p.clone()).unwrap());
        p[i] -= 2e-2;
        let lm = loss(&Tensor::from_f32(&[v, h], p).unwrap());
        let num = ((lp - lm) / 2e-2) as f32;
        assert!((num - gv[i]).abs() < 2e-3 * scale, "E[{i}]: numeric {num} vs {}", gv[i]);
    }
}

/// The f32 backend runs the same kernels: spot-check attention through the trait, and shape
/// errors instead of panics.
#[test]
fn backend_attention_and_shape_errors() {
    let be = CpuBackend;
    let mut r = ChaCha8Rng::seed_from_u64(9);
    let (dm, spec) = attention_cases().remove(0);
    let q = rand_vec(&mut r, dm.b * dm.t * dm.hq * dm.d);
    let k = rand_vec(&mut r, dm.b * dm.s * dm.hkv * dm.d);
    let v = rand_vec(&mut r, dm.b * dm.s * dm.hkv * dm.d);
    let tq = Tensor::from_f32(&[dm.b, dm.t, dm.hq, dm.d], q.clone()).unwrap();
    let tk = Tensor::from_f32(&[dm.b, dm.s, dm.hkv, dm.d], k.clone()).unwrap();
    let tv = Tensor::from_f32(&[dm.b, dm.s, dm.hkv, dm.d], v.clone()).unwrap();
    let y = be.attention(&tq, &tk, &tv, &spec).unwrap();
    let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
    let want = naive_attention(&f(&q), &f(&k), &f(&v), dm, &spec);
    // f32 vs f64: ~1e-7 relative per term over ≤ 80 keys.
    assert!(y.as_f32().unwrap().iter().zip(&want).all(|(a, b)| (*a as f64 - b).abs() < 1e-5));
    let bad = Tensor::zeros(&[dm.b, dm.s, 3, dm.d]);
    assert!(be.attention(&tq, &bad, &bad, &spec).is_err(), "Hq not a multiple of Hkv");
    assert!(be.linear(&Tensor::zeros(&[2, 3]), &Tensor::zeros(&[4, 5]), None).is_err());
    assert!(be.rms_norm(&Tensor::zeros(&[2, 3]), &Tensor::zeros(&[4]), 1e-6).is_err());
    assert!(be.rope(&Tensor::zeros(&[2, 1, 4]), &Tensor::zeros(&[3, 4]), &Tensor::zeros(&[3, 4])).is_err());
}

/// BF16 weights are upcast block-wise inside `linear`: same result as an F32 copy of the
/// weight (only gemm blocking differs: ≤ 1e-5 relative for k = 300).
#[test]
fn bf16_weight_linear_matches_f32() {
    let be = CpuBackend;
    let mut r = ChaCha8Rng::seed_from_u64(13);
    for (m, k, n) in [(1, 300, 70), (37, 300, 1100)] {
        let x = Tensor::from_f32(&[m, k], rand_vec(&mut r, m * k)).unwrap();
        let w = Tensor::from_f32(&[n, k], rand_vec(&mut r, n * k)).unwrap().to_dtype(onevision_model::DType::BF16).unwrap();
        let b = Tensor::from_f32(&[n], rand_vec(&mut r, n)).unwrap();
        let got = be.linear(&x, &w, Some(&b)).unwrap();
        let want = be.linear(&x, &w.to_dtype(onevision_model::DType::F32).unwrap(), Some(&b)).unwrap();
        let scale = want.as_f32().unwrap().iter().fold(0f32, |a, v| a.max(v.abs()));
        for (a, c) in got.as_f32().unwrap().iter().zip(want.as_f32().unwrap()) {
            assert!((a - c).abs() <= 1e-5 * scale, "m={m}: {a} vs {c}");
        }
    }
}

/// Few-row products use the packed kernel, with W packed once and cached on the tensor; rows
/// above the threshold use gemm. Both agree with the kernels' definition, and the cached layout
/// follows the weight: a write through `as_f32_mut` or a reshape never reuses a stale packing.
#[test]
fn packed_linear_follows_weight_writes_and_matches_gemm() {
    let be = CpuBackend;
    let mut r = ChaCha8Rng::seed_from_u64(14);
    let (k, n) = (300, 70);
    let x = rand_vec(&mut r, 300 * k);
    let mut w = Tensor::from_f32(&[n, k], rand_vec(&mut r, n * k)).unwrap();
    let close = |got: &Tensor, want: &[f32], what: &str| {
        // Different summation orders of 300 f32 products: ≤ 1e-5 relative to the largest output.
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (a, c) in got.as_f32().unwrap().iter().zip(want) {
            assert!((a - c).abs() <= 1e-5 * scale, "{what}: {a} vs {c}");
        }
    };
    for m in [1, 7, 32, 300] {
        let xt = Tensor::from_f32(&[m, k], x[..m * k].to_vec()).unwrap();
        let want = kernels::linear(&x[..m * k], m, k, w.as_f32().unwrap(), n, None);
        close(&be.linear(&xt, &w, None).unwrap(), &want, &format!("m={m}"));
    }
    let xt = Tensor::from_f32(&[4, k], x[..4 * k].to_vec()).unwrap();
    let before = be.linear(&xt, &w, None).unwrap();
    let shared = w.clone();
    w.as_f32_mut().unwrap().iter_mut().for_each(|v| *v *= 2.0);
    let after = be.linear(&xt, &w, None).unwrap();
    let doubled: Vec<f32> = before.as_f32().unwrap().iter().map(|v| 2.0 * v).collect();
    close(&after, &doubled, "after a write");
    // The clone taken before the write still has (and multiplies by) the old values.
    assert_eq!(be.linear(&xt, &shared, None).unwrap().as_f32().unwrap(), before.as_f32().unwrap());
    // A reshape to another [n', k'] shares the storage but must not use the [70, 300] packing.
    let wr = w.reshape(&[n * 2, k / 2]).unwrap();
    let xr = Tensor::from_f32(&[4, k / 2], x[..4 * k / 2].to_vec()).unwrap();
    let want = kernels::linear(xr.as_f32().unwrap(), 4, k / 2, wr.as_f32().unwrap(), n * 2, None);
    close(&be.linear(&xr, &wr, None).unwrap(), &want, "reshaped weight");
}
