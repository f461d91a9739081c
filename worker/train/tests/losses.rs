use onevision_train::*;

/// Small deterministic generator so tests need no RNG crate.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64) / ((1u64 << 53) as f64)
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next()
    }
}

struct Case {
    n: usize,
    l: usize,
    logp: Vec<f64>,
    old: Vec<f64>,
    refp: Vec<f64>,
    mask: Vec<bool>,
    adv: Vec<f64>,
}

fn random_case(seed: u64, cfg: &GrpoConfig) -> Case {
    let mut r = Lcg(seed);
    let (n, l) = (4, 6);
    let mut logp = vec![0.0; n * l];
    let mut old = vec![0.0; n * l];
    let mut refp = vec![0.0; n * l];
    let mut mask = vec![false; n * l];
    for i in 0..n {
        let len = 2 + i % 4; // different lengths so the aggregations differ
        for t in 0..l {
            let k = i * l + t;
            mask[k] = t < len;
            logp[k] = r.range(-3.0, -0.05);
            // Ratios spread over [0.5, 1.6] so all clip branches occur; keep them away from the clip
            // boundaries, where the loss has a kink and finite differences are meaningless.
            loop {
                let lr: f64 = r.range(-0.7, 0.47);
                let ratio = lr.exp();
                if (ratio - (1.0 - cfg.eps_low)).abs() > 1e-3
                    && (ratio - (1.0 + cfg.eps_high)).abs() > 1e-3
                {
                    old[k] = logp[k] - lr;
                    break;
                }
            }
            refp[k] = logp[k] + r.range(-0.5, 0.5);
        }
    }
    let adv = vec![1.3, -0.7, 0.4, -1.1];
    Case {
        n,
        l,
        logp,
        old,
        refp,
        mask,
        adv,
    }
}

fn loss_at(cfg: &GrpoConfig, c: &Case, logp: &[f64]) -> f64 {
    let b = GrpoBatch {
        n_seqs: c.n,
        seq_len: c.l,
        logp,
        old_logp: &c.old,
        ref_logp: Some(&c.refp),
        mask: &c.mask,
        advantages: &c.adv,
        keep: None,
        entropy: None,
        denominator: None,
    };
    grpo_loss(cfg, &b).unwrap().loss
}

