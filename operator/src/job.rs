//! What SFTJob and GRPOJob have in common, and the typed job file every pod reads.

use std::fmt::Debug;
use std::path::Path;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::*;

/// Borrowed view of the fields both job kinds share.
#[derive(Clone, Copy, Debug)]
pub struct Common<'a> {
    pub model: &'a ModelSource,
    pub dataset: &'a PathSpec,
    pub output: &'a PathSpec,
    pub storage: Option<&'a StorageSpec>,
    pub trainer: &'a TrainerSpec,
    pub hyperparameters: &'a Hyperparameters,
    pub eval: &'a EvalSpec,
    pub checkpoint: &'a CheckpointSpec,
    pub run_policy: &'a RunPolicy,
    pub scheduling: &'a SchedulingSpec,
}

/// A training job kind the planner and controller handle generically.
pub trait TrainingJob:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    /// The kind.
    const KIND: JobKind;
    /// Shared spec fields.
    fn common(&self) -> Common<'_>;
    /// Rollout workers (GRPOJob only).
    fn rollout(&self) -> Option<&RolloutSpec>;
    /// Current status.
    fn job_status(&self) -> Option<&JobStatus>;
    /// Mutable status (the local runner and tests set it).
    fn job_status_mut(&mut self) -> &mut Option<JobStatus>;
    /// Set `spec.model.path` (used to write the resolved model into the job file).
    fn set_model_path(&mut self, path: String);
}

macro_rules! common_view {
    ($s:expr) => {
        Common {
            model: &$s.model,
            dataset: &$s.dataset,
            output: &$s.output,
            storage: $s.storage.as_ref(),
            trainer: &$s.trainer,
            hyperparameters: &$s.hyperparameters,
            eval: &$s.eval,
            checkpoint: &$s.checkpoint,
            run_policy: &$s.run_policy,
            scheduling: &$s.scheduling,
        }
    };
}

impl TrainingJob for SFTJob {
    const KIND: JobKind = JobKind::SFTJob;
    fn common(&self) -> Common<'_> {
        common_view!(self.spec)
    }
    fn rollout(&self) -> Option<&RolloutSpec> {
        None
    }
    fn job_status(&self) -> Option<&JobStatus> {
        self.status.as_ref()
    }
    fn job_status_mut(&mut self) -> &mut Option<JobStatus> {
        &mut self.status
    }
    fn set_model_path(&mut self, path: String) {
        self.spec.model.path = Some(path);
    }
}

impl TrainingJob for GRPOJob {
    const KIND: JobKind = JobKind::GRPOJob;
    fn common(&self) -> Common<'_> {
        common_view!(self.spec)
    }
    fn rollout(&self) -> Option<&RolloutSpec> {
        Some(&self.spec.rollout)
    }
    fn job_status(&self) -> Option<&JobStatus> {
        self.status.as_ref()
    }
    fn job_status_mut(&mut self) -> &mut Option<JobStatus> {
        &mut self.status
    }
    fn set_model_path(&mut self, path: String) {
        self.spec.model.path = Some(path);
    }
}

/// Either job kind, e.g. as read from a manifest or from the mounted job file.
// One short-lived value per job: boxing would only make every match on it noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum AnyJob {
    Sft(SFTJob),
    Grpo(GRPOJob),
}

/// Errors reading a job manifest or job file.
#[derive(Debug, thiserror::Error)]
pub enum JobFileError {
    #[error("cannot read job file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("job manifest is not valid YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("job manifest has apiVersion {found:?}; expected {expected:?}")]
    ApiVersion {
        found: String,
        expected: &'static str,
    },
    #[error("job manifest has kind {0:?}; expected SFTJob or GRPOJob")]
    Kind(String),
    #[error("invalid {kind} manifest: {source}")]
    Spec {
        kind: &'static str,
        source: serde_yaml::Error,
    },
}

impl AnyJob {
    /// Parse one YAML document holding an SFTJob or GRPOJob (a user manifest or the job file).
    pub fn from_yaml(text: &str) -> Result<AnyJob, JobFileError> {
        let value: serde_yaml::Value = serde_yaml::from_str(text)?;
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        if api_version != API_VERSION {
            return Err(JobFileError::ApiVersion {
                found: api_version.to_string(),
                expected: API_VERSION,
            });
        }
        match value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
        {
            "SFTJob" => serde_yaml::from_str(text)
                .map(AnyJob::Sft)
                .map_err(|source| JobFileError::Spec {
                    kind: "SFTJob",
                    source,
                }),
            "GRPOJob" => serde_yaml::from_str(text)
                .map(AnyJob::Grpo)
                .map_err(|source| JobFileError::Spec {
                    kind: "GRPOJob",
                    source,
                }),
            other => Err(JobFileError::Kind(other.to_string())),
        }
    }

    /// Read the job file (`$ONEVISION_JOB_SPEC`, normally `/etc/onevision/job.yaml`).
    pub fn read(path: impl AsRef<Path>) -> Result<AnyJob, JobFileError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| JobFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        AnyJob::from_yaml(&text)
    }

    /// The kind.
    pub fn kind(&self) -> JobKind {
        match self {
            AnyJob::Sft(_) => JobKind::SFTJob,
            AnyJob::Grpo(_) => JobKind::GRPOJob,
        }
    }

    /// Object metadata.
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            AnyJob::Sft(j) => &j.metadata,
            AnyJob::Grpo(j) => &j.metadata,
        }
    }

    /// Shared spec fields.
    pub fn common(&self) -> Common<'_> {
        match self {
            AnyJob::Sft(j) => j.common(),
            AnyJob::Grpo(j) => j.common(),
        }
    }

    /// GRPO settings and rollout workers (GRPOJob only).
    pub fn grpo(&self) -> Option<(&GrpoSpec, &RolloutSpec)> {
        match self {
            AnyJob::Sft(_) => None,
            AnyJob::Grpo(j) => Some((&j.spec.grpo, &j.spec.rollout)),
        }
    }

    /// The model directory to load: `model.path`, which the operator fills in from the source
    /// SFTJob's output when the manifest says `model.fromSFTJob`. None while unresolved.
    pub fn model_path(&self) -> Option<&str> {
        self.common().model.path.as_deref()
    }

    /// Serialize back to YAML.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        match self {
            AnyJob::Sft(j) => serde_yaml::to_string(j),
            AnyJob::Grpo(j) => serde_yaml::to_string(j),
        }
    }
}

/// The content of the job file for `job` with the model resolved to `model_path`: the typed
/// manifest (apiVersion, kind, name, namespace, uid, spec) without status or managed fields.
pub fn job_file<J: TrainingJob>(job: &J, model_path: &str) -> Result<String, serde_yaml::Error> {
    let mut clean = job.clone();
    let meta = clean.meta_mut();
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        generation: meta.generation.take(),
        ..ObjectMeta::default()
    };
    *clean.job_status_mut() = None;
    clean.set_model_path(model_path.to_string());
    serde_yaml::to_string(&clean)
}
