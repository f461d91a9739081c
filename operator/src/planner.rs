//! The planner: pure functions from a job (or pool) and its observed children to the desired
//! children, the actions that get there, the new status and the events to publish.
//!
//! No I/O happens here. The controller observes (fresh reads), calls [`plan`] / [`plan_pool`]
//! and acts; the worker's local runner (`onevision run`) calls [`trainer_pods`],
//! [`rollout_pods`], [`job_config_map`] and [`resolve_model_path`] to run the very same pod
//! specs as local processes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, Pod, PodSpec,
    ResourceRequirements, Service, ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::DynamicObject;
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Resource, ResourceExt};

use crate::api::*;
use crate::env;
use crate::job::{job_file, TrainingJob};
use crate::labels;
use crate::EXIT_PERMANENT;

/// GPU extended resource name.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Container name of trainer pods.
pub const TRAINER_CONTAINER: &str = "trainer";
/// Container name of rollout pods.
pub const ROLLOUT_CONTAINER: &str = "rollout";
/// Port of the `/metrics` endpoint of trainer and rollout containers.
pub const METRICS_PORT: i32 = 9400;
/// Name of that container port (what the chart's PodMonitor scrapes).
pub const METRICS_PORT_NAME: &str = "metrics";
/// gRPC port of rollout workers (`Rollout` service + health), named [`ROLLOUT_PORT_NAME`].
pub const ROLLOUT_PORT: i32 = 50052;
pub const ROLLOUT_PORT_NAME: &str = "rollout";

/// Condition types set on jobs.
pub mod condition {
    pub const CREATED: &str = "Created";
    pub const RUNNING: &str = "Running";
    pub const RESTARTING: &str = "Restarting";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
    pub const SUSPENDED: &str = "Suspended";
}

/// Condition / event reasons.
pub mod reason {
    pub const CREATED: &str = "Created";
    pub const WAITING_FOR_SFT_JOB: &str = "WaitingForSFTJob";
    pub const SUSPENDED: &str = "Suspended";
    pub const WAITING_FOR_ADMISSION: &str = "WaitingForAdmission";
    pub const RESUMED: &str = "Resumed";
    pub const STARTING: &str = "Starting";
    pub const ALL_PODS_RUNNING: &str = "AllPodsRunning";
    pub const GANG_RESTART: &str = "GangRestart";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    pub const BACKOFF_LIMIT_EXCEEDED: &str = "BackoffLimitExceeded";
    pub const PERMANENT_ERROR: &str = "PermanentError";
}

/// Names of a job's children.
pub mod names {
    /// Headless Service (and pod subdomain) of the trainer gang.
    pub fn service(job: &str) -> String {
        format!("{job}-trainer")
    }
    /// ConfigMap holding the job file.
    pub fn config_map(job: &str) -> String {
        format!("{job}-spec")
    }
    /// Trainer pod (and hostname) of `rank`.
    pub fn trainer_pod(job: &str, rank: i32) -> String {
        format!("{job}-trainer-{rank}")
    }
    /// RolloutPool of a GRPOJob.
    pub fn rollout_pool(job: &str) -> String {
        format!("{job}-rollout")
    }
    /// Rollout pod `index` of pool `pool`.
    pub fn rollout_pod(pool: &str, index: i32) -> String {
        format!("{pool}-{index}")
    }
    /// PodGroup of the trainer gang.
    pub fn pod_group(job: &str) -> String {
        format!("{job}-trainer")
    }
    /// ServiceAccount, Role and RoleBinding the trainer pods run with (when the job does not
    /// name its own `trainer.serviceAccountName`).
    pub fn worker(job: &str) -> String {
        format!("{job}-worker")
    }
}

/// What the planner needs beyond the job itself: the children as they are now.
#[derive(Clone, Debug)]
pub struct Observed {
    /// Trainer pods of the job (label `onevision.dev/job-name=<job>`, role trainer).
    pub trainer_pods: Vec<Pod>,
    /// The headless Service, if it exists.
    pub service: Option<Service>,
    /// The job-spec ConfigMap, if it exists.
    pub config_map: Option<ConfigMap>,
    /// The RolloutPool (GRPOJob), if it exists.
    pub rollout_pool: Option<RolloutPool>,
    /// The SFTJob named by `model.fromSFTJob`, if any and if it exists.
    pub source_sft_job: Option<SFTJob>,
    /// The per-job worker ServiceAccount `<job>-worker`, if it exists.
    pub worker_service_account: Option<ServiceAccount>,
    /// The per-job worker Role `<job>-worker`, if it exists.
    pub worker_role: Option<Role>,
    /// The per-job worker RoleBinding `<job>-worker`, if it exists.
    pub worker_role_binding: Option<RoleBinding>,
    /// The current time.
    pub now: Timestamp,
}

impl Observed {
    /// Nothing exists yet.
    pub fn empty(now: Timestamp) -> Observed {
        Observed {
            trainer_pods: vec![],
            service: None,
            config_map: None,
            rollout_pool: None,
            source_sft_job: None,
            worker_service_account: None,
            worker_role: None,
            worker_role_binding: None,
            now,
        }
    }
}

/// A child object the operator manages.
// A handful per reconcile: boxing would only make every match on them noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Child {
    Service(Service),
    ConfigMap(ConfigMap),
    Pod(Pod),
    RolloutPool(RolloutPool),
    /// Volcano or coscheduling PodGroup (a CRD the operator does not own the types of).
    PodGroup(DynamicObject),
    ServiceAccount(ServiceAccount),
    Role(Role),
    RoleBinding(RoleBinding),
}

impl Child {
    /// Kind of the child.
    pub fn kind(&self) -> ChildKind {
        match self {
            Child::Service(_) => ChildKind::Service,
            Child::ConfigMap(_) => ChildKind::ConfigMap,
            Child::Pod(_) => ChildKind::Pod,
            Child::RolloutPool(_) => ChildKind::RolloutPool,
            Child::PodGroup(_) => ChildKind::PodGroup,
            Child::ServiceAccount(_) => ChildKind::ServiceAccount,
            Child::Role(_) => ChildKind::Role,
            Child::RoleBinding(_) => ChildKind::RoleBinding,
        }
    }

    /// Name of the child.
    pub fn name(&self) -> String {
        match self {
            Child::Service(o) => o.name_any(),
            Child::ConfigMap(o) => o.name_any(),
            Child::Pod(o) => o.name_any(),
            Child::RolloutPool(o) => o.name_any(),
            Child::PodGroup(o) => o.name_any(),
            Child::ServiceAccount(o) => o.name_any(),
            Child::Role(o) => o.name_any(),
            Child::RoleBinding(o) => o.name_any(),
        }
    }
}

/// Kinds of children.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChildKind {
    Service,
    ConfigMap,
    Pod,
    RolloutPool,
    PodGroup,
    ServiceAccount,
    Role,
    RoleBinding,
}

