//! Training glue: turns dataset rows into model inputs with labels, runs the SFT and GRPO
//! objectives through the model's forward/backward (`onevision-model`) and the loss math of
//! `onevision-train`, and keeps the optimizer state (fp32 master weights, AdamW, schedule) with
//! atomic checkpoints and an HF-layout export.
//!
//! The distributed runtime calls [`sft_step`] / [`grpo_step`] per micro-batch (gradients come back
//! under official tensor names, so they can be all-reduced by name), sums them with
//! [`onevision_train::GradAccumulator`] and hands the sum to [`Trainer::apply`].

pub mod encode;
pub mod step;
pub mod trainer;

pub use encode::{sample_messages, Encoder, GrpoRow};
pub use step::{
    grpo_step, logprobs_of, model_grads_to_map, sft_step, Freeze, GrpoSample, SftExample, StepOptions, StepOutput,
    StepStats,
};
pub use trainer::{export_hf, ApplyStats, ReducedGrads, Resumed, Trainer, TrainerConfig};

use std::path::PathBuf;

/// Everything that can go wrong in a training step, with the underlying cause.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    #[error("model: {0}")]
    Model(#[from] onevision_model::ModelError),
    #[error("preprocessing: {0}")]
    Preprocess(#[from] onevision_preprocess::PreprocessError),
    #[error("data: {0}")]
    Data(#[from] onevision_data::DataError),
    #[error("SFT loss: {0}")]
    Sft(#[from] onevision_train::SftError),
    #[error("GRPO loss: {0}")]
    Grpo(#[from] onevision_train::GrpoError),
    #[error("log-probs: {0}")]
    Logprob(#[from] onevision_train::LogprobError),
    #[error("optimizer: {0}")]
    Optim(#[from] onevision_train::OptimError),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] onevision_train::CheckpointError),
    /// A collective of the optimizer step (ZeRO-1) failed: another rank died or hung.
    #[error("collective: {0}")]
    Comm(#[from] onevision_comms::CommError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Bad input from the caller (row contents, shapes); the message says what to fix.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, TrainingError>;
