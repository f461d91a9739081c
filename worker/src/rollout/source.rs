//! [`PoolSource`]: the GRPO loop's completion source backed by the rollout workers.

use onevision_model::{Generation, PromptInput, Qwen25Vl, SamplingParams};

use super::pool::{tensors_from_model, GroupRequest, RolloutPool, Sampling};
use crate::runtime::grpo::RolloutSource;
use crate::runtime::trainer::LoopCtx;
use crate::runtime::RuntimeError;
use crate::training::Trainer;

/// Generates a step's groups on the rollout workers through a [`RolloutPool`]. Prompt `i` is
/// sampled with `params.seed + i` (as the in-process source), so results do not depend on which
/// worker ran a group. `publish` pushes the new weights from rank 0 and records them on the
/// other ranks (their pools then only check versions: a worker already at the version refuses
/// the duplicate push at its first message).
pub struct PoolSource {
    pool: RolloutPool,
}

impl PoolSource {
    pub fn new(pool: RolloutPool) -> Self {
        PoolSource { pool }
    }

    pub fn pool(&self) -> &RolloutPool {
        &self.pool
    }
}

fn rollout_err(e: super::RolloutError) -> RuntimeError {
    RuntimeError::Coordinator(format!("rollout: {e}"))
}

impl RolloutSource for PoolSource {
    fn generate(
        &mut self,
        cx: &LoopCtx<'_>,
        _policy: &Qwen25Vl,
        prompts: &[PromptInput],
        group: usize,
        params: &SamplingParams,
    ) -> Result<Vec<Vec<Generation>>, RuntimeError> {
        let groups = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| GroupRequest::from_prompt(p, group as u32, params.seed.wrapping_add(i as u64)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(rollout_err)?;
        let sampling = Sampling {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k as u32,
            max_new_tokens: params.max_new_tokens as u32,
            stop_token_ids: params.eos_token_ids.clone().unwrap_or_default(),
        };
        let results = cx.rt.block_on(self.pool.generate(groups, &sampling)).map_err(rollout_err)?;
        Ok(results
            .into_iter()
            .map(|r| {
                r.completions
                    .into_iter()
                    .map(|c| Generation {
                        finished: c.finish_reason == onevision_proto::v1::FinishReason::Stop,
                        token_ids: c.token_ids,
                        logprobs: c.logprobs,
                        first_logits: None,
                    })
                    .collect()
            })
            .collect())
    }

    fn publish(&mut self, cx: &LoopCtx<'_>, trainer: &Trainer, version: u64) -> Result<f64, RuntimeError> {
        let start = std::time::Instant::now();
        let be = trainer.model.backend();
        let host = trainer
            .model
            .named_weights()
            .into_iter()
            .map(|(n, t)| Ok((n, be.to_host(t)?)))
            .collect::<Result<Vec<_>, onevision_model::ModelError>>()
            .map_err(|e| RuntimeError::Coordinator(format!("rollout: weights to host: {e}")))?;
        let refs: Vec<(String, &onevision_model::Tensor)> = host.iter().map(|(n, t)| (n.clone(), t)).collect();
        let tensors = tensors_from_model(&refs).map_err(rollout_err)?;
        if cx.comm.rank() == 0 {
            let stats = cx.rt.block_on(self.pool.sync_weights(version, tensors)).map_err(rollout_err)?;
            if let Some(h) = cx.coordinator {
                h.set_trainer_model_version(version);
            }
            for (id, e) in &stats.workers_failed {
                tracing::warn!(worker = %id, error = %e, version, "weight push failed; the worker is updated before its next work");
            }
        } else {
            self.pool.publish(version, tensors).map_err(rollout_err)?;
        }
        Ok(start.elapsed().as_secs_f64())
    }
}
