//! Held-out evaluation: greedy generation on each question, scored with the accuracy reward
//! (answer tag or last `\boxed{}` against the ground truth). Questions are sharded over ranks and
//! the counts summed, so every rank returns the same result.

use onevision_comms::Communicator;
use onevision_data::Sample;
use onevision_model::{generate, Qwen25Vl, SamplingParams};
use onevision_rewards::{extract_answer, AccuracyReward, Reward, RewardRequest};

use super::dist::all_reduce_scalars;
use super::{EvalResult, Result};
use crate::training::Encoder;

/// Prompts generated together (left-padded batch with a shared KV cache).
pub const EVAL_BATCH: usize = 16;

/// The ground truth of a sample: its `answer` field, else the answer tag of its last assistant
/// turn (SFT data that carries the solution only in the trace).
pub fn ground_truth(sample: &Sample) -> Option<String> {
    if let Some(a) = &sample.answer {
        return Some(a.clone());
    }
    let last = sample.messages.iter().rev().find(|m| m.role == "assistant")?;
    extract_answer(&last.content).map(str::to_string)
}

/// The user-visible question text of a sample (for rewards that read the prompt).
pub fn prompt_text(sample: &Sample) -> String {
    sample
        .prompt_messages()
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A generation budget for evaluation: the longest reference answer in `samples`, tokenized,
/// with a quarter on top (a model may be a little wordier), within `[16, cap]`; `cap` when the
/// samples have no reference answers.
pub fn answer_budget(enc: &Encoder, samples: &[Sample], cap: usize) -> usize {
    let mut longest = 0;
    for s in samples {
        if let Some(last) = s.messages.iter().rev().find(|m| m.role == "assistant") {
            if let Ok(ids) = enc.completion_ids(&last.content) {
                longest = longest.max(ids.len());
            }
        }
    }
    if longest == 0 {
        return cap;
    }
    (longest + longest / 4 + 4).clamp(16, cap.max(16))
}

/// Greedy answers of `model` to this rank's `samples`, scored; counts summed over ranks.
pub fn evaluate(
    model: &Qwen25Vl,
    enc: &Encoder,
    comm: &dyn Communicator,
    samples: &[Sample],
    max_new_tokens: usize,
) -> Result<EvalResult> {
    let params = SamplingParams { max_new_tokens, temperature: 0.0, ..Default::default() };
    let reward = AccuracyReward::default();
    let (mut correct, mut n) = (0.0f64, 0.0f64);
    for chunk in samples.chunks(EVAL_BATCH) {
        let mut prompts = Vec::with_capacity(chunk.len());
        let mut reqs = Vec::with_capacity(chunk.len());
        for s in chunk {
            let Some(gt) = ground_truth(s) else {
                tracing::warn!(id = %s.id, "evaluation sample has no answer; skipped");
                continue;
            };
            prompts.push(enc.encode_prompt(s)?);
            reqs.push(RewardRequest { prompt: prompt_text(s), completion: String::new(), answer: Some(gt), meta: serde_json::Value::Null });
        }
        if prompts.is_empty() {
            continue;
        }
        let gens = generate(model, &prompts, &params).map_err(crate::training::TrainingError::from)?;
        for (g, r) in gens.iter().zip(reqs.iter_mut()) {
            r.completion = enc.processor().decode(&g.token_ids, true).map_err(crate::training::TrainingError::from)?;
        }
        let scores = reward.score_batch(&reqs)?;
        correct += scores.iter().sum::<f64>();
        n += scores.len() as f64;
    }
    let mut v = [correct, n];
    all_reduce_scalars(comm, &mut v)?;
    let n = v[1].round() as usize;
    Ok(EvalResult { accuracy: if n == 0 { 0.0 } else { v[0] / v[1] }, n })
}
