//! End-to-end tests of `onevision-operator` against a real kube-apiserver (the local cluster of
//! `scripts/local-cluster`), with pods run as local processes by the test node agent.
//!
//! The pods' `onevision` command is a small shell script (put first on the agent's PATH) that
//! runs until the test drops a marker file, then exits with the code written in it — so the
//! tests exercise the operator's real pod specs without needing a trained model.

use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};
use onevision_operator::api::{GRPOJob, JobPhase, RolloutPool, SFTJob};
use onevision_operator::{env, labels, planner};
use onevision_tests::{
    wait_for, workspace_binary, BackgroundProcess, Cluster, NodeAgent, NodeAgentConfig,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const LONG: Duration = Duration::from_secs(90);

struct Env {
    cluster: &'static Cluster,
    client: Client,
    ns: String,
    /// Directory of the fake `onevision` script and the marker files.
    fake: tempfile::TempDir,
    agent: Option<NodeAgent>,
    operator: Option<BackgroundProcess>,
}

const FAKE_ONEVISION: &str = r#"#!/bin/sh
# Fake worker: record the invocation and environment, then wait for "<dir>/<job>.exit" (or
# "<dir>/<pod>.exit") and exit with the code it contains.
dir="$ONEVISION_FAKE_DIR"
env > "$dir/$POD_NAME.env" 2>/dev/null
echo "$@" > "$dir/$POD_NAME.args"
while true; do
  for f in "$dir/$POD_NAME.exit" "$dir/$ONEVISION_JOB_NAME.exit"; do
    if [ -f "$f" ]; then exit "$(cat "$f")"; fi
  done
  sleep 0.2
done
"#;

impl Env {
    async fn new(
        cluster: &'static Cluster,
        prefix: &str,
        with_agent: bool,
    ) -> Result<Env, Box<dyn std::error::Error>> {
        cluster.install_onevision_crds()?;
        let client = cluster.client().await?;
        let ns = cluster.fresh_namespace(prefix).await?;
        let fake = tempfile::tempdir()?;
        let script = fake.path().join("onevision");
        std::fs::write(&script, FAKE_ONEVISION)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        }
        let agent = if with_agent {
            let mut cfg = NodeAgentConfig::for_namespace(&ns).with_gpu_nodes(2, 8);
            cfg.kubeconfig = Some(cluster.kubeconfig().to_path_buf());
            cfg.state_dir = fake.path().join("agent");
            cfg.path_prepend = vec![fake.path().to_path_buf()];
            cfg.env.insert(
                "ONEVISION_FAKE_DIR".into(),
                fake.path().to_string_lossy().to_string(),
            );
            Some(cluster.start_node_agent(cfg).await?)
        } else {
            None
        };
        let mut env = Env {
            cluster,
            client,
            ns,
            fake,
            agent,
            operator: None,
        };
        env.start_operator(&[])?;
        Ok(env)
    }

    fn start_operator(&mut self, extra: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
        let bin = workspace_binary("onevision-operator", "onevision-operator")?;
        let mut cmd = Command::new(bin);
        cmd.args([
            "run",
            "--namespace",
            &self.ns,
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(extra)
        .env("KUBECONFIG", self.cluster.kubeconfig())
        .env("RUST_LOG", "info,onevision_operator=debug");
        let n = std::fs::read_dir(self.fake.path())?.count();
        let log = self.fake.path().join(format!("operator-{n}.log"));
        self.operator = Some(BackgroundProcess::spawn("onevision-operator", cmd, &log)?);
        Ok(())
    }

    async fn stop_operator(&mut self) -> TestResult {
        if let Some(mut op) = self.operator.take() {
            op.stop_gracefully(OPERATOR_GRACE).await?;
        }
        Ok(())
    }

    fn operator_log(&self) -> String {
        self.operator.as_ref().map(|o| o.log()).unwrap_or_default()
    }

    fn apply(&self, yaml: &str) -> Result<String, Box<dyn std::error::Error>> {
        Ok(self.cluster.apply_yaml(&self.ns, yaml)?)
    }

    fn kubectl(&self, args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
        let mut full = vec!["-n", self.ns.as_str()];
        full.extend_from_slice(args);
        Ok(self.cluster.kubectl_ok(&full)?)
    }

    /// Make the fake worker(s) of `who` (a job name or a pod name) exit with `code`.
    fn finish(&self, who: &str, code: i32) -> std::io::Result<()> {
        std::fs::write(
            self.fake.path().join(format!("{who}.exit")),
            code.to_string(),
        )
    }

    fn fake_env(&self, pod: &str) -> String {
        std::fs::read_to_string(self.fake.path().join(format!("{pod}.env"))).unwrap_or_default()
    }

    async fn pods(&self, selector: &str) -> kube::Result<Vec<Pod>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        Ok(api
            .list(&ListParams::default().labels(selector))
            .await?
            .items)
    }

    async fn running_trainers(
        &self,
        job: &str,
        n: usize,
    ) -> Result<Vec<Pod>, Box<dyn std::error::Error>> {
        let sel = format!("{}={job},{}=trainer", labels::JOB_NAME, labels::ROLE);
        Ok(wait_for(
            &format!("{n} running trainer pods of {job}"),
            LONG,
            || async {
                let pods = self.pods(&sel).await?;
                let live: Vec<Pod> = pods
                    .into_iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .collect();
                Ok::<_, kube::Error>((live.len() == n).then_some(live))
            },
        )
        .await?)
    }

    async fn sft_phase(
        &self,
        name: &str,
        phase: JobPhase,
    ) -> Result<SFTJob, Box<dyn std::error::Error>> {
        let api: Api<SFTJob> = Api::namespaced(self.client.clone(), &self.ns);
        Ok(
            wait_for(&format!("SFTJob {name} phase {phase:?}"), LONG, || async {
                let j = api.get(name).await?;
                let ok = j.status.as_ref().and_then(|s| s.phase) == Some(phase);
                Ok::<_, kube::Error>(ok.then_some(j))
            })
            .await?,
        )
    }

    async fn grpo_phase(
        &self,
        name: &str,
        phase: JobPhase,
    ) -> Result<GRPOJob, Box<dyn std::error::Error>> {
        let api: Api<GRPOJob> = Api::namespaced(self.client.clone(), &self.ns);
        Ok(
            wait_for(&format!("GRPOJob {name} phase {phase:?}"), LONG, || async {
                let j = api.get(name).await?;
                let ok = j.status.as_ref().and_then(|s| s.phase) == Some(phase);
                Ok::<_, kube::Error>(ok.then_some(j))
            })
            .await?,
        )
    }

    /// `kubectl auth can-i` as a ServiceAccount of the test namespace.
    fn sa_can(
        &self,
        sa: &str,
        verb: &str,
        resource: &str,
    ) -> Result<bool, Box<dyn std::error::Error>> {
        let who = format!("system:serviceaccount:{}:{sa}", self.ns);
        let out = self.cluster.kubectl(&[
            "-n", &self.ns, "auth", "can-i", verb, resource, "--as", &who,
        ])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "yes")
    }

    /// The job's `<job>-worker` ServiceAccount, Role and RoleBinding exist, are owned by the job,
    /// grant exactly get/patch on rank 0's pod, and the trainer pods run as that account.
    async fn check_worker_rbac(&self, job: &str, owner: &SFTJob, pods: &[Pod]) -> TestResult {
        let name = format!("{job}-worker");
        let uid = owner.uid().unwrap_or_default();
        let owned_by_job =
            |refs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]| {
                refs.iter()
                    .any(|o| o.kind == "SFTJob" && o.uid == uid && o.controller == Some(true))
            };
        let sa = Api::<ServiceAccount>::namespaced(self.client.clone(), &self.ns)
            .get(&name)
            .await?;
        let role = Api::<Role>::namespaced(self.client.clone(), &self.ns)
            .get(&name)
            .await?;
        let binding = Api::<RoleBinding>::namespaced(self.client.clone(), &self.ns)
            .get(&name)
            .await?;
        for (kind, meta) in [
            ("ServiceAccount", &sa.metadata),
            ("Role", &role.metadata),
            ("RoleBinding", &binding.metadata),
        ] {
            assert!(
                owned_by_job(meta.owner_references.as_deref().unwrap_or_default()),
                "{kind} {name} not owned by the job: {:?}",
                meta.owner_references
            );
            let l = meta.labels.clone().unwrap_or_default();
            assert_eq!(l.get(labels::JOB_NAME).map(String::as_str), Some(job));
            assert_eq!(l.get(labels::JOB_KIND).map(String::as_str), Some("SFTJob"));
        }
        let rules = role.rules.unwrap_or_default();
        assert_eq!(rules, planner::worker_rules(job));
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].verbs, ["get", "patch"]);
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["pods".to_string()][..])
        );
        assert_eq!(
            rules[0].resource_names.as_deref(),
            Some(&[format!("{job}-trainer-0")][..])
        );
        assert_eq!(
            (
                binding.role_ref.kind.as_str(),
                binding.role_ref.name.as_str()
            ),
            ("Role", name.as_str())
        );
        let subjects = binding.subjects.unwrap_or_default();
        assert_eq!(subjects.len(), 1);
        assert_eq!(
            (
                subjects[0].kind.as_str(),
                subjects[0].name.as_str(),
                subjects[0].namespace.as_deref()
            ),
            ("ServiceAccount", name.as_str(), Some(self.ns.as_str()))
        );
        for p in pods {
            let spec = p.spec.as_ref().ok_or("pod without spec")?;
            assert_eq!(spec.service_account_name.as_deref(), Some(name.as_str()));
        }
        // What the API server's authorizer makes of it: rank 0's pod only, get and patch only.
        let rank0 = format!("pods/{job}-trainer-0");
        let rank1 = format!("pods/{job}-trainer-1");
        assert!(self.sa_can(&name, "patch", &rank0)?);
        assert!(self.sa_can(&name, "get", &rank0)?);
        assert!(!self.sa_can(&name, "patch", &rank1)?, "other ranks' pods");
        assert!(!self.sa_can(&name, "delete", &rank0)?);
        assert!(!self.sa_can(&name, "list", "pods")?);
        assert!(!self.sa_can(&name, "patch", &format!("sftjobs.onevision.dev/{job}"))?);
        Ok(())
    }

    async fn teardown(mut self) -> TestResult {
        self.stop_operator().await?;
        if let Some(agent) = self.agent.take() {
            agent.stop().await?;
        }
        self.cluster.delete_namespace(&self.ns).await?;
        Ok(())
    }
}

