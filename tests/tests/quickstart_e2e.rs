//! The whole system end to end on the real API server: `kubectl apply` of an SFTJob and a GRPOJob
//! (`fromSFTJob`, with a RolloutPool of one worker) → the operator's own pods run as local
//! processes by the node agent, each with the real `onevision` binary (`onevision trainer`,
//! `onevision rollout`), in its own network namespace, talking gRPC over the pod network → both jobs
//! reach `Succeeded` with the trainer's progress in their status, and the GRPO job trains the SFT
//! job's exported model. Nothing is granted by hand: progress reaching the status proves that the
//! per-job worker ServiceAccount/Role/RoleBinding the operator creates let rank 0 patch its pod. The data and model are the quickstart's kind (`onevision data synth`,
//! `onevision model init`), scaled down so the test takes about a minute.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kube::api::Api;
use onevision_operator::api::{GRPOJob, JobPhase, SFTJob};
use onevision_tests::{wait_for, workspace_binary, BackgroundProcess, NodeAgentConfig};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const MANIFEST: &str = r#"
apiVersion: onevision.dev/v1alpha1
kind: SFTJob
metadata: {name: qs-sft}
spec:
  model: {path: /data/model}
  dataset: {path: /data/data/train.jsonl}
  output: {path: /data/out/qs-sft}
  storage: {persistentVolumeClaim: {claimName: training-data}}
  trainer: {nodes: 2, image: onevision:test}
  hyperparameters: {learningRate: 1.0e-2, globalBatchSize: 8, microBatchSize: 2, maxSteps: 4, lrSchedule: constant}
  eval: {dataset: {path: /data/data/heldout.jsonl}, everySteps: 4}
  checkpoint: {everySteps: 2, keep: 2}
---
apiVersion: onevision.dev/v1alpha1
kind: GRPOJob
metadata: {name: qs-grpo}
spec:
  model: {fromSFTJob: qs-sft}
  dataset: {path: /data/data/train.jsonl}
  output: {path: /data/out/qs-grpo}
  storage: {persistentVolumeClaim: {claimName: training-data}}
  trainer: {nodes: 1, image: onevision:test}
  rollout: {replicas: 1}
  grpo: {groupSize: 4, maxNewTokens: 16, temperature: 1.0, klBeta: 0.04, rewards: [{name: accuracy}, {name: format, weight: 0.5}]}
  hyperparameters: {learningRate: 1.0e-3, globalBatchSize: 8, microBatchSize: 4, maxSteps: 2}
  eval: {dataset: {path: /data/data/heldout.jsonl}}
  checkpoint: {everySteps: 1}
"#;

fn run_ok(cmd: &mut Command) -> Result<(), Box<dyn std::error::Error>> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

