//! SFT token cross-entropy and the assistant-only label mask.

use crate::Real;

/// Label value that excludes a position from the loss (the HF/PyTorch convention).
pub const IGNORE_INDEX: i64 = -100;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SftError {
    #[error("logits have {got} values, expected rows ({rows}) · vocab ({vocab})")]
    Shape {
        got: usize,
        rows: usize,
        vocab: usize,
    },
    #[error("label {label} at row {row} is outside the vocabulary [0, {vocab}) and is not {IGNORE_INDEX}")]
    Label {
        row: usize,
        label: i64,
        vocab: usize,
    },
    #[error("vocab size must be positive")]
    EmptyVocab,
}

/// Cross-entropy result: mean loss over labelled rows, ∂loss/∂logits, and the number of labelled rows.
#[derive(Debug, Clone)]
pub struct CeOutput<T> {
    pub loss: f64,
    pub grad_logits: Vec<T>,
    pub tokens: usize,
}

/// Token cross-entropy of `logits` (`labels.len() × vocab`, row-major) against `labels`, where row i
/// predicts `labels[i]` (shift beforehand with [`shift_labels`] when labels are the input ids).
/// Rows labelled [`IGNORE_INDEX`] are skipped. loss = Σ_rows (logsumexp − logit[label]) / den, with den
/// the number of labelled rows or `denominator` (the global count, for gradient accumulation).
/// Gradient row = (softmax − onehot) / den; ignored rows get zeros. Log-sum-exp is max-shifted and
/// accumulated in f64, so f32 logits of a 150k vocabulary lose no precision in the sum.
pub fn cross_entropy<T: Real>(
    logits: &[T],
    vocab: usize,
    labels: &[i64],
    denominator: Option<f64>,
) -> Result<CeOutput<T>, SftError> {
    if vocab == 0 {
        return Err(SftError::EmptyVocab);
    }
    let rows = labels.len();
    if logits.len() != rows * vocab {
        return Err(SftError::Shape {
            got: logits.len(),
            rows,
            vocab,
        });
    }
    for (row, &l) in labels.iter().enumerate() {
        if l != IGNORE_INDEX && !(0..vocab as i64).contains(&l) {
            return Err(SftError::Label {
                row,
                label: l,
                vocab,
            });
        }
    }
    let tokens = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    let den = denominator.unwrap_or(tokens as f64);
    let scale = if den > 0.0 { 1.0 / den } else { 0.0 };
    let mut grad = vec![T::from_f64(0.0); logits.len()];
    let mut loss = 0.0;
    for (row, &label) in labels.iter().enumerate() {
        if label == IGNORE_INDEX {
            continue;
        }
        let x = &logits[row * vocab..(row + 1) * vocab];
        let m = x
            .iter()
            .map(|v| v.to_f64())
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = x.iter().map(|v| (v.to_f64() - m).exp()).sum();
        let lse = m + sum.ln();
        loss += lse - x[label as usize].to_f64();
        let g = &mut grad[row * vocab..(row + 1) * vocab];
        for (gj, xj) in g.iter_mut().zip(x) {
            *gj = T::from_f64((xj.to_f64() - lse).exp() * scale);
        }
        g[label as usize] = T::from_f64(((x[label as usize].to_f64() - lse).exp() - 1.0) * scale);
    }
    Ok(CeOutput {
        loss: loss * scale,
        grad_logits: grad,
        tokens,
    })
}

/// Causal-LM shift: position i is trained to predict token i+1; the last position has no target.
pub fn shift_labels(labels: &[i64]) -> Vec<i64> {
    let mut out: Vec<i64> = labels.iter().skip(1).copied().collect();
    if !labels.is_empty() {
        out.push(IGNORE_INDEX);
    }
    out
}

/// Special token ids of the ChatML template (Qwen: `<|im_start|>`, `<|im_end|>`, and the ids of
/// `assistant\n` that follow `<|im_start|>` in an assistant turn).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTokens {
    pub im_start: u32,
    pub im_end: u32,
    pub assistant_header: Vec<u32>,
}

/// Which tokens of a tokenised conversation are trained on: every assistant turn's content and its
/// closing `<|im_end|>` — not the header, not the newline after `<|im_end|>`, not other roles. A
/// truncated final assistant turn (no `<|im_end|>`) is trained up to the end.
pub fn assistant_mask(ids: &[u32], tok: &ChatTokens) -> Vec<bool> {
    let mut mask = vec![false; ids.len()];
    let h = tok.assistant_header.len();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] == tok.im_start
            && ids.get(i + 1..i + 1 + h) == Some(tok.assistant_header.as_slice())
        {
            let mut j = i + 1 + h;
            while j < ids.len() {
                mask[j] = true;
                if ids[j] == tok.im_end {
                    break;
                }
                j += 1;
            }
            i = j + 1;
        } else {
            i += 1;
        }
    }
    mask
}

/// HF-style labels (unshifted): the token id where [`assistant_mask`] is set, else [`IGNORE_INDEX`].
pub fn assistant_labels(ids: &[u32], tok: &ChatTokens) -> Vec<i64> {
    ids.iter()
        .zip(assistant_mask(ids, tok))
        .map(|(&id, m)| if m { id as i64 } else { IGNORE_INDEX })
        .collect()
}