/// One step of a plan.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Server-side apply (creates the object when missing).
    Apply(Child),
    /// Delete the named child (in the job's namespace).
    Delete { kind: ChildKind, name: String },
    /// Delete the job itself (`ttlSecondsAfterFinished` elapsed).
    DeleteJob,
}

/// Severity of a planned event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventSeverity {
    Normal,
    Warning,
}

/// An event to publish on the job (planned only when something changed).
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedEvent {
    pub severity: EventSeverity,
    pub reason: String,
    pub message: String,
}

/// Result of planning one job.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Applies and deletes, in order.
    pub actions: Vec<Action>,
    /// The new status (write only after the actions succeeded).
    pub status: JobStatus,
    /// Events for what changed.
    pub events: Vec<PlannedEvent>,
    /// Labels the job object itself must carry (Kueue's queue label).
    pub job_labels: BTreeMap<String, String>,
    /// Reconcile again after this long even if nothing changes (deadline / TTL timers).
    pub requeue_after: Option<Duration>,
}

impl Plan {
    /// Objects applied by this plan of a given kind.
    pub fn applied(&self, kind: ChildKind) -> impl Iterator<Item = &Child> {
        self.actions.iter().filter_map(move |a| match a {
            Action::Apply(c) if c.kind() == kind => Some(c),
            _ => None,
        })
    }

    /// Names deleted by this plan of a given kind.
    pub fn deleted(&self, kind: ChildKind) -> Vec<&str> {
        self.actions
            .iter()
            .filter_map(|a| match a {
                Action::Delete { kind: k, name } if *k == kind => Some(name.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// Why a job or pool cannot be planned (the object itself is malformed).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("{kind} has no metadata.{field}; it must come from the API server (or set it in the manifest for local runs)")]
    MissingMetadata {
        kind: &'static str,
        field: &'static str,
    },
}

/// Identity of a job for building children.
#[derive(Clone, Debug)]
struct JobIdent {
    name: String,
    namespace: String,
    kind: JobKind,
    owner: OwnerReference,
}

fn ident<J: TrainingJob>(job: &J) -> Result<JobIdent, PlanError> {
    let kind = J::KIND.as_str();
    let name = job.meta().name.clone().ok_or(PlanError::MissingMetadata {
        kind,
        field: "name",
    })?;
    let namespace = job
        .meta()
        .namespace
        .clone()
        .ok_or(PlanError::MissingMetadata {
            kind,
            field: "namespace",
        })?;
    let owner = job
        .controller_owner_ref(&())
        .ok_or(PlanError::MissingMetadata { kind, field: "uid" })?;
    Ok(JobIdent {
        name,
        namespace,
        kind: J::KIND,
        owner,
    })
}

fn job_labels_for(ident: &JobIdent, role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::JOB_NAME.to_string(), ident.name.clone()),
        (
            labels::JOB_KIND.to_string(),
            ident.kind.as_str().to_string(),
        ),
        (labels::ROLE.to_string(), role.to_string()),
    ])
}

fn child_meta(ident: &JobIdent, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(ident.namespace.clone()),
        labels: Some(labels),
        owner_references: Some(vec![ident.owner.clone()]),
        ..ObjectMeta::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Child builders (public: the local runner uses them)
// ---------------------------------------------------------------------------------------------

/// `MASTER_ADDR` of a job: the rank-0 pod's DNS name behind the headless Service.
pub fn master_addr(job: &str, namespace: &str) -> String {
    format!(
        "{}.{}.{namespace}.svc",
        names::trainer_pod(job, 0),
        names::service(job)
    )
}

/// `ONEVISION_COORDINATOR` of a job: `host:port` of rank 0's gRPC coordinator.
pub fn coordinator_addr(job: &str, namespace: &str, port: i32) -> String {
    format!("{}:{port}", master_addr(job, namespace))
}

/// Processes per trainer pod: one per GPU, one on CPU-only pods.
pub fn nproc_per_node(trainer: &TrainerSpec) -> i32 {
    trainer.gpus_per_node.max(1)
}

/// The headless Service giving trainer pods stable DNS names (`publishNotReadyAddresses`, so
/// rank 0 resolves before it is Ready).
pub fn headless_service<J: TrainingJob>(job: &J) -> Result<Service, PlanError> {
    let ident = ident(job)?;
    let trainer = job.common().trainer;
    let selector = BTreeMap::from([
        (labels::JOB_NAME.to_string(), ident.name.clone()),
        (labels::ROLE.to_string(), labels::ROLE_TRAINER.to_string()),
    ]);
    Ok(Service {
        metadata: child_meta(
            &ident,
            names::service(&ident.name),
            job_labels_for(&ident, labels::ROLE_TRAINER),
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector),
            ports: Some(vec![
                ServicePort {
                    name: Some("rendezvous".into()),
                    port: trainer.master_port,
                    ..Default::default()
                },
                ServicePort {
                    name: Some("coordinator".into()),
                    port: trainer.coordinator_port,
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    })
}

/// The ConfigMap `<job>-spec` holding the typed job file (`job.yaml`) with the model resolved.
pub fn job_config_map<J: TrainingJob>(job: &J, model_path: &str) -> Result<ConfigMap, PlanError> {
    let ident = ident(job)?;
    // Serializing our own typed struct to YAML cannot fail (no maps with non-string keys).
    let text = job_file(job, model_path).unwrap_or_default();
    Ok(ConfigMap {
        metadata: child_meta(
            &ident,
            names::config_map(&ident.name),
            job_labels_for(&ident, labels::ROLE_TRAINER),
        ),
        data: Some(BTreeMap::from([(env::JOB_SPEC_FILE.to_string(), text)])),
        ..Default::default()
    })
}

fn plain_env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// `ONEVISION_METRICS_ADDR=0.0.0.0:9400`: every worker serves `/metrics` on its `metrics` port.
fn metrics_env() -> EnvVar {
    plain_env(env::METRICS_ADDR, format!("0.0.0.0:{METRICS_PORT}"))
}

fn metrics_port() -> ContainerPort {
    ContainerPort {
        name: Some(METRICS_PORT_NAME.into()),
        container_port: METRICS_PORT,
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
    }
}

fn with_gpus(resources: Option<&ResourceRequirements>, gpus: i32) -> Option<ResourceRequirements> {
    let mut r = resources.cloned().unwrap_or_default();
    if gpus > 0 {
        r.limits
            .get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.into(), Quantity(gpus.to_string()));
    }
    if r == ResourceRequirements::default() {
        None
    } else {
        Some(r)
    }
}

/// Volumes and mounts every pod gets: the job file, the storage, and a RAM-backed /dev/shm
/// (NCCL and data loaders need more than the container default of 64 MiB).
fn pod_volumes(config_map: &str, storage: Option<&StorageSpec>) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![
        Volume {
            name: "job-spec".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map.into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: None,
            }),
            ..Default::default()
        },
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "job-spec".into(),
            mount_path: env::JOB_SPEC_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "dshm".into(),
            mount_path: "/dev/shm".into(),
            ..Default::default()
        },
    ];
    if let Some(s) = storage {
        volumes.push(Volume {
            name: "storage".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: s.persistent_volume_claim.claim_name.clone(),
                read_only: s.persistent_volume_claim.read_only.then_some(true),
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "storage".into(),
            mount_path: s.mount_path.clone(),
            read_only: s.persistent_volume_claim.read_only.then_some(true),
            ..Default::default()
        });
    }
    (volumes, mounts)
}

