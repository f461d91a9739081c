//! One forward + backward of the SFT or GRPO objective over a batch: loss, statistics and the
//! gradient of every trainable parameter under its official name.

use std::collections::BTreeMap;

use onevision_model::{PromptInput, Qwen25Vl, Tensor, VisionGrads};
use onevision_train::{
    cross_entropy, grpo_loss, shift_labels, token_logprobs, token_logprobs_backward, GrpoBatch, GrpoConfig, GrpoStats,
    TensorMap, IGNORE_INDEX,
};
use serde::Serialize;

use super::{Result, TrainingError};

/// An SFT sample: model inputs and HF-style labels (unshifted, one per input id, `-100` = not
/// trained on).
#[derive(Debug, Clone)]
pub struct SftExample {
    pub input: PromptInput,
    pub labels: Vec<i64>,
}

impl SftExample {
    /// Tokens this sample contributes to the loss (after the causal shift).
    pub fn label_tokens(&self) -> usize {
        shift_labels(&self.labels).iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// A GRPO completion: prompt + completion ids in `input`, with the completion starting at
/// `prompt_len`. Log-probs are per completion token.
#[derive(Debug, Clone)]
pub struct GrpoSample {
    pub input: PromptInput,
    pub prompt_len: usize,
    /// Log-probs recorded at sampling time; `None`: the current policy (one update per batch, ratio 1).
    pub old_logp: Option<Vec<f32>>,
    /// Reference-model log-probs; needed when β > 0.
    pub ref_logp: Option<Vec<f32>>,
    pub advantage: f64,
}

impl GrpoSample {
    pub fn completion_len(&self) -> usize {
        self.input.input_ids.len().saturating_sub(self.prompt_len)
    }
}

/// Which parts of the model receive no gradient (and so are never updated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Freeze {
    /// Patch embedding and the ViT blocks.
    pub vision_tower: bool,
    /// The patch merger (ln_q + 2-layer MLP) that projects into the language model.
    pub merger: bool,
}

impl Freeze {
    /// How far backward must go into the vision encoder: not through a frozen part with nothing
    /// trainable before it.
    pub fn vision_grads(&self) -> VisionGrads {
        match (self.vision_tower, self.merger) {
            (true, true) => VisionGrads::None,
            (true, false) => VisionGrads::MergerOnly,
            (false, _) => VisionGrads::All,
        }
    }
    pub fn is_frozen(&self, name: &str) -> bool {
        (self.vision_tower && (name.starts_with("visual.blocks.") || name.starts_with("visual.patch_embed.")))
            || (self.merger && name.starts_with("visual.merger."))
    }
}

/// Options shared by both objectives.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepOptions {
    /// Loss denominator override for gradient accumulation: the global number of label tokens
    /// (SFT), or what [`GrpoBatch::denominator`] expects (GRPO). `None`: this batch's own count.
    pub denominator: Option<f64>,
    pub freeze: Freeze,
    /// Sampling temperature the log-probs refer to (GRPO; 1 = the raw distribution).
    pub temperature: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StepStats {
    /// GRPO statistics (clip fraction, KL, entropy, lengths); `None` for SFT.
    pub grpo: Option<GrpoStats>,
}

/// Result of one step: the loss, the number of scored tokens, the gradients (f32, official
/// names; a tied head's gradient is in `model.embed_tokens.weight`).
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub loss: f64,
    pub tokens: usize,
    pub grads: TensorMap,
    pub stats: StepStats,
}

/// Model gradients → host f32 named tensors, dropping frozen parameters.
pub fn model_grads_to_map(model: &Qwen25Vl, grads: BTreeMap<String, Tensor>, freeze: Freeze) -> Result<TensorMap> {
    let be = model.backend();
    let mut out = TensorMap::new();
    for (name, g) in grads {
        if freeze.is_frozen(&name) {
            continue;
        }
        let host = be.to_host(&g)?;
        let t = onevision_train::Tensor { shape: host.shape().to_vec(), data: host.to_f32_vec()? };
        out.insert(name, t);
    }
    Ok(out)
}