/// Time an operator gets to exit after SIGTERM. Its own shutdown is bounded at 14 s (5 s reconciles
/// in flight, 5 s Lease release, 2 s metrics server, 2 s runtime), under the chart's 30 s grace.
const OPERATOR_GRACE: Duration = Duration::from_secs(20);

fn sft_yaml(name: &str, nodes: i32, extra_spec: &str) -> String {
    format!(
        r#"apiVersion: onevision.dev/v1alpha1
kind: SFTJob
metadata: {{name: {name}}}
spec:
  model: {{path: /data/models/qwen}}
  dataset: {{path: /data/train.jsonl}}
  output: {{path: /data/out/{name}}}
  storage: {{persistentVolumeClaim: {{claimName: data}}}}
  trainer: {{nodes: {nodes}, gpusPerNode: 1, image: onevision:test}}
  hyperparameters: {{learningRate: 1.0e-5, globalBatchSize: 8}}
{extra_spec}"#
    )
}

fn grpo_yaml(name: &str, model: &str, replicas: i32) -> String {
    format!(
        r#"apiVersion: onevision.dev/v1alpha1
kind: GRPOJob
metadata: {{name: {name}}}
spec:
  model: {model}
  dataset: {{path: /data/train.jsonl}}
  output: {{path: /data/out/{name}}}
  storage: {{persistentVolumeClaim: {{claimName: data}}}}
  trainer: {{nodes: 1, gpusPerNode: 1, image: onevision:test}}
  rollout: {{replicas: {replicas}, gpusPerReplica: 0}}
  grpo: {{groupSize: 4, klBeta: 0.04, clipEpsilon: 0.2, rewards: [{{name: accuracy}}]}}
  hyperparameters: {{learningRate: 1.0e-6, globalBatchSize: 8}}
"#
    )
}