fn downward_env() -> Vec<EnvVar> {
    vec![
        field_env(env::POD_IP, "status.podIP"),
        field_env(env::POD_NAME, "metadata.name"),
        field_env(env::POD_NAMESPACE, "metadata.namespace"),
    ]
}

/// Name of the container port of local rank `i` ≥ 1's ring listener (`MASTER_PORT + i`).
pub fn ring_port_name(local_rank: i32) -> String {
    format!("ring-{local_rank}")
}

/// Trainer container ports: `rendezvous` (`MASTER_PORT`, local rank 0's ring listener),
/// `ring-1`…`ring-{nproc-1}` (`MASTER_PORT + i`, the other ranks the per-GPU launcher starts),
/// `coordinator` and `metrics`. Named, so the chart's NetworkPolicy admits them by name whatever
/// `trainer.masterPort` is.
fn trainer_ports(master_port: i32, coordinator_port: i32, nproc: i32) -> Vec<ContainerPort> {
    let named = |name: String, port: i32| ContainerPort {
        name: Some(name),
        container_port: port,
        ..Default::default()
    };
    let mut ports = vec![named("rendezvous".into(), master_port)];
    // Past 65535 no port can be declared; the launcher refuses that masterPort with a reason.
    ports.extend(
        (1..nproc)
            .filter(|i| master_port + i <= 65535)
            .map(|i| named(ring_port_name(i), master_port + i)),
    );
    ports.push(named("coordinator".into(), coordinator_port));
    ports.push(metrics_port());
    ports
}

/// The trainer gang: `trainer.nodes` pods for gang generation `generation` (= status.restarts).
///
/// Pod `i` is `<job>-trainer-<i>` with hostname/subdomain making it resolvable as
/// `<job>-trainer-<i>.<job>-trainer.<ns>.svc`, runs `onevision trainer --job /etc/onevision/job.yaml`
/// and carries the rendezvous environment documented in [`crate::env`].
pub fn trainer_pods<J: TrainingJob>(job: &J, generation: i32) -> Result<Vec<Pod>, PlanError> {
    let ident = ident(job)?;
    let c = job.common();
    let t = c.trainer;
    (0..t.nodes)
        .map(|rank| Ok(trainer_pod(&ident, job, rank, generation)))
        .collect()
}

fn trainer_pod<J: TrainingJob>(ident: &JobIdent, job: &J, rank: i32, generation: i32) -> Pod {
    let c = job.common();
    let t = c.trainer;
    let nproc = nproc_per_node(t);
    let mut labels = job_labels_for(ident, labels::ROLE_TRAINER);
    labels.insert(labels::REPLICA_INDEX.into(), rank.to_string());
    let mut annotations =
        BTreeMap::from([(labels::GANG_GENERATION.to_string(), generation.to_string())]);
    match c.scheduling.pod_group {
        Some(PodGroupPolicy::Volcano) => {
            annotations.insert(
                labels::VOLCANO_GROUP_NAME.into(),
                names::pod_group(&ident.name),
            );
        }
        Some(PodGroupPolicy::Coscheduling) => {
            labels.insert(
                labels::COSCHEDULING_POD_GROUP.into(),
                names::pod_group(&ident.name),
            );
        }
        None => {}
    }
    let mut env = vec![
        plain_env(env::MASTER_ADDR, master_addr(&ident.name, &ident.namespace)),
        plain_env(env::MASTER_PORT, t.master_port.to_string()),
        plain_env(env::WORLD_SIZE, (t.nodes * nproc).to_string()),
        plain_env(env::RANK, rank.to_string()),
        plain_env(env::NODE_RANK, rank.to_string()),
        plain_env(env::NNODES, t.nodes.to_string()),
        plain_env(env::NPROC_PER_NODE, nproc.to_string()),
        plain_env(env::JOB_NAME, ident.name.clone()),
        plain_env(env::JOB_NAMESPACE, ident.namespace.clone()),
        plain_env(env::JOB_KIND, ident.kind.as_str()),
        plain_env(env::ROLE, labels::ROLE_TRAINER),
        plain_env(env::REPLICA_INDEX, rank.to_string()),
        plain_env(
            env::COORDINATOR,
            coordinator_addr(&ident.name, &ident.namespace, t.coordinator_port),
        ),
        plain_env(env::JOB_SPEC, env::JOB_SPEC_PATH),
        plain_env(env::RESTART_COUNT, generation.to_string()),
        metrics_env(),
    ];
    env.extend(downward_env());
    // User variables last: later entries win, so users can override ours deliberately.
    env.extend(t.env.iter().cloned());
    let (volumes, volume_mounts) = pod_volumes(&names::config_map(&ident.name), c.storage);
    let name = names::trainer_pod(&ident.name, rank);
    let mut meta = child_meta(ident, name.clone(), labels);
    meta.annotations = Some(annotations);
    Pod {
        metadata: meta,
        spec: Some(PodSpec {
            hostname: Some(name),
            subdomain: Some(names::service(&ident.name)),
            // The gang is restarted as a whole by the operator; a kubelet restart of one rank
            // would rejoin a rendezvous the others already left.
            restart_policy: Some("Never".into()),
            scheduler_name: c.scheduling.scheduler_name.clone(),
            priority_class_name: c.scheduling.priority_class_name.clone(),
            node_selector: (!t.node_selector.is_empty()).then(|| t.node_selector.clone()),
            tolerations: (!t.tolerations.is_empty()).then(|| t.tolerations.clone()),
            service_account_name: Some(trainer_service_account(&ident.name, t)),
            containers: vec![Container {
                name: TRAINER_CONTAINER.into(),
                image: Some(t.image.clone()),
                image_pull_policy: t.image_pull_policy.map(|p| p.as_str().to_string()),
                command: Some(vec![
                    "onevision".into(),
                    "trainer".into(),
                    "--job".into(),
                    env::JOB_SPEC_PATH.into(),
                ]),
                env: Some(env),
                ports: Some(trainer_ports(t.master_port, t.coordinator_port, nproc)),
                resources: with_gpus(t.resources.as_ref(), t.gpus_per_node),
                volume_mounts: Some(volume_mounts),
                ..Default::default()
            }],
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    }
}

/// The ServiceAccount trainer pods run as: the user's `trainer.serviceAccountName`, else the
/// per-job `<job>-worker` that [`worker_rbac`] creates.
pub fn trainer_service_account(job: &str, trainer: &TrainerSpec) -> String {
    trainer
        .service_account_name
        .clone()
        .unwrap_or_else(|| names::worker(job))
}

/// What trainer pods need from the API server, created per job unless the job names its own
/// `trainer.serviceAccountName` (then the user grants what that account needs).
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerRbac {
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
}

/// The rules of the per-job worker Role: rank 0 publishes progress by patching its own pod's
/// annotation (docs/operator.md, "Progress contract"), and that is all a worker does with the
/// API. Least privilege: `get` and `patch`, and only on rank 0's pod by name. The name
/// `<job>-trainer-0` is stable across gang generations (a restarted gang reuses the names), so
/// `resourceNames` never needs updating; the other ranks, and other jobs' pods, stay untouchable.
pub fn worker_rules(job: &str) -> Vec<PolicyRule> {
    vec![PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec!["pods".into()]),
        resource_names: Some(vec![names::trainer_pod(job, 0)]),
        verbs: vec!["get".into(), "patch".into()],
        non_resource_urls: None,
    }]
}

