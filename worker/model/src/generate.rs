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

/// The next token and its log-probability under the raw logits (temperature 1, no penalty or
/// filtering). Without top-k/top-p/penalty this works on the logits in place: no vocabulary-sized
/// copy or sort; sampling walks the vocabulary in id order (inverse CDF over the ids), one
/// exp per id for the normaliser and at most one more per id for the draw. Greedy picks the first
/// maximum, like [`choose_token`]; with filters or a penalty it defers to [`choose_token`].
pub fn sample_token(logits: &[f32], history: &[u32], p: &SamplingParams, rng: &mut ChaCha8Rng) -> (u32, f32) {
    let plain = p.repetition_penalty == 1.0 && (p.top_k == 0 || p.top_k >= logits.len()) && p.top_p >= 1.0;
    if !plain || logits.is_empty() {
        let t = choose_token(logits, history, p, rng);
        return (t, token_logprob(logits, t));
    }
    let (mut best, mut mx) = (0usize, logits[0]);
    for (i, &v) in logits.iter().enumerate() {
        if v > mx {
            best = i;
            mx = v;
        }
    }
    let mxd = mx as f64;
    if p.temperature == 0.0 {
        let lse = mxd + logits.iter().map(|&l| (l - mx).exp() as f64).sum::<f64>().ln();
        return (best as u32, (logits[best] as f64 - lse) as f32);
    }
    let inv_t = 1.0 / p.temperature;
    thread_local! {
        /// The terms of the sampling distribution, kept for the walk, and the raw (T = 1) terms
        /// for the log-prob's normaliser (one vocabulary each per thread).
        static TERMS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    TERMS.with_borrow_mut(|(terms, raw)| {
        // One f32 exp per id (8-wide, ≤ 2 ulp), summed in f64: the normaliser is as accurate as
        // the exps (~2e-7 relative), and the walk re-adds the same terms in the same order, so it
        // ends inside the vocabulary; `last` only guards against `target` rounding up to z_t.
        crate::cpu::kernels::exp_shift_scale(logits, mx, inv_t, terms);
        let z_t: f64 = terms.iter().map(|&e| e as f64).sum();
        let z_1 = if inv_t == 1.0 {
            z_t
        } else {
            crate::cpu::kernels::exp_shift_scale(logits, mx, 1.0, raw);
            raw.iter().map(|&e| e as f64).sum()
        };
        let target = rng.random::<f64>() * z_t;
        let (mut c, mut tok, mut last) = (0f64, None, best);
        for (i, &e) in terms.iter().enumerate() {
            if e > 0.0 {
                last = i;
            }
            c += e as f64;
            if target < c {
                tok = Some(i);
                break;
            }
        }
        let tok = tok.unwrap_or(last);
        (tok as u32, (logits[tok] as f64 - mxd - z_1.ln()) as f32)
    })
}

/// Generate for a batch of prompts (different lengths, any number of images each): prompt `i`
/// uses RNG stream `i` of the seed. Decoded together (see [`BatchDecoder`]) until every sequence
/// has hit an eos id, `max_new_tokens`, or the context end.
pub fn generate(model: &Qwen25Vl, prompts: &[PromptInput], params: &SamplingParams) -> Result<Vec<Generation>> {
    params.validate()?;
    let jobs: Vec<GroupJob<'_>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GroupJob { tag: i as u64, prompt: p, n: 1, params, first_stream: i as u64 })
        .collect();
    Ok(run_to_end(model, &jobs)?.into_iter().flatten().collect())
}

/// `n` samples of one prompt (a GRPO group): the prompt and its images are encoded once and the
/// KV cache is shared; sample `i` uses RNG stream `i`, as `generate` on `n` copies does.
pub fn generate_group(model: &Qwen25Vl, prompt: &PromptInput, n: usize, params: &SamplingParams) -> Result<Vec<Generation>> {
    params.validate()?;
    let job = GroupJob { tag: 0, prompt, n, params, first_stream: 0 };
    Ok(run_to_end(model, std::slice::from_ref(&job))?.into_iter().flatten().collect())
}

/// Several prompt groups decoded together, each with its own sampling parameters and seed (held-out
/// evaluation with `k` samples per question): the generations of each job, in job order.
pub fn generate_groups(model: &Qwen25Vl, jobs: &[GroupJob<'_>]) -> Result<Vec<Vec<Generation>>> {
    for j in jobs {
        j.params.validate()?;
    }
    run_to_end(model, jobs)
}

/// Decodes `jobs` together to the end; the generations of each job, in job order.
fn run_to_end(model: &Qwen25Vl, jobs: &[GroupJob<'_>]) -> Result<Vec<Vec<Generation>>> {
    // Runs on the calling thread. (Moving the loop onto a rayon worker with `rayon::scope` made
    // evaluation ~25 % faster, but one CI run then saw an SFT trainer stall and restart; the
    // rollout worker gets the same gain from a pool of its own, where nothing else runs.)
    let mut dec = BatchDecoder::new(model);
    let mut done = dec.add_groups(jobs)?;
    while !dec.is_idle() {
        done.extend(dec.step()?);
    }
    done.sort_by_key(|f| f.tag);
    Ok(done.into_iter().map(|f| f.generations).collect())
}

/// One prompt group for a [`BatchDecoder`].
#[derive(Clone, Copy)]
pub struct GroupJob<'a> {
    /// Returned with the group's generations.
    pub tag: u64,
    pub prompt: &'a PromptInput,
    /// Samples to draw (G).
    pub n: usize,
    pub params: &'a SamplingParams,
    /// Sample `i` uses RNG stream `first_stream + i` of `params.seed`.
    pub first_stream: u64,
}

/// A group whose every sample has finished.
#[derive(Debug)]
pub struct FinishedGroup {
    pub tag: u64,
    pub generations: Vec<Generation>,
}

/// A drawn token, its log-prob, and the row's logits when the first step's are kept.
type Pick = (u32, f32, Option<Vec<f32>>);

/// One sequence (sample) in the decode batch.
struct Seq {
    /// Slot in `BatchDecoder::groups`.
    group: usize,
    sample: usize,
    rng: ChaCha8Rng,
    /// M-RoPE position of the next token fed back.
    next_pos: i64,
    /// Tokens it may generate (max_new_tokens, capped by the context).
    budget: usize,
    done: bool,
    /// Token to feed at the next decode step.
    last: u32,
}

struct GroupState {
    tag: u64,
    params: SamplingParams,
    eos: Vec<u32>,
    /// Prompt ids, kept only for the repetition penalty.
    prompt: Vec<u32>,
    outs: Vec<Generation>,
    /// Samples not finished yet.
    live: usize,
}

/// Continuous batching: the samples of several prompt groups decode as one batch; a group's
/// prompt (and images) is prefilled once and its KV entries shared by its G samples; groups
/// join between steps (`add_groups`) and leave as soon as all their samples have finished.
///
/// KV layout: one cache [rows, capacity, Hkv, D] with a shared fill level `len`; each row's
/// entries are right-aligned at `len` and `key_start[row]` masks the slots before them (the
/// `AttnMask::Causal` left padding), so rows of different lengths decode in one step. Rows are
/// re-laid (a gather of the live entries) only when groups join or enough finished rows have
/// accumulated, never per step. Positions are explicit per row, so the alignment does not change
/// any row's result beyond float rounding of the batched products.
pub struct BatchDecoder<'m> {
    model: &'m Qwen25Vl,
    cache: Option<KvCache>,
    /// The cache rows, in order.
    seqs: Vec<Seq>,
    /// Next-token logits of each row [seqs.len() × vocab].
    logits: Vec<f32>,
    groups: Vec<Option<GroupState>>,
}

/// Rows of a fresh prefill joining the batch.
struct Joining<'a> {
    cache: &'a KvCache,
    /// Per new row: its prompt's index in the prefill batch.
    prompt_of: Vec<usize>,
    logits: &'a [f32],
    seqs: Vec<Seq>,
}