/// A good manifest applies; each bad one is refused by the API server with a message naming the
/// field (OpenAPI bounds, enums and the CEL rules of the schema).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_manifests_are_validated_by_the_api_server() -> TestResult {
    let cluster = onevision_tests::require_cluster!();
    cluster.install_onevision_crds()?;
    let ns = cluster.fresh_namespace("op-validate").await?;
    let good = grpo_yaml("ok", "{path: /data/m}", 2);
    cluster.apply_yaml(&ns, &good)?;
    let bad: Vec<(String, &str)> = vec![
        (
            good.replace("{path: /data/m}", "{path: /data/m, fromSFTJob: x}"),
            "exactly one of model.fromSFTJob and model.path",
        ),
        (
            good.replace("{path: /data/m}", "{}"),
            "exactly one of model.fromSFTJob and model.path",
        ),
        (
            good.replace("groupSize: 4", "groupSize: 1"),
            "spec.grpo.groupSize",
        ),
        (
            good.replace("clipEpsilon: 0.2", "clipEpsilon: 1.5"),
            "spec.grpo.clipEpsilon",
        ),
        (
            good.replace("klBeta: 0.04", "klBeta: -1"),
            "spec.grpo.klBeta",
        ),
        (
            good.replace("clipEpsilon: 0.2", "clipEpsilon: 0.2, epsilonHigh: 0.1"),
            "grpo.epsilonHigh must be >= grpo.clipEpsilon",
        ),
        (
            good.replace(
                "rewards: [{name: accuracy}]",
                "rewards: [{name: accuracy}, {name: accuracy}]",
            ),
            "grpo.rewards names must be unique",
        ),
        (
            good.replace("learningRate: 1.0e-6", "learningRate: 0.0"),
            "hyperparameters.learningRate",
        ),
        (
            good.replace("replicas: 2", "replicas: -1"),
            "spec.rollout.replicas",
        ),
        (good.replace("nodes: 1,", "nodes: 0,"), "spec.trainer.nodes"),
        (
            good.replace("gpusPerNode: 1", "gpusPerNode: -2"),
            "spec.trainer.gpusPerNode",
        ),
        (
            good.replace("lossAggregation", "x")
                .replace("rewards:", "lossAggregation: sum, rewards:"),
            "spec.grpo.lossAggregation",
        ),
        (
            good.replace(
                "name: ok",
                "name: ok-but-this-name-is-far-too-long-for-pod-hostnames",
            ),
            "metadata.name",
        ),
        // Immutable trainer shape: the job "ok" exists with nodes 1.
        (
            good.replace("nodes: 1,", "nodes: 2,"),
            "trainer.nodes is immutable",
        ),
    ];
    for (yaml, field) in bad {
        let out = cluster.kubectl_with_stdin(&["-n", &ns, "apply", "-f", "-"], Some(&yaml))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "manifest breaking {field} was accepted:\n{yaml}"
        );
        assert!(
            stderr.contains(field),
            "refusal should name {field}: {stderr}"
        );
    }
    cluster.delete_namespace(&ns).await?;
    Ok(())
}