/// The per-job ServiceAccount, Role and RoleBinding `<job>-worker` (owned by the job, so they are
/// garbage-collected with it); `None` when the job sets `trainer.serviceAccountName`.
pub fn worker_rbac<J: TrainingJob>(job: &J) -> Result<Option<WorkerRbac>, PlanError> {
    let ident = ident(job)?;
    if job.common().trainer.service_account_name.is_some() {
        return Ok(None);
    }
    let name = names::worker(&ident.name);
    let meta = || {
        child_meta(
            &ident,
            name.clone(),
            job_labels_for(&ident, labels::ROLE_TRAINER),
        )
    };
    Ok(Some(WorkerRbac {
        service_account: ServiceAccount {
            metadata: meta(),
            ..Default::default()
        },
        role: Role {
            metadata: meta(),
            rules: Some(worker_rules(&ident.name)),
        },
        role_binding: RoleBinding {
            metadata: meta(),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: name.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: name.clone(),
                namespace: Some(ident.namespace.clone()),
                api_group: None,
            }]),
        },
    }))
}

/// Apply the worker RBAC objects that are missing, not owned by this job (an earlier job of the
/// same name still being garbage-collected) or altered. ServiceAccount first: the API server
/// refuses pods whose service account does not exist.
fn ensure_worker_rbac<J: TrainingJob>(
    job: &J,
    ident: &JobIdent,
    obs: &Observed,
    actions: &mut Vec<Action>,
) -> Result<(), PlanError> {
    let Some(want) = worker_rbac(job)? else {
        return Ok(());
    };
    let owned = |m: &ObjectMeta| {
        m.owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == ident.owner.uid)
    };
    if !obs
        .worker_service_account
        .as_ref()
        .is_some_and(|o| owned(&o.metadata))
    {
        actions.push(Action::Apply(Child::ServiceAccount(want.service_account)));
    }
    if !obs
        .worker_role
        .as_ref()
        .is_some_and(|o| owned(&o.metadata) && o.rules == want.role.rules)
    {
        actions.push(Action::Apply(Child::Role(want.role)));
    }
    if !obs.worker_role_binding.as_ref().is_some_and(|o| {
        owned(&o.metadata)
            && o.role_ref == want.role_binding.role_ref
            && o.subjects == want.role_binding.subjects
    }) {
        actions.push(Action::Apply(Child::RoleBinding(want.role_binding)));
    }
    Ok(())
}

/// The RolloutPool `<job>-rollout` a GRPOJob owns, with `replicas` workers.
pub fn rollout_pool_for(
    job: &GRPOJob,
    replicas: i32,
    suspend: bool,
) -> Result<RolloutPool, PlanError> {
    let ident = ident(job)?;
    let s = &job.spec;
    let mut meta = child_meta(
        &ident,
        names::rollout_pool(&ident.name),
        job_labels_for(&ident, labels::ROLE_ROLLOUT),
    );
    meta.annotations = Some(BTreeMap::from([(
        labels::JOB_REPLICAS.to_string(),
        s.rollout.replicas.to_string(),
    )]));
    Ok(RolloutPool {
        metadata: meta,
        spec: RolloutPoolSpec {
            replicas,
            job_name: ident.name.clone(),
            job_kind: JobKind::GRPOJob.as_str().into(),
            image: s
                .rollout
                .image
                .clone()
                .unwrap_or_else(|| s.trainer.image.clone()),
            image_pull_policy: s.trainer.image_pull_policy,
            gpus_per_replica: s.rollout.gpus_per_replica,
            resources: s.rollout.resources.clone(),
            coordinator: coordinator_addr(
                &ident.name,
                &ident.namespace,
                s.trainer.coordinator_port,
            ),
            job_spec_config_map: names::config_map(&ident.name),
            storage: s.storage.clone(),
            env: s.trainer.env.clone(),
            node_selector: s.trainer.node_selector.clone(),
            tolerations: s.trainer.tolerations.clone(),
            // Rollout workers never call the Kubernetes API, so they do not get the per-job
            // worker account: only the user's own account, if named, else the namespace default.
            service_account_name: s.trainer.service_account_name.clone(),
            scheduler_name: s.scheduling.scheduler_name.clone(),
            priority_class_name: s.scheduling.priority_class_name.clone(),
            suspend,
        },
        status: None,
    })
}

/// Labels selecting the pods of a RolloutPool.
pub fn pool_selector(pool_name: &str, job_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::JOB_NAME.to_string(), job_name.to_string()),
        (labels::ROLE.to_string(), labels::ROLE_ROLLOUT.to_string()),
        (labels::POOL_NAME.to_string(), pool_name.to_string()),
    ])
}