impl<'m> BatchDecoder<'m> {
    pub fn new(model: &'m Qwen25Vl) -> Self {
        BatchDecoder { model, cache: None, seqs: vec![], logits: vec![], groups: vec![] }
    }

    /// Samples still generating (the batch rows that do work).
    pub fn live_rows(&self) -> usize {
        self.seqs.iter().filter(|s| !s.done).count()
    }

    /// No group in flight.
    pub fn is_idle(&self) -> bool {
        self.groups.iter().all(Option::is_none)
    }

    /// Prefills the jobs' prompts (one batched prefill, each prompt once) and adds their samples
    /// to the batch; their first tokens are drawn at the next [`step`](Self::step). Jobs with no
    /// samples or no room to generate come back at once. On error nothing is added.
    pub fn add_groups(&mut self, jobs: &[GroupJob<'_>]) -> Result<Vec<FinishedGroup>> {
        for j in jobs {
            j.params.validate()?;
        }
        let ctx = self.model.config.text.max_position_embeddings;
        let mut finished = Vec::new();
        let mut prompts = Vec::new();
        let mut staged = Vec::new();
        for j in jobs {
            let budget = j.params.max_new_tokens.min(ctx.saturating_sub(j.prompt.input_ids.len()));
            let outs = (0..j.n).map(|_| Generation { token_ids: vec![], logprobs: vec![], finished: false, first_logits: None }).collect();
            if j.n == 0 || budget == 0 {
                finished.push(FinishedGroup { tag: j.tag, generations: outs });
                continue;
            }
            let state = GroupState {
                tag: j.tag,
                eos: j.params.eos_token_ids.clone().unwrap_or_else(|| self.model.config.eos_token_ids.clone()),
                prompt: if j.params.repetition_penalty != 1.0 { j.prompt.input_ids.clone() } else { vec![] },
                params: j.params.clone(),
                outs,
                live: j.n,
            };
            prompts.push(j.prompt.clone());
            staged.push((state, j.n, budget, j.first_stream));
        }
        if prompts.is_empty() {
            return Ok(finished);
        }
        let (pre, cache) = self.model.prefill(&prompts, 0, false)?;
        let logits = self.model.backend().to_host(&pre.logits)?.to_f32_vec()?;
        let mut seqs = Vec::new();
        let mut prompt_of = Vec::new();
        for (pi, (state, n, budget, first_stream)) in staged.into_iter().enumerate() {
            let seed = state.params.seed;
            let slot = self.insert_group(state);
            for sample in 0..n {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(first_stream + sample as u64);
                let next_pos = pre.positions[pi].next_position();
                seqs.push(Seq { group: slot, sample, rng, next_pos, budget, done: false, last: 0 });
                prompt_of.push(pi);
            }
        }
        let joining = Joining { cache: &cache, prompt_of, logits: &logits, seqs };
        if let Err(e) = self.relayout(Some(joining)) {
            // Leave the decoder as it was: forget the groups that could not join.
            let slots: std::collections::HashSet<usize> = self.seqs.iter().map(|s| s.group).collect();
            for (i, g) in self.groups.iter_mut().enumerate() {
                if !slots.contains(&i) {
                    *g = None;
                }
            }
            return Err(e);
        }
        Ok(finished)
    }

    fn insert_group(&mut self, g: GroupState) -> usize {
        match self.groups.iter().position(Option::is_none) {
            Some(i) => {
                self.groups[i] = Some(g);
                i
            }
            None => {
                self.groups.push(Some(g));
                self.groups.len() - 1
            }
        }
    }

    /// Draws one token for every live row, retires the rows that finish, and runs one decode
    /// step for the rest. Returns the groups that completed.
    pub fn step(&mut self) -> Result<Vec<FinishedGroup>> {
        // The step is a burst of short parallel regions: keep the pool's threads awake for it.
        let _hot = crate::cpu::hot::HotPool::new();
        let vocab = self.model.config.text.vocab_size;
        let groups = &self.groups;
        let picks: Vec<Option<Pick>> = {
            use rayon::prelude::*;
            let work = |(s, row): (&mut Seq, &[f32])| {
                if s.done {
                    return None;
                }
                let g = groups[s.group].as_ref().expect("a row's group lives until the row finishes");
                let out = &g.outs[s.sample];
                let history: Vec<u32> =
                    if g.params.repetition_penalty != 1.0 { g.prompt.iter().chain(&out.token_ids).copied().collect() } else { vec![] };
                let first = (out.token_ids.is_empty() && g.params.keep_first_logits).then(|| row.to_vec());
                let (t, lp) = sample_token(row, &history, &g.params, &mut s.rng);
                Some((t, lp, first))
            };
            // Rows are independent (own RNG stream): spread them over the threads when the
            // vocabulary makes sampling worth it.
            if self.seqs.len() * vocab >= 1 << 16 {
                self.seqs.par_iter_mut().zip(self.logits.par_chunks(vocab)).map(work).collect()
            } else {
                self.seqs.iter_mut().zip(self.logits.chunks(vocab)).map(work).collect()
            }
        };
        let mut completed = Vec::new();
        for (s, pick) in self.seqs.iter_mut().zip(picks) {
            let Some((tok, lp, first)) = pick else { continue };
            let g = self.groups[s.group].as_mut().expect("live row has a group");
            let out = &mut g.outs[s.sample];
            if first.is_some() {
                out.first_logits = first;
            }
            out.token_ids.push(tok);
            out.logprobs.push(lp);
            s.last = tok;
            if g.eos.contains(&tok) {
                out.finished = true;
                s.done = true;
            } else if out.token_ids.len() >= s.budget {
                s.done = true;
            }
            if s.done {
                g.live -= 1;
                if g.live == 0 {
                    completed.push(s.group);
                }
            }
        }
        let mut out = Vec::with_capacity(completed.len());
        for slot in completed {
            let g = self.groups[slot].take().expect("completed once");
            out.push(FinishedGroup { tag: g.tag, generations: g.outs });
        }
        let dead = self.seqs.iter().filter(|s| s.done).count();
        if dead == self.seqs.len() {
            self.cache = None;
            self.seqs.clear();
            self.logits.clear();
            return Ok(out);
        }
        // Finished rows still cost a row of every product: drop them once they are an eighth of
        // the batch (a re-layout copies the live cache, so not after every single one).
        if dead > 0 && dead * 8 >= self.seqs.len() {
            self.relayout(None)?;
        }
        self.decode()?;
        Ok(out)
    }

    /// One decode step for every row (finished rows not yet dropped feed their last token; their
    /// results are ignored).
    fn decode(&mut self) -> Result<()> {
        let m = self.model;
        let tc = &m.config.text;
        let cache = self.cache.as_mut().expect("rows imply a cache");
        let tokens: Vec<u32> = self.seqs.iter().map(|s| s.last).collect();
        let pos: Vec<[i64; 3]> = self.seqs.iter().map(|s| [s.next_pos; 3]).collect();
        let b = tokens.len();
        let e = m.backend().embedding(&m.text.embed, &tokens)?;
        let h = m.text_forward(&e.reshape(&[b, 1, tc.hidden_size])?, &pos, cache)?;
        let logits = m.logits(&h.reshape(&[b, tc.hidden_size])?)?;
        self.logits = m.backend().to_host(&logits)?.to_f32_vec()?;
        for s in &mut self.seqs {
            s.next_pos += 1;
        }
        Ok(())
    }

    /// Rebuilds the cache with the live rows (finished ones dropped) followed by `joining`'s
    /// rows, each right-aligned at the new fill level, with room for every row's remaining
    /// budget. One gather per layer tensor (plus one scatter when both old and new rows exist).
    fn relayout(&mut self, joining: Option<Joining<'_>>) -> Result<()> {
        let be = self.model.backend();
        let tc = &self.model.config.text;
        let (layers, width) = (tc.num_hidden_layers, tc.num_key_value_heads * tc.head_dim);
        let vocab = tc.vocab_size;
        let keep: Vec<usize> = (0..self.seqs.len()).filter(|&i| !self.seqs[i].done).collect();
        let old = self.cache.as_ref().filter(|_| !keep.is_empty());
        let generated = |s: &Seq| self.groups[s.group].as_ref().map_or(0, |g| g.outs[s.sample].token_ids.len());
        // (live entries, slots still needed) of each destination row.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        if let Some(c) = old {
            rows.extend(keep.iter().map(|&i| (c.len - c.key_start[i], self.seqs[i].budget - generated(&self.seqs[i]))));
        }
        if let Some(j) = &joining {
            let t = j.cache.len;
            rows.extend(j.prompt_of.iter().zip(&j.seqs).map(|(&p, s)| (t - j.cache.key_start[p], s.budget)));
        }
        let len = rows.iter().map(|r| r.0).max().unwrap_or(0);
        let capacity = len + rows.iter().map(|r| r.1).max().unwrap_or(0).max(1);
        let batch = rows.len();
        // Source row (in the flattened [B·S, width] view) of each destination slot; slots
        // outside a row's entries point at one of its entries (masked, never read).
        let map = |base: usize, live: usize| (0..capacity).map(move |s| base + (s + live).saturating_sub(len).min(live.saturating_sub(1)));
        let (mut first_idx, mut scatter_dst, mut scatter_src) = (Vec::with_capacity(batch * capacity), vec![], vec![]);
        let n_old = old.map_or(0, |_| keep.len());
        if let Some(c) = old {
            for &i in &keep {
                first_idx.extend(map(i * c.capacity + c.key_start[i], c.len - c.key_start[i]));
            }
        }
        if let Some(j) = &joining {
            let t = j.cache.len;
            for (r, &p) in j.prompt_of.iter().enumerate() {
                let live = t - j.cache.key_start[p];
                let src = map(p * j.cache.capacity + j.cache.key_start[p], live);
                if old.is_some() {
                    first_idx.extend(std::iter::repeat_n(0, capacity));
                    let dst_row = n_old + r;
                    scatter_dst.extend((len - live..len).map(|s| dst_row * capacity + s));
                    scatter_src.extend(src.skip(len - live).take(live));
                } else {
                    first_idx.extend(src);
                }
            }
        }
        let relaid = |old_t: Option<&Tensor>, new_t: Option<&Tensor>| -> Result<Tensor> {
            let flat = |t: &Tensor| t.reshape(&[t.numel() / width, width]);
            let first = match old_t {
                Some(t) => be.gather_rows(&flat(t)?, &first_idx)?,
                None => be.gather_rows(&flat(new_t.expect("a source exists"))?, &first_idx)?,
            };
            let out = match (old_t, new_t) {
                (Some(_), Some(n)) if !scatter_dst.is_empty() => {
                    be.scatter_rows(&first, &scatter_dst, &be.gather_rows(&flat(n)?, &scatter_src)?)?
                }
                _ => first,
            };
            out.reshape(&[batch, capacity, tc.num_key_value_heads, tc.head_dim])
        };
        let (mut k, mut v) = (Vec::with_capacity(layers), Vec::with_capacity(layers));
        if batch > 0 {
            for l in 0..layers {
                k.push(relaid(old.map(|c| &c.k[l]), joining.as_ref().map(|j| &j.cache.k[l]))?);
                v.push(relaid(old.map(|c| &c.v[l]), joining.as_ref().map(|j| &j.cache.v[l]))?);
            }
        }
        let key_start = rows.iter().map(|r| len - r.0).collect();
        let mut logits = Vec::with_capacity(batch * vocab);
        for &i in &keep {
            if old.is_some() {
                logits.extend_from_slice(&self.logits[i * vocab..(i + 1) * vocab]);
            }
        }
        let mut seqs: Vec<Seq> = Vec::with_capacity(batch);
        let mut taken: Vec<Option<Seq>> = std::mem::take(&mut self.seqs).into_iter().map(Some).collect();
        if old.is_some() {
            seqs.extend(keep.iter().map(|&i| taken[i].take().expect("kept once")));
        }
        if let Some(j) = joining {
            for &p in &j.prompt_of {
                logits.extend_from_slice(&j.logits[p * vocab..(p + 1) * vocab]);
            }
            seqs.extend(j.seqs);
        }
        self.cache = (batch > 0).then_some(KvCache { k, v, len, capacity, batch, key_start });
        self.seqs = seqs;
        self.logits = logits;
        Ok(())
    }
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

