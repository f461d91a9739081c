//! API types of group `onevision.dev`, version `v1alpha1`: `SFTJob`, `GRPOJob`, `RolloutPool`.
//!
//! Validation lives in the generated schema (OpenAPI bounds, enums and CEL
//! `x-kubernetes-validations`) so the API server refuses a bad spec with a message naming the
//! field; the operator never has to re-validate what the server already checked.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every onevision resource.
pub const GROUP: &str = "onevision.dev";
/// API version served and stored.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` string of every onevision resource.
pub const API_VERSION: &str = "onevision.dev/v1alpha1";

// ---------------------------------------------------------------------------------------------
// Shared building blocks
// ---------------------------------------------------------------------------------------------

/// Where the initial model weights come from: exactly one of `fromSFTJob` and `path`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("has(self.fromSFTJob) != has(self.path)").message("exactly one of model.fromSFTJob and model.path must be set"))]
pub struct ModelSource {
    /// Name of an SFTJob in the same namespace; the job waits (`WaitingForSFTJob`) until it
    /// succeeded and then starts from its output checkpoint.
    #[serde(
        rename = "fromSFTJob",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(min = 1))]
    pub from_sft_job: Option<String>,
    /// Directory holding a Hugging Face Qwen2.5-VL checkpoint (safetensors + config + tokenizer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub path: Option<String>,
}

/// A filesystem location inside the pods (normally on the mounted storage).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PathSpec {
    /// Absolute path, e.g. `/data/datasets/clevr/train.jsonl`.
    #[schemars(length(min = 1), regex(pattern = r"^/"))]
    pub path: String,
}

/// Shared storage mounted in every pod of the job.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// A PersistentVolumeClaim (ReadWriteMany for multi-node jobs) holding models, data and outputs.
    pub persistent_volume_claim: PvcRef,
    /// Where the claim is mounted in every container.
    #[serde(default = "default_mount_path")]
    #[schemars(regex(pattern = r"^/"))]
    pub mount_path: String,
}

/// Reference to a PersistentVolumeClaim in the job's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcRef {
    /// Name of the claim.
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// Mount the claim read-only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

fn default_mount_path() -> String {
    "/data".into()
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The trainer gang: `nodes` pods with `gpusPerNode` GPUs each, started and restarted together.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerSpec {
    /// Number of trainer pods (one per node). Immutable.
    #[schemars(range(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("trainer.nodes is immutable"))]
    pub nodes: i32,
    /// GPUs (`nvidia.com/gpu`) per trainer pod; 0 runs on CPU. Immutable.
    #[serde(default)]
    #[schemars(range(min = 0, max = 64))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("trainer.gpusPerNode is immutable"))]
    pub gpus_per_node: i32,
    /// Worker image (contains the `onevision` binary).
    #[schemars(length(min = 1))]
    pub image: String,
    /// Image pull policy: Always, IfNotPresent or Never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// CPU/memory requests and limits; `nvidia.com/gpu` is set from `gpusPerNode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment variables for the trainer containers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Node selector for trainer pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for trainer pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Service account of the trainer pods (rank 0 needs `patch` on its own pod to report progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// torch-style rendezvous port on rank 0 (`MASTER_PORT`).
    #[serde(default = "default_master_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub master_port: i32,
    /// gRPC coordinator port on rank 0 (`ONEVISION_COORDINATOR`).
    #[serde(default = "default_coordinator_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub coordinator_port: i32,
    /// ZeRO stage of the data-parallel ranks: 0 = every rank holds the full optimizer state;
    /// 1 = ZeRO-1, each rank keeps fp32 master weights and AdamW moments for 1/N of the
    /// parameters (gradients reduce-scattered, parameters all-gathered). Checkpoints of either
    /// stage resume under the other and under another number of ranks.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == 0 || self == 1").message("trainer.zeroStage must be 0 (off) or 1 (ZeRO-1 optimizer-state sharding)"))]
    pub zero_stage: i32,
}

fn default_master_port() -> i32 {
    29500
}
fn default_coordinator_port() -> i32 {
    50051
}

/// Container image pull policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The value Kubernetes expects in `imagePullPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Learning-rate schedule after warmup.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum LrSchedule {
    Constant,
    Linear,
    #[default]
    Cosine,
}

