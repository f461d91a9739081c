//! GRPO loss on per-token log-probs, with its gradient with respect to the current log-probs.
//!
//! Layout: `n_seqs × seq_len` row-major arrays (the completions, padded), with a mask marking the
//! completion tokens that are scored. Per token t of completion i (R1-Onevision recipe):
//!   ratio = exp(logp − old_logp),
//!   ℓ = −min(ratio·A_i, clip(ratio, 1−ε_low, 1+ε_high)·A_i) + β·KL(logp, ref_logp),
//! then aggregated. The returned `grad_logp` is ∂loss/∂logp, which chains into the model's backward
//! through log-softmax. For a single policy update per batch pass `old_logp = logp` (ratio 1, the
//! gradient is still A·ratio, as with a detached copy in PyTorch).

use crate::Real;
use serde::{Deserialize, Serialize};

/// KL estimator of KL(π_θ ‖ π_ref) per token, with d = ref − logp (Schulman's k1/k2/k3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// logp − ref.
    K1,
    /// ½ (logp − ref)².
    K2,
    /// exp(d) − d − 1 (GRPO default: unbiased and non-negative).
    #[default]
    K3,
}

/// How per-token losses become one number.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Aggregation {
    /// Mean over sequences of each sequence's token mean (original GRPO).
    #[default]
    SeqMeanTokenMean,
    /// Sum over all tokens / number of tokens (DAPO).
    TokenMean,
    /// Sum over all tokens / (number of sequences · max_len) (Dr. GRPO: no length normalisation).
    DrGrpo { max_len: usize },
}

/// GRPO hyper-parameters. Defaults: the R1-Onevision run (ε = 0.2, β = 0.04, k3, seq-mean-token-mean).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GrpoConfig {
    pub eps_low: f64,
    pub eps_high: f64,
    /// KL coefficient; 0 skips the reference entirely (`ref_logp` may be `None`).
    pub beta: f64,
    pub kl: KlEstimator,
    pub aggregation: Aggregation,
    /// Divide advantages by the group's sample std (+1e-4). `false`: Dr. GRPO, centring only.
    /// Read by the caller via [`group_advantages`], like `dynamic_sampling`.
    pub scale_rewards: bool,
    /// Drop groups whose rewards are all equal (they carry no signal) instead of training on zeros.
    /// Read by the caller: pass it to [`group_advantages`] and its `keep` to [`GrpoBatch::keep`].
    pub dynamic_sampling: bool,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            eps_low: 0.2,
            eps_high: 0.2,
            beta: 0.04,
            kl: KlEstimator::K3,
            aggregation: Aggregation::SeqMeanTokenMean,
            scale_rewards: true,
            dynamic_sampling: false,
        }
    }
}

/// Errors from malformed GRPO inputs.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GrpoError {
    #[error("`{name}` has {got} values, expected {want} (n_seqs · seq_len or n_seqs)")]
    Shape {
        name: &'static str,
        got: usize,
        want: usize,
    },
    #[error("beta = {0} > 0 needs reference log-probs (ref_logp); pass them or set beta = 0")]
    MissingRef(f64),
    #[error("invalid GRPO config: {0}")]
    Config(String),
}

/// Advantages of one batch: `advantages[i]` per completion, and `keep[i]` (false for completions of
/// groups dropped by dynamic sampling).
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    pub advantages: Vec<f64>,
    pub keep: Vec<bool>,
    /// Number of groups dropped by dynamic sampling.
    pub dropped_groups: usize,
}

/// Group-relative advantages `(r − mean_g) / (std_g + 1e-4)` with the sample std (n − 1), or
/// `r − mean_g` when `scale` is false. `group[i]` is completion i's prompt id (any order). A group of
/// one has std 0 (no spread to estimate). With `dynamic_sampling`, groups with all-equal rewards
/// are marked not kept.
pub fn group_advantages(
    rewards: &[f64],
    group: &[usize],
    scale: bool,
    dynamic_sampling: bool,
) -> Result<Advantages, GrpoError> {
    if group.len() != rewards.len() {
        return Err(GrpoError::Shape {
            name: "group",
            got: group.len(),
            want: rewards.len(),
        });
    }
    use std::collections::BTreeMap;
    let mut members: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, g) in group.iter().enumerate() {
        members.entry(*g).or_default().push(i);
    }
    let mut advantages = vec![0.0; rewards.len()];
    let mut keep = vec![true; rewards.len()];
    let mut dropped_groups = 0;
    for idx in members.values() {
        let n = idx.len() as f64;
        let mean = idx.iter().map(|&i| rewards[i]).sum::<f64>() / n;
        let var = if idx.len() > 1 {
            idx.iter()
                .map(|&i| (rewards[i] - mean).powi(2))
                .sum::<f64>()
                / (n - 1.0)
        } else {
            0.0
        };
        let all_equal = idx.iter().all(|&i| rewards[i] == rewards[idx[0]]);
        if dynamic_sampling && all_equal {
            dropped_groups += 1;
            idx.iter().for_each(|&i| keep[i] = false);
            continue;
        }
        for &i in idx {
            let centred = rewards[i] - mean;
            advantages[i] = if scale {
                centred / (var.sqrt() + 1e-4)
            } else {
                centred
            };
        }
    }
    Ok(Advantages {
        advantages,
        keep,
        dropped_groups,
    })
}