    #[test]
    fn sample_token_draws_from_the_tempered_softmax_and_reports_raw_logprobs() {
        // logits ln(1..4): at T = 1 probabilities 0.1..0.4; at T = 0.5 they go as i², i.e.
        // 1/30, 4/30, 9/30, 16/30. 20k draws → ±1% (≈3σ of the largest binomial).
        let l: Vec<f32> = [1f32, 2., 3., 4.].iter().map(|v| v.ln()).collect();
        for (t, want) in [(1.0f32, [0.1, 0.2, 0.3, 0.4]), (0.5, [1. / 30., 4. / 30., 9. / 30., 16. / 30.])] {
            let p = SamplingParams { temperature: t, ..Default::default() };
            let mut r = rng();
            let mut c = [0usize; 4];
            for _ in 0..20000 {
                let (tok, lp) = sample_token(&l, &[], &p, &mut r);
                // The log-prob is under the raw logits whatever T: ln((tok + 1) / 10).
                assert!((lp as f64 - ((tok + 1) as f64 / 10.0).ln()).abs() < 1e-6, "T {t}: token {tok} lp {lp}");
                c[tok as usize] += 1;
            }
            for i in 0..4 {
                assert!((c[i] as f64 / 20000.0 - want[i]).abs() < 0.01, "T {t}: {c:?}");
            }
        }
        // Greedy: the first maximum, with its raw log-prob.
        let (tok, lp) = sample_token(&[0.0, 2.0, 2.0], &[], &SamplingParams::default(), &mut rng());
        assert_eq!(tok, 1);
        assert!((lp as f64 - (2f64.exp() / (1.0 + 2.0 * 2f64.exp())).ln()).abs() < 1e-6);
    }
}