/// Optimisation hyperparameters shared by SFT and GRPO.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Hyperparameters {
    /// Peak learning rate (AdamW).
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("hyperparameters.learningRate must be in (0, 1]"))]
    pub learning_rate: f64,
    /// Passes over the dataset.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub epochs: i32,
    /// Sequences per optimizer step summed over all ranks.
    #[schemars(range(min = 1))]
    pub global_batch_size: i32,
    /// Sequences per forward/backward on one GPU; gradient accumulation makes up the rest.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub micro_batch_size: i32,
    /// Stop after this many optimizer steps (default: derived from epochs and dataset size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_steps: Option<i64>,
    /// Learning-rate schedule after warmup.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Linear warmup steps.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub warmup_steps: i64,
    /// AdamW weight decay.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0.0").message("hyperparameters.weightDecay must be >= 0"))]
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    #[serde(default = "default_max_grad_norm")]
    #[x_kube(validation = Rule::new("self >= 0.0").message("hyperparameters.maxGradNorm must be >= 0"))]
    pub max_grad_norm: f64,
    /// Maximum tokens per sequence (prompt + image tokens + answer); longer samples are truncated.
    #[serde(default = "default_max_seq_len")]
    #[schemars(range(min = 16))]
    pub max_seq_len: i32,
    /// Keep the vision encoder frozen (train the merger and the language model only).
    #[serde(default = "yes")]
    pub freeze_vision: bool,
    /// Random seed for data order, dropout and sampling.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub seed: i64,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Hyperparameters {
            learning_rate: 1e-5,
            epochs: 1,
            global_batch_size: 8,
            micro_batch_size: 1,
            max_steps: None,
            lr_schedule: LrSchedule::Cosine,
            warmup_steps: 0,
            weight_decay: 0.0,
            max_grad_norm: default_max_grad_norm(),
            max_seq_len: default_max_seq_len(),
            freeze_vision: true,
            seed: 0,
        }
    }
}

fn one() -> i32 {
    1
}
fn yes() -> bool {
    true
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_max_seq_len() -> i32 {
    4096
}

/// Checkpointing: written under `output.path`, resumed from after a gang restart.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// Save every N optimizer steps (and at the end).
    #[serde(default = "default_every_steps")]
    #[schemars(range(min = 1))]
    pub every_steps: i64,
    /// Keep the newest N checkpoints.
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1))]
    pub keep: i32,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec {
            every_steps: default_every_steps(),
            keep: default_keep(),
        }
    }
}

fn default_every_steps() -> i64 {
    50
}
fn default_keep() -> i32 {
    3
}

/// Held-out evaluation during training.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EvalSpec {
    /// Fraction of the dataset held out for evaluation (0 disables evaluation).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0.0 && self < 1.0").message("eval.fraction must be in [0, 1)"))]
    pub fraction: f64,
    /// Evaluate every N optimizer steps.
    #[serde(default = "default_every_steps")]
    #[schemars(range(min = 1))]
    pub every_steps: i64,
    /// Optional separate evaluation dataset (overrides `fraction`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<PathSpec>,
    /// Also score sampled answers (verl's `val_kwargs`): `samples` completions per question at
    /// this temperature and top-p, reported as their mean accuracy (DeepSeek-R1's pass@1,
    /// mean@k) next to the greedy accuracy. Absent: greedy only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<EvalSampling>,
}

impl Default for EvalSpec {
    fn default() -> Self {
        EvalSpec {
            fraction: 0.0,
            every_steps: default_every_steps(),
            dataset: None,
            sampling: None,
        }
    }
}

/// `eval.sampling`: sampled evaluation settings (defaults: DeepSeek-R1's T 0.6, top-p 0.95).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EvalSampling {
    /// Completions per question; the reported accuracy is their mean.
    #[serde(default = "default_eval_samples")]
    #[schemars(range(min = 1, max = 64))]
    pub samples: i32,
    #[serde(default = "default_eval_temperature")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 10.0").message("eval.sampling.temperature must be in (0, 10]"))]
    pub temperature: f64,
    #[serde(default = "default_eval_top_p")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("eval.sampling.topP must be in (0, 1]"))]
    pub top_p: f64,
}