/// One batch of completions, `n_seqs × seq_len` row-major.
#[derive(Debug, Clone, Copy)]
pub struct GrpoBatch<'a, T> {
    pub n_seqs: usize,
    pub seq_len: usize,
    /// Current policy log-probs of the sampled tokens.
    pub logp: &'a [T],
    /// Log-probs recorded when sampling (the old policy).
    pub old_logp: &'a [T],
    /// Reference model log-probs; required when β > 0.
    pub ref_logp: Option<&'a [T]>,
    /// Which tokens are completion tokens to score.
    pub mask: &'a [bool],
    /// Per-sequence advantage.
    pub advantages: &'a [f64],
    /// Per-sequence: false excludes the sequence (dynamic sampling). `None`: all kept.
    pub keep: Option<&'a [bool]>,
    /// Per-token policy entropies, for statistics only.
    pub entropy: Option<&'a [T]>,
    /// Denominator override for gradient accumulation over micro-batches: the global token count
    /// (token-mean), sequence count (seq-mean-token-mean) or sequences·max_len (dr-grpo).
    pub denominator: Option<f64>,
}

/// Statistics of one loss evaluation (token statistics are over scored tokens of kept sequences).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GrpoStats {
    pub n_seqs: usize,
    pub n_tokens: usize,
    /// Fraction of tokens whose ratio is clipped below (ratio < 1−ε_low with A < 0).
    pub clip_low_frac: f64,
    /// Fraction of tokens whose ratio is clipped above (ratio > 1+ε_high with A > 0).
    pub clip_high_frac: f64,
    pub clip_frac: f64,
    /// Mean per-token KL estimate (0 when β = 0 and no reference was given).
    pub kl_mean: f64,
    /// Mean per-token entropy, when entropies were given.
    pub entropy_mean: Option<f64>,
    pub ratio_mean: f64,
    pub len_mean: f64,
    pub len_min: usize,
    pub len_max: usize,
    /// Fraction of kept sequences whose advantage is exactly 0.
    pub zero_adv_frac: f64,
    /// Policy-gradient and KL parts of the loss (loss = pg_loss + β·kl_loss).
    pub pg_loss: f64,
    pub kl_loss: f64,
}

/// Loss, ∂loss/∂logp (same layout as `logp`, 0 outside the mask) and statistics.
#[derive(Debug, Clone)]
pub struct GrpoOutput<T> {
    pub loss: f64,
    pub grad_logp: Vec<T>,
    pub stats: GrpoStats,
}

/// The KL value and its derivative with respect to logp.
fn kl_and_grad(est: KlEstimator, logp: f64, refp: f64) -> (f64, f64) {
    let d = refp - logp;
    match est {
        KlEstimator::K1 => (-d, 1.0),
        KlEstimator::K2 => (0.5 * d * d, -d),
        KlEstimator::K3 => {
            let e = d.exp();
            (e - d - 1.0, 1.0 - e)
        }
    }
}