/// SFTJob → headless Service, ConfigMap, gang of pods with the rendezvous env, status; rank 0's
/// progress annotation reaches the status; deleting a trainer pod restarts the gang exactly
/// once; all ranks exiting 0 → Succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_sft_job_runs_restarts_as_a_gang_and_succeeds() -> TestResult {
    let cluster = onevision_tests::require_cluster!();
    let env = Env::new(cluster, "op-sft", true).await?;
    env.apply(&sft_yaml("llava", 2, ""))?;
    let pods = env.running_trainers("llava", 2).await?;
    let job = env.sft_phase("llava", JobPhase::Running).await?;
    let st = job.status.clone().unwrap();
    assert_eq!(st.restarts, 0);
    assert!(st
        .conditions
        .iter()
        .any(|c| c.type_ == "Running" && c.status == "True"));
    assert_eq!(st.observed_generation, job.metadata.generation);

    let svc = Api::<Service>::namespaced(env.client.clone(), &env.ns)
        .get("llava-trainer")
        .await?;
    let spec = svc.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    let cm = Api::<ConfigMap>::namespaced(env.client.clone(), &env.ns)
        .get("llava-spec")
        .await?;
    assert!(cm.data.unwrap()[env::JOB_SPEC_FILE].contains("kind: SFTJob"));
    for p in &pods {
        assert_eq!(p.owner_references()[0].kind, "SFTJob");
    }
    env.check_worker_rbac("llava", &job, &pods).await?;
    // The worker really ran with the operator's environment.
    let fake_env = wait_for("fake worker env of rank 1", LONG, || async {
        let e = env.fake_env("llava-trainer-1");
        Ok::<_, std::io::Error>(e.contains("NODE_RANK").then_some(e))
    })
    .await?;
    let expect_addr = format!("MASTER_ADDR=llava-trainer-0.llava-trainer.{}.svc", env.ns);
    for needle in [
        expect_addr.as_str(),
        "WORLD_SIZE=2",
        "NODE_RANK=1",
        "NNODES=2",
        "ONEVISION_ROLE=trainer",
    ] {
        assert!(fake_env.contains(needle), "missing {needle} in\n{fake_env}");
    }
    let args =
        std::fs::read_to_string(env.fake.path().join("llava-trainer-0.args")).unwrap_or_default();
    assert_eq!(args.trim(), "trainer --job /etc/onevision/job.yaml");

    // Rank 0 reports progress on its own pod, as the job's worker ServiceAccount.
    let worker = format!("system:serviceaccount:{}:llava-worker", env.ns);
    env.kubectl(&[
        "--as",
        &worker,
        "annotate",
        "pod",
        "llava-trainer-0",
        r#"onevision.dev/progress={"step":5,"totalSteps":50,"loss":1.25}"#,
    ])?;
    let api: Api<SFTJob> = Api::namespaced(env.client.clone(), &env.ns);
    wait_for("progress in status", LONG, || async {
        let j = api.get("llava").await?;
        let p = j.status.and_then(|s| s.step_progress);
        Ok::<_, kube::Error>((p.as_deref() == Some("5/50")).then_some(()))
    })
    .await?;
    let printed = env.kubectl(&["get", "sft", "llava"])?;
    assert!(
        printed.contains("5/50") && printed.contains("1.25"),
        "{printed}"
    );

    // Delete one rank: the whole gang is replaced once.
    let old_uids: Vec<String> = pods.iter().map(|p| p.uid().unwrap_or_default()).collect();
    Api::<Pod>::namespaced(env.client.clone(), &env.ns)
        .delete("llava-trainer-1", &DeleteParams::default())
        .await?;
    let job = wait_for("restarts = 1", LONG, || async {
        let j = api.get("llava").await?;
        Ok::<_, kube::Error>((j.status.as_ref().is_some_and(|s| s.restarts == 1)).then_some(j))
    })
    .await?;
    assert!(job
        .status
        .unwrap()
        .conditions
        .iter()
        .any(|c| c.type_ == "Restarting"));
    let fresh = env.running_trainers("llava", 2).await?;
    env.sft_phase("llava", JobPhase::Running).await?;
    for p in &fresh {
        assert!(
            !old_uids.contains(&p.uid().unwrap_or_default()),
            "pod {} was not recreated",
            p.name_any()
        );
        assert_eq!(p.annotations()[labels::GANG_GENERATION], "1");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        api.get("llava").await?.status.unwrap().restarts,
        1,
        "exactly one gang restart"
    );

    env.finish("llava", 0)?;
    let job = env.sft_phase("llava", JobPhase::Succeeded).await?;
    assert!(job.status.unwrap().completion_time.is_some());
    wait_for(
        "events Created, GangRestart, Succeeded on the job",
        LONG,
        || async {
            let events = env.kubectl(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=llava",
                "-o",
                "jsonpath={.items[*].reason}",
            ])?;
            let all = ["Created", "GangRestart", "Succeeded"]
                .iter()
                .all(|r| events.contains(r));
            Ok::<_, Box<dyn std::error::Error>>(all.then_some(()))
        },
    )
    .await?;
    env.teardown().await
}