#[test]
fn grpo_gradient_matches_finite_differences() {
    let aggs = [
        Aggregation::SeqMeanTokenMean,
        Aggregation::TokenMean,
        Aggregation::DrGrpo { max_len: 8 },
    ];
    let kls = [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3];
    let mut checked = 0;
    for (ai, agg) in aggs.iter().enumerate() {
        for (ki, kl) in kls.iter().enumerate() {
            for &(beta, eps_high) in &[(0.0, 0.2), (0.04, 0.28), (0.5, 0.2)] {
                let cfg = GrpoConfig {
                    aggregation: *agg,
                    kl: *kl,
                    beta,
                    eps_high,
                    ..Default::default()
                };
                let c = random_case(1 + (ai * 9 + ki * 3) as u64, &cfg);
                let out = grpo_loss(
                    &cfg,
                    &GrpoBatch {
                        n_seqs: c.n,
                        seq_len: c.l,
                        logp: &c.logp,
                        old_logp: &c.old,
                        ref_logp: Some(&c.refp),
                        mask: &c.mask,
                        advantages: &c.adv,
                        keep: None,
                        entropy: None,
                        denominator: None,
                    },
                )
                .unwrap();
                for k in 0..c.logp.len() {
                    // Central differences in f64 with h = 1e-6: truncation O(h²) ≈ 1e-12, rounding
                    // ≈ 1e-16/h = 1e-10, so 1e-7 absolute is a safe yet tight bound.
                    let h = 1e-6;
                    let mut p = c.logp.clone();
                    p[k] += h;
                    let up = loss_at(&cfg, &c, &p);
                    p[k] -= 2.0 * h;
                    let dn = loss_at(&cfg, &c, &p);
                    let fd = (up - dn) / (2.0 * h);
                    let g = out.grad_logp[k];
                    assert!(
                        (fd - g).abs() < 1e-7,
                        "{cfg:?} token {k}: analytic {g} vs fd {fd}"
                    );
                    if !c.mask[k] {
                        assert_eq!(g, 0.0);
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 27 * 24);
}

#[test]
fn grpo_hand_computed_clipping_and_kl() {
    // One sequence, four tokens, A = +1 for tokens 0-1 and a second sequence with A = −1.
    // ratios: 1.5 (A>0: clipped high → −1.2, grad 0), 0.5 (A>0: unclipped → −0.5, grad −0.5),
    //         0.5 (A<0: clipped low → 0.8, grad 0), 1.5 (A<0: unclipped → 1.5, grad 1.5).
    let r = |x: f64| x.ln();
    let logp = vec![-1.0, -1.0, -1.0, -1.0];
    let old = vec![-1.0 - r(1.5), -1.0 - r(0.5), -1.0 - r(0.5), -1.0 - r(1.5)];
    let refp = vec![-2.0; 4];
    let mask = vec![true; 4];
    let adv = vec![1.0, -1.0];
    let cfg = GrpoConfig {
        beta: 0.1,
        ..Default::default()
    };
    let out = grpo_loss(
        &cfg,
        &GrpoBatch {
            n_seqs: 2,
            seq_len: 2,
            logp: &logp,
            old_logp: &old,
            ref_logp: Some(&refp),
            mask: &mask,
            advantages: &adv,
            keep: None,
            entropy: Some(&[0.5, 1.0, 1.5, 2.0]),
            denominator: None,
        },
    )
    .unwrap();
    // k3 with d = ref − logp = −1: e^{−1} + 1 − 1 = e^{−1}; its logp-derivative 1 − e^{−1}.
    let kl = (-1f64).exp();
    let pg = [-1.2, -0.5, 0.8, 1.5];
    // seq-mean-token-mean over 2 sequences of 2 tokens: each token weight 1/4.
    let want: f64 = pg.iter().map(|p| (p + 0.1 * kl) / 4.0).sum();
    assert!((out.loss - want).abs() < 1e-12, "{} vs {want}", out.loss);
    let dk = 0.1 * (1.0 - kl);
    let want_g = [dk / 4.0, (-0.5 + dk) / 4.0, dk / 4.0, (1.5 + dk) / 4.0];
    for (g, w) in out.grad_logp.iter().zip(want_g) {
        assert!((g - w).abs() < 1e-12, "{g} vs {w}");
    }
    let s = &out.stats;
    assert_eq!(
        (s.clip_low_frac, s.clip_high_frac, s.clip_frac),
        (0.25, 0.25, 0.5)
    );
    assert!((s.kl_mean - kl).abs() < 1e-12);
    assert_eq!(s.entropy_mean, Some(1.25));
    assert!((s.ratio_mean - 1.0).abs() < 1e-12);
    assert_eq!(
        (s.n_seqs, s.n_tokens, s.len_min, s.len_max, s.len_mean),
        (2, 4, 2, 2, 2.0)
    );
    assert!((s.pg_loss + 0.1 * s.kl_loss - out.loss).abs() < 1e-12);
}

#[test]
fn advantages_sample_std_and_variants() {
    let a = group_advantages(&[1.0, 0.0, 0.0, 1.0], &[0, 0, 0, 0], true, false).unwrap();
    // mean 0.5; sample std sqrt(4·0.25/3) = sqrt(1/3).
    let want = 0.5 / ((1.0f64 / 3.0).sqrt() + 1e-4);
    for (x, s) in a.advantages.iter().zip([1.0, -1.0, -1.0, 1.0]) {
        assert!((x - s * want).abs() < 1e-12);
    }
    // Two interleaved groups, one all equal; no std normalisation.
    let a = group_advantages(
        &[2.0, 1.0, 0.0, 1.0, 1.0, 1.0],
        &[7, 3, 7, 3, 7, 3],
        false,
        false,
    )
    .unwrap();
    assert_eq!(a.advantages, vec![1.0, 0.0, -1.0, 0.0, 0.0, 0.0]);
    assert_eq!(a.keep, vec![true; 6]);
    // Dynamic sampling drops group 3.
    let a = group_advantages(
        &[2.0, 1.0, 0.0, 1.0, 1.0, 1.0],
        &[7, 3, 7, 3, 7, 3],
        false,
        true,
    )
    .unwrap();
    assert_eq!(a.keep, vec![true, false, true, false, true, false]);
    assert_eq!(a.dropped_groups, 1);
    // Group of one: std undefined → advantage 0.
    assert_eq!(
        group_advantages(&[5.0], &[0], true, false)
            .unwrap()
            .advantages,
        vec![0.0]
    );
    assert!(group_advantages(&[1.0], &[0, 1], true, false).is_err());
}

fn batch<'a>(
    n: usize,
    l: usize,
    logp: &'a [f64],
    mask: &'a [bool],
    adv: &'a [f64],
    keep: Option<&'a [bool]>,
    den: Option<f64>,
) -> GrpoBatch<'a, f64> {
    GrpoBatch {
        n_seqs: n,
        seq_len: l,
        logp,
        old_logp: logp,
        ref_logp: None,
        mask,
        advantages: adv,
        keep,
        entropy: None,
        denominator: den,
    }
}

#[test]
fn aggregations_ratio_one() {
    // Ratio 1, β = 0: ℓ_it = −A_i. Lengths 1 and 3, A = (2, −1).
    let logp = vec![-1.0; 8];
    let mask = vec![true, false, false, false, true, true, true, false];
    let adv = vec![2.0, -1.0];
    let cfg = |agg| GrpoConfig {
        beta: 0.0,
        aggregation: agg,
        ..Default::default()
    };
    let b = batch(2, 4, &logp, &mask, &adv, None, None);
    // seq-mean-token-mean: mean(−2, 1) = −0.5
    let o = grpo_loss(&cfg(Aggregation::SeqMeanTokenMean), &b).unwrap();
    assert!((o.loss + 0.5).abs() < 1e-12);
    assert!((o.grad_logp[0] + 1.0).abs() < 1e-12 && (o.grad_logp[4] - 1.0 / 6.0).abs() < 1e-12);
    // token-mean: (−2 + 3)/4 = 0.25
    let o = grpo_loss(&cfg(Aggregation::TokenMean), &b).unwrap();
    assert!((o.loss - 0.25).abs() < 1e-12);
    // dr-grpo: (−2 + 3)/(2·10) = 0.05
    let o = grpo_loss(&cfg(Aggregation::DrGrpo { max_len: 10 }), &b).unwrap();
    assert!((o.loss - 0.05).abs() < 1e-12);
    assert!((o.grad_logp[5] - 1.0 / 20.0).abs() < 1e-12);
    // keep=false drops the second sequence entirely.
    let keep = [true, false];
    let o = grpo_loss(
        &cfg(Aggregation::TokenMean),
        &batch(2, 4, &logp, &mask, &adv, Some(&keep), None),
    )
    .unwrap();
    assert!((o.loss + 2.0).abs() < 1e-12);
    assert_eq!(o.grad_logp[4], 0.0);
    assert_eq!((o.stats.n_seqs, o.stats.n_tokens), (1, 1));
    // zero-advantage fraction
    let o = grpo_loss(
        &cfg(Aggregation::TokenMean),
        &batch(2, 4, &logp, &mask, &[0.0, 1.0], None, None),
    )
    .unwrap();
    assert_eq!(o.stats.zero_adv_frac, 0.5);
}

#[test]
fn micro_batches_with_global_denominator_sum_to_full_batch() {
    let cfg = GrpoConfig {
        aggregation: Aggregation::TokenMean,
        beta: 0.0,
        ..Default::default()
    };
    let c = random_case(42, &cfg);
    let full = grpo_loss(&cfg, &batch(4, c.l, &c.logp, &c.mask, &c.adv, None, None)).unwrap();
    let tokens = full.stats.n_tokens as f64;
    let h = 2 * c.l;
    let a = grpo_loss(
        &cfg,
        &batch(
            2,
            c.l,
            &c.logp[..h],
            &c.mask[..h],
            &c.adv[..2],
            None,
            Some(tokens),
        ),
    )
    .unwrap();
    let b = grpo_loss(
        &cfg,
        &batch(
            2,
            c.l,
            &c.logp[h..],
            &c.mask[h..],
            &c.adv[2..],
            None,
            Some(tokens),
        ),
    )
    .unwrap();
    assert!((a.loss + b.loss - full.loss).abs() < 1e-12);
    let joined: Vec<f64> = a.grad_logp.iter().chain(&b.grad_logp).copied().collect();
    for (x, y) in joined.iter().zip(&full.grad_logp) {
        assert!((x - y).abs() < 1e-15);
    }
}

#[test]
fn grpo_input_errors() {
    let logp = vec![-1.0; 4];
    let mask = vec![true; 4];
    let cfg = GrpoConfig::default(); // β = 0.04 needs a reference
    let e = grpo_loss(&cfg, &batch(2, 2, &logp, &mask, &[1.0, 0.0], None, None)).unwrap_err();
    assert_eq!(e, GrpoError::MissingRef(0.04));
    let e = grpo_loss(&cfg, &batch(2, 2, &logp, &mask, &[1.0], None, None)).unwrap_err();
    assert!(matches!(
        e,
        GrpoError::Shape {
            name: "advantages",
            ..
        }
    ));
    let e = grpo_loss(&cfg, &batch(3, 2, &logp, &mask, &[1.0; 3], None, None)).unwrap_err();
    assert!(matches!(e, GrpoError::Shape { name: "logp", .. }));
    let bad = GrpoConfig {
        beta: 0.0,
        aggregation: Aggregation::DrGrpo { max_len: 0 },
        ..Default::default()
    };
    assert!(matches!(
        grpo_loss(&bad, &batch(2, 2, &logp, &mask, &[1.0, 0.0], None, None)),
        Err(GrpoError::Config(_))
    ));
    // Empty batch: zero loss, no NaN.
    let o = grpo_loss(
        &GrpoConfig { beta: 0.0, ..cfg },
        &batch(2, 2, &logp, &[false; 4], &[1.0, 0.0], None, None),
    )
    .unwrap();
    assert_eq!(o.loss, 0.0);
    assert!(o.stats.len_mean == 0.0 && o.stats.clip_frac == 0.0);
}

#[test]
fn grpo_f32_matches_f64() {
    let cfg = GrpoConfig::default();
    let c = random_case(7, &cfg);
    let f = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
    let (lp, old, rf) = (f(&c.logp), f(&c.old), f(&c.refp));
    let b32 = GrpoBatch {
        n_seqs: c.n,
        seq_len: c.l,
        logp: &lp[..],
        old_logp: &old[..],
        ref_logp: Some(&rf[..]),
        mask: &c.mask,
        advantages: &c.adv,
        keep: None,
        entropy: None,
        denominator: None,
    };
    let o32 = grpo_loss(&cfg, &b32).unwrap();
    let o64 = loss_at(&cfg, &c, &c.logp);
    // Inputs rounded to f32 (rel 6e-8) move the O(1) loss by ~1e-7.
    assert!((o32.loss - o64).abs() < 1e-5);
}

fn ce_loss(logits: &[f64], v: usize, labels: &[i64]) -> f64 {
    cross_entropy(logits, v, labels, None).unwrap().loss
}

#[test]
fn cross_entropy_values_and_gradient() {
    // Uniform logits over 2 classes: ln 2.
    let o = cross_entropy(&[0.0f64, 0.0], 2, &[0], None).unwrap();
    assert!((o.loss - 2f64.ln()).abs() < 1e-15);
    assert_eq!(o.grad_logits, vec![-0.5, 0.5]);
    // Hand value: logits (1, 2, 3), label 2 → lse − 3 = ln(e + e² + e³) − 3.
    let o = cross_entropy(&[1.0f64, 2.0, 3.0], 3, &[2], None).unwrap();
    let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    assert!((o.loss - (lse - 3.0)).abs() < 1e-14);

    let mut r = Lcg(3);
    let v = 7;
    let labels = vec![3, IGNORE_INDEX, 0, 6, IGNORE_INDEX];
    let logits: Vec<f64> = (0..labels.len() * v).map(|_| r.range(-4.0, 4.0)).collect();
    let o = cross_entropy(&logits, v, &labels, None).unwrap();
    assert_eq!(o.tokens, 3);
    for k in 0..logits.len() {
        let h = 1e-6; // same error budget as the GRPO check
        let mut p = logits.clone();
        p[k] += h;
        let up = ce_loss(&p, v, &labels);
        p[k] -= 2.0 * h;
        let fd = (up - ce_loss(&p, v, &labels)) / (2.0 * h);
        assert!(
            (fd - o.grad_logits[k]).abs() < 1e-8,
            "logit {k}: {} vs {fd}",
            o.grad_logits[k]
        );
    }
    // Ignored rows have zero gradient; each labelled row's gradient sums to 0.
    assert!(o.grad_logits[v..2 * v].iter().all(|g| *g == 0.0));
    assert!(o.grad_logits[..v].iter().sum::<f64>().abs() < 1e-15);
    // Large logits in f32 do not overflow (max-shifted).
    let o = cross_entropy(&[1000.0f32, 0.0], 2, &[1], None).unwrap();
    assert!((o.loss - 1000.0).abs() < 1e-3 && o.loss.is_finite());
    // Denominator override scales loss and gradient.
    let o2 = cross_entropy(&logits, v, &labels, Some(6.0)).unwrap();
    let o = cross_entropy(&logits, v, &labels, None).unwrap();
    assert!((o2.loss * 2.0 - o.loss).abs() < 1e-12);
    for (a, b) in o2.grad_logits.iter().zip(&o.grad_logits) {
        assert!((a * 2.0 - b).abs() < 1e-15);
    }
}

#[test]
fn cross_entropy_errors() {
    assert_eq!(
        cross_entropy(&[0.0f32; 5], 2, &[0, 1], None).unwrap_err(),
        SftError::Shape {
            got: 5,
            rows: 2,
            vocab: 2
        }
    );
    assert_eq!(
        cross_entropy(&[0.0f32; 4], 2, &[0, 2], None).unwrap_err(),
        SftError::Label {
            row: 1,
            label: 2,
            vocab: 2
        }
    );
    assert_eq!(
        cross_entropy(&[0.0f32; 4], 2, &[0, -5], None).unwrap_err(),
        SftError::Label {
            row: 1,
            label: -5,
            vocab: 2
        }
    );
    let o = cross_entropy(&[0.0f32; 4], 2, &[IGNORE_INDEX, IGNORE_INDEX], None).unwrap();
    assert_eq!((o.loss, o.tokens), (0.0, 0));
}

#[test]
fn assistant_mask_multi_turn() {
    // ids: 1 = <|im_start|>, 2 = <|im_end|>, 11 = "\n", 10 = "assistant", 20 = "user", 30 = "system".
    let tok = ChatTokens {
        im_start: 1,
        im_end: 2,
        assistant_header: vec![10, 11],
    };
    #[rustfmt::skip]
    let ids = [
        1, 30, 11, 5, 2, 11,            // system
        1, 20, 11, 10, 11, 7, 2, 11,    // user (mentions "assistant\n" mid-text: not a header)
        1, 10, 11, 40, 41, 2, 11,       // assistant 1
        1, 20, 11, 9, 2, 11,            // user
        1, 10, 11, 42, 2, 11,           // assistant 2
        1, 10, 11, 50, 51,              // truncated assistant 3
    ];
    let m = assistant_mask(&ids, &tok);
    let on: Vec<usize> = m
        .iter()
        .enumerate()
        .filter(|(_, b)| **b)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(on, vec![17, 18, 19, 30, 31, 36, 37]);
    assert_eq!(ids[19], 2); // the closing <|im_end|> is trained
    assert!(!m[20]); // the newline after it is not
    let labels = assistant_labels(&ids, &tok);
    assert_eq!(labels[17], 40);
    assert_eq!(labels[20], IGNORE_INDEX);
    assert_eq!(shift_labels(&labels)[16], 40);
    assert_eq!(shift_labels(&[5, 6]), vec![6, IGNORE_INDEX]);
    assert!(shift_labels(&[]).is_empty());
    // Empty assistant turn: only its <|im_end|>.
    assert_eq!(
        assistant_mask(&[1, 10, 11, 2, 11], &tok),
        vec![false, false, false, true, false]
    );
}

#[test]
fn token_logprobs_values_and_backward() {
    let v = 5;
    // Uniform logits: logp = −ln V and entropy = ln V at any temperature.
    let (lp, ent) = token_logprobs(&[0.0f64; 10], v, &[1, 4], 0.7).unwrap();
    for (a, b) in lp.iter().zip(&ent) {
        assert!((a + (v as f64).ln()).abs() < 1e-14 && (b - (v as f64).ln()).abs() < 1e-14);
    }
    let mut r = Lcg(11);
    let targets = [2u32, 0, 4, 3];
    let logits: Vec<f64> = (0..targets.len() * v).map(|_| r.range(-3.0, 3.0)).collect();
    // At T = 1, logp = −(per-token cross-entropy).
    let (lp, _) = token_logprobs(&logits, v, &targets, 1.0).unwrap();
    for (k, &t) in targets.iter().enumerate() {
        let ce = cross_entropy(&logits[k * v..(k + 1) * v], v, &[t as i64], None)
            .unwrap()
            .loss;
        assert!((lp[k] + ce).abs() < 1e-13);
    }
    // Probabilities of all targets of a row sum to 1.
    let row = &logits[..v];
    let total: f64 = (0..v as u32)
        .map(|t| token_logprobs(row, v, &[t], 0.9).unwrap().0[0].exp())
        .sum();
    assert!((total - 1.0).abs() < 1e-13);
    // Entropy against its definition −Σ p log p.
    let (_, ent) = token_logprobs(row, v, &[0], 0.9).unwrap();
    let h: f64 = (0..v as u32)
        .map(|t| {
            let l = token_logprobs(row, v, &[t], 0.9).unwrap().0[0];
            -l.exp() * l
        })
        .sum();
    assert!((ent[0] - h).abs() < 1e-13);

    // Backward of L = Σ w_r logp_r against central differences (h = 1e-6, bound as for GRPO).
    let temp = 0.9;
    let w = [0.3, -1.2, 0.0, 2.0];
    let loss = |x: &[f64]| -> f64 {
        token_logprobs(x, v, &targets, temp)
            .unwrap()
            .0
            .iter()
            .zip(w)
            .map(|(l, w)| l * w)
            .sum()
    };
    let g = token_logprobs_backward(&logits, v, &targets, temp, &w).unwrap();
    for k in 0..logits.len() {
        let mut p = logits.clone();
        p[k] += 1e-6;
        let up = loss(&p);
        p[k] -= 2e-6;
        let fd = (up - loss(&p)) / 2e-6;
        assert!((fd - g[k]).abs() < 1e-8, "logit {k}: {} vs {fd}", g[k]);
    }
    assert_eq!(
        token_logprobs(&[0.0f32; 4], 2, &[2, 0], 1.0).unwrap_err(),
        LogprobError::Target {
            row: 0,
            target: 2,
            vocab: 2
        }
    );
    assert_eq!(
        token_logprobs(&[0.0f32; 4], 2, &[0, 0], 0.0).unwrap_err(),
        LogprobError::Temperature(0.0)
    );
    assert!(token_logprobs_backward(&[0.0f32; 4], 2, &[0, 0], 1.0, &[1.0]).is_err());
}
