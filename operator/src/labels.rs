//! Label and annotation keys on the operator's children.

/// Name of the owning job (SFTJob/GRPOJob) on every child.
pub const JOB_NAME: &str = "onevision.dev/job-name";
/// `trainer` or `rollout`.
pub const ROLE: &str = "onevision.dev/role";
/// Index of the pod within its role.
pub const REPLICA_INDEX: &str = "onevision.dev/replica-index";
/// Kind of the owning job.
pub const JOB_KIND: &str = "onevision.dev/job-kind";
/// Name of the RolloutPool on its pods.
pub const POOL_NAME: &str = "onevision.dev/pool-name";
/// Annotation: gang generation (= status.restarts at creation) of a trainer pod.
pub const GANG_GENERATION: &str = "onevision.dev/gang-generation";
/// Annotation written by trainer rank 0 on its own pod: JSON [`crate::api::Progress`].
pub const PROGRESS: &str = "onevision.dev/progress";
/// Annotation on a RolloutPool: the `spec.rollout.replicas` of the job last propagated to it.
pub const JOB_REPLICAS: &str = "onevision.dev/job-replicas";
/// Kueue queue label.
pub const KUEUE_QUEUE_NAME: &str = "kueue.x-k8s.io/queue-name";
/// Volcano pod-group annotation.
pub const VOLCANO_GROUP_NAME: &str = "scheduling.k8s.io/group-name";
/// scheduler-plugins coscheduling pod-group label.
pub const COSCHEDULING_POD_GROUP: &str = "scheduling.x-k8s.io/pod-group";

/// Role value of trainer pods.
pub const ROLE_TRAINER: &str = "trainer";
/// Role value of rollout pods.
pub const ROLE_ROLLOUT: &str = "rollout";
