//! Table tests of the planner: no API server, only the public API the controller and the local
//! runner use.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};
use onevision_operator::api::*;
use onevision_operator::job::{AnyJob, TrainingJob};
use onevision_operator::planner::{
    self, condition, names, plan, plan_pool, reason, Action, Child, ChildKind, EventSeverity,
    Observed, Plan,
};
use onevision_operator::{env, labels, EXIT_PERMANENT};

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_750_000_000 + s).unwrap()
}

fn base_hparams() -> Hyperparameters {
    Hyperparameters {
        learning_rate: 1e-5,
        global_batch_size: 16,
        ..Default::default()
    }
}

fn sft(name: &str, nodes: i32, gpus: i32) -> SFTJob {
    let mut job = SFTJob::new(
        name,
        SFTJobSpec {
            model: ModelSource {
                path: Some("/data/models/qwen".into()),
                from_sft_job: None,
            },
            dataset: PathSpec {
                path: "/data/train.jsonl".into(),
            },
            output: PathSpec {
                path: format!("/data/out/{name}"),
            },
            storage: Some(StorageSpec {
                persistent_volume_claim: PvcRef {
                    claim_name: "training-data".into(),
                    read_only: false,
                },
                mount_path: "/data".into(),
            }),
            trainer: TrainerSpec {
                nodes,
                gpus_per_node: gpus,
                image: "onevision:test".into(),
                master_port: 29500,
                coordinator_port: 50051,
                ..Default::default()
            },
            hyperparameters: base_hparams(),
            eval: EvalSpec::default(),
            checkpoint: CheckpointSpec::default(),
            run_policy: RunPolicy::default(),
            scheduling: SchedulingSpec::default(),
        },
    );
    job.metadata.namespace = Some("team".into());
    job.metadata.uid = Some(format!("uid-{name}"));
    job.metadata.generation = Some(1);
    job.metadata.creation_timestamp = Some(Time(at(0)));
    job
}

fn grpo(name: &str, replicas: i32) -> GRPOJob {
    let s = sft(name, 2, 8);
    let mut job = GRPOJob::new(
        name,
        GRPOJobSpec {
            model: s.spec.model,
            dataset: s.spec.dataset,
            output: s.spec.output,
            storage: s.spec.storage,
            trainer: s.spec.trainer,
            rollout: RolloutSpec {
                replicas,
                gpus_per_replica: 1,
                batch_size: 8,
                ..Default::default()
            },
            grpo: GrpoSpec {
                group_size: 8,
                kl_beta: 0.04,
                clip_epsilon: 0.2,
                epsilon_high: None,
                temperature: 0.9,
                top_p: 1.0,
                max_new_tokens: 1024,
                rewards: vec![RewardSpec {
                    name: "accuracy".into(),
                    weight: 1.0,
                }],
                loss_aggregation: LossAggregation::TokenMean,
                kl_estimator: KlEstimator::K3,
                iterations_per_batch: 1,
                max_staleness: 0,
                scale_rewards: true,
                dynamic_sampling: None,
            },
            hyperparameters: s.spec.hyperparameters,
            eval: EvalSpec::default(),
            checkpoint: CheckpointSpec::default(),
            run_policy: RunPolicy::default(),
            scheduling: SchedulingSpec::default(),
        },
    );
    job.metadata = s.metadata;
    job
}

/// The controller's loop in miniature: store the new status on the job.
fn commit<J: TrainingJob>(job: &mut J, plan: &Plan) {
    *job.job_status_mut() = Some(plan.status.clone());
}

fn created_pods(plan: &Plan) -> Vec<Pod> {
    plan.applied(ChildKind::Pod)
        .map(|c| match c {
            Child::Pod(p) => p.clone(),
            _ => unreachable!(),
        })
        .collect()
}

fn env_of(pod: &Pod) -> BTreeMap<String, String> {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
        .collect()
}

/// The container port named `name` of the pod's only container.
fn container_port(pod: &Pod, name: &str) -> Option<i32> {
    pod.spec.as_ref()?.containers[0]
        .ports
        .as_ref()?
        .iter()
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port)
}

fn with_phase(mut pod: Pod, phase: &str) -> Pod {
    pod.status = Some(PodStatus {
        phase: Some(phase.into()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: if phase == "Running" { "True" } else { "False" }.into(),
            ..Default::default()
        }]),
        ..Default::default()
    });
    pod
}

