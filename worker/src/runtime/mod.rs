//! The distributed runtime: the `onevision trainer` pod entrypoint (rendezvous through rank 0's
//! coordinator, data parallel over a TCP ring, the SFT and GRPO loops, evaluation, checkpoints,
//! progress and status files) and the local runner behind `onevision run`, which starts the
//! operator planner's pods as local processes.

pub mod dist;
pub mod env;
pub mod eval;
pub mod grpo;
pub mod launcher;
pub mod local;
pub mod pod_progress;
pub mod report;
pub mod settings;
pub mod sft;
pub mod signals;
pub mod trainer;

use std::path::PathBuf;

pub use env::TrainerEnv;
pub use report::{CategoryAccuracy, EvalResult, Reporter, SampledAccuracy};
pub use settings::JobSettings;

/// Exit code of a trainer that stopped on SIGINT/SIGTERM after writing a resumable checkpoint
/// (128 + SIGINT, what shells report for Ctrl-C).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Everything the runtime can fail with. [`RuntimeError::is_permanent`] decides the exit code:
/// a permanent error (bad spec, missing data or model) exits with [`crate::EXIT_PERMANENT`] so
/// the operator fails the job instead of restarting the gang.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The job spec or environment is unusable; the message names the field to fix.
    #[error("{0}")]
    Config(String),
    #[error("job file: {0}")]
    JobFile(#[from] onevision_operator::job::JobFileError),
    #[error("data: {0}")]
    Data(#[from] onevision_data::DataError),
    #[error("model {path}: {source}")]
    ModelLoad { path: PathBuf, source: onevision_model::ModelError },
    #[error(transparent)]
    Training(#[from] crate::training::TrainingError),
    #[error("collective: {0}")]
    Comm(#[from] onevision_comms::CommError),
    #[error("rendezvous: {0}")]
    Rendezvous(#[from] onevision_comms::RendezvousError),
    #[error("coordinator: {0}")]
    Coordinator(String),
    #[error("rollout: {0}")]
    Rollout(#[from] crate::rollout::RolloutError),
    #[error("reward: {0}")]
    Reward(#[from] onevision_rewards::RewardError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The gang was told to stop (a rank died, the coordinator shut down); a restart may help.
    #[error("stopping: {0}")]
    Stopped(String),
    /// SIGINT/SIGTERM: a checkpoint was written, rerunning resumes.
    #[error("interrupted ({0}); the latest checkpoint is resumable")]
    Interrupted(String),
    /// A child rank of the per-GPU launcher failed; the launcher exits with its code.
    #[error("trainer rank {rank} exited with code {code}; the other local ranks were stopped")]
    RankExited { rank: String, code: i32 },
}

impl RuntimeError {
    /// True when retrying cannot help (bad config, missing data, unknown reward).
    pub fn is_permanent(&self) -> bool {
        use crate::training::TrainingError as T;
        match self {
            RuntimeError::Config(_)
            | RuntimeError::JobFile(_)
            | RuntimeError::Data(_)
            | RuntimeError::ModelLoad { .. } => true,
            RuntimeError::Reward(e) => matches!(
                e,
                onevision_rewards::RewardError::Unknown { .. }
                    | onevision_rewards::RewardError::BadWeight { .. }
                    | onevision_rewards::RewardError::Duplicate(_)
                    | onevision_rewards::RewardError::Empty
                    | onevision_rewards::RewardError::MissingAnswer { .. }
            ),
            RuntimeError::Training(t) => matches!(t, T::Data(_) | T::Preprocess(_) | T::Invalid(_)),
            RuntimeError::RankExited { code, .. } => *code == crate::EXIT_PERMANENT,
            _ => false,
        }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RuntimeError::Interrupted(_) => EXIT_INTERRUPTED,
            RuntimeError::RankExited { code, .. } => *code,
            e if e.is_permanent() => crate::EXIT_PERMANENT,
            _ => 1,
        }
    }
}

pub type Result<T> = std::result::Result<T, RuntimeError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let path = path.into();
    move |source| RuntimeError::Io { path, source }
}
