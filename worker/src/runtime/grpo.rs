//! The GRPO step: sample a group of G completions per prompt, score them with the job's rewards,
//! group-normalise the advantages, add reference log-probs when `klBeta > 0`, and update the
//! policy `iterationsPerBatch` times. Loss denominators are global (all-reduced counts), so the
//! update equals one process doing the whole batch.
//!
//! Completions come from a [`RolloutSource`]: [`InProcess`] generates with the policy itself
//! (`rollout.replicas: 0`, on-policy by construction); a pool of rollout workers plugs in through
//! the same trait, receiving versioned weights after each update.

use std::time::Instant;

use onevision_data::{Dataset, Sample};
use onevision_model::{generate_group, Generation, PromptInput, Qwen25Vl, SamplingParams};
use onevision_rewards::{AccuracyReward, Reward, RewardRegistry, RewardRequest, RewardScores, WeightedReward};
use onevision_proto::v1;
use onevision_train::{group_advantages, Aggregation, TensorMap};

use super::dist::{add_into, all_reduce_grads, all_reduce_scalars, GradLayout};
use super::sft::step_mfu;
use super::eval::{ground_truth, prompt_text};
use super::settings::{GrpoSettings, JobSettings};
use super::trainer::{LoopCtx, StepReport, TrainStep};
use super::{Result, RuntimeError};
use crate::rollout::{tensors_from_model, weights_version, GroupRequest, PoolConfig, RolloutPool, Sampling, WorkerSource};
use crate::telemetry::{phase_span, weight_sync_span, GrpoMetrics, Phase, RewardStats, StepMetrics};
use crate::training::{grpo_step, logprobs_of, GrpoSample, StepOptions, Trainer, TrainingError};

/// Where a step's completions come from.
pub trait RolloutSource {
    /// `group` completions for every prompt, in prompt order. `params.seed` seeds prompt 0;
    /// prompt `i` uses `params.seed + i`.
    fn generate(
        &mut self,
        cx: &LoopCtx<'_>,
        policy: &Qwen25Vl,
        prompts: &[PromptInput],
        group: usize,
        params: &SamplingParams,
    ) -> Result<Vec<Vec<Generation>>>;

    /// Make the weights of optimizer step `step` available to the generators.
    /// Returns the seconds spent.
    fn publish(&mut self, _cx: &LoopCtx<'_>, _trainer: &Trainer, _step: u64) -> Result<f64> {
        Ok(0.0)
    }
}

/// The trainer rank samples its own prompts with the current policy (vision encoding and
/// prefill once per group, KV cache replicated: [`generate_group`]).
pub struct InProcess;

impl RolloutSource for InProcess {
    fn generate(
        &mut self,
        _cx: &LoopCtx<'_>,
        policy: &Qwen25Vl,
        prompts: &[PromptInput],
        group: usize,
        params: &SamplingParams,
    ) -> Result<Vec<Vec<Generation>>> {
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut pp = params.clone();
                pp.seed = params.seed.wrapping_add(i as u64);
                generate_group(policy, p, group, &pp).map_err(|e| RuntimeError::Training(e.into()))
            })
            .collect()
    }
}

/// Rollout workers (`onevision rollout` processes/pods) found through the coordinator's
/// registry: prompt groups are load-balanced over whichever workers are registered, a lost
/// worker's groups are retried elsewhere, and every optimizer step's weights are pushed
/// (versioned by gang generation and step, [`weights_version`], so versions keep increasing
/// across gang restarts; `grpo.maxStaleness` bounds how old a completion's weights may be).
pub struct WorkerPool {
    pool: RolloutPool,
    /// Gang generation (`ONEVISION_RESTART_COUNT`).
    generation: u64,
    /// Weights version the workers were last given (0 = the checkpoint they loaded).
    synced: Option<u64>,
}

impl WorkerPool {
    pub fn new(client: onevision_comms::coordinator::CoordinatorClient, max_staleness: u64, generation: u64) -> Self {
        let cfg = PoolConfig { staleness: max_staleness, ..PoolConfig::default() };
        WorkerPool { pool: RolloutPool::new(WorkerSource::Coordinator(client), cfg), generation, synced: None }
    }
}