fn host_logits(model: &Qwen25Vl, logits: &Tensor) -> Result<Vec<f32>> {
    Ok(model.backend().to_host(logits)?.to_f32_vec()?)
}

/// SFT token cross-entropy over all label tokens of the batch (one mean, as transformers computes
/// for a batch), and its gradients.
pub fn sft_step(model: &Qwen25Vl, batch: &[SftExample], opts: &StepOptions) -> Result<StepOutput> {
    for (i, ex) in batch.iter().enumerate() {
        if ex.labels.len() != ex.input.input_ids.len() {
            return Err(TrainingError::Invalid(format!(
                "SFT sample {i}: {} labels for {} input ids",
                ex.labels.len(),
                ex.input.input_ids.len()
            )));
        }
    }
    let prompts: Vec<PromptInput> = batch.iter().map(|e| e.input.clone()).collect();
    let fwd = model.forward_train(&prompts)?;
    let (b, t, v) = (batch.len(), fwd.logits.dim(1), fwd.logits.dim(2));
    let mut labels = vec![IGNORE_INDEX; b * t];
    for (bi, ex) in batch.iter().enumerate() {
        let start = bi * t + fwd.pad[bi];
        labels[start..start + ex.labels.len()].copy_from_slice(&shift_labels(&ex.labels));
    }
    let logits = host_logits(model, &fwd.logits)?;
    let ce = cross_entropy(&logits, v, &labels, opts.denominator)?;
    drop(logits);
    // The loss runs on the host; its gradient goes back to the model's device (identity on CPU).
    let dlogits = model.backend().to_device(&Tensor::from_f32(&[b, t, v], ce.grad_logits)?)?;
    let grads = model.backward_with(&fwd.tape, &dlogits, opts.freeze.vision_grads())?;
    Ok(StepOutput { loss: ce.loss, tokens: ce.tokens, grads: model_grads_to_map(model, grads, opts.freeze)?, stats: StepStats::default() })
}

/// Rows of the `[B·T, V]` logits that score completion tokens, with their target ids: for sample
/// `i`, completion token `j` is predicted by the logits at position `prompt_len + j − 1`.
fn completion_rows(batch: &[GrpoSample], pad: &[usize], t: usize) -> Result<Vec<(usize, u32)>> {
    let mut rows = Vec::new();
    for (i, s) in batch.iter().enumerate() {
        if s.prompt_len == 0 || s.completion_len() == 0 {
            return Err(TrainingError::Invalid(format!(
                "GRPO sample {i}: needs a non-empty prompt and completion (prompt_len {}, {} ids)",
                s.prompt_len,
                s.input.input_ids.len()
            )));
        }
        for j in 0..s.completion_len() {
            rows.push((i * t + pad[i] + s.prompt_len + j - 1, s.input.input_ids[s.prompt_len + j]));
        }
    }
    Ok(rows)
}

fn gather_rows(logits: &[f32], v: usize, rows: &[(usize, u32)]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * v);
    for &(r, _) in rows {
        out.extend_from_slice(&logits[r * v..(r + 1) * v]);
    }
    out
}

/// Per-sample log-probs of the completion tokens under `model` (no gradient): the old-policy or
/// reference log-probs for [`GrpoSample`].
pub fn logprobs_of(model: &Qwen25Vl, batch: &[GrpoSample], temperature: f64) -> Result<Vec<Vec<f32>>> {
    let prompts: Vec<PromptInput> = batch.iter().map(|s| s.input.clone()).collect();
    let fwd = model.forward_train(&prompts)?;
    let (t, v) = (fwd.logits.dim(1), fwd.logits.dim(2));
    let rows = completion_rows(batch, &fwd.pad, t)?;
    let logits = host_logits(model, &fwd.logits)?;
    let targets: Vec<u32> = rows.iter().map(|r| r.1).collect();
    let (lp, _) = token_logprobs(&gather_rows(&logits, v, &rows), v, &targets, temperature)?;
    let mut out = Vec::with_capacity(batch.len());
    let mut k = 0;
    for s in batch {
        out.push(lp[k..k + s.completion_len()].to_vec());
        k += s.completion_len();
    }
    Ok(out)
}