/// `trainer.serviceAccountName` opts out: no worker ServiceAccount/Role/RoleBinding, and the
/// trainer pods run as the user's account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_uses_the_users_service_account_when_named() -> TestResult {
    let cluster = onevision_tests::require_cluster!();
    let env = Env::new(cluster, "op-sa", false).await?;
    env.apply("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: mine}\n")?;
    let yaml = sft_yaml("own", 1, "").replace(
        "image: onevision:test}",
        "image: onevision:test, serviceAccountName: mine}",
    );
    assert!(yaml.contains("serviceAccountName: mine"), "{yaml}");
    env.apply(&yaml)?;
    let sel = format!("{}=own,{}=trainer", labels::JOB_NAME, labels::ROLE);
    let pods = wait_for("trainer pod of own", LONG, || async {
        let pods = env.pods(&sel).await?;
        Ok::<_, kube::Error>((!pods.is_empty()).then_some(pods))
    })
    .await
    .map_err(|e| format!("{e}\noperator:\n{}", env.operator_log()))?;
    let spec = pods[0].spec.as_ref().ok_or("pod without spec")?;
    assert_eq!(spec.service_account_name.as_deref(), Some("mine"));
    assert!(
        Api::<ServiceAccount>::namespaced(env.client.clone(), &env.ns)
            .get_opt("own-worker")
            .await?
            .is_none()
    );
    assert!(Api::<Role>::namespaced(env.client.clone(), &env.ns)
        .get_opt("own-worker")
        .await?
        .is_none());
    assert!(Api::<RoleBinding>::namespaced(env.client.clone(), &env.ns)
        .get_opt("own-worker")
        .await?
        .is_none());
    env.teardown().await
}