/// `k=v,k=v` form of a selector (what `/scale` reports).
pub fn selector_string(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Rollout pod `index` of a pool: `onevision rollout --job /etc/onevision/job.yaml`.
pub fn rollout_pod(pool: &RolloutPool, index: i32) -> Result<Pod, PlanError> {
    let kind = "RolloutPool";
    let pool_name = pool.meta().name.clone().ok_or(PlanError::MissingMetadata {
        kind,
        field: "name",
    })?;
    let namespace = pool
        .meta()
        .namespace
        .clone()
        .ok_or(PlanError::MissingMetadata {
            kind,
            field: "namespace",
        })?;
    let owner = pool
        .controller_owner_ref(&())
        .ok_or(PlanError::MissingMetadata { kind, field: "uid" })?;
    let s = &pool.spec;
    let mut labels = pool_selector(&pool_name, &s.job_name);
    labels.insert(labels::JOB_KIND.into(), s.job_kind.clone());
    labels.insert(labels::REPLICA_INDEX.into(), index.to_string());
    let mut env = vec![
        plain_env(env::JOB_NAME, s.job_name.clone()),
        plain_env(env::JOB_NAMESPACE, namespace.clone()),
        plain_env(env::JOB_KIND, s.job_kind.clone()),
        plain_env(env::ROLE, labels::ROLE_ROLLOUT),
        plain_env(env::REPLICA_INDEX, index.to_string()),
        plain_env(env::POOL_NAME, pool_name.clone()),
        plain_env(env::COORDINATOR, s.coordinator.clone()),
        plain_env(env::JOB_SPEC, env::JOB_SPEC_PATH),
        plain_env(env::ROLLOUT_LISTEN, format!("0.0.0.0:{ROLLOUT_PORT}")),
        metrics_env(),
    ];
    env.extend(downward_env());
    env.extend(s.env.iter().cloned());
    let (volumes, volume_mounts) = pod_volumes(&s.job_spec_config_map, s.storage.as_ref());
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(names::rollout_pod(&pool_name, index)),
            namespace: Some(namespace),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            // Failed workers are replaced by the pool controller (they are interchangeable).
            restart_policy: Some("Never".into()),
            scheduler_name: s.scheduler_name.clone(),
            priority_class_name: s.priority_class_name.clone(),
            node_selector: (!s.node_selector.is_empty()).then(|| s.node_selector.clone()),
            tolerations: (!s.tolerations.is_empty()).then(|| s.tolerations.clone()),
            service_account_name: s.service_account_name.clone(),
            containers: vec![Container {
                name: ROLLOUT_CONTAINER.into(),
                image: Some(s.image.clone()),
                image_pull_policy: s.image_pull_policy.map(|p| p.as_str().to_string()),
                command: Some(vec![
                    "onevision".into(),
                    "rollout".into(),
                    "--job".into(),
                    env::JOB_SPEC_PATH.into(),
                ]),
                env: Some(env),
                ports: Some(vec![
                    ContainerPort {
                        name: Some(ROLLOUT_PORT_NAME.into()),
                        container_port: ROLLOUT_PORT,
                        ..Default::default()
                    },
                    metrics_port(),
                ]),
                resources: with_gpus(s.resources.as_ref(), s.gpus_per_replica),
                volume_mounts: Some(volume_mounts),
                ..Default::default()
            }],
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    })
}

/// All `spec.replicas` rollout pods of a pool (what the local runner starts).
pub fn rollout_pods(pool: &RolloutPool) -> Result<Vec<Pod>, PlanError> {
    (0..pool.spec.replicas)
        .map(|i| rollout_pod(pool, i))
        .collect()
}

/// The PodGroup for the trainer gang, if `scheduling.podGroup` asks for one.
pub fn pod_group<J: TrainingJob>(job: &J) -> Result<Option<DynamicObject>, PlanError> {
    let ident = ident(job)?;
    let c = job.common();
    let (group, version) = match c.scheduling.pod_group {
        None => return Ok(None),
        Some(PodGroupPolicy::Volcano) => ("scheduling.volcano.sh", "v1beta1"),
        Some(PodGroupPolicy::Coscheduling) => ("scheduling.x-k8s.io", "v1alpha1"),
    };
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, "PodGroup"));
    let mut obj = DynamicObject::new(&names::pod_group(&ident.name), &ar);
    let mut labels = job_labels_for(&ident, labels::ROLE_TRAINER);
    if let Some(q) = &c.scheduling.queue_name {
        labels.insert(labels::KUEUE_QUEUE_NAME.into(), q.clone());
    }
    obj.metadata = child_meta(&ident, names::pod_group(&ident.name), labels);
    let mut spec = serde_json::json!({ "minMember": c.trainer.nodes });
    if let Some(p) = &c.scheduling.priority_class_name {
        spec["priorityClassName"] = serde_json::Value::String(p.clone());
    }
    obj.data = serde_json::json!({ "spec": spec });
    Ok(Some(obj))
}

/// The model directory a job starts from, or None while its source SFTJob has not succeeded.
pub fn resolve_model_path(model: &ModelSource, source: Option<&SFTJob>) -> Option<String> {
    if let Some(p) = &model.path {
        return Some(p.clone());
    }
    let source = source?;
    let succeeded = source.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Succeeded);
    succeeded.then(|| source.spec.output.path.clone())
}

// ---------------------------------------------------------------------------------------------
// Pod observation
// ---------------------------------------------------------------------------------------------

/// What the planner makes of one pod.
#[derive(Clone, Debug, PartialEq)]
pub enum PodState {
    /// Being deleted.
    Terminating,
    /// Not yet running.
    Pending,
    /// Running; `ready` from the Ready condition.
    Running {
        ready: bool,
    },
    Succeeded,
    /// Failed; the exit code of the main container if known.
    Failed {
        exit_code: Option<i32>,
        reason: String,
    },
}

/// Exit code of a terminated container of the pod that exited non-zero (first one found).
fn terminated_exit_code(pod: &Pod) -> Option<i32> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses
        .iter()
        .filter_map(|cs| cs.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code))
        .find(|c| *c != 0)
}

/// Classify a pod.
pub fn pod_state(pod: &Pod) -> PodState {
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Terminating;
    }
    let status = pod.status.as_ref();
    match status.and_then(|s| s.phase.as_deref()) {
        Some("Running") => {
            // A container can terminate before the kubelet flips the pod phase.
            if let Some(code) = terminated_exit_code(pod) {
                return PodState::Failed {
                    exit_code: Some(code),
                    reason: "ContainerExited".into(),
                };
            }
            let ready = status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            PodState::Running { ready }
        }
        Some("Succeeded") => PodState::Succeeded,
        Some("Failed") => PodState::Failed {
            exit_code: terminated_exit_code(pod),
            reason: status
                .and_then(|s| s.reason.clone())
                .unwrap_or_else(|| "Failed".into()),
        },
        _ => PodState::Pending,
    }
}

fn pod_index(pod: &Pod) -> Option<i32> {
    pod.labels().get(labels::REPLICA_INDEX)?.parse().ok()
}

fn pod_generation(pod: &Pod) -> Option<i32> {
    pod.annotations().get(labels::GANG_GENERATION)?.parse().ok()
}

/// Parse rank 0's progress annotation; None when absent or malformed (never fails the job).
pub fn progress_from_pod(pod: &Pod) -> Option<Progress> {
    serde_json::from_str(pod.annotations().get(labels::PROGRESS)?).ok()
}

// ---------------------------------------------------------------------------------------------
// The job planner
// ---------------------------------------------------------------------------------------------

/// Accumulates status changes and the events they warrant.
struct StatusBuilder {
    status: JobStatus,
    events: Vec<PlannedEvent>,
    now: Time,
    generation: Option<i64>,
}