impl RolloutSource for WorkerPool {
    fn generate(
        &mut self,
        cx: &LoopCtx<'_>,
        policy: &Qwen25Vl,
        prompts: &[PromptInput],
        group: usize,
        params: &SamplingParams,
    ) -> Result<Vec<Vec<Generation>>> {
        let reqs = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| GroupRequest::from_prompt(p, group as u32, params.seed.wrapping_add(i as u64)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let sampling = Sampling {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k as u32,
            max_new_tokens: params.max_new_tokens as u32,
            stop_token_ids: policy.config.eos_token_ids.clone(),
        };
        let results = cx.rt.block_on(self.pool.generate(reqs, &sampling))?;
        Ok(results
            .into_iter()
            .map(|g| {
                g.completions
                    .into_iter()
                    .map(|c| Generation {
                        finished: c.finish_reason == v1::FinishReason::Stop,
                        token_ids: c.token_ids,
                        logprobs: c.logprobs,
                        first_logits: None,
                    })
                    .collect()
            })
            .collect())
    }

    fn publish(&mut self, cx: &LoopCtx<'_>, trainer: &Trainer, step: u64) -> Result<f64> {
        let version = weights_version(self.generation, step);
        if self.synced == Some(version) || (self.synced.is_none() && version == 0) {
            self.synced = Some(version);
            return Ok(0.0);
        }
        let t = Instant::now();
        let _in_sync = weight_sync_span(version).entered();
        let tensors = tensors_from_model(&trainer.model.named_weights())?;
        if cx.comm.rank() == 0 {
            // Rank 0 pushes; the other ranks only record the version, so their groups wait for it.
            let st = cx.rt.block_on(self.pool.sync_weights(version, tensors))?;
            if !st.workers_failed.is_empty() {
                tracing::warn!(version, failed = ?st.workers_failed, "some rollout workers missed the weight update; they get it before their next work");
            }
            if let Some(c) = cx.coordinator {
                c.set_trainer_model_version(version);
            }
        } else {
            self.pool.publish(version, tensors)?;
        }
        self.synced = Some(version);
        Ok(t.elapsed().as_secs_f64())
    }
}

/// SplitMix64: decorrelated per-(seed, step, rank) sampling seeds.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The GRPO objective for the shared training loop.
pub struct GrpoStep<'a> {
    g: GrpoSettings,
    seed: u64,
    micro: usize,
    freeze: crate::training::Freeze,
    data: &'a Dataset,
    train_index: &'a [usize],
    reference: Option<Qwen25Vl>,
    layout: GradLayout,
    reward: WeightedReward,
    reward_names: Vec<String>,
    accuracy: AccuracyReward,
    source: Box<dyn RolloutSource + 'a>,
}

impl<'a> GrpoStep<'a> {
    pub fn new(
        s: &JobSettings,
        data: &'a Dataset,
        train_index: &'a [usize],
        reference: Option<Qwen25Vl>,
        layout: GradLayout,
    ) -> Result<Self> {
        let g = s.grpo.clone().ok_or_else(|| RuntimeError::Config("not a GRPOJob".into()))?;
        let reward = WeightedReward::from_specs(&g.rewards, &RewardRegistry::builtin())?;
        if g.loss.beta > 0.0 && reference.is_none() {
            return Err(RuntimeError::Config("grpo.klBeta > 0 needs the reference model".into()));
        }
        Ok(GrpoStep {
            reward_names: g.rewards.iter().map(|r| r.name.clone()).collect(),
            g,
            seed: s.seed,
            micro: s.micro_batch,
            freeze: s.freeze,
            data,
            train_index,
            reference,
            layout,
            reward,
            accuracy: AccuracyReward::default(),
            source: Box::new(InProcess),
        })
    }

    /// Replace the completion source (e.g. a pool of rollout workers).
    pub fn with_source(mut self, source: Box<dyn RolloutSource + 'a>) -> Self {
        self.source = source;
        self
    }
}