fn exited(mut pod: Pod, code: i32) -> Pod {
    pod.status = Some(PodStatus {
        phase: Some(if code == 0 { "Succeeded" } else { "Failed" }.into()),
        container_statuses: Some(vec![ContainerStatus {
            name: "trainer".into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..Default::default()
    });
    pod
}

fn terminating(mut pod: Pod) -> Pod {
    pod.metadata.deletion_timestamp = Some(Time(at(1)));
    pod
}

fn observed(pods: Vec<Pod>, now: i64) -> Observed {
    let mut o = Observed::empty(at(now));
    o.trainer_pods = pods;
    o
}

/// A world where the Service and ConfigMap already exist.
fn settled<J: TrainingJob>(job: &J, pods: Vec<Pod>, now: i64) -> Observed {
    let mut o = observed(pods, now);
    o.service = Some(planner::headless_service(job).unwrap());
    o.config_map = Some(planner::job_config_map(job, "/data/models/qwen").unwrap());
    if let Some(rbac) = planner::worker_rbac(job).unwrap() {
        o.worker_service_account = Some(rbac.service_account);
        o.worker_role = Some(rbac.role);
        o.worker_role_binding = Some(rbac.role_binding);
    }
    o
}

/// Names of the applied children of a kind, in plan order.
fn applied_names(plan: &Plan, kind: ChildKind) -> Vec<String> {
    plan.applied(kind).map(|c| c.name()).collect()
}

/// Position of the first action applying a child of `kind`.
fn first_apply(plan: &Plan, kind: ChildKind) -> usize {
    plan.actions
        .iter()
        .position(|a| matches!(a, Action::Apply(c) if c.kind() == kind))
        .unwrap_or_else(|| panic!("no {kind:?} applied: {:?}", plan.actions))
}

#[test]
fn trainer_pods_get_a_per_job_worker_account_allowed_to_patch_rank0_only() {
    let job = sft("r1ov", 2, 8);
    let p = plan(&job, &Observed::empty(at(1))).unwrap();
    for kind in [
        ChildKind::ServiceAccount,
        ChildKind::Role,
        ChildKind::RoleBinding,
    ] {
        assert_eq!(applied_names(&p, kind), ["r1ov-worker"], "{kind:?}");
        // The API server refuses pods whose ServiceAccount does not exist yet.
        assert!(
            first_apply(&p, kind) < first_apply(&p, ChildKind::Pod),
            "{kind:?}"
        );
    }
    let mut role = None;
    let mut binding = None;
    for c in &p.actions {
        let Action::Apply(c) = c else { continue };
        let meta = match c {
            Child::ServiceAccount(o) => &o.metadata,
            Child::Role(o) => {
                role = Some(o.clone());
                &o.metadata
            }
            Child::RoleBinding(o) => {
                binding = Some(o.clone());
                &o.metadata
            }
            _ => continue,
        };
        assert_eq!(meta.namespace.as_deref(), Some("team"));
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("SFTJob", "uid-r1ov", Some(true)),
            "garbage-collected with the job"
        );
        let l = meta.labels.as_ref().unwrap();
        assert_eq!(l[labels::JOB_NAME], "r1ov");
        assert_eq!(l[labels::JOB_KIND], "SFTJob");
    }
    let rules = role.unwrap().rules.unwrap();
    assert_eq!(rules.len(), 1);
    let r = &rules[0];
    assert_eq!(r.api_groups.as_deref(), Some(&[String::new()][..]));
    assert_eq!(r.resources.as_deref(), Some(&["pods".to_string()][..]));
    assert_eq!(r.verbs, ["get", "patch"]);
    assert_eq!(
        r.resource_names.as_deref(),
        Some(&["r1ov-trainer-0".to_string()][..]),
        "only rank 0's pod, whose name every gang generation reuses"
    );
    let b = binding.unwrap();
    assert_eq!(
        (
            b.role_ref.api_group.as_str(),
            b.role_ref.kind.as_str(),
            b.role_ref.name.as_str()
        ),
        ("rbac.authorization.k8s.io", "Role", "r1ov-worker")
    );
    let s = &b.subjects.unwrap()[0];
    assert_eq!(
        (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()),
        ("ServiceAccount", "r1ov-worker", Some("team"))
    );
    for pod in created_pods(&p) {
        assert_eq!(
            pod.spec.unwrap().service_account_name.as_deref(),
            Some("r1ov-worker")
        );
    }
    // The same pods for the local runner.
    for pod in planner::trainer_pods(&job, 0).unwrap() {
        assert_eq!(
            pod.spec.unwrap().service_account_name.as_deref(),
            Some("r1ov-worker")
        );
    }
}

#[test]
fn worker_rbac_is_reapplied_only_when_missing_altered_or_not_ours() {
    let (mut job, pods) = running_job(1);
    let p = plan(&job, &settled(&job, pods.clone(), 3)).unwrap();
    commit(&mut job, &p);
    let quiet = settled(&job, pods.clone(), 4);
    assert!(plan(&job, &quiet).unwrap().actions.is_empty());

    // Someone widened the Role: put back.
    let mut obs = quiet.clone();
    obs.worker_role.as_mut().unwrap().rules.as_mut().unwrap()[0]
        .verbs
        .push("delete".into());
    let p = plan(&job, &obs).unwrap();
    assert_eq!(applied_names(&p, ChildKind::Role), ["llava-worker"]);
    assert_eq!(p.actions.len(), 1, "{:?}", p.actions);

    // The RoleBinding was deleted: recreated.
    let mut obs = quiet.clone();
    obs.worker_role_binding = None;
    let p = plan(&job, &obs).unwrap();
    assert_eq!(applied_names(&p, ChildKind::RoleBinding), ["llava-worker"]);

    // A ServiceAccount of an earlier job with the same name (being garbage-collected): adopted by
    // applying it with this job as owner, or it would vanish under the running pods.
    let mut obs = quiet;
    obs.worker_service_account
        .as_mut()
        .unwrap()
        .metadata
        .owner_references = Some(vec![OwnerReference {
        api_version: API_VERSION.into(),
        kind: "SFTJob".into(),
        name: "llava".into(),
        uid: "uid-of-an-earlier-llava".into(),
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    let p = plan(&job, &obs).unwrap();
    assert_eq!(
        applied_names(&p, ChildKind::ServiceAccount),
        ["llava-worker"]
    );
}

#[test]
fn service_account_name_opts_out_of_the_worker_rbac() {
    let mut job = grpo("own", 2);
    job.spec.trainer.service_account_name = Some("mine".into());
    assert_eq!(planner::worker_rbac(&job).unwrap(), None);
    let p = plan(&job, &Observed::empty(at(1))).unwrap();
    for kind in [
        ChildKind::ServiceAccount,
        ChildKind::Role,
        ChildKind::RoleBinding,
    ] {
        assert!(
            applied_names(&p, kind).is_empty(),
            "{kind:?}: {:?}",
            p.actions
        );
    }
    for pod in created_pods(&p) {
        assert_eq!(
            pod.spec.unwrap().service_account_name.as_deref(),
            Some("mine")
        );
    }
    let pool = pool_of(&p).expect("rollout pool");
    assert_eq!(pool.spec.service_account_name.as_deref(), Some("mine"));

    // Without it, rollout workers (which never call the API) do not get the worker account.
    let job = grpo("rl", 2);
    let p = plan(&job, &Observed::empty(at(1))).unwrap();
    assert_eq!(applied_names(&p, ChildKind::Role), ["rl-worker"]);
    let mut pool = pool_of(&p).expect("rollout pool");
    assert_eq!(pool.spec.service_account_name, None);
    pool.metadata.uid = Some("uid-pool".into());
    for pod in planner::rollout_pods(&pool).unwrap() {
        assert_eq!(pod.spec.unwrap().service_account_name, None);
    }
}

fn cond<'a>(
    st: &'a JobStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    st.conditions.iter().find(|c| c.type_ == type_)
}

fn is_true(st: &JobStatus, type_: &str) -> bool {
    cond(st, type_).is_some_and(|c| c.status == "True")
}

/// Start a job and return it with its running gang (status committed).
fn running_job(nodes: i32) -> (SFTJob, Vec<Pod>) {
    let mut job = sft("llava", nodes, 8);
    let p = plan(&job, &Observed::empty(at(1))).unwrap();
    commit(&mut job, &p);
    let pods: Vec<Pod> = created_pods(&p)
        .into_iter()
        .map(|p| with_phase(p, "Running"))
        .collect();
    let p = plan(&job, &observed(pods.clone(), 2)).unwrap();
    commit(&mut job, &p);
    assert_eq!(job.status.as_ref().unwrap().phase, Some(JobPhase::Running));
    (job, pods)
}

#[test]
fn new_sft_job_creates_config_map_service_and_gang() {
    let job = sft("r1ov", 2, 8);
    let p = plan(&job, &Observed::empty(at(1))).unwrap();

    let svc = p
        .applied(ChildKind::Service)
        .map(|c| match c {
            Child::Service(s) => s.clone(),
            _ => unreachable!(),
        })
        .next()
        .expect("service");
    assert_eq!(svc.name_any(), "r1ov-trainer");
    let spec = svc.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));

    let cm = p
        .applied(ChildKind::ConfigMap)
        .map(|c| match c {
            Child::ConfigMap(c) => c.clone(),
            _ => unreachable!(),
        })
        .next()
        .expect("configmap");
    let file = &cm.data.unwrap()[env::JOB_SPEC_FILE];
    let parsed = AnyJob::from_yaml(file).expect("job file parses back");
    assert_eq!(parsed.kind(), JobKind::SFTJob);
    assert_eq!(parsed.model_path(), Some("/data/models/qwen"));
    assert!(
        !file.contains("status"),
        "job file carries no status: {file}"
    );

    let pods = created_pods(&p);
    assert_eq!(
        pods.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["r1ov-trainer-0", "r1ov-trainer-1"]
    );
    for (rank, pod) in pods.iter().enumerate() {
        let e = env_of(pod);
        assert_eq!(e[env::MASTER_ADDR], "r1ov-trainer-0.r1ov-trainer.team.svc");
        assert_eq!(e[env::MASTER_PORT], "29500");
        assert_eq!(e[env::WORLD_SIZE], "16");
        assert_eq!(e[env::NNODES], "2");
        assert_eq!(e[env::NPROC_PER_NODE], "8");
        assert_eq!(e[env::NODE_RANK], rank.to_string());
        assert_eq!(e[env::RANK], rank.to_string());
        assert_eq!(e[env::JOB_NAME], "r1ov");
        assert_eq!(e[env::JOB_KIND], "SFTJob");
        assert_eq!(e[env::ROLE], "trainer");
        assert_eq!(
            e[env::COORDINATOR],
            "r1ov-trainer-0.r1ov-trainer.team.svc:50051"
        );
        assert_eq!(e[env::JOB_SPEC], "/etc/onevision/job.yaml");
        assert_eq!(e[env::RESTART_COUNT], "0");
        assert_eq!(e[env::METRICS_ADDR], "0.0.0.0:9400");
        assert_eq!(
            container_port(pod, planner::METRICS_PORT_NAME),
            Some(planner::METRICS_PORT),
            "the PodMonitor scrapes the port named metrics"
        );
        assert_eq!(container_port(pod, "coordinator"), Some(50051));
        // The per-GPU launcher's ranks 1..8 listen on MASTER_PORT + i, declared by name for the
        // chart's NetworkPolicy.
        assert_eq!(container_port(pod, "rendezvous"), Some(29500));
        for i in 1..8 {
            assert_eq!(
                container_port(pod, &planner::ring_port_name(i)),
                Some(29500 + i)
            );
        }
        assert_eq!(container_port(pod, &planner::ring_port_name(8)), None);
        let all = pod.spec.as_ref().unwrap().containers[0]
            .env
            .as_ref()
            .unwrap();
        let pod_ip = all.iter().find(|v| v.name == env::POD_IP).unwrap();
        assert_eq!(
            pod_ip
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "status.podIP"
        );

        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            spec.hostname.as_deref(),
            Some(format!("r1ov-trainer-{rank}").as_str())
        );
        assert_eq!(spec.subdomain.as_deref(), Some("r1ov-trainer"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let c = &spec.containers[0];
        assert_eq!(
            c.command.as_ref().unwrap(),
            &["onevision", "trainer", "--job", "/etc/onevision/job.yaml"]
        );
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"].0,
            "8"
        );
        let mounts: Vec<_> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert!(
            mounts.contains(&"/data") && mounts.contains(&"/etc/onevision"),
            "{mounts:?}"
        );
        let claim = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find_map(|v| v.persistent_volume_claim.as_ref())
            .unwrap();
        assert_eq!(claim.claim_name, "training-data");

        let l = pod.labels();
        assert_eq!(l[labels::JOB_NAME], "r1ov");
        assert_eq!(l[labels::ROLE], "trainer");
        assert_eq!(l[labels::REPLICA_INDEX], rank.to_string());
        let owner = &pod.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("SFTJob", "uid-r1ov", Some(true))
        );
    }

    assert_eq!(p.status.phase, Some(JobPhase::Starting));
    assert!(p.status.gang_created);
    assert!(is_true(&p.status, condition::CREATED));
    assert_eq!(p.status.start_time, Some(Time(at(1))));
    assert_eq!(p.status.observed_generation, Some(1));
    assert_eq!(
        p.events
            .iter()
            .filter(|e| e.reason == reason::CREATED)
            .count(),
        1
    );
}

#[test]
fn running_copies_progress_from_rank0_and_is_quiet_when_unchanged() {
    let (mut job, mut pods) = running_job(2);
    let st = job.status.clone().unwrap();
    assert!(is_true(&st, condition::RUNNING));
    assert_eq!(st.active, 2);

    pods[0].annotations_mut().insert(
        labels::PROGRESS.into(),
        r#"{"step":10,"totalSteps":100,"loss":0.5,"accuracy":0.25}"#.into(),
    );
    let p = plan(&job, &observed(pods.clone(), 3)).unwrap();
    let progress = p.status.progress.clone().unwrap();
    assert_eq!(
        (progress.step, progress.total_steps, progress.loss),
        (10, Some(100), Some(0.5))
    );
    assert_eq!(p.status.step_progress.as_deref(), Some("10/100"));
    commit(&mut job, &p);

    // Same world again: nothing to do, nothing to say.
    let p = plan(&job, &settled(&job, pods.clone(), 4)).unwrap();
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert!(p.events.is_empty(), "{:?}", p.events);
    assert_eq!(Some(&p.status), job.status.as_ref());

    // A malformed annotation is ignored, the last progress kept.
    pods[0]
        .annotations_mut()
        .insert(labels::PROGRESS.into(), "not json".into());
    let p = plan(&job, &observed(pods, 5)).unwrap();
    assert_eq!(p.status.progress.unwrap().step, 10);
}

#[test]
fn deleted_trainer_pod_restarts_the_whole_gang_once() {
    let (mut job, pods) = running_job(3);
    // The user deletes rank 1: it is gone from the list.
    let remaining = vec![pods[0].clone(), pods[2].clone()];
    let p = plan(&job, &observed(remaining.clone(), 10)).unwrap();
    assert_eq!(p.status.restarts, 1);
    assert_eq!(p.status.phase, Some(JobPhase::Restarting));
    assert!(is_true(&p.status, condition::RESTARTING));
    assert!(!is_true(&p.status, condition::RUNNING));
    let mut deleted = p.deleted(ChildKind::Pod);
    deleted.sort();
    assert_eq!(deleted, ["llava-trainer-0", "llava-trainer-2"]);
    assert!(created_pods(&p).is_empty());
    let ev: Vec<_> = p
        .events
        .iter()
        .filter(|e| e.reason == reason::GANG_RESTART)
        .collect();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].severity, EventSeverity::Warning);
    assert!(
        ev[0].message.contains("llava-trainer-1"),
        "{}",
        ev[0].message
    );
    commit(&mut job, &p);

    // Old pods still terminating: no second restart, no creation (names are still taken).
    let dying: Vec<Pod> = remaining.into_iter().map(terminating).collect();
    let p = plan(&job, &observed(dying, 11)).unwrap();
    assert_eq!(p.status.restarts, 1);
    assert!(p
        .actions
        .iter()
        .all(|a| !matches!(a, Action::Apply(Child::Pod(_)))));
    assert!(p.deleted(ChildKind::Pod).is_empty());
    commit(&mut job, &p);

    // All gone: a fresh generation is created, told it is a restart.
    let p = plan(&job, &observed(vec![], 12)).unwrap();
    let fresh = created_pods(&p);
    assert_eq!(fresh.len(), 3);
    for pod in &fresh {
        assert_eq!(pod.annotations()[labels::GANG_GENERATION], "1");
        assert_eq!(env_of(pod)[env::RESTART_COUNT], "1");
    }
    assert_eq!(p.status.restarts, 1);
    commit(&mut job, &p);

    let running: Vec<Pod> = fresh
        .into_iter()
        .map(|p| with_phase(p, "Running"))
        .collect();
    let p = plan(&job, &observed(running, 13)).unwrap();
    assert_eq!(p.status.phase, Some(JobPhase::Running));
    assert!(!is_true(&p.status, condition::RESTARTING));
    assert_eq!(p.status.restarts, 1);
}