impl StatusBuilder {
    /// Set a condition; returns true when its status flipped (or it is new).
    fn condition(
        &mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> bool {
        let status_str = if status { "True" } else { "False" };
        let message = message.into();
        let conds = &mut self.status.conditions;
        if let Some(c) = conds.iter_mut().find(|c| c.type_ == type_) {
            let flipped = c.status != status_str;
            if flipped {
                c.last_transition_time = self.now.clone();
            }
            c.status = status_str.into();
            c.reason = reason.into();
            c.message = message;
            c.observed_generation = self.generation;
            return flipped;
        }
        if !status {
            // A condition that never held is not worth listing.
            return false;
        }
        conds.push(Condition {
            type_: type_.into(),
            status: status_str.into(),
            reason: reason.into(),
            message,
            last_transition_time: self.now.clone(),
            observed_generation: self.generation,
        });
        true
    }

    fn is_true(&self, type_: &str) -> bool {
        self.status
            .conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True")
    }

    fn event(&mut self, severity: EventSeverity, reason: &str, message: impl Into<String>) {
        self.events.push(PlannedEvent {
            severity,
            reason: reason.into(),
            message: message.into(),
        });
    }

    /// Set the phase, with an event when it changed.
    fn phase(
        &mut self,
        phase: JobPhase,
        severity: EventSeverity,
        reason: &str,
        message: impl Into<String>,
    ) {
        let message = message.into();
        if self.status.phase != Some(phase) {
            self.event(severity, reason, message);
        }
        self.status.phase = Some(phase);
    }
}

fn secs_between(from: &Time, to: Timestamp) -> i64 {
    to.as_second() - from.0.as_second()
}

/// Plan one reconcile of an SFTJob or GRPOJob.
pub fn plan<J: TrainingJob>(job: &J, obs: &Observed) -> Result<Plan, PlanError> {
    let ident = ident(job)?;
    let c = job.common();
    let mut sb = StatusBuilder {
        status: job.job_status().cloned().unwrap_or_default(),
        events: vec![],
        now: Time(obs.now),
        generation: job.meta().generation,
    };
    sb.status.observed_generation = job.meta().generation;
    let mut actions = vec![];
    let mut requeue_after = None;
    let mut job_labels = BTreeMap::new();
    if let Some(q) = &c.scheduling.queue_name {
        job_labels.insert(labels::KUEUE_QUEUE_NAME.to_string(), q.clone());
    }

    if sb.condition(
        condition::CREATED,
        true,
        reason::CREATED,
        format!("{} accepted", ident.kind),
    ) {
        sb.event(
            EventSeverity::Normal,
            reason::CREATED,
            format!("{} {} accepted", ident.kind, ident.name),
        );
    }
    if sb.status.phase.is_none() {
        sb.status.phase = Some(JobPhase::Pending);
    }

    let live_pods: Vec<&Pod> = obs.trainer_pods.iter().collect();
    let delete_alive = |actions: &mut Vec<Action>, only_unfinished: bool| {
        for p in &live_pods {
            let st = pod_state(p);
            let finished = matches!(st, PodState::Succeeded | PodState::Failed { .. });
            if st != PodState::Terminating && !(only_unfinished && finished) {
                actions.push(Action::Delete {
                    kind: ChildKind::Pod,
                    name: p.name_any(),
                });
            }
        }
    };

    // ---- finished jobs: tidy up, honour the TTL, nothing else changes.
    if sb.status.phase.is_some_and(JobPhase::is_terminal) {
        delete_alive(&mut actions, true);
        suspend_pool(job, obs, &mut actions)?;
        if let (Some(ttl), Some(done)) = (
            c.run_policy.ttl_seconds_after_finished,
            &sb.status.completion_time,
        ) {
            let left = ttl - secs_between(done, obs.now);
            if left <= 0 {
                actions.push(Action::DeleteJob);
            } else {
                requeue_after = Some(Duration::from_secs(left as u64));
            }
        }
        return Ok(finish(sb, actions, job_labels, requeue_after, obs));
    }

    // ---- model source.
    let model_path = match sb.status.model_path.clone() {
        Some(p) if c.model.from_sft_job.is_some() => Some(p),
        _ => resolve_model_path(c.model, obs.source_sft_job.as_ref()),
    };
    let Some(model_path) = model_path else {
        let src = c.model.from_sft_job.clone().unwrap_or_default();
        let state = match &obs.source_sft_job {
            None => "does not exist yet".to_string(),
            Some(s) => format!(
                "is {}",
                s.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .unwrap_or_default()
                    .as_str()
            ),
        };
        let msg = format!("waiting for SFTJob {src} to succeed (it {state})");
        sb.condition(
            condition::CREATED,
            true,
            reason::WAITING_FOR_SFT_JOB,
            msg.clone(),
        );
        sb.phase(
            JobPhase::WaitingForSFTJob,
            EventSeverity::Normal,
            reason::WAITING_FOR_SFT_JOB,
            msg,
        );
        delete_alive(&mut actions, false);
        return Ok(finish(sb, actions, job_labels, requeue_after, obs));
    };
    sb.status.model_path = Some(model_path.clone());

    // ---- children that exist for the whole life of the job.
    ensure_worker_rbac(job, &ident, obs, &mut actions)?;
    let cm = job_config_map(job, &model_path)?;
    if obs.config_map.as_ref().map(|o| &o.data) != Some(&cm.data) {
        actions.push(Action::Apply(Child::ConfigMap(cm)));
    }
    if obs.service.is_none() {
        actions.push(Action::Apply(Child::Service(headless_service(job)?)));
    }

    // ---- deadline.
    if let (Some(limit), Some(start)) =
        (c.run_policy.active_deadline_seconds, &sb.status.start_time)
    {
        let left = limit - secs_between(start, obs.now);
        if left <= 0 {
            fail(
                &mut sb,
                reason::DEADLINE_EXCEEDED,
                format!("job ran longer than activeDeadlineSeconds={limit}"),
            );
            delete_alive(&mut actions, true);
            suspend_pool(job, obs, &mut actions)?;
            return Ok(finish(sb, actions, job_labels, requeue_after, obs));
        }
        requeue_after = Some(Duration::from_secs(left as u64));
    }

    // ---- suspension (user or queue admission).
    let awaiting_admission = c.run_policy.suspend.is_none() && c.scheduling.queue_name.is_some();
    let suspended = c.run_policy.suspend.unwrap_or(awaiting_admission);
    if suspended {
        let (why, msg) = if awaiting_admission {
            (
                reason::WAITING_FOR_ADMISSION,
                format!(
                    "waiting for queue {} to admit the job",
                    c.scheduling.queue_name.as_deref().unwrap_or_default()
                ),
            )
        } else {
            (
                reason::SUSPENDED,
                "job suspended; pods deleted, status kept".to_string(),
            )
        };
        sb.condition(condition::SUSPENDED, true, why, msg.clone());
        sb.condition(condition::RUNNING, false, why, msg.clone());
        sb.phase(JobPhase::Suspended, EventSeverity::Normal, why, msg);
        delete_alive(&mut actions, false);
        sb.status.start_time = None;
        sb.status.active = 0;
        // Resuming starts a fresh gang generation so that pods still terminating are not mixed
        // up with the new ones (bumped once: afterwards no pod has the new generation).
        let generation = sb.status.gang_generation;
        let has_current = obs
            .trainer_pods
            .iter()
            .any(|p| pod_generation(p) == Some(generation));
        if job.job_status().is_some_and(|s| s.gang_created) || has_current {
            sb.status.gang_generation += 1;
        }
        sb.status.gang_created = false;
        suspend_pool(job, obs, &mut actions)?;
        requeue_after = None;
        return Ok(finish(sb, actions, job_labels, requeue_after, obs));
    }
    if sb.is_true(condition::SUSPENDED) {
        sb.condition(condition::SUSPENDED, false, reason::RESUMED, "job resumed");
        sb.event(
            EventSeverity::Normal,
            reason::RESUMED,
            "job resumed; recreating the trainer gang",
        );
    }

    // ---- PodGroup and RolloutPool.
    if let Some(pg) = pod_group(job)? {
        if !sb.status.gang_created {
            actions.push(Action::Apply(Child::PodGroup(pg)));
        }
    }
    ensure_pool(job, obs, false, &mut actions)?;

    // ---- the gang.
    let generation = sb.status.gang_generation;
    let nodes = c.trainer.nodes;
    // Pods of an earlier incarnation, or of an earlier job with the same name (still being
    // garbage collected), are stale: their names must be free before the gang is (re)created.
    let uid = ident.owner.uid.clone();
    let (current, stale): (Vec<&Pod>, Vec<&Pod>) = obs.trainer_pods.iter().partition(|p| {
        pod_generation(p) == Some(generation) && p.owner_references().iter().any(|o| o.uid == uid)
    });

    // Permanent errors fail fast, whatever generation reported them.
    for p in &obs.trainer_pods {
        if let PodState::Failed {
            exit_code: Some(EXIT_PERMANENT),
            ..
        } = pod_state(p)
        {
            fail(
                &mut sb,
                reason::PERMANENT_ERROR,
                format!(
                    "pod {} exited with code {EXIT_PERMANENT} (permanent error: fix the spec or data, see its logs, then recreate the job)",
                    p.name_any()
                ),
            );
            delete_alive(&mut actions, true);
            suspend_pool(job, obs, &mut actions)?;
            return Ok(finish(sb, actions, job_labels, requeue_after, obs));
        }
    }

    let by_index: BTreeMap<i32, &Pod> = current
        .iter()
        .filter_map(|p| pod_index(p).map(|i| (i, *p)))
        .filter(|(i, _)| *i < nodes)
        .collect();
    let states: BTreeMap<i32, PodState> =
        by_index.iter().map(|(i, p)| (*i, pod_state(p))).collect();

    if states.len() == nodes as usize && states.values().all(|s| *s == PodState::Succeeded) {
        sb.status.completion_time = Some(Time(obs.now));
        sb.status.active = 0;
        sb.condition(
            condition::RUNNING,
            false,
            reason::SUCCEEDED,
            "all trainer pods completed",
        );
        sb.condition(
            condition::RESTARTING,
            false,
            reason::SUCCEEDED,
            "all trainer pods completed",
        );
        sb.condition(
            condition::SUCCEEDED,
            true,
            reason::SUCCEEDED,
            "all trainer pods completed",
        );
        sb.phase(
            JobPhase::Succeeded,
            EventSeverity::Normal,
            reason::SUCCEEDED,
            "training finished",
        );
        suspend_pool(job, obs, &mut actions)?;
        if let Some(ttl) = c.run_policy.ttl_seconds_after_finished {
            requeue_after = Some(Duration::from_secs(ttl.max(0) as u64));
        } else {
            requeue_after = None;
        }
        return Ok(finish(sb, actions, job_labels, requeue_after, obs));
    }

    // Gang failure: a failed or deleted member, or a member missing after the gang was created.
    let broken = states.iter().find_map(|(i, s)| match s {
        PodState::Failed { exit_code, reason } => Some(format!(
            "trainer pod {} failed ({reason}{})",
            names::trainer_pod(&ident.name, *i),
            exit_code
                .map(|c| format!(", exit code {c}"))
                .unwrap_or_default()
        )),
        PodState::Terminating => Some(format!(
            "trainer pod {} is being deleted",
            names::trainer_pod(&ident.name, *i)
        )),
        _ => None,
    });
    let broken = broken.or_else(|| {
        if sb.status.gang_created {
            (0..nodes).find(|i| !by_index.contains_key(i)).map(|i| {
                format!(
                    "trainer pod {} disappeared",
                    names::trainer_pod(&ident.name, i)
                )
            })
        } else {
            None
        }
    });
    if let Some(cause) = broken {
        let limit = c.run_policy.backoff_limit;
        if sb.status.restarts >= limit {
            fail(
                &mut sb,
                reason::BACKOFF_LIMIT_EXCEEDED,
                format!("{cause}; backoffLimit {limit} reached"),
            );
            delete_alive(&mut actions, true);
            suspend_pool(job, obs, &mut actions)?;
            return Ok(finish(sb, actions, job_labels, requeue_after, obs));
        }
        sb.status.restarts += 1;
        sb.status.gang_generation += 1;
        sb.status.gang_created = false;
        sb.status.active = 0;
        let msg = format!(
            "{cause}; restarting the whole gang from the last checkpoint (restart {}/{limit})",
            sb.status.restarts
        );
        sb.condition(
            condition::RESTARTING,
            true,
            reason::GANG_RESTART,
            msg.clone(),
        );
        sb.condition(condition::RUNNING, false, reason::GANG_RESTART, msg.clone());
        sb.status.phase = Some(JobPhase::Restarting);
        sb.event(EventSeverity::Warning, reason::GANG_RESTART, msg);
        delete_alive(&mut actions, false);
        return Ok(finish(sb, actions, job_labels, requeue_after, obs));
    }

    // Old-generation pods still around: delete them and wait (the names are reused).
    if !stale.is_empty() {
        for p in &stale {
            if pod_state(p) != PodState::Terminating {
                actions.push(Action::Delete {
                    kind: ChildKind::Pod,
                    name: p.name_any(),
                });
            }
        }
        return Ok(finish(sb, actions, job_labels, requeue_after, obs));
    }

    // Create the missing members of the current generation.
    let missing: Vec<i32> = (0..nodes).filter(|i| !by_index.contains_key(i)).collect();
    if !missing.is_empty() {
        for rank in &missing {
            actions.push(Action::Apply(Child::Pod(trainer_pod(
                &ident, job, *rank, generation,
            ))));
        }
        sb.status.gang_created = true;
        if sb.status.start_time.is_none() {
            sb.status.start_time = Some(Time(obs.now));
            if let Some(limit) = c.run_policy.active_deadline_seconds {
                requeue_after = Some(Duration::from_secs(limit as u64));
            }
        }
    }
    sb.status.gang_created = true;

    let running = states
        .values()
        .filter(|s| matches!(s, PodState::Running { .. } | PodState::Succeeded))
        .count();
    sb.status.active = states
        .values()
        .filter(|s| matches!(s, PodState::Running { .. }))
        .count() as i32;
    if missing.is_empty() && running == nodes as usize {
        sb.condition(
            condition::RESTARTING,
            false,
            reason::ALL_PODS_RUNNING,
            "gang running again",
        );
        sb.condition(
            condition::RUNNING,
            true,
            reason::ALL_PODS_RUNNING,
            format!("all {nodes} trainer pods running"),
        );
        sb.phase(
            JobPhase::Running,
            EventSeverity::Normal,
            reason::ALL_PODS_RUNNING,
            format!("all {nodes} trainer pods running"),
        );
    } else {
        let msg = format!("{running}/{nodes} trainer pods running");
        let phase = if sb.is_true(condition::RESTARTING) {
            JobPhase::Restarting
        } else {
            JobPhase::Starting
        };
        sb.phase(phase, EventSeverity::Normal, reason::STARTING, msg);
    }

    // Progress from rank 0 of the current gang.
    if let Some(p) = by_index.get(&0).and_then(|p| progress_from_pod(p)) {
        sb.status.progress = Some(p);
    }
    Ok(finish(sb, actions, job_labels, requeue_after, obs))
}

fn fail(sb: &mut StatusBuilder, why: &str, msg: String) {
    sb.status.completion_time = Some(sb.now.clone());
    sb.status.active = 0;
    sb.condition(condition::RUNNING, false, why, msg.clone());
    sb.condition(condition::RESTARTING, false, why, msg.clone());
    sb.condition(condition::FAILED, true, why, msg.clone());
    sb.phase(JobPhase::Failed, EventSeverity::Warning, why, msg);
}

/// Desired RolloutPool of a GRPOJob, applied when missing or when it differs.
fn ensure_pool<J: TrainingJob>(
    job: &J,
    obs: &Observed,
    suspend: bool,
    actions: &mut Vec<Action>,
) -> Result<(), PlanError> {
    let Some(grpo) = as_grpo(job) else {
        return Ok(());
    };
    let wanted = grpo.spec.rollout.replicas;
    let replicas = match &obs.rollout_pool {
        None => wanted,
        Some(pool) => {
            // `kubectl scale`/HPA own the pool's replicas; only a change of the job's own field
            // (recorded in the annotation) is propagated again.
            let propagated = pool
                .annotations()
                .get(labels::JOB_REPLICAS)
                .and_then(|v| v.parse::<i32>().ok());
            if propagated == Some(wanted) {
                pool.spec.replicas
            } else {
                wanted
            }
        }
    };
    let desired = rollout_pool_for(&grpo, replicas, suspend)?;
    let differs = match &obs.rollout_pool {
        None => true,
        Some(pool) => {
            pool.spec != desired.spec
                || pool.annotations().get(labels::JOB_REPLICAS)
                    != desired.annotations().get(labels::JOB_REPLICAS)
        }
    };
    if differs {
        actions.push(Action::Apply(Child::RolloutPool(desired)));
    }
    Ok(())
}

fn suspend_pool<J: TrainingJob>(
    job: &J,
    obs: &Observed,
    actions: &mut Vec<Action>,
) -> Result<(), PlanError> {
    if obs.rollout_pool.is_some() {
        ensure_pool(job, obs, true, actions)?;
    }
    Ok(())
}

fn as_grpo<J: TrainingJob>(job: &J) -> Option<GRPOJob> {
    if J::KIND != JobKind::GRPOJob {
        return None;
    }
    // Round-trip through JSON: J is GRPOJob here, the trait just cannot say so statically.
    serde_json::to_value(job)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
}

fn finish(
    mut sb: StatusBuilder,
    actions: Vec<Action>,
    job_labels: BTreeMap<String, String>,
    requeue_after: Option<Duration>,
    obs: &Observed,
) -> Plan {
    if let Some(p) = &sb.status.progress {
        sb.status.step_progress = Some(match p.total_steps {
            Some(t) => format!("{}/{t}", p.step),
            None => format!("{}", p.step),
        });
    }
    if let Some(pool) = &obs.rollout_pool {
        sb.status.rollout_ready_replicas = pool.status.as_ref().map(|s| s.ready_replicas);
    }
    Plan {
        actions,
        status: sb.status,
        events: sb.events,
        job_labels,
        requeue_after,
    }
}

// ---------------------------------------------------------------------------------------------
// The RolloutPool planner
// ---------------------------------------------------------------------------------------------

/// Result of planning one RolloutPool reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolPlan {
    /// Pods to create (server-side apply).
    pub create: Vec<Pod>,
    /// Pod names to delete.
    pub delete: Vec<String>,
    /// New status.
    pub status: RolloutPoolStatus,
}