/// GRPOJob → RolloutPool `<job>-rollout` (owned by the job) whose size follows `kubectl scale`
/// 2 → 4 → 1, with the /scale subresource reporting replicas and selector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_grpo_job_rollout_pool_scales() -> TestResult {
    let cluster = onevision_tests::require_cluster!();
    let env = Env::new(cluster, "op-grpo", true).await?;
    env.apply(&grpo_yaml("rl", "{path: /data/m}", 2))?;
    env.running_trainers("rl", 1).await?;
    let pools: Api<RolloutPool> = Api::namespaced(env.client.clone(), &env.ns);
    let sel = format!("{}=rl-rollout", labels::POOL_NAME);
    let live = |n: usize| {
        let sel = sel.clone();
        let env = &env;
        let pools = pools.clone();
        async move {
            wait_for(&format!("{n} ready rollout pods"), LONG, || async {
                let pods: Vec<Pod> = env
                    .pods(&sel)
                    .await?
                    .into_iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .collect();
                let pool = pools.get("rl-rollout").await?;
                let st = pool.status.unwrap_or_default();
                Ok::<_, kube::Error>((pods.len() == n && st.replicas == n as i32).then_some(pods))
            })
            .await
        }
    };
    let pods = live(2).await?;
    assert_eq!(pods[0].owner_references()[0].kind, "RolloutPool");
    let pool = pools.get("rl-rollout").await?;
    assert_eq!(pool.owner_references()[0].kind, "GRPOJob");
    let fake_env = wait_for("rollout worker env", LONG, || async {
        let e = env.fake_env("rl-rollout-0");
        Ok::<_, std::io::Error>(e.contains("ONEVISION_ROLE").then_some(e))
    })
    .await?;
    assert!(fake_env.contains("ONEVISION_ROLE=rollout"), "{fake_env}");
    assert!(fake_env.contains(&format!(
        "ONEVISION_COORDINATOR=rl-trainer-0.rl-trainer.{}.svc:50051",
        env.ns
    )));

    env.kubectl(&["scale", "rp", "rl-rollout", "--replicas", "4"])?;
    live(4).await?;
    let scale = env.kubectl(&[
        "get",
        "--raw",
        &format!(
            "/apis/onevision.dev/v1alpha1/namespaces/{}/rolloutpools/rl-rollout/scale",
            env.ns
        ),
    ])?;
    let scale: serde_json::Value = serde_json::from_str(&scale)?;
    assert_eq!(scale["spec"]["replicas"], 4);
    assert!(scale["status"]["selector"]
        .as_str()
        .unwrap_or_default()
        .contains("onevision.dev/pool-name=rl-rollout"));
    env.kubectl(&["scale", "rp", "rl-rollout", "--replicas", "1"])?;
    let one = live(1).await?;
    assert_eq!(one[0].name_any(), "rl-rollout-0");
    // The job did not fight the scale.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pools.get("rl-rollout").await?.spec.replicas, 1);
    env.teardown().await
}

/// suspend deletes the pods and keeps the status; resume recreates the gang without counting a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_suspend_and_resume() -> TestResult {
    let cluster = onevision_tests::require_cluster!();
    let env = Env::new(cluster, "op-suspend", true).await?;
    env.apply(&sft_yaml("sus", 2, ""))?;
    let before = env.running_trainers("sus", 2).await?;
    env.kubectl(&[
        "annotate",
        "pod",
        "sus-trainer-0",
        r#"onevision.dev/progress={"step":3}"#,
    ])?;
    let api: Api<SFTJob> = Api::namespaced(env.client.clone(), &env.ns);
    wait_for("progress", LONG, || async {
        let j = api.get("sus").await?;
        Ok::<_, kube::Error>(
            j.status
                .and_then(|s| s.progress)
                .filter(|p| p.step == 3)
                .map(|_| ()),
        )
    })
    .await?;

    env.kubectl(&[
        "patch",
        "sft",
        "sus",
        "--type=merge",
        "-p",
        r#"{"spec":{"runPolicy":{"suspend":true}}}"#,
    ])?;
    let job = env.sft_phase("sus", JobPhase::Suspended).await?;
    wait_for("no trainer pods while suspended", LONG, || async {
        let n = env.pods(&format!("{}=sus", labels::JOB_NAME)).await?.len();
        Ok::<_, kube::Error>((n == 0).then_some(()))
    })
    .await?;
    let st = job.status.unwrap();
    assert_eq!(
        st.progress.map(|p| p.step),
        Some(3),
        "status kept while suspended"
    );

    env.kubectl(&[
        "patch",
        "sft",
        "sus",
        "--type=merge",
        "-p",
        r#"{"spec":{"runPolicy":{"suspend":false}}}"#,
    ])?;
    let after = env.running_trainers("sus", 2).await?;
    let job = env.sft_phase("sus", JobPhase::Running).await?;
    let st = job.status.unwrap();
    assert_eq!(st.restarts, 0, "resume is not a restart");
    assert!(st
        .conditions
        .iter()
        .any(|c| c.type_ == "Suspended" && c.status == "False" && c.reason == "Resumed"));
    let old: Vec<_> = before.iter().map(|p| p.uid()).collect();
    assert!(after.iter().all(|p| !old.contains(&p.uid())));
    env.teardown().await
}