#[test]
fn failed_pod_restarts_until_backoff_limit() {
    let (mut job, pods) = running_job(2);
    job.spec.run_policy.backoff_limit = 1;
    let failed = vec![pods[0].clone(), exited(pods[1].clone(), 1)];
    let p = plan(&job, &observed(failed, 10)).unwrap();
    assert_eq!(p.status.restarts, 1);
    assert_eq!(
        p.deleted(ChildKind::Pod),
        ["llava-trainer-0", "llava-trainer-1"]
    );
    commit(&mut job, &p);
    // Second gang fails as well: the limit (1) is reached.
    let p = plan(&job, &observed(vec![], 11)).unwrap();
    commit(&mut job, &p);
    let gang: Vec<Pod> = created_pods(&p);
    let failed = vec![
        with_phase(gang[0].clone(), "Running"),
        exited(gang[1].clone(), 137),
    ];
    let p = plan(&job, &observed(failed, 12)).unwrap();
    assert_eq!(p.status.phase, Some(JobPhase::Failed));
    assert_eq!(p.status.restarts, 1);
    let f = cond(&p.status, condition::FAILED).unwrap();
    assert_eq!(
        (f.status.as_str(), f.reason.as_str()),
        ("True", reason::BACKOFF_LIMIT_EXCEEDED)
    );
    assert!(f.message.contains("exit code 137"), "{}", f.message);
    assert_eq!(
        p.deleted(ChildKind::Pod),
        ["llava-trainer-0"],
        "the surviving rank is stopped"
    );
    assert_eq!(p.status.completion_time, Some(Time(at(12))));
}