/// Keep `spec.replicas` (0 when suspended) interchangeable workers `<pool>-0..N-1`: replace
/// finished ones, remove the highest indices on scale-down.
pub fn plan_pool(pool: &RolloutPool, pods: &[Pod]) -> Result<PoolPlan, PlanError> {
    let name = pool.meta().name.clone().ok_or(PlanError::MissingMetadata {
        kind: "RolloutPool",
        field: "name",
    })?;
    let desired = if pool.spec.suspend {
        0
    } else {
        pool.spec.replicas.max(0)
    };
    let mut create = vec![];
    let mut delete = vec![];
    let mut taken = BTreeSet::new();
    let (mut replicas, mut ready) = (0, 0);
    for p in pods {
        let state = pod_state(p);
        let idx = pod_index(p);
        if let Some(i) = idx {
            taken.insert(i);
        }
        if state == PodState::Terminating {
            continue;
        }
        let in_range = idx.is_some_and(|i| i < desired);
        let finished = matches!(state, PodState::Succeeded | PodState::Failed { .. });
        if !in_range || finished {
            delete.push(p.name_any());
            continue;
        }
        replicas += 1;
        if state == (PodState::Running { ready: true }) {
            ready += 1;
        }
    }
    for i in 0..desired {
        if !taken.contains(&i) {
            create.push(rollout_pod(pool, i)?);
        }
    }
    let status = RolloutPoolStatus {
        replicas,
        ready_replicas: ready,
        selector: selector_string(&pool_selector(&name, &pool.spec.job_name)),
        observed_generation: pool.meta().generation,
    };
    Ok(PoolPlan {
        create,
        delete,
        status,
    })
}