fn default_eval_samples() -> i32 {
    8
}
fn default_eval_temperature() -> f64 {
    0.6
}
fn default_eval_top_p() -> f64 {
    0.95
}

/// Job-level failure, suspension and cleanup policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// Gang restarts allowed before the job fails with `BackoffLimitExceeded`.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 1000))]
    pub backoff_limit: i32,
    /// Suspend: delete the pods, keep the status; resume by setting false. Unset with
    /// `scheduling.queueName` means "suspended until the queue (Kueue) admits the job".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// Fail with `DeadlineExceeded` after this many seconds running (reset on resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Delete the job (and, by cascade, its children) this many seconds after it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
}

impl Default for RunPolicy {
    fn default() -> Self {
        RunPolicy {
            backoff_limit: default_backoff_limit(),
            suspend: None,
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
        }
    }
}

fn default_backoff_limit() -> i32 {
    3
}

/// Gang-scheduling integration used for the trainer pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodGroupPolicy {
    /// Volcano: PodGroup `scheduling.volcano.sh/v1beta1` + annotation `scheduling.k8s.io/group-name`.
    Volcano,
    /// scheduler-plugins coscheduling: PodGroup `scheduling.x-k8s.io/v1alpha1` + label
    /// `scheduling.x-k8s.io/pod-group`.
    Coscheduling,
}

/// Queueing and scheduling.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Kueue LocalQueue; sets label `kueue.x-k8s.io/queue-name` and keeps the job suspended until
    /// admitted (`runPolicy.suspend: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub queue_name: Option<String>,
    /// `schedulerName` of every pod (e.g. `volcano`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub scheduler_name: Option<String>,
    /// `priorityClassName` of every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub priority_class_name: Option<String>,
    /// Create a PodGroup (minMember = trainer.nodes) for an all-or-nothing scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_group: Option<PodGroupPolicy>,
}

/// Rollout workers of a GRPOJob (a RolloutPool `<job>-rollout`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Initial rollout workers; afterwards `kubectl scale rp <job>-rollout` or an HPA may change
    /// the pool, and a change of this field is propagated again.
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: i32,
    /// GPUs per rollout worker.
    #[serde(default)]
    #[schemars(range(min = 0, max = 64))]
    pub gpus_per_replica: i32,
    /// Image of the rollout workers (default: `trainer.image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// CPU/memory of a rollout worker; `nvidia.com/gpu` is set from `gpusPerReplica`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Prompts a worker generates per request batch.
    #[serde(default = "default_rollout_batch")]
    #[schemars(range(min = 1))]
    pub batch_size: i32,
}

fn default_rollout_batch() -> i32 {
    8
}

/// How the per-token policy loss is reduced to a scalar.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum LossAggregation {
    /// Mean over all tokens of the batch (DAPO).
    #[default]
    TokenMean,
    /// Mean over tokens of each sequence, then over sequences (original GRPO).
    SeqMeanTokenMean,
    /// Sum over tokens of each sequence, then mean over sequences (Dr. GRPO style).
    SeqMeanTokenSum,
}

/// Estimator of KL(policy || reference) per token.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum KlEstimator {
    K1,
    K2,
    /// Schulman's unbiased low-variance estimator (GRPO paper).
    #[default]
    K3,
}

/// One rule-based reward and its weight in the total reward.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RewardSpec {
    /// Reward function name (e.g. `accuracy`, `format`).
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z][a-z0-9_-]*$"))]
    pub name: String,
    /// Weight of this reward in the sum.
    #[serde(default = "default_weight")]
    pub weight: f64,
}

fn default_weight() -> f64 {
    1.0
}