/// GRPO loss and gradient. See the module docs for the formula.
pub fn grpo_loss<T: Real>(
    cfg: &GrpoConfig,
    b: &GrpoBatch<'_, T>,
) -> Result<GrpoOutput<T>, GrpoError> {
    let n = b.n_seqs * b.seq_len;
    let check = |name: &'static str, got: usize, want: usize| {
        if got == want {
            Ok(())
        } else {
            Err(GrpoError::Shape { name, got, want })
        }
    };
    check("logp", b.logp.len(), n)?;
    check("old_logp", b.old_logp.len(), n)?;
    check("mask", b.mask.len(), n)?;
    check("advantages", b.advantages.len(), b.n_seqs)?;
    if let Some(r) = b.ref_logp {
        check("ref_logp", r.len(), n)?;
    }
    if let Some(e) = b.entropy {
        check("entropy", e.len(), n)?;
    }
    if let Some(k) = b.keep {
        check("keep", k.len(), b.n_seqs)?;
    }
    if !(cfg.eps_low >= 0.0 && cfg.eps_low < 1.0 && cfg.eps_high >= 0.0 && cfg.beta >= 0.0) {
        return Err(GrpoError::Config(format!(
            "need 0 ≤ eps_low < 1, eps_high ≥ 0, beta ≥ 0; got eps_low {}, eps_high {}, beta {}",
            cfg.eps_low, cfg.eps_high, cfg.beta
        )));
    }
    if let Aggregation::DrGrpo { max_len: 0 } = cfg.aggregation {
        return Err(GrpoError::Config(
            "dr-grpo needs max_len > 0 (the max completion length)".into(),
        ));
    }
    let refs = if cfg.beta > 0.0 {
        Some(b.ref_logp.ok_or(GrpoError::MissingRef(cfg.beta))?)
    } else {
        b.ref_logp
    };

    // Which sequences count, and their token counts.
    let kept = |i: usize| b.keep.is_none_or(|k| k[i]);
    let lens: Vec<usize> = (0..b.n_seqs)
        .map(|i| {
            b.mask[i * b.seq_len..(i + 1) * b.seq_len]
                .iter()
                .filter(|m| **m)
                .count()
        })
        .collect();
    let active: Vec<usize> = (0..b.n_seqs).filter(|&i| kept(i) && lens[i] > 0).collect();
    let n_tokens: usize = active.iter().map(|&i| lens[i]).sum();
    let n_active = active.len();

    // Weight of token (i, t) in the aggregate: loss = Σ w_i · ℓ_it.
    let natural_den = match cfg.aggregation {
        Aggregation::SeqMeanTokenMean => n_active as f64,
        Aggregation::TokenMean => n_tokens as f64,
        Aggregation::DrGrpo { max_len } => (n_active * max_len) as f64,
    };
    let den = b.denominator.unwrap_or(natural_den);

    let mut grad = vec![T::from_f64(0.0); n];
    let mut st = GrpoStats {
        n_seqs: n_active,
        n_tokens,
        len_min: usize::MAX,
        ..Default::default()
    };
    let (mut pg_sum, mut kl_sum, mut loss) = (0.0, 0.0, 0.0);
    let (mut kl_tok, mut ent_tok, mut ratio_tok) = (0.0, 0.0, 0.0);
    let (mut low, mut high, mut zero_adv) = (0usize, 0usize, 0usize);
    for &i in &active {
        let a = b.advantages[i];
        if a == 0.0 {
            zero_adv += 1;
        }
        let w = if den > 0.0 {
            match cfg.aggregation {
                Aggregation::SeqMeanTokenMean => 1.0 / (lens[i] as f64 * den),
                _ => 1.0 / den,
            }
        } else {
            0.0
        };
        st.len_min = st.len_min.min(lens[i]);
        st.len_max = st.len_max.max(lens[i]);
        for t in 0..b.seq_len {
            let k = i * b.seq_len + t;
            if !b.mask[k] {
                continue;
            }
            let lp = b.logp[k].to_f64();
            let ratio = (lp - b.old_logp[k].to_f64()).exp();
            let clipped = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high);
            let (unc, clp) = (ratio * a, clipped * a);
            // −min(unc, clp): its derivative is −A·ratio when the unclipped term is the min, else 0
            // (the clipped term is flat in logp outside the band; inside it equals the unclipped one).
            let (pg, mut g) = if unc <= clp {
                (-unc, -a * ratio)
            } else {
                (-clp, 0.0)
            };
            if ratio < 1.0 - cfg.eps_low && a < 0.0 {
                low += 1;
            }
            if ratio > 1.0 + cfg.eps_high && a > 0.0 {
                high += 1;
            }
            let mut tok = pg;
            if let Some(r) = refs {
                let (kl, dkl) = kl_and_grad(cfg.kl, lp, r[k].to_f64());
                kl_tok += kl;
                kl_sum += w * kl;
                if cfg.beta > 0.0 {
                    tok += cfg.beta * kl;
                    g += cfg.beta * dkl;
                }
            }
            pg_sum += w * pg;
            loss += w * tok;
            grad[k] = T::from_f64(w * g);
            ratio_tok += ratio;
            if let Some(e) = b.entropy {
                ent_tok += e[k].to_f64();
            }
        }
    }
    let frac = |x: f64, d: usize| if d > 0 { x / d as f64 } else { 0.0 };
    st.clip_low_frac = frac(low as f64, n_tokens);
    st.clip_high_frac = frac(high as f64, n_tokens);
    st.clip_frac = frac((low + high) as f64, n_tokens);
    st.kl_mean = frac(kl_tok, n_tokens);
    st.entropy_mean = b.entropy.map(|_| frac(ent_tok, n_tokens));
    st.ratio_mean = frac(ratio_tok, n_tokens);
    st.len_mean = frac(n_tokens as f64, n_active);
    if n_active == 0 {
        st.len_min = 0;
    }
    st.zero_adv_frac = frac(zero_adv as f64, n_active);
    st.pg_loss = pg_sum;
    st.kl_loss = kl_sum;
    Ok(GrpoOutput {
        loss,
        grad_logp: grad,
        stats: st,
    })
}
