//! Generation: greedy and sampling (temperature, top-k, top-p, repetition penalty, seeded),
//! stopping on the checkpoint's eos ids, returning new tokens and their log-probabilities.
use crate::error::{ModelError, Result};
use crate::model::{KvCache, PromptInput, Qwen25Vl};
use crate::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus filtering.
    pub top_p: f32,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    /// 1.0 disables (HF semantics: positive logits divided, negative multiplied).
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Overrides the config's eos ids when set.
    pub eos_token_ids: Option<Vec<u32>>,
    /// Keep the first step's full logits (for `--dump-first-logits`).
    pub keep_first_logits: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { max_new_tokens: 256, temperature: 0.0, top_p: 1.0, top_k: 0, repetition_penalty: 1.0, seed: 0, eos_token_ids: None, keep_first_logits: false }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Invalid(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// New tokens; the eos token is included when generated.
    pub token_ids: Vec<u32>,
    /// log p(token) under the model's unmodified distribution (raw logits, temperature 1, no
    /// penalty or filtering): what a GRPO policy/ref forward recomputes.
    pub logprobs: Vec<f32>,
    /// True if stopped on an eos id (false: max_new_tokens or context end).
    pub finished: bool,
    pub first_logits: Option<Vec<f32>>,
}

/// log_softmax(logits)[tok], accumulated in f64.
pub fn token_logprob(logits: &[f32], tok: u32) -> f32 {
    let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = mx + logits.iter().map(|&l| (l as f64 - mx).exp()).sum::<f64>().ln();
    (logits[tok as usize] as f64 - lse) as f32
}

