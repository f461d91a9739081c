//! What the trainer needs from a typed job spec, validated once: paths, batch geometry, schedule,
//! evaluation and GRPO settings. Every refusal is a [`RuntimeError::Config`] naming the field.

use std::path::PathBuf;

use onevision_operator::api::{GrpoSpec, JobKind, LossAggregation, LrSchedule};
use onevision_operator::job::AnyJob;
use onevision_train::{Aggregation, GrpoConfig, KlEstimator, ScheduleKind};

use super::{Result, RuntimeError};
use crate::training::Freeze;

/// Validated settings of one job.
#[derive(Debug, Clone)]
pub struct JobSettings {
    pub kind: JobKind,
    pub name: String,
    pub namespace: String,
    pub model: PathBuf,
    pub dataset: PathBuf,
    pub eval_dataset: Option<PathBuf>,
    pub eval_fraction: f64,
    pub eval_every: u64,
    /// `eval.sampling`: also score sampled answers (mean accuracy over the samples).
    pub eval_sampling: Option<EvalSampling>,
    /// Final model (HF layout), `metrics.jsonl`, `status.json`; checkpoints in `checkpoints/`.
    pub output: PathBuf,
    pub learning_rate: f64,
    pub epochs: u64,
    /// Sequences per optimizer step over all ranks (GRPO: completions).
    pub global_batch: usize,
    pub micro_batch: usize,
    pub max_steps: Option<u64>,
    pub schedule: ScheduleKind,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
    pub max_seq_len: usize,
    pub freeze: Freeze,
    pub seed: u64,
    pub checkpoint_every: u64,
    pub checkpoint_keep: usize,
    /// `trainer.zeroStage`: 0 = every rank holds the full optimizer state, 1 = ZeRO-1 (sharded).
    pub zero_stage: u8,
    pub grpo: Option<GrpoSettings>,
}

/// Sampled evaluation: `samples` completions per question at `temperature` and `top_p`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalSampling {
    pub samples: usize,
    pub temperature: f64,
    pub top_p: f64,
}

/// GRPO-only settings.
#[derive(Debug, Clone)]
pub struct GrpoSettings {
    pub group_size: usize,
    pub loss: GrpoConfig,
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    pub rewards: Vec<onevision_rewards::RewardSpec>,
    pub iterations: usize,
    pub max_staleness: u64,
    /// Rollout workers the job asked for; 0 = the trainer ranks generate themselves.
    pub rollout_replicas: usize,
    /// `grpo.dynamicSampling.maxRounds` when dynamic sampling is on (`loss.dynamic_sampling`).
    pub max_sampling_rounds: Option<usize>,
}

fn bad(msg: String) -> RuntimeError {
    RuntimeError::Config(msg)
}

impl JobSettings {
    pub fn from_job(job: &AnyJob) -> Result<Self> {
        let c = job.common();
        let meta = job.meta();
        let name = meta.name.clone().ok_or_else(|| bad("the job has no metadata.name".into()))?;
        let model = job.model_path().ok_or_else(|| {
            bad("spec.model.path is not set: a job file must carry the resolved model (the operator or `onevision run` fills it in from model.fromSFTJob)".into())
        })?;
        let h = c.hyperparameters;
        if !(h.learning_rate > 0.0 && h.learning_rate.is_finite()) {
            return Err(bad(format!("hyperparameters.learningRate must be > 0, got {}", h.learning_rate)));
        }
        if h.global_batch_size < 1 || h.micro_batch_size < 1 || h.epochs < 1 {
            return Err(bad("hyperparameters.globalBatchSize, microBatchSize and epochs must be ≥ 1".into()));
        }
        // The API server enforces this too; a job file written by hand is checked here.
        let zero_stage = match c.trainer.zero_stage {
            0 => 0,
            1 => 1,
            z => return Err(bad(format!("trainer.zeroStage must be 0 (off) or 1 (ZeRO-1 optimizer-state sharding), got {z}"))),
        };
        let eval_sampling = match &c.eval.sampling {
            None => None,
            Some(e) => {
                // The API server enforces these too; a job file written by hand is checked here.
                if !(1..=64).contains(&e.samples) {
                    return Err(bad(format!("eval.sampling.samples must be in [1, 64], got {}", e.samples)));
                }
                if !(e.temperature > 0.0 && e.temperature <= 10.0) {
                    return Err(bad(format!("eval.sampling.temperature must be in (0, 10], got {}", e.temperature)));
                }
                if !(e.top_p > 0.0 && e.top_p <= 1.0) {
                    return Err(bad(format!("eval.sampling.topP must be in (0, 1], got {}", e.top_p)));
                }
                Some(EvalSampling { samples: e.samples as usize, temperature: e.temperature, top_p: e.top_p })
            }
        };
        let grpo = match job.grpo() {
            None => None,
            Some((g, rollout)) => Some(grpo_settings(g, rollout.replicas, h.global_batch_size)?),
        };
        Ok(JobSettings {
            kind: job.kind(),
            name,
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            model: PathBuf::from(model),
            dataset: PathBuf::from(&c.dataset.path),
            eval_dataset: c.eval.dataset.as_ref().map(|d| PathBuf::from(&d.path)),
            eval_fraction: c.eval.fraction,
            eval_every: c.eval.every_steps.max(1) as u64,
            eval_sampling,
            output: PathBuf::from(&c.output.path),
            learning_rate: h.learning_rate,
            epochs: h.epochs as u64,
            global_batch: h.global_batch_size as usize,
            micro_batch: h.micro_batch_size as usize,
            max_steps: h.max_steps.map(|s| s.max(1) as u64),
            schedule: match h.lr_schedule {
                LrSchedule::Constant => ScheduleKind::Constant,
                LrSchedule::Linear => ScheduleKind::Linear,
                LrSchedule::Cosine => ScheduleKind::Cosine,
            },
            warmup_steps: h.warmup_steps.max(0) as u64,
            weight_decay: h.weight_decay,
            max_grad_norm: (h.max_grad_norm > 0.0).then_some(h.max_grad_norm),
            max_seq_len: h.max_seq_len.max(16) as usize,
            freeze: Freeze { vision_tower: h.freeze_vision, merger: false },
            seed: h.seed.max(0) as u64,
            checkpoint_every: c.checkpoint.every_steps.max(1) as u64,
            checkpoint_keep: c.checkpoint.keep.max(1) as usize,
            zero_stage,
            grpo,
        })
    }