/// GRPO algorithm settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.epsilonHigh) || self.epsilonHigh >= self.clipEpsilon").message("grpo.epsilonHigh must be >= grpo.clipEpsilon"))]
pub struct GrpoSpec {
    /// Completions sampled per prompt (the group the advantage is normalised over).
    #[schemars(range(min = 2, max = 1024))]
    pub group_size: i32,
    /// KL penalty coefficient against the reference model.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0.0").message("grpo.klBeta must be >= 0"))]
    pub kl_beta: f64,
    /// PPO clip range (lower, and upper unless `epsilonHigh` is set).
    #[serde(default = "default_clip")]
    #[x_kube(validation = Rule::new("self > 0.0 && self < 1.0").message("grpo.clipEpsilon must be in (0, 1)"))]
    pub clip_epsilon: f64,
    /// Upper clip range (DAPO clip-higher).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self < 1.0").message("grpo.epsilonHigh must be in (0, 1)"))]
    pub epsilon_high: Option<f64>,
    /// Sampling temperature of the rollouts.
    #[serde(default = "default_temperature")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 10.0").message("grpo.temperature must be in (0, 10]"))]
    pub temperature: f64,
    /// Nucleus sampling threshold.
    #[serde(default = "default_top_p")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("grpo.topP must be in (0, 1]"))]
    pub top_p: f64,
    /// Maximum generated tokens per completion.
    #[serde(default = "default_max_new_tokens")]
    #[schemars(range(min = 1, max = 131072))]
    pub max_new_tokens: i32,
    /// Rule-based rewards summed with their weights.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(r, self.exists_one(o, o.name == r.name))").message("grpo.rewards names must be unique"))]
    pub rewards: Vec<RewardSpec>,
    /// Reduction of the per-token loss.
    #[serde(default)]
    pub loss_aggregation: LossAggregation,
    /// KL estimator.
    #[serde(default)]
    pub kl_estimator: KlEstimator,
    /// Policy updates per batch of rollouts (mu in the GRPO paper).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub iterations_per_batch: i32,
    /// Rollouts generated by weights at most this many versions old are accepted (0 = on-policy).
    #[serde(default)]
    #[schemars(range(min = 0, max = 64))]
    pub max_staleness: i32,
    /// Normalise advantages by the group's reward standard deviation.
    #[serde(default = "yes")]
    pub scale_rewards: bool,
    /// DAPO dynamic sampling: drop prompt groups whose completions all got the same reward (they
    /// carry no gradient) and sample fresh prompts until the batch is full again. Present = on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_sampling: Option<DynamicSampling>,
}

/// `grpo.dynamicSampling` (DAPO, verl's `filter_groups`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DynamicSampling {
    /// Sampling rounds per step at most, the first included. A step still short of groups after
    /// the last round trains on the groups it has (logged), rather than failing the job.
    #[serde(default = "default_max_rounds")]
    #[schemars(range(min = 1, max = 64))]
    pub max_rounds: i32,
}

fn default_max_rounds() -> i32 {
    4
}

fn default_clip() -> f64 {
    0.2
}
fn default_temperature() -> f64 {
    1.0
}
fn default_top_p() -> f64 {
    1.0
}
fn default_max_new_tokens() -> i32 {
    1024
}

// ---------------------------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------------------------

/// Lifecycle phase of a training job.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum JobPhase {
    /// Accepted; children being created.
    #[default]
    Pending,
    /// `model.fromSFTJob` has not succeeded yet.
    WaitingForSFTJob,
    /// Suspended by the user or waiting for queue admission; no pods.
    Suspended,
    /// Trainer pods created, not all running yet.
    Starting,
    /// All trainer pods running.
    Running,
    /// The gang is being torn down to be recreated.
    Restarting,
    /// All trainer pods exited 0.
    Succeeded,
    /// Permanent error, backoff limit or deadline exceeded.
    Failed,
}

impl JobPhase {
    /// Every phase, for metrics that export one series per phase.
    pub const ALL: [JobPhase; 8] = [
        JobPhase::Pending,
        JobPhase::WaitingForSFTJob,
        JobPhase::Suspended,
        JobPhase::Starting,
        JobPhase::Running,
        JobPhase::Restarting,
        JobPhase::Succeeded,
        JobPhase::Failed,
    ];

    /// Finished for good (no more pods will be created).
    pub fn is_terminal(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Failed)
    }

    /// Name as written in `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Pending => "Pending",
            JobPhase::WaitingForSFTJob => "WaitingForSFTJob",
            JobPhase::Suspended => "Suspended",
            JobPhase::Starting => "Starting",
            JobPhase::Running => "Running",
            JobPhase::Restarting => "Restarting",
            JobPhase::Succeeded => "Succeeded",
            JobPhase::Failed => "Failed",
        }
    }
}

