//! Token log-probs from logits and their backward: the link between the GRPO loss (which wants
//! ∂loss/∂logp) and the model's output logits (which want ∂loss/∂logits).

use crate::Real;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LogprobError {
    #[error("logits have {got} values, expected targets ({rows}) · vocab ({vocab})")]
    Shape {
        got: usize,
        rows: usize,
        vocab: usize,
    },
    #[error("`{name}` has {got} values for {rows} targets")]
    Len {
        name: &'static str,
        got: usize,
        rows: usize,
    },
    #[error("target {target} at row {row} is outside the vocabulary of {vocab}")]
    Target {
        row: usize,
        target: u32,
        vocab: usize,
    },
    #[error("temperature must be finite and > 0, got {0}")]
    Temperature(f64),
}

fn check<T>(
    logits: &[T],
    vocab: usize,
    targets: &[u32],
    temperature: f64,
) -> Result<(), LogprobError> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(LogprobError::Temperature(temperature));
    }
    if vocab == 0 || logits.len() != targets.len() * vocab {
        return Err(LogprobError::Shape {
            got: logits.len(),
            rows: targets.len(),
            vocab,
        });
    }
    if let Some((row, &t)) = targets
        .iter()
        .enumerate()
        .find(|(_, t)| **t as usize >= vocab)
    {
        return Err(LogprobError::Target {
            row,
            target: t,
            vocab,
        });
    }
    Ok(())
}

/// Max-shifted log-sum-exp of `row / temperature`, accumulated in f64.
fn lse<T: Real>(row: &[T], inv_t: f64) -> f64 {
    let m = row
        .iter()
        .map(|v| v.to_f64() * inv_t)
        .fold(f64::NEG_INFINITY, f64::max);
    m + row
        .iter()
        .map(|v| (v.to_f64() * inv_t - m).exp())
        .sum::<f64>()
        .ln()
}

/// Per row r: `logp[r] = log softmax(logits[r] / temperature)[targets[r]]` and the entropy of that
/// distribution. Rows are `logits[r·vocab .. (r+1)·vocab]`; row r scores `targets[r]` (already
/// shifted: the logits at position t predict token t+1). The temperature must be the rollout's, as
/// in TRL, so that old and new log-probs describe the same sampling distribution.
pub fn token_logprobs<T: Real>(
    logits: &[T],
    vocab: usize,
    targets: &[u32],
    temperature: f64,
) -> Result<(Vec<T>, Vec<T>), LogprobError> {
    check(logits, vocab, targets, temperature)?;
    let inv_t = 1.0 / temperature;
    let mut logp = Vec::with_capacity(targets.len());
    let mut ent = Vec::with_capacity(targets.len());
    for (r, &t) in targets.iter().enumerate() {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let l = lse(row, inv_t);
        logp.push(T::from_f64(row[t as usize].to_f64() * inv_t - l));
        // H = −Σ p log p = lse − Σ p z.
        let pz: f64 = row
            .iter()
            .map(|v| {
                let z = v.to_f64() * inv_t;
                (z - l).exp() * z
            })
            .sum();
        ent.push(T::from_f64(l - pz));
    }
    Ok((logp, ent))
}

/// ∂loss/∂logits given ∂loss/∂logp from [`token_logprobs`]:
/// `grad[r, j] = grad_logp[r] · (onehot(targets[r])_j − softmax(logits[r]/T)_j) / T`.
pub fn token_logprobs_backward<T: Real>(
    logits: &[T],
    vocab: usize,
    targets: &[u32],
    temperature: f64,
    grad_logp: &[T],
) -> Result<Vec<T>, LogprobError> {
    check(logits, vocab, targets, temperature)?;
    if grad_logp.len() != targets.len() {
        return Err(LogprobError::Len {
            name: "grad_logp",
            got: grad_logp.len(),
            rows: targets.len(),
        });
    }
    let inv_t = 1.0 / temperature;
    let mut grad = vec![T::from_f64(0.0); logits.len()];
    for (r, &t) in targets.iter().enumerate() {
        let g = grad_logp[r].to_f64();
        if g == 0.0 {
            continue; // masked tokens: the whole row's gradient is zero
        }
        let row = &logits[r * vocab..(r + 1) * vocab];
        let l = lse(row, inv_t);
        let out = &mut grad[r * vocab..(r + 1) * vocab];
        for (j, (o, v)) in out.iter_mut().zip(row).enumerate() {
            let p = (v.to_f64() * inv_t - l).exp();
            let onehot = if j == t as usize { 1.0 } else { 0.0 };
            *o = T::from_f64(g * (onehot - p) * inv_t);
        }
    }
    Ok(grad)
}