/// A GRPOJob with `model.fromSFTJob` waits until that SFTJob succeeded, then starts from its
/// output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_from_sft_job_waits_for_the_source() -> TestResult {
    let cluster = onevision_tests::require_cluster!();
    let env = Env::new(cluster, "op-chain", true).await?;
    env.apply(&grpo_yaml("rl", "{fromSFTJob: base}", 1))?;
    let job = env.grpo_phase("rl", JobPhase::WaitingForSFTJob).await?;
    assert!(job
        .status
        .unwrap()
        .conditions
        .iter()
        .any(|c| c.reason == "WaitingForSFTJob"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        env.pods(&format!("{}=rl", labels::JOB_NAME))
            .await?
            .is_empty(),
        "nothing runs before the model exists"
    );

    env.apply(&sft_yaml("base", 1, ""))?;
    env.sft_phase("base", JobPhase::Running).await?;
    assert_eq!(
        env.grpo_phase("rl", JobPhase::WaitingForSFTJob)
            .await?
            .status
            .unwrap()
            .phase,
        Some(JobPhase::WaitingForSFTJob)
    );
    env.finish("base", 0)?;
    env.sft_phase("base", JobPhase::Succeeded).await?;
    env.running_trainers("rl", 1).await?;
    let job = env.grpo_phase("rl", JobPhase::Running).await?;
    assert_eq!(
        job.status.unwrap().model_path.as_deref(),
        Some("/data/out/base")
    );
    let cm = Api::<ConfigMap>::namespaced(env.client.clone(), &env.ns)
        .get("rl-spec")
        .await?;
    assert!(cm.data.unwrap()[env::JOB_SPEC_FILE].contains("path: /data/out/base"));
    env.teardown().await
}

