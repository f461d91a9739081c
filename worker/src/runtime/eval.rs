//! Held-out evaluation: greedy generation on each question, scored with the accuracy reward
//! (answer tag or last `\boxed{}` against the ground truth). Questions are sharded over ranks and
//! the counts summed, so every rank returns the same result.

use std::collections::BTreeMap;

use onevision_comms::Communicator;
use onevision_data::Sample;
use onevision_model::{generate, Qwen25Vl, SamplingParams};
use onevision_rewards::{extract_answer, AccuracyReward, Reward, RewardRequest};

use super::dist::all_reduce_scalars;
use super::{CategoryAccuracy, EvalResult, Result};
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

/// The category a question is reported under: its row's `family` (synthetic tasks) or `category`
/// (R1-Onevision-Bench) field.
pub fn category(sample: &Sample) -> Option<&str> {
    ["family", "category"].iter().find_map(|k| sample.meta.get(*k)?.as_str())
}

/// The categories of a whole evaluation set, sorted (every rank derives the same list from the
/// full set, so per-category counts all-reduce position by position).
pub fn categories(samples: &[Sample]) -> Vec<String> {
    let mut c: Vec<String> = samples.iter().filter_map(|s| category(s).map(str::to_string)).collect();
    c.sort();
    c.dedup();
    c
}

/// Greedy answers of `model` to this rank's `samples`, scored; counts summed over ranks, in total
/// and per entry of `categories` (see [`categories`]).
pub fn evaluate(
    model: &Qwen25Vl,
    enc: &Encoder,
    comm: &dyn Communicator,
    samples: &[Sample],
    categories: &[String],
    max_new_tokens: usize,
) -> Result<EvalResult> {
    let params = SamplingParams { max_new_tokens, temperature: 0.0, ..Default::default() };
    let reward = AccuracyReward::default();
    // [correct, n] in total, then per category.
    let mut counts = vec![0.0f64; 2 + 2 * categories.len()];
    for chunk in samples.chunks(EVAL_BATCH) {
        let mut prompts = Vec::with_capacity(chunk.len());
        let mut reqs = Vec::with_capacity(chunk.len());
        let mut slots = Vec::with_capacity(chunk.len());
        for s in chunk {
            let Some(gt) = ground_truth(s) else {
                tracing::warn!(id = %s.id, "evaluation sample has no answer; skipped");
                continue;
            };
            prompts.push(enc.encode_prompt(s)?);
            slots.push(category(s).and_then(|c| categories.iter().position(|x| x == c)));
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
        for (score, slot) in scores.iter().zip(&slots) {
            counts[0] += score;
            counts[1] += 1.0;
            if let Some(i) = slot {
                counts[2 + 2 * i] += score;
                counts[3 + 2 * i] += 1.0;
            }
        }
    }
    all_reduce_scalars(comm, &mut counts)?;
    let accuracy = |correct: f64, n: f64| if n == 0.0 { 0.0 } else { correct / n };
    let by_category = categories
        .iter()
        .enumerate()
        .filter(|(i, _)| counts[3 + 2 * i] > 0.0)
        .map(|(i, c)| {
            let (k, n) = (counts[2 + 2 * i], counts[3 + 2 * i]);
            (c.clone(), CategoryAccuracy { accuracy: accuracy(k, n), n: n.round() as usize })
        })
        .collect::<BTreeMap<_, _>>();
    Ok(EvalResult { accuracy: accuracy(counts[0], counts[1]), n: counts[1].round() as usize, by_category })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(meta: serde_json::Value) -> Sample {
        Sample { id: "x".into(), messages: vec![], images: vec![], answer: Some("1".into()), meta }
    }

    #[test]
    fn categories_come_from_family_or_category_sorted_and_unique() {
        let rows = [
            row(serde_json::json!({"family": "count", "difficulty": 1})),
            row(serde_json::json!({"category": "Math", "level": "College"})),
            row(serde_json::json!({"family": "color"})),
            row(serde_json::json!({"family": "count"})),
            row(serde_json::json!({"family": 3})),
            row(serde_json::Value::Null),
        ];
        assert_eq!(category(&rows[1]), Some("Math"));
        assert_eq!(category(&rows[4]), None, "a non-string field names no category");
        assert_eq!(categories(&rows), vec!["Math", "color", "count"]);
    }
}