/// Cuts a completion before the first vision placeholder id (image/video pad, vision start/end):
/// a sampled placeholder would make the training forward expect an image that is not there.
/// The shortened sequence is still a sample of the policy's prefix distribution.
pub fn strip_vision_tokens(policy: &Qwen25Vl, g: &mut Generation) {
    let c = &policy.config;
    let banned = [Some(c.image_token_id), c.video_token_id, Some(c.vision_start_token_id), c.vision_end_token_id];
    if let Some(cut) = g.token_ids.iter().position(|t| banned.contains(&Some(*t))) {
        g.token_ids.truncate(cut);
        g.logprobs.truncate(cut);
        g.finished = false;
    }
}

/// The completion's text for rewards: its tokens without the end-of-turn id, special tokens
/// dropped.
fn completion_text(cx: &LoopCtx<'_>, g: &Generation) -> Result<String> {
    let ids: &[u32] = if g.finished && !g.token_ids.is_empty() { &g.token_ids[..g.token_ids.len() - 1] } else { &g.token_ids };
    cx.enc.processor().decode(ids, true).map_err(|e| RuntimeError::Training(TrainingError::Preprocess(e)))
}

/// One sampling round of a step: prompts, their groups of completions, and the scores.
struct Round {
    prompts: Vec<PromptInput>,
    groups: Vec<Vec<Generation>>,
    scores: RewardScores,
    /// Accuracy reward per completion, when every sample has a ground truth.
    acc: Option<Vec<f64>>,
    /// Group-relative advantage per completion.
    advantages: Vec<f64>,
    /// Per group: do its completions' rewards differ (a group of one never does)?
    spread: Vec<bool>,
}

/// Which groups of which round a step trains on, given whether each has a reward spread. Without
/// dynamic sampling: all of them. With it (DAPO): the first `target` groups with a spread, in
/// sampling order; groups without one carry no gradient (zero advantage) and are dropped.
pub fn pick_groups(spread: &[Vec<bool>], target: usize, dynamic: bool) -> Vec<Vec<bool>> {
    let mut left = target;
    spread
        .iter()
        .map(|round| {
            round
                .iter()
                .map(|&s| {
                    let keep = !dynamic || (s && left > 0);
                    left -= usize::from(dynamic && keep);
                    keep
                })
                .collect()
        })
        .collect()
}

impl GrpoStep<'_> {
    /// Samples `G` completions for each of `batch` (positions in the train split) and scores them.
    fn sample_round(
        &mut self,
        cx: &LoopCtx<'_>,
        trainer: &Trainer,
        batch: &[usize],
        params: &SamplingParams,
    ) -> Result<Round> {
        let samples: Vec<Sample> = batch
            .iter()
            .map(|&i| self.data.get(self.train_index[i]))
            .collect::<std::result::Result<_, _>>()?;
        let prompts = samples.iter().map(|s| cx.enc.encode_prompt(s)).collect::<std::result::Result<Vec<_>, _>>()?;
        let mut groups = phase_span(Phase::RolloutWait)
            .in_scope(|| self.source.generate(cx, &trainer.model, &prompts, self.g.group_size, params))?;
        for gen in groups.iter_mut().flatten() {
            strip_vision_tokens(&trainer.model, gen);
        }
        let mut reqs = Vec::new();
        let mut group_of = Vec::new();
        for (si, (s, gens)) in samples.iter().zip(&groups).enumerate() {
            let answer = ground_truth(s);
            for gen in gens {
                reqs.push(RewardRequest {
                    prompt: prompt_text(s),
                    completion: completion_text(cx, gen)?,
                    answer: answer.clone(),
                    meta: s.meta.clone(),
                });
                group_of.push(si);
            }
        }
        let scores = self.reward.score(&reqs)?;
        let acc = if reqs.iter().all(|r| r.answer.is_some()) { Some(self.accuracy.score_batch(&reqs)?) } else { None };
        // With dynamic sampling on, `keep` marks the groups with a spread; their advantages are
        // the same either way (a group without a spread has zero advantage).
        let adv = group_advantages(&scores.total, &group_of, self.g.loss.scale_rewards, true)
            .map_err(|e| RuntimeError::Training(e.into()))?;
        let mut spread = vec![false; groups.len()];
        for (&gi, &keep) in group_of.iter().zip(&adv.keep) {
            spread[gi] = keep;
        }
        Ok(Round { prompts, groups, scores, acc, advantages: adv.advantages, spread })
    }

    /// Fresh prompts for refill round `round` (≥ 1) of a step: `n` positions drawn from the whole
    /// train split, keyed by (seed, step, rank) and the round, so a resumed run draws the same ones.
    fn refill_batch(&self, step_key: u64, round: usize, n: usize) -> Vec<usize> {
        let len = self.train_index.len().max(1) as u64;
        let base = mix(step_key ^ mix(round as u64));
        (0..n as u64).map(|j| (mix(base.wrapping_add(j)) % len) as usize).collect()
    }
}