/// Training progress reported by trainer rank 0 (see `onevision.dev/progress` in docs/operator.md).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Optimizer steps completed.
    #[serde(default)]
    pub step: i64,
    /// Planned optimizer steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<i64>,
    /// Current epoch (fractional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<f64>,
    /// Latest training loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Latest mean reward (GRPO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<f64>,
    /// Latest accuracy (eval accuracy for SFT, accuracy reward for GRPO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Latest saved checkpoint directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

/// Status of an SFTJob or GRPOJob.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    /// Current phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// metav1.Condition list keyed by type: Created, Running, Restarting, Succeeded, Failed, Suspended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// When the current run started (trainer pods first created; reset on resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Gang restarts so far.
    #[serde(default)]
    pub restarts: i32,
    /// Incarnation of the trainer gang: bumped on every gang restart and every suspension, and
    /// stamped on each trainer pod (annotation `onevision.dev/gang-generation`), so pods of an
    /// earlier incarnation that are still terminating are never mistaken for the current ones.
    #[serde(default)]
    pub gang_generation: i32,
    /// True once every pod of the current gang generation has been created; a missing pod after
    /// that means it was deleted, which restarts the gang.
    #[serde(default, skip_serializing_if = "is_false")]
    pub gang_created: bool,
    /// Trainer pods currently running.
    #[serde(default)]
    pub active: i32,
    /// Resolved model directory (the SFTJob's output for `model.fromSFTJob`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_path: Option<String>,
    /// Progress reported by rank 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// `step/totalSteps` for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_progress: Option<String>,
    /// Rollout workers ready (GRPOJob).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_ready_replicas: Option<i32>,
    /// The `metadata.generation` this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// Kinds
// ---------------------------------------------------------------------------------------------

