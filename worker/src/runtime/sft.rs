//! The SFT step across ranks: every rank encodes its share of the global batch, the loss is the
//! token mean over the *global* batch (each rank divides by the all-reduced label-token count),
//! micro-batches are summed locally, and one all-reduce sums gradients and loss over ranks. The
//! result equals a single process computing the whole global batch at once.

use std::time::Instant;

use onevision_comms::Communicator;
use onevision_data::{Dataset, Sample};
use onevision_model::flops::{train_step_flops, VisionTrainable};
use onevision_model::{PromptInput, Qwen25Vl};
use onevision_train::TensorMap;

use super::dist::{add_into, all_reduce_grads, all_reduce_scalars, GradLayout};
use super::trainer::{LoopCtx, StepReport, TrainStep};
use super::{Result, RuntimeError};
use crate::telemetry::{mfu, phase_span, Phase, StepMetrics};
use crate::training::{sft_step, Encoder, Freeze, ReducedGrads, SftExample, StepOptions, Trainer};

/// Loss and summed gradients of one global batch.
#[derive(Debug, Clone)]
pub struct GlobalGrads {
    /// Token-mean cross-entropy over the global batch.
    pub loss: f64,
    /// Label tokens of the global batch.
    pub tokens: usize,
    /// Summed over ranks: full, or this rank's shard under ZeRO-1 (see `GradLayout`).
    pub grads: ReducedGrads,
}

/// This rank's `examples` are its share of the global batch; see the module docs.
pub fn sft_global_grads(
    model: &Qwen25Vl,
    comm: &dyn Communicator,
    layout: &GradLayout,
    examples: &[SftExample],
    micro_batch: usize,
    freeze: Freeze,
) -> Result<GlobalGrads> {
    let local_tokens: usize = examples.iter().map(SftExample::label_tokens).sum();
    let mut tokens = [local_tokens as f64];
    all_reduce_scalars(comm, &mut tokens)?;
    let global_tokens = tokens[0].round().max(1.0);
    let opts = StepOptions { denominator: Some(global_tokens), freeze, temperature: None };
    let mut grads = TensorMap::new();
    let mut loss = 0.0;
    for chunk in examples.chunks(micro_batch.max(1)) {
        let out = sft_step(model, chunk, &opts)?;
        loss += out.loss;
        add_into(&mut grads, out.grads);
    }
    let mut extra = [loss as f32];
    let grads = all_reduce_grads(comm, layout, &grads, &mut extra)?;
    Ok(GlobalGrads { loss: extra[0] as f64, tokens: global_tokens as usize, grads })
}

/// Encodes samples for SFT, truncating to `max_seq_len` tokens (labels cut along).
pub fn encode_sft(enc: &Encoder, samples: &[Sample], max_seq_len: usize) -> Result<Vec<SftExample>> {
    samples
        .iter()
        .map(|s| {
            let mut ex = enc.encode_sft(s)?;
            if ex.input.input_ids.len() > max_seq_len {
                // Image tokens come first in every prompt, so cutting the tail keeps the image.
                ex.input.input_ids.truncate(max_seq_len);
                ex.labels.truncate(max_seq_len);
            }
            Ok(ex)
        })
        .collect()
}

/// Model FLOPs utilisation of a step that ran forward + backward `passes` times over `inputs`
/// in `secs` on this rank (`onevision_model::flops`), or `None` when the device's peak is
/// unknown (CPU without `ONEVISION_PEAK_TFLOPS`).
pub(crate) fn step_mfu<'a>(
    model: &Qwen25Vl,
    freeze: Freeze,
    inputs: impl Iterator<Item = &'a PromptInput>,
    passes: usize,
    secs: f64,
) -> Result<Option<f64>> {
    let Some(peak) = mfu::device_peak_tflops(model.backend()).map_err(|e| RuntimeError::Config(e.to_string()))? else {
        return Ok(None);
    };
    let trainable = VisionTrainable { tower: !freeze.vision_tower, merger: !freeze.merger };
    let flops = passes as f64 * train_step_flops(&model.config, inputs, trainable);
    Ok(Some(mfu::mfu(flops, secs, peak)))
}

/// The SFT objective for the shared training loop.
pub struct SftStep<'a> {
    pub data: &'a Dataset,
    pub train_index: &'a [usize],
    pub layout: GradLayout,
}

impl TrainStep for SftStep<'_> {
    fn step(&mut self, cx: &mut LoopCtx<'_>, trainer: &mut Trainer, batch: &[usize]) -> Result<StepReport> {
        let t0 = Instant::now();
        let samples = batch
            .iter()
            .map(|&i| self.data.get(self.train_index[i]))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let examples = encode_sft(cx.enc, &samples, cx.settings.max_seq_len)?;
        let g = phase_span(Phase::ForwardBackward).in_scope(|| {
            sft_global_grads(&trainer.model, cx.comm, &self.layout, &examples, cx.settings.micro_batch, cx.settings.freeze)
        })?;
        let t1 = Instant::now();
        let applied = phase_span(Phase::Optimizer).in_scope(|| trainer.apply_reduced(cx.comm, g.grads))?;
        let t2 = Instant::now();
        let secs = (t2 - t0).as_secs_f64().max(1e-9);
        let (t_fb, t_opt) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
        // MFU of this rank over the whole step (the sum of its logged phases).
        let mfu = step_mfu(&trainer.model, cx.settings.freeze, examples.iter().map(|e| &e.input), 1, t_fb + t_opt)?;
        let metrics = StepMetrics {
            step: applied.step,
            total_steps: cx.total_steps,
            loss: g.loss,
            learning_rate: applied.lr,
            grad_norm: applied.grad_norm,
            tokens_per_second: g.tokens as f64 / secs,
            samples_per_second: cx.settings.global_batch as f64 / secs,
            mfu,
            phase_seconds: vec![(Phase::ForwardBackward, t_fb), (Phase::Optimizer, t_opt)],
            grpo: None,
        };
        Ok(StepReport { metrics, reward: None, accuracy: None })
    }
}