#[test]
fn permanent_exit_code_fails_fast_without_restart() {
    let (job, pods) = running_job(2);
    let p = plan(
        &job,
        &observed(
            vec![pods[0].clone(), exited(pods[1].clone(), EXIT_PERMANENT)],
            10,
        ),
    )
    .unwrap();
    assert_eq!(p.status.phase, Some(JobPhase::Failed));
    assert_eq!(p.status.restarts, 0);
    assert_eq!(
        cond(&p.status, condition::FAILED).unwrap().reason,
        reason::PERMANENT_ERROR
    );
    assert_eq!(p.deleted(ChildKind::Pod), ["llava-trainer-0"]);
    assert!(p
        .events
        .iter()
        .any(|e| e.reason == reason::PERMANENT_ERROR && e.severity == EventSeverity::Warning));
}

#[test]
fn success_then_ttl_deletes_the_job() {
    let (mut job, pods) = running_job(2);
    job.spec.run_policy.ttl_seconds_after_finished = Some(60);
    let done: Vec<Pod> = pods.into_iter().map(|p| exited(p, 0)).collect();
    let p = plan(&job, &settled(&job, done.clone(), 100)).unwrap();
    assert_eq!(p.status.phase, Some(JobPhase::Succeeded));
    assert!(is_true(&p.status, condition::SUCCEEDED));
    assert_eq!(p.status.completion_time, Some(Time(at(100))));
    assert!(
        p.actions.is_empty(),
        "finished pods are kept for their logs: {:?}",
        p.actions
    );
    commit(&mut job, &p);

    let p = plan(&job, &observed(done.clone(), 130)).unwrap();
    assert!(!p.actions.contains(&Action::DeleteJob));
    assert_eq!(p.requeue_after, Some(std::time::Duration::from_secs(30)));
    assert!(p.events.is_empty());
    let p = plan(&job, &observed(done, 160)).unwrap();
    assert!(p.actions.contains(&Action::DeleteJob));
}