/// Restarting the operator mid-job adopts the running gang: no pod is recreated or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_restart_creates_no_duplicate_pods() -> TestResult {
    let cluster = onevision_tests::require_cluster!();
    let mut env = Env::new(cluster, "op-restart", true).await?;
    env.apply(&sft_yaml("steady", 2, ""))?;
    let before = env.running_trainers("steady", 2).await?;
    env.sft_phase("steady", JobPhase::Running).await?;
    env.stop_operator().await?;
    // Two replicas with leader election: only one acts.
    let ns = env.ns.clone();
    env.start_operator(&["--leader-elect", "--lease-namespace", &ns])?;
    let first = env.operator.take();
    env.start_operator(&["--leader-elect", "--lease-namespace", &ns])?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = env.pods(&format!("{}=steady", labels::JOB_NAME)).await?;
    assert_eq!(
        after.len(),
        2,
        "{:?}",
        after.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
    let mut a: Vec<_> = after.iter().map(|p| p.uid()).collect();
    let mut b: Vec<_> = before.iter().map(|p| p.uid()).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "pods were recreated after the operator restart");
    let api: Api<SFTJob> = Api::namespaced(env.client.clone(), &env.ns);
    assert_eq!(api.get("steady").await?.status.unwrap().restarts, 0);
    // The lease exists and names one holder.
    let holder = env.kubectl(&[
        "get",
        "lease",
        "onevision-operator",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    assert!(!holder.is_empty(), "lease has a holder");
    if let Some(mut f) = first {
        f.stop_gracefully(OPERATOR_GRACE).await?;
    }
    // The remaining replica takes over and keeps reconciling.
    env.finish("steady", 0)?;
    env.sft_phase("steady", JobPhase::Succeeded)
        .await
        .map_err(|e| format!("{e}\noperator log:\n{}", env.operator_log()))?;
    env.teardown().await
}

/// Scale numbers on the local API server, printed as `MEASURE ...` lines (docs/operator.md records
/// them). Ignored by default: it creates 233 pods and takes minutes on a small machine. Run with
/// `cargo test -p onevision-tests --test operator_e2e -- --ignored --nocapture measure_`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement (minutes); run explicitly with -- --ignored measure_"]
async fn measure_32_node_gang_and_200_jobs() -> TestResult {
    let cluster = onevision_tests::require_cluster!();
    let env = Env::new(cluster, "op-scale", false).await?;
    // Warm up: the operator is connected and its caches synced before the clock starts.
    env.apply(&sft_yaml("warm", 1, ""))?;
    wait_for("warm-up pod", LONG, || async {
        Ok::<_, kube::Error>(
            (env.pods(&format!("{}=warm", labels::JOB_NAME)).await?.len() == 1).then_some(()),
        )
    })
    .await?;
    let sel = format!("{}=big", labels::JOB_NAME);
    let start = Instant::now();
    env.apply(&sft_yaml("big", 32, ""))?;
    wait_for(
        "32 trainer pods created",
        Duration::from_secs(120),
        || async {
            let n = env.pods(&sel).await?.len();
            Ok::<_, kube::Error>((n == 32).then_some(()))
        },
    )
    .await?;
    let gang = start.elapsed();
    eprintln!(
        "MEASURE operator: kubectl apply of a 32-node SFTJob -> 32 pods created: {:.2}s",
        gang.as_secs_f64()
    );

    let many: String = (0..200)
        .map(|i| format!("---\n{}", sft_yaml(&format!("j{i}"), 1, "")))
        .collect();
    let path = env.fake.path().join("many.yaml");
    std::fs::write(&path, many)?;
    let start = Instant::now();
    env.kubectl(&["apply", "-f", &path.to_string_lossy()])?;
    let applied = start.elapsed();
    let api: Api<SFTJob> = Api::namespaced(env.client.clone(), &env.ns);
    wait_for(
        "200 jobs reconciled (status + pod)",
        Duration::from_secs(300),
        || async {
            let jobs = api.list(&ListParams::default()).await?.items;
            let done = jobs
                .iter()
                .filter(|j| j.name_any().starts_with('j'))
                .filter(|j| j.status.as_ref().is_some_and(|s| s.gang_created))
                .count();
            Ok::<_, kube::Error>((done == 200).then_some(()))
        },
    )
    .await?;
    let all = start.elapsed();
    let pods = env.pods(&format!("{}=trainer", labels::ROLE)).await?.len();
    assert_eq!(pods, 233);
    eprintln!(
        "MEASURE operator: 200 SFTJobs in one kubectl apply: apply took {:.2}s; all 200 reconciled (status written, pod created) {:.2}s after the apply started, {:.2}s after it returned",
        applied.as_secs_f64(),
        all.as_secs_f64(),
        (all - applied).as_secs_f64()
    );

    // The same through the API with 32 creates in flight, so the client is not the bottleneck.
    let jobs: Vec<SFTJob> = (0..200)
        .map(|i| serde_yaml::from_str(&sft_yaml(&format!("k{i}"), 1, "")))
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    futures::stream::iter(jobs.iter().map(|j| {
        let api = api.clone();
        async move { api.create(&Default::default(), j).await }
    }))
    .buffer_unordered(32)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let created = start.elapsed();
    wait_for(
        "200 API-created jobs reconciled",
        Duration::from_secs(300),
        || async {
            let jobs = api.list(&ListParams::default()).await?.items;
            let done = jobs
                .iter()
                .filter(|j| j.name_any().starts_with('k'))
                .filter(|j| j.status.as_ref().is_some_and(|s| s.gang_created))
                .count();
            Ok::<_, kube::Error>((done == 200).then_some(()))
        },
    )
    .await?;
    let all = start.elapsed();
    eprintln!(
        "MEASURE operator: 200 SFTJobs created through the API (32 in flight): creates took {:.2}s; all 200 reconciled {:.2}s after the first create",
        created.as_secs_f64(),
        all.as_secs_f64()
    );
    assert!(gang < Duration::from_secs(60), "32-node gang took {gang:?}");
    env.teardown().await
}
