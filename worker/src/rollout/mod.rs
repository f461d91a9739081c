//! Rollout workers and the trainer's rollout pool (docs/rollout.md).
//!
//! **Worker side** (`onevision rollout`): an [`Engine`] holds the policy model; prompt groups are
//! decoded together with continuous batching (`onevision_model::generate::BatchDecoder`): one
//! image encoding and one prefill per group, its G samples sharing the prompt's KV entries, up
//! to the worker's capacity in sequences per decode step. [`serve_rollout`] exposes it as the
//! `onevision.v1.Rollout` gRPC service (plus `grpc.health.v1`): `Generate` streams groups in and
//! completions out, `UpdateWeights` applies chunked, named, versioned tensors atomically at the
//! commit, `Info` reports version and capacity.
//!
//! **Trainer side**: a [`RolloutPool`] finds the workers through the coordinator's
//! `RolloutRegistry` (workers come and go at any time: `kubectl scale`), spreads prompt groups
//! over them, retries a lost worker's groups elsewhere, and pushes weights so that every
//! completion is at most `staleness` versions behind the newest published weights:
//!
//! ```text
//! let pool = RolloutPool::new(WorkerSource::Coordinator(client), PoolConfig::default());
//! pool.sync_weights(version, tensors_from_model(&model.named_weights())?).await?;  // -> SyncStats
//! let results: Vec<GroupResult> = pool.generate(groups, &sampling).await?;       // request order
//! let workers: Vec<WorkerStatus> = pool.workers().await?;
//! ```
//!
//! `runtime::grpo::WorkerPool` plugs the pool into the GRPO loop.

mod engine;
mod error;
mod pool;
mod server;

pub use engine::{expand_image_pads, Engine, EngineConfig, GroupOutput, PreparedGroup};
pub use error::{RolloutError, WorkerError};
pub use pool::{
    tensors_from_f32, tensors_from_model, Completion, GroupRequest, GroupResult, ImageInput, PoolConfig, RolloutPool,
    Sampling, SyncStats, WorkerSource, WorkerStatus, weights_version,
};
pub use server::{serve_rollout, RolloutServerHandle, RolloutService, ServerConfig};