/// Tiny verifiable dataset and random model through the CLI, into the PVC's host directory.
fn prepare_storage(onevision: &Path, root: &Path) -> TestResult {
    std::fs::create_dir_all(root)?;
    run_ok(Command::new(onevision).args(["data", "synth", "--out"]).arg(root.join("data")).args([
        "--train", "48", "--heldout", "6", "--families", "color", "--difficulty", "1", "--image-size", "56",
    ]))?;
    run_ok(
        Command::new(onevision)
            .args(["model", "init", "--out"])
            .arg(root.join("model"))
            .arg("--tokenizer-corpus")
            .arg(root.join("data/train.jsonl"))
            .args(["--vocab-size", "400", "--hidden-size", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1"])
            .args(["--intermediate-size", "64", "--vision-hidden-size", "32", "--vision-depth", "1"])
            .args(["--vision-heads", "1", "--vision-intermediate-size", "64"]),
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_quickstart_runs_real_workers_to_succeeded() -> TestResult {
    let cluster = onevision_tests::require_cluster!();
    cluster.install_onevision_crds()?;
    let client = cluster.client().await?;
    let ns = cluster.fresh_namespace("qs").await?;
    let tmp = tempfile::tempdir()?;

    let onevision = workspace_binary("onevision-worker", "onevision")?;
    let mut cfg = NodeAgentConfig::for_namespace(&ns).with_gpu_nodes(2, 0);
    cfg.kubeconfig = Some(cluster.kubeconfig().to_path_buf());
    cfg.state_dir = tmp.path().join("agent");
    cfg.path_prepend = vec![onevision.parent().ok_or("binary has no directory")?.to_path_buf()];
    let storage = cfg.pvc_dir(&ns, "training-data");
    prepare_storage(&onevision, &storage)?;
    let agent = cluster.start_node_agent(cfg).await?;

    let mut op = Command::new(workspace_binary("onevision-operator", "onevision-operator")?);
    op.args(["run", "--namespace", &ns, "--metrics-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", cluster.kubeconfig())
        .env("RUST_LOG", "info");
    let mut operator = BackgroundProcess::spawn("onevision-operator", op, &tmp.path().join("operator.log"))?;

    cluster.apply_yaml(&ns, MANIFEST)?;
    let sfts: Api<SFTJob> = Api::namespaced(client.clone(), &ns);
    let grpos: Api<GRPOJob> = Api::namespaced(client.clone(), &ns);
    let logs = |pods: &[&str]| {
        pods.iter()
            .map(|p| format!("--- {p}:\n{}", agent.pod_log(&ns, p, "trainer").unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Generous: the 2-core CI machine runs this beside other test binaries.
    let limit = Duration::from_secs(300);
    let sft = wait_for("SFTJob qs-sft Succeeded", limit, || async {
        let j = sfts.get("qs-sft").await?;
        let phase = j.status.as_ref().and_then(|s| s.phase);
        if phase == Some(JobPhase::Failed) {
            return Err(format!("qs-sft failed: {:?}\n{}", j.status, logs(&["qs-sft-trainer-0", "qs-sft-trainer-1"])).into());
        }
        Ok::<_, Box<dyn std::error::Error>>((phase == Some(JobPhase::Succeeded)).then_some(j))
    })
    .await
    .map_err(|e| format!("{e}\n{}\noperator:\n{}", logs(&["qs-sft-trainer-0", "qs-sft-trainer-1"]), operator.log()))?;
    let st = sft.status.expect("status");
    let progress = st.progress.expect("trainer rank 0 reported progress");
    assert_eq!(progress.step, 4, "SFT progress: {progress:?}");
    assert_eq!(progress.total_steps, Some(4));
    assert!(progress.loss.is_some_and(|l| l.is_finite() && l > 0.0), "loss in status: {progress:?}");
    assert_eq!(st.restarts, 0);
    // Both ranks ran the real trainer and the exported model is on the shared storage.
    assert!(storage.join("out/qs-sft").exists(), "SFT output on the PVC");

    let grpo = wait_for("GRPOJob qs-grpo Succeeded", limit, || async {
        let j = grpos.get("qs-grpo").await?;
        let phase = j.status.as_ref().and_then(|s| s.phase);
        if phase == Some(JobPhase::Failed) {
            return Err(format!("qs-grpo failed: {:?}\n{}", j.status, logs(&["qs-grpo-trainer-0"])).into());
        }
        Ok::<_, Box<dyn std::error::Error>>((phase == Some(JobPhase::Succeeded)).then_some(j))
    })
    .await
    .map_err(|e| {
        let rollout = agent.pod_log(&ns, "qs-grpo-rollout-0", "rollout").unwrap_or_default();
        format!("{e}\n{}\n--- rollout:\n{rollout}\noperator:\n{}", logs(&["qs-grpo-trainer-0"]), operator.log())
    })?;
    let st = grpo.status.expect("status");
    let progress = st.progress.expect("GRPO progress");
    assert_eq!(progress.step, 2, "GRPO progress: {progress:?}");
    assert!(progress.reward.is_some_and(|r| r.is_finite()), "reward in status: {progress:?}");
    // fromSFTJob: the GRPO job trained the SFT job's output model.
    let model_path = st.model_path.unwrap_or_default();
    assert!(model_path.contains("qs-sft"), "GRPO model path {model_path}");

    // The operator bounds its own shutdown at 14 s (docs/operator.md); 20 s leaves headroom.
    operator.stop_gracefully(Duration::from_secs(20)).await?;
    agent.stop().await?;
    cluster.delete_namespace(&ns).await?;
    Ok(())
}
