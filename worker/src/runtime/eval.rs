//! Held-out evaluation: greedy generation on each question, scored with the accuracy reward
//! (answer tag or last `\boxed{}` against the ground truth), and with `eval.sampling` the mean
//! accuracy of k sampled answers per question (DeepSeek-R1's pass@1). Questions are sharded over
//! ranks and the counts summed, so every rank returns the same result.

use onevision_comms::Communicator;
use onevision_data::Sample;
use onevision_model::{generate_groups, Generation, GroupJob, Qwen25Vl, SamplingParams};
use onevision_rewards::{extract_answer, AccuracyReward, Reward, RewardRequest};

use super::dist::all_reduce_scalars;
use super::settings::EvalSampling;
use super::{CategoryAccuracy, EvalResult, Result, SampledAccuracy};
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

/// The RNG seed of a question's sampled answers: FNV-1a of its id, so a question gets the same
/// draws whichever rank's shard holds it and wherever it sits in the file.
pub fn question_seed(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Generated answers to `questions` (decoded text), in order: one greedy answer per question and,
/// with `sampling`, `sampling.samples` sampled ones (seeded by [`question_seed`]).
pub fn answer_questions(
    model: &Qwen25Vl,
    enc: &Encoder,
    questions: &[&Sample],
    max_new_tokens: usize,
    sampling: Option<&EvalSampling>,
) -> Result<Vec<(String, Vec<String>)>> {
    let greedy = SamplingParams { max_new_tokens, temperature: 0.0, ..Default::default() };
    let decode = |g: &Generation| enc.processor().decode(&g.token_ids, true).map_err(crate::training::TrainingError::from);
    let mut out = Vec::with_capacity(questions.len());
    for chunk in questions.chunks(EVAL_BATCH) {
        let prompts = chunk.iter().map(|s| enc.encode_prompt(s)).collect::<std::result::Result<Vec<_>, _>>()?;
        let sampled_params: Vec<SamplingParams> = match sampling {
            Some(e) => chunk
                .iter()
                .map(|s| SamplingParams { max_new_tokens, temperature: e.temperature as f32, top_p: e.top_p as f32, seed: question_seed(&s.id), ..Default::default() })
                .collect(),
            None => Vec::new(),
        };
        // Greedy and sampled groups decode as one batch: the greedy answer of question i is job
        // i (stream i, as `generate` would use), its samples job chunk.len() + i.
        let (n, k) = (chunk.len(), sampling.map_or(0, |e| e.samples));
        let jobs: Vec<GroupJob<'_>> = (prompts.iter().enumerate())
            .map(|(i, prompt)| GroupJob { tag: i as u64, prompt, n: 1, params: &greedy, first_stream: i as u64 })
            .chain(prompts.iter().zip(&sampled_params).enumerate().map(|(i, (prompt, params))| GroupJob {
                tag: (n + i) as u64,
                prompt,
                n: k,
                params,
                first_stream: 0,
            }))
            .collect();
        let groups = generate_groups(model, &jobs).map_err(crate::training::TrainingError::from)?;
        let (greedy_groups, sampled_groups) = groups.split_at(n);
        for (i, g) in greedy_groups.iter().enumerate() {
            let samples = sampled_groups.get(i).map_or(Ok(Vec::new()), |grp| grp.iter().map(decode).collect::<std::result::Result<Vec<_>, _>>())?;
            out.push((decode(&g[0])?, samples));
        }
    }
    Ok(out)
}

/// The questions an evaluation scores: those with a ground truth.
fn scored_samples(samples: &[Sample]) -> Vec<&Sample> {
    samples
        .iter()
        .filter(|s| {
            let ok = ground_truth(s).is_some();
            if !ok {
                tracing::warn!(id = %s.id, "evaluation sample has no answer; skipped");
            }
            ok
        })
        .collect()
}

/// Per-question sums of an evaluation, position by position so ranks can all-reduce them:
/// `[greedy correct, questions, sampled accuracy]` in total, then the same per category.
struct Tally {
    sums: Vec<f64>,
}

impl Tally {
    fn new(categories: usize) -> Self {
        Tally { sums: vec![0.0; 3 * (1 + categories)] }
    }

    /// One question: its greedy score, its sampled answers' scores (may be empty), its category.
    fn add(&mut self, greedy: f64, sampled: &[f64], category: Option<usize>) {
        let mean = if sampled.is_empty() { 0.0 } else { sampled.iter().sum::<f64>() / sampled.len() as f64 };
        for base in std::iter::once(0).chain(category.map(|c| 3 * (c + 1))) {
            self.sums[base] += greedy;
            self.sums[base + 1] += 1.0;
            self.sums[base + 2] += mean;
        }
    }

    fn result(&self, categories: &[String], sampling: Option<&EvalSampling>) -> EvalResult {
        let frac = |k: f64, n: f64| if n == 0.0 { 0.0 } else { k / n };
        let s = &self.sums;
        let present = || categories.iter().enumerate().map(|(i, c)| (c, 3 * (i + 1))).filter(|(_, b)| s[b + 1] > 0.0);
        EvalResult {
            accuracy: frac(s[0], s[1]),
            n: s[1].round() as usize,
            by_category: present().map(|(c, b)| (c.clone(), CategoryAccuracy { accuracy: frac(s[b], s[b + 1]), n: s[b + 1].round() as usize })).collect(),
            sampled: sampling.map(|e| SampledAccuracy {
                accuracy: frac(s[2], s[1]),
                samples: e.samples,
                temperature: e.temperature,
                top_p: e.top_p,
                by_category: present().map(|(c, b)| (c.clone(), frac(s[b + 2], s[b + 1]))).collect(),
            }),
        }
    }
}

/// Greedy (and, with `sampling`, sampled) answers of `model` to this rank's `samples`, scored
/// with the accuracy reward; sums over ranks, in total and per entry of `categories` (see
/// [`categories`]).
pub fn evaluate(
    model: &Qwen25Vl,
    enc: &Encoder,
    comm: &dyn Communicator,
    samples: &[Sample],
    categories: &[String],
    max_new_tokens: usize,
    sampling: Option<&EvalSampling>,
) -> Result<EvalResult> {
    let reward = AccuracyReward::default();
    let questions = scored_samples(samples);
    let answers = answer_questions(model, enc, &questions, max_new_tokens, sampling)?;
    let mut tally = Tally::new(categories.len());
    for (s, (greedy, sampled)) in questions.into_iter().zip(&answers) {
        let (prompt, answer) = (prompt_text(s), ground_truth(s));
        let req = |completion: &String| RewardRequest {
            prompt: prompt.clone(),
            completion: completion.clone(),
            answer: answer.clone(),
            meta: serde_json::Value::Null,
        };
        let reqs: Vec<RewardRequest> = std::iter::once(greedy).chain(sampled).map(req).collect();
        let scores = reward.score_batch(&reqs)?;
        let slot = category(s).and_then(|c| categories.iter().position(|x| x == c));
        tally.add(scores[0], &scores[1..], slot);
    }
    all_reduce_scalars(comm, &mut tally.sums)?;
    Ok(tally.result(categories, sampling))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(meta: serde_json::Value) -> Sample {
        Sample { id: "x".into(), messages: vec![], images: vec![], answer: Some("1".into()), meta }
    }

    #[test]
    fn question_seeds_are_fnv1a_of_the_id() {
        // Published FNV-1a 64 test vectors: a stable seed, whatever the Rust version or platform.
        assert_eq!(question_seed(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(question_seed("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(question_seed("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn tally_averages_samples_per_question_and_splits_categories() {
        let cats = ["color".to_string(), "count".to_string(), "shape".to_string()];
        let e = EvalSampling { samples: 4, temperature: 0.6, top_p: 0.95 };
        let mut t = Tally::new(cats.len());
        t.add(1.0, &[1.0, 1.0, 0.0, 0.0], Some(0)); // colour: greedy right, 2 of 4 samples
        t.add(0.0, &[1.0, 0.0, 0.0, 0.0], Some(1)); // count: greedy wrong, 1 of 4
        t.add(1.0, &[1.0, 1.0, 1.0, 1.0], Some(0)); // colour: all right
        t.add(0.0, &[0.0; 4], None); // a question without a category counts in the total only
        let r = t.result(&cats, Some(&e));
        assert_eq!((r.accuracy, r.n), (0.5, 4));
        let s = r.sampled.as_ref().unwrap();
        assert_eq!(s.accuracy, (0.5 + 0.25 + 1.0 + 0.0) / 4.0);
        assert_eq!((s.samples, s.temperature, s.top_p), (4, 0.6, 0.95));
        assert_eq!(r.by_category.len(), 2, "shape had no question: not reported");
        assert_eq!((r.by_category["color"].accuracy, r.by_category["color"].n), (1.0, 2));
        assert_eq!((r.by_category["count"].accuracy, r.by_category["count"].n), (0.0, 1));
        assert_eq!(s.by_category["color"], 0.75);
        assert_eq!(s.by_category["count"], 0.25);
        // Two ranks' tallies summed position by position give the result of one tally of both.
        let (mut a, mut b, mut both) = (Tally::new(3), Tally::new(3), Tally::new(3));
        a.add(1.0, &[0.0, 1.0], Some(2));
        b.add(0.0, &[1.0, 1.0], Some(2));
        both.add(1.0, &[0.0, 1.0], Some(2));
        both.add(0.0, &[1.0, 1.0], Some(2));
        let sum: Vec<f64> = a.sums.iter().zip(&b.sums).map(|(x, y)| x + y).collect();
        assert_eq!(sum, both.sums);
        // Greedy only: no sampled block.
        assert!(t.result(&cats, None).sampled.is_none());
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
