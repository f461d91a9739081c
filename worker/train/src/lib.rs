//! Training math: losses, AdamW, schedules, atomic training checkpoints.
//!
//! Model-independent: everything works on plain slices and named f32 tensors, so the model crate
//! wires it in by passing log-probs/logits and gradients.

pub mod checkpoint;
pub mod grpo;
pub mod logprob;
pub mod optim;
pub mod schedule;
pub mod sft;
pub mod tensor;

pub use checkpoint::{
    CheckpointError, CheckpointManager, DataPosition, LatestValid, Manifest, OptimizerShard,
    TrainingState,
};
pub use grpo::{
    group_advantages, grpo_loss, Advantages, Aggregation, GrpoBatch, GrpoConfig, GrpoError,
    GrpoOutput, GrpoStats, KlEstimator,
};
pub use logprob::{token_logprobs, token_logprobs_backward, LogprobError};
pub use optim::{
    adamw_update, clip_coefficient, clip_grad_norm, scale_grads, AdamW, AdamWConfig, AdamWHyper,
    FlatEntry, FlatLayout, GradAccumulator, GroupSpec, OptimError, ParamState, Piece, ShardPiece,
    ShardedAdamW,
};
pub use schedule::{Schedule, ScheduleError, ScheduleKind, Warmup};
pub use sft::{
    assistant_labels, assistant_mask, cross_entropy, shift_labels, CeOutput, ChatTokens, SftError,
    IGNORE_INDEX,
};
pub use tensor::{Tensor, TensorMap};

/// Floating-point element types the losses accept (f32 from the model, f64 for gradient checks).
/// Arithmetic is done in f64 either way.
pub trait Real: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
}

impl Real for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Real for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
}