/// Supervised fine-tuning of a Qwen2.5-VL model on reasoning traces.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "onevision.dev",
    version = "v1alpha1",
    kind = "SFTJob",
    plural = "sftjobs",
    singular = "sftjob",
    namespaced,
    status = "JobStatus",
    shortname = "sft",
    category = "onevision",
    derive = "PartialEq",
    doc = "Supervised fine-tuning job: a gang of trainer pods",
    validation = Rule::new("size(self.metadata.name) <= 40").message("metadata.name must be at most 40 characters (pod hostnames <name>-trainer-<N> must fit 63)"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Step", type_ = "string", json_path = ".status.stepProgress"),
    printcolumn(name = "Loss", type_ = "number", json_path = ".status.progress.loss"),
    printcolumn(name = "Restarts", type_ = "integer", json_path = ".status.restarts"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct SFTJobSpec {
    /// Initial weights.
    pub model: ModelSource,
    /// Training data (JSONL of image + question + reasoning trace).
    pub dataset: PathSpec,
    /// Output directory: checkpoints and the final model.
    pub output: PathSpec,
    /// Shared storage mounted in every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,
    /// The trainer gang.
    pub trainer: TrainerSpec,
    /// Optimisation hyperparameters.
    pub hyperparameters: Hyperparameters,
    /// Held-out evaluation.
    #[serde(default)]
    pub eval: EvalSpec,
    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// Restarts, suspension, deadline and cleanup.
    #[serde(default)]
    pub run_policy: RunPolicy,
    /// Queueing and scheduling.
    #[serde(default)]
    pub scheduling: SchedulingSpec,
}

/// GRPO reinforcement learning with rule-based rewards: trainer gang + RolloutPool.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "onevision.dev",
    version = "v1alpha1",
    kind = "GRPOJob",
    plural = "grpojobs",
    singular = "grpojob",
    namespaced,
    status = "JobStatus",
    shortname = "grpo",
    category = "onevision",
    derive = "PartialEq",
    doc = "GRPO job: a gang of trainer pods and a RolloutPool of generation workers",
    validation = Rule::new("size(self.metadata.name) <= 40").message("metadata.name must be at most 40 characters (pod hostnames <name>-trainer-<N> must fit 63)"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Step", type_ = "string", json_path = ".status.stepProgress"),
    printcolumn(name = "Reward", type_ = "number", json_path = ".status.progress.reward"),
    printcolumn(name = "Restarts", type_ = "integer", json_path = ".status.restarts"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct GRPOJobSpec {
    /// Initial policy (and reference) weights.
    pub model: ModelSource,
    /// Prompts with verifiable answers (JSONL).
    pub dataset: PathSpec,
    /// Output directory: checkpoints and the final model.
    pub output: PathSpec,
    /// Shared storage mounted in every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,
    /// The trainer gang.
    pub trainer: TrainerSpec,
    /// Rollout (generation) workers.
    pub rollout: RolloutSpec,
    /// GRPO algorithm settings.
    pub grpo: GrpoSpec,
    /// Optimisation hyperparameters.
    pub hyperparameters: Hyperparameters,
    /// Held-out evaluation.
    #[serde(default)]
    pub eval: EvalSpec,
    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// Restarts, suspension, deadline and cleanup.
    #[serde(default)]
    pub run_policy: RunPolicy,
    /// Queueing and scheduling.
    #[serde(default)]
    pub scheduling: SchedulingSpec,
}

/// A scalable pool of interchangeable rollout workers (normally owned by a GRPOJob).
// Two printer columns share `type_ = "integer"`; clippy mistakes the derive's arguments for attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "onevision.dev",
    version = "v1alpha1",
    kind = "RolloutPool",
    plural = "rolloutpools",
    singular = "rolloutpool",
    namespaced,
    status = "RolloutPoolStatus",
    shortname = "rp",
    category = "onevision",
    derive = "PartialEq",
    doc = "Pool of rollout workers with the /scale subresource",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Job", type_ = "string", json_path = ".spec.jobName"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RolloutPoolSpec {
    /// Rollout workers to keep running.
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: i32,
    /// The GRPOJob the workers serve (their coordinator is its rank 0).
    #[schemars(length(min = 1))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("jobName is immutable"))]
    pub job_name: String,
    /// Kind of that job (GRPOJob).
    #[serde(default = "default_pool_job_kind")]
    pub job_kind: String,
    /// Worker image.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Image pull policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// GPUs per worker.
    #[serde(default)]
    #[schemars(range(min = 0, max = 64))]
    pub gpus_per_replica: i32,
    /// CPU/memory of a worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// `host:port` of the job's gRPC coordinator.
    #[schemars(length(min = 1))]
    pub coordinator: String,
    /// ConfigMap holding the job spec (`job.yaml`), mounted at /etc/onevision.
    #[schemars(length(min = 1))]
    pub job_spec_config_map: String,
    /// Shared storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Node selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Service account of the workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Scheduler of the workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_name: Option<String>,
    /// Priority class of the workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Keep no pods (the owning job is suspended, waiting or finished).
    #[serde(default, skip_serializing_if = "is_false")]
    pub suspend: bool,
}

fn default_pool_job_kind() -> String {
    "GRPOJob".into()
}

/// Status of a RolloutPool (read by `kubectl scale` / HPA through `/scale`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutPoolStatus {
    /// Worker pods that exist and are not finished.
    #[serde(default)]
    pub replicas: i32,
    /// Worker pods that are Ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the workers (string form, for `/scale`).
    #[serde(default)]
    pub selector: String,
    /// The `metadata.generation` this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Which training kind a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobKind {
    SFTJob,
    GRPOJob,
}

impl JobKind {
    /// The `kind` string.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::SFTJob => "SFTJob",
            JobKind::GRPOJob => "GRPOJob",
        }
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    /// `trainer.zeroStage` defaults to 0 (existing manifests keep their meaning) and the schema
    /// refuses anything but 0 and 1 with a message naming the field.
    #[test]
    fn zero_stage_defaults_to_off_and_is_validated_by_the_schema() {
        let t: TrainerSpec = serde_json::from_value(serde_json::json!({"nodes": 2, "image": "x"})).unwrap();
        assert_eq!(t.zero_stage, 0);
        let t: TrainerSpec =
            serde_json::from_value(serde_json::json!({"nodes": 2, "image": "x", "zeroStage": 1})).unwrap();
        assert_eq!(serde_json::to_value(&t).unwrap()["zeroStage"], 1);
        for crd in [SFTJob::crd(), GRPOJob::crd()] {
            let schema = serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap()).unwrap();
            let field = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["trainer"]["properties"]["zeroStage"];
            assert_eq!(field["default"], 0);
            let rule = &field["x-kubernetes-validations"][0];
            assert_eq!(rule["rule"], "self == 0 || self == 1");
            assert!(rule["message"].as_str().unwrap().contains("trainer.zeroStage"));
        }
    }
}