/// GRPO loss over the batch's completions (see `onevision_train::grpo` for the formula) and its
/// gradients. Samples without `old_logp` use the current log-probs (ratio 1).
pub fn grpo_step(model: &Qwen25Vl, batch: &[GrpoSample], cfg: &GrpoConfig, opts: &StepOptions) -> Result<StepOutput> {
    let temperature = opts.temperature.unwrap_or(1.0);
    let prompts: Vec<PromptInput> = batch.iter().map(|s| s.input.clone()).collect();
    let fwd = model.forward_train(&prompts)?;
    let (b, t, v) = (batch.len(), fwd.logits.dim(1), fwd.logits.dim(2));
    let rows = completion_rows(batch, &fwd.pad, t)?;
    let logits = host_logits(model, &fwd.logits)?;
    let targets: Vec<u32> = rows.iter().map(|r| r.1).collect();
    let sel = gather_rows(&logits, v, &rows);
    drop(logits);
    let (lp, ent) = token_logprobs(&sel, v, &targets, temperature)?;

    // Pad every per-token array to n_seqs × max_len for the loss.
    let max_len = batch.iter().map(GrpoSample::completion_len).max().unwrap_or(0);
    let n = b * max_len;
    let (mut logp, mut old, mut entropy, mut mask) = (vec![0f32; n], vec![0f32; n], vec![0f32; n], vec![false; n]);
    let mut refp = batch.iter().all(|s| s.ref_logp.is_some()).then(|| vec![0f32; n]);
    if refp.is_none() && batch.iter().any(|s| s.ref_logp.is_some()) {
        return Err(TrainingError::Invalid("either every GRPO sample has ref_logp or none has".into()));
    }
    let mut k = 0;
    for (i, s) in batch.iter().enumerate() {
        let c = s.completion_len();
        let check = |name: &str, x: &Option<Vec<f32>>| match x {
            Some(x) if x.len() != c => Err(TrainingError::Invalid(format!("GRPO sample {i}: {name} has {} values for {c} completion tokens", x.len()))),
            _ => Ok(()),
        };
        check("old_logp", &s.old_logp)?;
        check("ref_logp", &s.ref_logp)?;
        for j in 0..c {
            let p = i * max_len + j;
            logp[p] = lp[k + j];
            entropy[p] = ent[k + j];
            mask[p] = true;
            old[p] = s.old_logp.as_ref().map_or(lp[k + j], |o| o[j]);
            if let (Some(r), Some(sr)) = (refp.as_mut(), s.ref_logp.as_ref()) {
                r[p] = sr[j];
            }
        }
        k += c;
    }
    let advantages: Vec<f64> = batch.iter().map(|s| s.advantage).collect();
    let out = grpo_loss(
        cfg,
        &GrpoBatch {
            n_seqs: b,
            seq_len: max_len,
            logp: &logp,
            old_logp: &old,
            ref_logp: refp.as_deref(),
            mask: &mask,
            advantages: &advantages,
            keep: None,
            entropy: Some(&entropy),
            denominator: opts.denominator,
        },
    )?;
    // ∂loss/∂logp back to the selected logits rows, then scattered into the full [B, T, V].
    let mut g_sel = Vec::with_capacity(rows.len());
    for (i, s) in batch.iter().enumerate() {
        g_sel.extend_from_slice(&out.grad_logp[i * max_len..i * max_len + s.completion_len()]);
    }
    let d_sel = token_logprobs_backward(&sel, v, &targets, temperature, &g_sel)?;
    let mut dlogits = vec![0f32; b * t * v];
    for (ri, &(r, _)) in rows.iter().enumerate() {
        dlogits[r * v..(r + 1) * v].copy_from_slice(&d_sel[ri * v..(ri + 1) * v]);
    }
    let grads = model.backward_with(&fwd.tape, &model.backend().to_device(&Tensor::from_f32(&[b, t, v], dlogits)?)?, opts.freeze.vision_grads())?;
    Ok(StepOutput {
        loss: out.loss,
        tokens: rows.len(),
        grads: model_grads_to_map(model, grads, opts.freeze)?,
        stats: StepStats { grpo: Some(out.stats) },
    })
}