    /// Sequences (SFT) or completions (GRPO) one rank processes per optimizer step.
    pub fn per_rank_batch(&self, world_size: usize) -> Result<usize> {
        let units = match &self.grpo {
            None => self.global_batch,
            Some(g) => self.global_batch / g.group_size,
        };
        if units % world_size != 0 {
            let what = if self.grpo.is_some() { "globalBatchSize / grpo.groupSize (prompts per step)" } else { "hyperparameters.globalBatchSize" };
            return Err(bad(format!("{what} = {units} must be a multiple of the number of trainer processes ({world_size})")));
        }
        Ok(units / world_size)
    }

    /// Checkpoints live next to the final model.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.output.join("checkpoints")
    }
}

fn grpo_settings(g: &GrpoSpec, replicas: i32, global_batch: i32) -> Result<GrpoSettings> {
    if g.group_size < 2 {
        return Err(bad(format!("grpo.groupSize must be ≥ 2, got {}", g.group_size)));
    }
    if global_batch % g.group_size != 0 {
        return Err(bad(format!(
            "hyperparameters.globalBatchSize ({global_batch}, completions per step) must be a multiple of grpo.groupSize ({})",
            g.group_size
        )));
    }
    let eps_high = g.epsilon_high.unwrap_or(g.clip_epsilon);
    let max_new_tokens = g.max_new_tokens.max(1) as usize;
    let loss = GrpoConfig {
        eps_low: g.clip_epsilon,
        eps_high,
        beta: g.kl_beta,
        kl: match g.kl_estimator {
            onevision_operator::api::KlEstimator::K1 => KlEstimator::K1,
            onevision_operator::api::KlEstimator::K2 => KlEstimator::K2,
            onevision_operator::api::KlEstimator::K3 => KlEstimator::K3,
        },
        aggregation: match g.loss_aggregation {
            LossAggregation::TokenMean => Aggregation::TokenMean,
            LossAggregation::SeqMeanTokenMean => Aggregation::SeqMeanTokenMean,
            LossAggregation::SeqMeanTokenSum => Aggregation::DrGrpo { max_len: max_new_tokens },
        },
        scale_rewards: g.scale_rewards,
        dynamic_sampling: g.dynamic_sampling.is_some(),
    };
    let max_sampling_rounds = match &g.dynamic_sampling {
        Some(d) if d.max_rounds < 1 => {
            return Err(bad(format!("grpo.dynamicSampling.maxRounds must be ≥ 1, got {}", d.max_rounds)))
        }
        Some(d) => Some(d.max_rounds as usize),
        None => None,
    };
    Ok(GrpoSettings {
        group_size: g.group_size as usize,
        loss,
        temperature: g.temperature,
        top_p: g.top_p,
        max_new_tokens,
        rewards: g
            .rewards
            .iter()
            .map(|r| onevision_rewards::RewardSpec { name: r.name.clone(), weight: r.weight })
            .collect(),
        iterations: g.iterations_per_batch.max(1) as usize,
        max_staleness: g.max_staleness.max(0) as u64,
        rollout_replicas: replicas.max(0) as usize,
        max_sampling_rounds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sft(eval: &str) -> Result<JobSettings> {
        let yaml = format!(
            "apiVersion: onevision.dev/v1alpha1\nkind: SFTJob\nmetadata: {{name: j}}\nspec:\n  model: {{path: /m}}\n  dataset: {{path: /d.jsonl}}\n  output: {{path: /o}}\n  trainer: {{nodes: 1, image: x}}\n  hyperparameters: {{learningRate: 1.0e-3, globalBatchSize: 4, microBatchSize: 2}}\n  eval: {eval}\n"
        );
        JobSettings::from_job(&AnyJob::from_yaml(&yaml).unwrap())
    }

    #[test]
    fn eval_sampling_defaults_to_r1_settings_and_rejects_bad_values() {
        assert_eq!(sft("{everySteps: 5}").unwrap().eval_sampling, None);
        let s = sft("{sampling: {}}").unwrap().eval_sampling.unwrap();
        assert_eq!(s, EvalSampling { samples: 8, temperature: 0.6, top_p: 0.95 });
        let s = sft("{sampling: {samples: 2, temperature: 1.0, topP: 1.0}}").unwrap().eval_sampling.unwrap();
        assert_eq!(s, EvalSampling { samples: 2, temperature: 1.0, top_p: 1.0 });
        for (bad, field) in [
            ("{sampling: {samples: 0}}", "eval.sampling.samples"),
            ("{sampling: {samples: 65}}", "eval.sampling.samples"),
            ("{sampling: {temperature: 0.0}}", "eval.sampling.temperature"),
            ("{sampling: {topP: 1.5}}", "eval.sampling.topP"),
        ] {
            let e = sft(bad).unwrap_err().to_string();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }
}