/// Applies the HF processors in HF order (repetition penalty, temperature, top-k, top-p)
/// and picks a token: argmax when greedy (first maximum, like torch.argmax), else a draw.
pub fn choose_token(logits: &[f32], history: &[u32], p: &SamplingParams, rng: &mut ChaCha8Rng) -> u32 {
    let mut l = logits.to_vec();
    if p.repetition_penalty != 1.0 {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(v) = l.get_mut(t as usize) {
                *v = if *v < 0.0 { *v * p.repetition_penalty } else { *v / p.repetition_penalty };
            }
        }
    }
    if p.temperature == 0.0 {
        let mut best = 0;
        for (i, &v) in l.iter().enumerate() {
            if v > l[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut idx: Vec<(f32, u32)> = l.iter().enumerate().map(|(i, &v)| (v / p.temperature, i as u32)).collect();
    // Sort descending by logit; stable so ties keep the lower id first.
    idx.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
    if p.top_k > 0 && p.top_k < idx.len() {
        // HF keeps every token tied with the k-th logit.
        let kth = idx[p.top_k - 1].0;
        let keep = idx.iter().take_while(|x| x.0 >= kth).count();
        idx.truncate(keep);
    }
    let mx = idx[0].0 as f64;
    let mut probs: Vec<f64> = idx.iter().map(|x| (x.0 as f64 - mx).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= z);
    if p.top_p < 1.0 {
        // Smallest prefix whose mass reaches top_p (at least one token).
        let mut c = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            c += q;
            if c >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= z);
    }
    let u: f64 = rng.random::<f64>();
    let mut c = 0.0;
    for (i, q) in probs.iter().enumerate() {
        c += q;
        if u < c {
            return idx[i].1;
        }
    }
    idx[probs.len() - 1].1
}

/// Generate for a batch of prompts (different lengths, any number of images each).
/// Prompts are prefilled together, then decoded in lock-step until every sequence has hit an eos
/// id, `max_new_tokens`, or the context end.
pub fn generate(model: &Qwen25Vl, prompts: &[PromptInput], params: &SamplingParams) -> Result<Vec<Generation>> {
    params.validate()?;
    let t = prompts.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
    let budget = params.max_new_tokens.min(model.config.text.max_position_embeddings.saturating_sub(t));
    let (pre, cache) = model.prefill(prompts, budget, false)?;
    let logits = model.backend().to_host(&pre.logits)?.to_f32_vec()?;
    let next_pos = pre.positions.iter().map(|p| p.next_position()).collect();
    let histories: Vec<&[u32]> = prompts.iter().map(|p| p.input_ids.as_slice()).collect();
    decode_loop(model, &histories, logits, cache, next_pos, budget, params)
}

/// `n` samples of one prompt (a GRPO group): the prompt and its images are encoded once and the
/// KV cache is replicated; sample `i` uses RNG stream `i`, exactly as `generate` on `n` copies.
pub fn generate_group(model: &Qwen25Vl, prompt: &PromptInput, n: usize, params: &SamplingParams) -> Result<Vec<Generation>> {
    params.validate()?;
    if n == 0 {
        return Ok(vec![]);
    }
    let t = prompt.input_ids.len();
    let budget = params.max_new_tokens.min(model.config.text.max_position_embeddings.saturating_sub(t));
    let (pre, one) = model.prefill(std::slice::from_ref(prompt), budget, false)?;
    let be = model.backend();
    let rep = vec![0usize; n];
    let dup = |x: &Tensor| -> Result<Tensor> {
        let mut shape = x.shape().to_vec();
        let flat = x.reshape(&[1, x.numel()])?;
        shape[0] = n;
        be.gather_rows(&flat, &rep)?.reshape(&shape)
    };
    let cache = KvCache {
        k: one.k.iter().map(dup).collect::<Result<_>>()?,
        v: one.v.iter().map(dup).collect::<Result<_>>()?,
        len: one.len,
        capacity: one.capacity,
        batch: n,
        key_start: vec![0; n],
    };
    let row = be.to_host(&pre.logits)?.to_f32_vec()?;
    let logits: Vec<f32> = (0..n).flat_map(|_| row.iter().copied()).collect();
    let next_pos = vec![pre.positions[0].next_position(); n];
    let histories = vec![prompt.input_ids.as_slice(); n];
    decode_loop(model, &histories, logits, cache, next_pos, budget, params)
}

/// Sample/decode until every row is finished. `logits` holds the first step's rows [B·V].
fn decode_loop(
    model: &Qwen25Vl,
    prompts: &[&[u32]],
    mut logits: Vec<f32>,
    mut cache: KvCache,
    mut next_pos: Vec<i64>,
    budget: usize,
    params: &SamplingParams,
) -> Result<Vec<Generation>> {
    let eos = params.eos_token_ids.clone().unwrap_or_else(|| model.config.eos_token_ids.clone());
    let vocab = model.config.text.vocab_size;
    let be = model.backend();
    let b = prompts.len();
    let mut out: Vec<Generation> = (0..b).map(|_| Generation { token_ids: vec![], logprobs: vec![], finished: false, first_logits: None }).collect();
    let mut rngs: Vec<ChaCha8Rng> = (0..b)
        .map(|i| {
            let mut r = ChaCha8Rng::seed_from_u64(params.seed);
            r.set_stream(i as u64);
            r
        })
        .collect();
    let mut done = vec![false; b];
    for step in 0..budget {
        let mut toks = vec![0u32; b];
        for i in 0..b {
            let row = &logits[i * vocab..(i + 1) * vocab];
            if step == 0 && params.keep_first_logits {
                out[i].first_logits = Some(row.to_vec());
            }
            if done[i] {
                // Finished rows keep decoding a harmless token; their output is ignored.
                toks[i] = *out[i].token_ids.last().unwrap_or(&0);
                continue;
            }
            let history: Vec<u32> = if params.repetition_penalty != 1.0 {
                prompts[i].iter().chain(&out[i].token_ids).copied().collect()
            } else {
                vec![]
            };
            let tok = choose_token(row, &history, params, &mut rngs[i]);
            out[i].token_ids.push(tok);
            out[i].logprobs.push(token_logprob(row, tok));
            if eos.contains(&tok) {
                done[i] = true;
                out[i].finished = true;
            }
            toks[i] = tok;
        }
        if done.iter().all(|&d| d) || step + 1 == budget {
            break;
        }
        logits = be.to_host(&model.decode_step(&toks, &next_pos, &mut cache)?)?.to_f32_vec()?;
        next_pos.iter_mut().for_each(|p| *p += 1);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(7)
    }

    #[test]
    fn greedy_picks_first_max_and_penalty_applies() {
        let p = SamplingParams::default();
        assert_eq!(choose_token(&[1.0, 3.0, 3.0, -1.0], &[], &p, &mut rng()), 1);
        // Penalty 4 on token 1: 3/4 = 0.75 < 1.0 → token 0 wins; negative logits get multiplied.
        let p = SamplingParams { repetition_penalty: 4.0, ..Default::default() };
        assert_eq!(choose_token(&[1.0, 3.0, 0.5, -1.0], &[1, 1], &p, &mut rng()), 0);
    }

    #[test]
    fn top_k_1_and_tiny_top_p_are_greedy() {
        let l = [0.1, 2.0, 1.9, -3.0];
        for p in [SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() }, SamplingParams { temperature: 1.0, top_p: 1e-6, ..Default::default() }] {
            for s in 0..20 {
                assert_eq!(choose_token(&l, &[], &p, &mut ChaCha8Rng::seed_from_u64(s)), 1);
            }
        }
    }

    #[test]
    fn sampling_frequencies_follow_softmax() {
        // logits ln(1), ln(2), ln(3), ln(4): probabilities 0.1..0.4; 20k draws → ±1% (≈3σ).
        let l: Vec<f32> = [1f32, 2., 3., 4.].iter().map(|v| v.ln()).collect();
        let p = SamplingParams { temperature: 1.0, ..Default::default() };
        let mut r = rng();
        let mut c = [0usize; 4];
        for _ in 0..20000 {
            c[choose_token(&l, &[], &p, &mut r) as usize] += 1;
        }
        for i in 0..4 {
            let f = c[i] as f64 / 20000.0;
            assert!((f - (i + 1) as f64 / 10.0).abs() < 0.01, "{c:?}");
        }
        // top_p 0.65 keeps {0.4, 0.3} (mass 0.7 ≥ 0.65) → tokens 3 and 2 only, 4:3.
        let p = SamplingParams { temperature: 1.0, top_p: 0.65, ..Default::default() };
        let mut c = [0usize; 4];
        for _ in 0..20000 {
            c[choose_token(&l, &[], &p, &mut r) as usize] += 1;
        }
        assert_eq!(c[0] + c[1], 0);
        assert!((c[3] as f64 / 20000.0 - 4.0 / 7.0).abs() < 0.015, "{c:?}");
    }

    #[test]
    fn logprob_matches_log_softmax() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|&v| (v as f64).exp()).sum();
        assert!((token_logprob(&l, 2) as f64 - (3.0 - z.ln())).abs() < 1e-6);
    }
}