impl TrainStep for GrpoStep<'_> {
    fn step(&mut self, cx: &mut LoopCtx<'_>, trainer: &mut Trainer, batch: &[usize]) -> Result<StepReport> {
        let t0 = Instant::now();
        let mut t_sync_start = 0.0;
        let step_key = self.seed ^ mix(cx.step.wrapping_mul(1 << 20) + cx.comm.rank() as u64);
        let base_seed = mix(step_key);
        let (max_new_tokens, temperature, top_p) = (self.g.max_new_tokens, self.g.temperature as f32, self.g.top_p as f32);
        let params = |seed: u64| SamplingParams { max_new_tokens, temperature, top_p, seed, ..Default::default() };
        // A resumed run's workers still hold the starting checkpoint: bring them up to date.
        t_sync_start += self.source.publish(cx, trainer, trainer.step())?;

        // Sample, score, and (dynamic sampling) refill until this rank has `batch.len()` groups
        // with a reward spread or the rounds run out. Rounds are per rank: no collective inside.
        let target = batch.len();
        let max_rounds = self.g.max_sampling_rounds.unwrap_or(1).max(1);
        let mut rounds = vec![self.sample_round(cx, trainer, batch, &params(base_seed))?];
        let informative = |r: &Round| r.spread.iter().filter(|&&x| x).count();
        if self.g.loss.dynamic_sampling {
            let mut have = informative(&rounds[0]);
            while have < target && rounds.len() < max_rounds {
                let round = rounds.len();
                let more = self.refill_batch(step_key, round, target);
                let r = self.sample_round(cx, trainer, &more, &params(mix(base_seed ^ mix(round as u64))))?;
                have += informative(&r);
                rounds.push(r);
            }
            if have < target {
                tracing::warn!(
                    step = cx.step,
                    groups = have,
                    wanted = target,
                    rounds = rounds.len(),
                    "dynamic sampling: too few prompt groups with a reward spread after grpo.dynamicSampling.maxRounds; training on those"
                );
            }
        }
        let t_rollout = t0.elapsed().as_secs_f64() - t_sync_start;

        // Group-relative advantages (a group never spans ranks). Dynamic sampling keeps the
        // groups with a spread, in sampling order, up to `target`; the rest train on every group.
        let g = &self.g;
        let spread: Vec<Vec<bool>> = rounds.iter().map(|r| r.spread.clone()).collect();
        let picked = pick_groups(&spread, target, g.loss.dynamic_sampling);
        let mut all = Vec::new();
        for (r, keep_round) in rounds.iter().zip(&picked) {
            let mut k = 0;
            for (si, gens) in r.groups.iter().enumerate() {
                let keep = keep_round[si];
                for gen in gens {
                    if keep {
                        let mut input = r.prompts[si].clone();
                        let prompt_len = input.input_ids.len();
                        input.input_ids.extend_from_slice(&gen.token_ids);
                        all.push(GrpoSample { input, prompt_len, old_logp: None, ref_logp: None, advantage: r.advantages[k] });
                    }
                    k += 1;
                }
            }
        }

        // Global statistics of everything sampled this step (all rounds; once per step).
        let sampled = || rounds.iter().flat_map(|r| r.groups.iter().flatten());
        let n_groups: usize = rounds.iter().map(|r| r.groups.len()).sum();
        let zero_groups = n_groups - spread.iter().flatten().filter(|&&x| x).count();
        let totals = || rounds.iter().flat_map(|r| r.scores.total.iter().copied());
        let has_acc = rounds.iter().all(|r| r.acc.is_some());
        let mut st = vec![
            sampled().count() as f64,
            sampled().map(|x| x.token_ids.len() as f64).sum(),
            zero_groups as f64,
            n_groups as f64,
            rounds.iter().filter_map(|r| r.acc.as_ref()).flatten().sum(),
            totals().sum(),
            totals().map(|x| x * x).sum(),
            rounds.len() as f64,
        ];
        for (ci, _) in rounds[0].scores.components.iter().enumerate() {
            let comp = || rounds.iter().flat_map(|r| r.scores.components[ci].1.iter().copied());
            st.push(comp().sum());
            st.push(comp().map(|x| x * x).sum());
        }
        let counts_at = st.len();
        // Loss denominators over every trained completion of every rank (zero-advantage ones
        // included; groups dropped by dynamic sampling are not trained on).
        st.push(all.iter().filter(|x| x.completion_len() > 0).count() as f64);
        st.push(all.iter().map(|x| x.completion_len() as f64).sum());
        all_reduce_scalars(cx.comm, &mut st)?;
        let (global_seqs, global_tokens) = (st[counts_at].max(1.0), st[counts_at + 1].max(1.0));
        let denominator = match g.loss.aggregation {
            Aggregation::SeqMeanTokenMean => global_seqs,
            Aggregation::TokenMean => global_tokens,
            Aggregation::DrGrpo { max_len } => global_seqs * max_len as f64,
        };
        // Without a KL term a zero-advantage completion contributes exactly nothing: skip it.
        let mut active: Vec<GrpoSample> = all
            .into_iter()
            .filter(|x| x.completion_len() > 0 && (g.loss.beta > 0.0 || x.advantage != 0.0))
            .collect();
        let temperature = g.temperature;
        let t_ref = Instant::now();
        let in_reference = (self.reference.is_some() || g.iterations > 1).then(|| phase_span(Phase::Reference).entered());
        if let Some(reference) = &self.reference {
            for chunk in active.chunks_mut(self.micro.max(1)) {
                let lp = logprobs_of(reference, chunk, temperature)?;
                for (x, l) in chunk.iter_mut().zip(lp) {
                    x.ref_logp = Some(l);
                }
            }
        }
        if g.iterations > 1 {
            for chunk in active.chunks_mut(self.micro.max(1)) {
                let lp = logprobs_of(&trainer.model, chunk, temperature)?;
                for (x, l) in chunk.iter_mut().zip(lp) {
                    x.old_logp = Some(l);
                }
            }
        }
        let t_reference = t_ref.elapsed().as_secs_f64();
        drop(in_reference);

        let opts = StepOptions { denominator: Some(denominator), freeze: self.freeze, temperature: Some(temperature) };
        let (mut t_fb, mut t_opt, mut t_sync) = (0.0, 0.0, t_sync_start);
        let mut last = None;
        let mut extra_sum = [0f32; 5];
        for _ in 0..g.iterations {
            let t = Instant::now();
            let in_fb = phase_span(Phase::ForwardBackward).entered();
            let mut grads = TensorMap::new();
            let mut extra = [0f32; 5]; // loss, clip·tok, kl·tok, entropy·tok, tok
            for chunk in active.chunks(self.micro.max(1)) {
                let out = grpo_step(&trainer.model, chunk, &g.loss, &opts)?;
                extra[0] += out.loss as f32;
                if let Some(gs) = &out.stats.grpo {
                    let tok = gs.n_tokens as f32;
                    extra[1] += gs.clip_frac as f32 * tok;
                    extra[2] += gs.kl_mean as f32 * tok;
                    extra[3] += gs.entropy_mean.unwrap_or(0.0) as f32 * tok;
                    extra[4] += tok;
                }
                add_into(&mut grads, out.grads);
            }
            let grads = all_reduce_grads(cx.comm, &self.layout, &grads, &mut extra)?;
            drop(in_fb);
            t_fb += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let applied = phase_span(Phase::Optimizer).in_scope(|| trainer.apply_reduced(cx.comm, grads))?;
            t_opt += t.elapsed().as_secs_f64();
            t_sync += self.source.publish(cx, trainer, applied.step)?;
            last = Some(applied);
            extra_sum = extra;
        }
        let applied = last.ok_or_else(|| RuntimeError::Config("grpo.iterationsPerBatch must be ≥ 1".into()))?;
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        // MFU of the policy update (verl/Megatron convention): its forward + backward passes over
        // `iterations`, timed by the forward_backward + optimizer phases. Rollout, reference and
        // old-log-prob forwards and weight sync are outside both the FLOPs and the time.
        let mfu = step_mfu(&trainer.model, self.freeze, active.iter().map(|x| &x.input), g.iterations, t_fb + t_opt)?;
        let n = st[0].max(1.0);
        let tok = (extra_sum[4] as f64).max(1.0);
        let stats = |sum: f64, sq: f64| -> (f64, f64) {
            let mean = sum / n;
            (mean, (sq / n - mean * mean).max(0.0).sqrt())
        };
        let (total_mean, total_std) = stats(st[5], st[6]);
        let mut rewards = vec![RewardStats { name: "total".into(), mean: total_mean, std: total_std }];
        for (i, name) in self.reward_names.iter().enumerate() {
            let (m, s) = stats(st[8 + 2 * i], st[9 + 2 * i]);
            rewards.push(RewardStats { name: name.clone(), mean: m, std: s });
        }
        let accuracy = has_acc.then(|| st[4] / n);
        let metrics = StepMetrics {
            step: applied.step,
            total_steps: cx.total_steps,
            loss: extra_sum[0] as f64,
            learning_rate: applied.lr,
            grad_norm: applied.grad_norm,
            tokens_per_second: st[1] / secs,
            samples_per_second: n / secs,
            mfu,
            phase_seconds: vec![
                (Phase::RolloutWait, t_rollout),
                (Phase::Reference, t_reference),
                (Phase::ForwardBackward, t_fb),
                (Phase::Optimizer, t_opt),
                (Phase::WeightSync, t_sync),
            ],
            grpo: Some(GrpoMetrics {
                rewards,
                accuracy: accuracy.unwrap_or(0.0),
                kl: extra_sum[2] as f64 / tok,
                clip_fraction: extra_sum[1] as f64 / tok,
                entropy: extra_sum[3] as f64 / tok,
                response_length: st[1] / n,
                zero_advantage_fraction: st[2] / st[3].max(1.0),
                sampling_rounds: st[7] / cx.comm.world_size().max(1) as f64,
            }),
        };
        Ok(StepReport { metrics, reward: Some(total_mean), accuracy })
    }
}

#[cfg(test)]
mod tests {
    use super::pick_groups;

    #[test]
    fn without_dynamic_sampling_every_group_trains() {
        let spread = vec![vec![false, true, false]];
        assert_eq!(pick_groups(&spread, 3, false), vec![vec![true, true, true]]);
    }

    #[test]
    fn dynamic_sampling_keeps_the_first_groups_with_a_spread_up_to_the_target() {
        // Round 0 has one informative group, the refill two more: the batch of 2 takes round 0's
        // and the first of round 1's, in sampling order.
        let spread = vec![vec![false, true, false], vec![true, false, true]];
        assert_eq!(pick_groups(&spread, 2, true), vec![vec![false, true, false], vec![true, false, false]]);
        // Too few after the last round: train on those there are.
        let spread = vec![vec![false, false], vec![false, true]];
        assert_eq!(pick_groups(&spread, 2, true), vec![vec![false, false], vec![false, true]]);
        // None at all: nothing trains.
        assert_eq!(pick_groups(&[vec![false, false]], 2, true), vec![vec![false, false]]);
    }
}
