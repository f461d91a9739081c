//! The environment contract between the operator's pod specs and the `onevision` worker.
//!
//! Every trainer and rollout pod gets these variables; the worker's local runner
//! (`onevision run`) sets the same names so the worker cannot tell the two apart.

/// Rank-0 trainer pod DNS name `<job>-trainer-0.<job>-trainer.<ns>.svc` (torch rendezvous).
pub const MASTER_ADDR: &str = "MASTER_ADDR";
/// Rendezvous port on rank 0 (`trainer.masterPort`, default 29500).
pub const MASTER_PORT: &str = "MASTER_PORT";
/// Total trainer processes: `trainer.nodes × max(trainer.gpusPerNode, 1)`.
pub const WORLD_SIZE: &str = "WORLD_SIZE";
/// Pod-level rank, equal to `NODE_RANK` (the per-GPU rank is `NODE_RANK × NPROC_PER_NODE + LOCAL_RANK`).
pub const RANK: &str = "RANK";
/// Index of this trainer pod in the gang, 0-based.
pub const NODE_RANK: &str = "NODE_RANK";
/// Trainer pods in the gang (`trainer.nodes`).
pub const NNODES: &str = "NNODES";
/// Processes per trainer pod: `max(trainer.gpusPerNode, 1)`.
pub const NPROC_PER_NODE: &str = "NPROC_PER_NODE";

/// Name of the SFTJob/GRPOJob.
pub const JOB_NAME: &str = "ONEVISION_JOB_NAME";
/// Namespace of the job.
pub const JOB_NAMESPACE: &str = "ONEVISION_JOB_NAMESPACE";
/// `SFTJob` or `GRPOJob`.
pub const JOB_KIND: &str = "ONEVISION_JOB_KIND";
/// `trainer` or `rollout`.
pub const ROLE: &str = "ONEVISION_ROLE";
/// Index of this pod within its role (trainer: node rank; rollout: pool index).
pub const REPLICA_INDEX: &str = "ONEVISION_REPLICA_INDEX";
/// `host:port` of the gRPC coordinator served by trainer rank 0.
pub const COORDINATOR: &str = "ONEVISION_COORDINATOR";
/// Path of the mounted typed job spec (`/etc/onevision/job.yaml`).
pub const JOB_SPEC: &str = "ONEVISION_JOB_SPEC";
/// Gang generation (= `status.restarts` when the pod was created); > 0 means resume from the
/// latest checkpoint in `output.path`.
pub const RESTART_COUNT: &str = "ONEVISION_RESTART_COUNT";
/// `host:port` the worker serves Prometheus `/metrics` on (`0.0.0.0:`[`crate::planner::METRICS_PORT`]
/// in pods; the container port is named `metrics` for the chart's PodMonitor). Unset or empty:
/// no metrics server.
pub const METRICS_ADDR: &str = "ONEVISION_METRICS_ADDR";
/// `host:port` the rollout worker's gRPC server binds (`0.0.0.0:`[`crate::planner::ROLLOUT_PORT`]
/// in pods, a fixed container port named `rollout` so a NetworkPolicy can admit it by name).
pub const ROLLOUT_LISTEN: &str = "ONEVISION_ROLLOUT_LISTEN";
/// Name of the RolloutPool (rollout pods only).
pub const POOL_NAME: &str = "ONEVISION_POOL_NAME";

/// Pod IP (downward API `status.podIP`).
pub const POD_IP: &str = "POD_IP";
/// Pod name (downward API `metadata.name`); rank 0 annotates its own pod with progress.
pub const POD_NAME: &str = "POD_NAME";
/// Pod namespace (downward API `metadata.namespace`).
pub const POD_NAMESPACE: &str = "POD_NAMESPACE";

/// Directory the job-spec ConfigMap is mounted at.
pub const JOB_SPEC_DIR: &str = "/etc/onevision";
/// File name of the job spec inside [`JOB_SPEC_DIR`] (and key in the ConfigMap).
pub const JOB_SPEC_FILE: &str = "job.yaml";
/// Full path of the mounted job spec.
pub const JOB_SPEC_PATH: &str = "/etc/onevision/job.yaml";