#[test]
fn active_deadline_fails_the_job() {
    let (mut job, pods) = running_job(1);
    job.spec.run_policy.active_deadline_seconds = Some(50);
    let p = plan(&job, &observed(pods.clone(), 20)).unwrap();
    assert_eq!(p.status.phase, Some(JobPhase::Running));
    assert_eq!(
        p.requeue_after,
        Some(std::time::Duration::from_secs(31)),
        "start was t=1"
    );
    let p = plan(&job, &observed(pods, 51)).unwrap();
    assert_eq!(p.status.phase, Some(JobPhase::Failed));
    assert_eq!(
        cond(&p.status, condition::FAILED).unwrap().reason,
        reason::DEADLINE_EXCEEDED
    );
    assert_eq!(p.deleted(ChildKind::Pod), ["llava-trainer-0"]);
}

#[test]
fn suspend_deletes_pods_keeps_status_and_resume_recreates() {
    let (mut job, mut pods) = running_job(2);
    pods[0]
        .annotations_mut()
        .insert(labels::PROGRESS.into(), r#"{"step":7}"#.into());
    let p = plan(&job, &observed(pods.clone(), 5)).unwrap();
    commit(&mut job, &p);

    job.spec.run_policy.suspend = Some(true);
    let p = plan(&job, &observed(pods.clone(), 6)).unwrap();
    assert_eq!(p.status.phase, Some(JobPhase::Suspended));
    assert!(is_true(&p.status, condition::SUSPENDED));
    assert_eq!(p.deleted(ChildKind::Pod).len(), 2);
    assert_eq!(p.status.progress.as_ref().unwrap().step, 7, "progress kept");
    assert_eq!(p.status.restarts, 0, "suspension is not a restart");
    assert!(p.events.iter().any(|e| e.reason == reason::SUSPENDED));
    commit(&mut job, &p);

    // Resume while the old pods are still terminating: they are stale, nothing restarts.
    job.spec.run_policy.suspend = Some(false);
    let dying: Vec<Pod> = pods.into_iter().map(terminating).collect();
    let p = plan(&job, &observed(dying, 7)).unwrap();
    assert_eq!(p.status.restarts, 0);
    assert!(created_pods(&p).is_empty());
    let s = cond(&p.status, condition::SUSPENDED).unwrap();
    assert_eq!(
        (s.status.as_str(), s.reason.as_str()),
        ("False", reason::RESUMED)
    );
    assert!(p.events.iter().any(|e| e.reason == reason::RESUMED));
    commit(&mut job, &p);

    let p = plan(&job, &observed(vec![], 8)).unwrap();
    let fresh = created_pods(&p);
    assert_eq!(fresh.len(), 2);
    assert_eq!(fresh[0].annotations()[labels::GANG_GENERATION], "1");
    assert_eq!(p.status.restarts, 0);
    assert_eq!(
        p.status.start_time,
        Some(Time(at(8))),
        "deadline clock restarts on resume"
    );
}

#[test]
fn queue_name_waits_for_admission() {
    let mut job = sft("queued", 2, 8);
    job.spec.scheduling.queue_name = Some("team-a".into());
    let p = plan(&job, &Observed::empty(at(1))).unwrap();
    assert_eq!(p.status.phase, Some(JobPhase::Suspended));
    assert_eq!(
        cond(&p.status, condition::SUSPENDED).unwrap().reason,
        reason::WAITING_FOR_ADMISSION
    );
    assert!(created_pods(&p).is_empty());
    assert_eq!(p.job_labels[labels::KUEUE_QUEUE_NAME], "team-a");
    commit(&mut job, &p);
    // Kueue admits by setting suspend: false.
    job.spec.run_policy.suspend = Some(false);
    let p = plan(&job, &Observed::empty(at(2))).unwrap();
    assert_eq!(created_pods(&p).len(), 2);
    assert_eq!(p.status.phase, Some(JobPhase::Starting));
}

#[test]
fn from_sft_job_waits_then_uses_its_output() {
    let mut source = sft("base-sft", 1, 8);
    let mut job = grpo("rl", 2);
    job.spec.model = ModelSource {
        from_sft_job: Some("base-sft".into()),
        path: None,
    };

    let p = plan(&job, &Observed::empty(at(1))).unwrap();
    assert_eq!(p.status.phase, Some(JobPhase::WaitingForSFTJob));
    assert!(
        p.actions.is_empty(),
        "nothing is created before the model exists: {:?}",
        p.actions
    );
    assert!(p
        .events
        .iter()
        .any(|e| e.reason == reason::WAITING_FOR_SFT_JOB));
    commit(&mut job, &p);

    source.status = Some(JobStatus {
        phase: Some(JobPhase::Running),
        ..Default::default()
    });
    let mut obs = Observed::empty(at(2));
    obs.source_sft_job = Some(source.clone());
    let p = plan(&job, &obs).unwrap();
    assert_eq!(p.status.phase, Some(JobPhase::WaitingForSFTJob));
    assert!(p.events.is_empty(), "still waiting: no new event");
    assert!(cond(&p.status, condition::CREATED)
        .unwrap()
        .message
        .contains("Running"));

    source.status = Some(JobStatus {
        phase: Some(JobPhase::Succeeded),
        ..Default::default()
    });
    obs.source_sft_job = Some(source);
    let p = plan(&job, &obs).unwrap();
    assert_eq!(p.status.model_path.as_deref(), Some("/data/out/base-sft"));
    let cm = p
        .applied(ChildKind::ConfigMap)
        .find_map(|c| match c {
            Child::ConfigMap(c) => Some(c.clone()),
            _ => None,
        })
        .unwrap();
    let parsed = AnyJob::from_yaml(&cm.data.unwrap()[env::JOB_SPEC_FILE]).unwrap();
    assert_eq!(parsed.model_path(), Some("/data/out/base-sft"));
    assert_eq!(created_pods(&p).len(), 2);
    commit(&mut job, &p);
    // The resolved path sticks even if the source SFTJob is deleted later.
    let p = plan(&job, &Observed::empty(at(3))).unwrap();
    assert_eq!(p.status.model_path.as_deref(), Some("/data/out/base-sft"));
    assert_ne!(p.status.phase, Some(JobPhase::WaitingForSFTJob));
}

fn pool_of(plan: &Plan) -> Option<RolloutPool> {
    plan.applied(ChildKind::RolloutPool).find_map(|c| match c {
        Child::RolloutPool(p) => Some(p.clone()),
        _ => None,
    })
}

#[test]
fn grpo_job_owns_a_rollout_pool_whose_scale_is_respected() {
    let mut job = grpo("rl", 4);
    let p = plan(&job, &Observed::empty(at(1))).unwrap();
    let pool = pool_of(&p).expect("pool created");
    assert_eq!(pool.name_any(), "rl-rollout");
    assert_eq!(pool.spec.replicas, 4);
    assert!(!pool.spec.suspend);
    assert_eq!(
        pool.spec.coordinator,
        "rl-trainer-0.rl-trainer.team.svc:50051"
    );
    assert_eq!(pool.spec.job_spec_config_map, "rl-spec");
    assert_eq!(pool.owner_references()[0].kind, "GRPOJob");
    commit(&mut job, &p);

    // `kubectl scale rp rl-rollout --replicas 2`: the operator leaves it alone.
    let mut scaled = pool.clone();
    scaled.spec.replicas = 2;
    scaled.status = Some(RolloutPoolStatus {
        replicas: 2,
        ready_replicas: 2,
        ..Default::default()
    });
    let mut obs = Observed::empty(at(2));
    obs.rollout_pool = Some(scaled.clone());
    let p = plan(&job, &obs).unwrap();
    assert!(pool_of(&p).is_none(), "scale owned by kubectl/HPA");
    assert_eq!(p.status.rollout_ready_replicas, Some(2));

    // Editing the job's own replicas propagates again.
    job.spec.rollout.replicas = 6;
    let p = plan(&job, &obs).unwrap();
    let pool = pool_of(&p).unwrap();
    assert_eq!(pool.spec.replicas, 6);
    assert_eq!(pool.annotations()[labels::JOB_REPLICAS], "6");

    // Suspending the job parks the pool without touching its size.
    job.spec.rollout.replicas = 4;
    job.spec.run_policy.suspend = Some(true);
    let p = plan(&job, &obs).unwrap();
    let pool = pool_of(&p).unwrap();
    assert!(pool.spec.suspend);
    assert_eq!(pool.spec.replicas, 2);
}

fn test_pool(replicas: i32) -> RolloutPool {
    let job = grpo("rl", replicas);
    let mut pool = planner::rollout_pool_for(&job, replicas, false).unwrap();
    pool.metadata.uid = Some("uid-pool".into());
    pool
}

#[test]
fn pool_keeps_replicas_and_scales_by_index() {
    let mut pool = test_pool(2);
    let p = plan_pool(&pool, &[]).unwrap();
    assert_eq!(
        p.create.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["rl-rollout-0", "rl-rollout-1"]
    );
    let pod = &p.create[0];
    let e = env_of(pod);
    assert_eq!(e[env::ROLE], "rollout");
    assert_eq!(
        e[env::COORDINATOR],
        "rl-trainer-0.rl-trainer.team.svc:50051"
    );
    assert_eq!(e[env::POOL_NAME], "rl-rollout");
    assert_eq!(
        e[env::METRICS_ADDR],
        format!("0.0.0.0:{}", planner::METRICS_PORT)
    );
    assert_eq!(container_port(pod, "metrics"), Some(9400));
    // A fixed, named gRPC port: the chart's NetworkPolicy admits it by name.
    assert_eq!(e[env::ROLLOUT_LISTEN], "0.0.0.0:50052");
    assert_eq!(
        container_port(pod, planner::ROLLOUT_PORT_NAME),
        Some(planner::ROLLOUT_PORT)
    );
    assert_eq!(
        pod.spec.as_ref().unwrap().containers[0]
            .command
            .as_ref()
            .unwrap(),
        &["onevision", "rollout", "--job", "/etc/onevision/job.yaml"]
    );
    assert_eq!(pod.owner_references()[0].kind, "RolloutPool");
    assert_eq!(
        p.status.selector,
        "onevision.dev/job-name=rl,onevision.dev/pool-name=rl-rollout,onevision.dev/role=rollout"
    );

    // Scale up to 4 with two running.
    let running: Vec<Pod> = p
        .create
        .into_iter()
        .map(|p| with_phase(p, "Running"))
        .collect();
    pool.spec.replicas = 4;
    let p = plan_pool(&pool, &running).unwrap();
    assert_eq!(
        p.create.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["rl-rollout-2", "rl-rollout-3"]
    );
    assert_eq!((p.status.replicas, p.status.ready_replicas), (2, 2));

    // Four exist, one failed: replaced (deleted now, recreated once gone).
    let mut four = running.clone();
    four.push(with_phase(
        planner::rollout_pod(&pool, 2).unwrap(),
        "Pending",
    ));
    four.push(exited(planner::rollout_pod(&pool, 3).unwrap(), 1));
    let p = plan_pool(&pool, &four).unwrap();
    assert_eq!(p.delete, ["rl-rollout-3"]);
    assert!(
        p.create.is_empty(),
        "name still taken until the failed pod is gone"
    );
    assert_eq!((p.status.replicas, p.status.ready_replicas), (3, 2));

    // Scale down to 1: highest indices go.
    pool.spec.replicas = 1;
    let p = plan_pool(&pool, &running).unwrap();
    assert_eq!(p.delete, ["rl-rollout-1"]);
    assert_eq!(p.status.replicas, 1);

    // Suspended: no pods at all.
    pool.spec.suspend = true;
    let p = plan_pool(&pool, &running).unwrap();
    assert_eq!(p.delete, ["rl-rollout-0", "rl-rollout-1"]);
    assert!(p.create.is_empty());
}

#[test]
fn pods_of_a_previous_job_with_the_same_name_are_not_adopted() {
    let job = sft("again", 1, 0);
    let mut old = planner::trainer_pods(&job, 0).unwrap().remove(0);
    old.metadata.owner_references = Some(vec![OwnerReference {
        api_version: API_VERSION.into(),
        kind: "SFTJob".into(),
        name: "again".into(),
        uid: "uid-of-deleted-job".into(),
        controller: Some(true),
        ..Default::default()
    }]);
    let p = plan(&job, &observed(vec![with_phase(old, "Running")], 1)).unwrap();
    assert_eq!(p.deleted(ChildKind::Pod), ["again-trainer-0"]);
    assert!(created_pods(&p).is_empty(), "wait for the name to be free");
}

#[test]
fn cpu_only_and_scheduling_options() {
    let mut job = sft("cpu", 2, 0);
    job.spec.scheduling = SchedulingSpec {
        queue_name: None,
        scheduler_name: Some("volcano".into()),
        priority_class_name: Some("high".into()),
        pod_group: Some(PodGroupPolicy::Volcano),
    };
    let p = plan(&job, &Observed::empty(at(1))).unwrap();
    let pods = created_pods(&p);
    let e = env_of(&pods[0]);
    assert_eq!(
        (e[env::WORLD_SIZE].as_str(), e[env::NPROC_PER_NODE].as_str()),
        ("2", "1")
    );
    assert_eq!(
        container_port(&pods[0], &planner::ring_port_name(1)),
        None,
        "one rank per CPU pod: no extra ring ports"
    );
    let spec = pods[0].spec.as_ref().unwrap();
    assert!(
        spec.containers[0].resources.is_none(),
        "no GPU limit on CPU-only pods"
    );
    assert_eq!(spec.scheduler_name.as_deref(), Some("volcano"));
    assert_eq!(spec.priority_class_name.as_deref(), Some("high"));
    assert_eq!(
        pods[0].annotations()[labels::VOLCANO_GROUP_NAME],
        "cpu-trainer"
    );
    let pg = p
        .applied(ChildKind::PodGroup)
        .find_map(|c| match c {
            Child::PodGroup(o) => Some(o.clone()),
            _ => None,
        })
        .expect("podgroup");
    assert_eq!(
        pg.types.unwrap().api_version,
        "scheduling.volcano.sh/v1beta1"
    );
    assert_eq!(pg.data["spec"]["minMember"], 2);
}

#[test]
fn objects_without_identity_are_refused_not_panicked_on() {
    let mut job = sft("x", 1, 1);
    job.metadata.uid = None;
    assert!(plan(&job, &Observed::empty(at(1))).is_err());
    job.metadata.uid = Some("u".into());
    job.metadata.namespace = None;
    let err = plan(&job, &Observed::empty(at(1))).unwrap_err();
    assert!(err.to_string().contains("namespace"), "{err}");
    let mut pool = test_pool(1);
    pool.metadata.name = None;
    assert!(plan_pool(&pool, &[]).is_err());
}

#[test]
fn job_status_roundtrips_through_the_printer_fields() {
    let (job, _) = running_job(1);
    let v = serde_json::to_value(&job).unwrap();
    assert_eq!(v["status"]["phase"], "Running");
    assert_eq!(v["status"]["restarts"], 0);
    assert!(v["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "Running"));
    assert_eq!(
        job.meta().name.as_deref(),
        Some(names::trainer_pod("llava", 0).trim_end_matches("-trainer-0"))
    );
}
