//! The per-GPU launcher of `onevision trainer` through `onevision run`: an SFTJob with
//! `trainer.nodes: 1, gpusPerNode: 2` on CPU is one pod whose launcher starts two ranks that
//! form a world of two on the TCP ring; a failed child takes its sibling down and the pod exits
//! with the child's code (78 stays permanent), leaving no process behind.

mod runtime_common;


use runtime_common::{json, metrics, onevision_run, trainer_pids, wait_for_steps, Fixture};

const MANIFEST: &str = r#"
apiVersion: onevision.dev/v1alpha1
kind: SFTJob
metadata: {name: tiny-sft}
spec:
  model: {path: /data/model}
  dataset: {path: /data/data/train.jsonl}
  output: {path: /data/out/tiny-sft}
  storage: {persistentVolumeClaim: {claimName: data}}
  trainer: {nodes: 1, gpusPerNode: 2, image: onevision:test, env: [{name: ONEVISION_COMM, value: ring}]}
  runPolicy: {backoffLimit: 0}
  hyperparameters: {learningRate: 1.0e-2, globalBatchSize: 8, microBatchSize: 2, maxSteps: 4, lrSchedule: constant}
  eval: {dataset: {path: /data/data/heldout.jsonl}, everySteps: 100}
  checkpoint: {everySteps: 100, keep: 1}
"#;

#[test]
fn two_gpus_per_node_run_two_ranks_in_one_pod() {
    let fx = Fixture::new(32, 4);
    let manifest = fx.path().join("tiny.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let work = fx.path().join("work");
    let out = onevision_run(&manifest, &work, fx.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "onevision run failed: {stderr}");

    let dir = work.join("tiny-sft");
    let logs: Vec<_> = std::fs::read_dir(dir.join("logs")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(logs, ["tiny-sft-trainer-0.log"], "one pod");
    let log = std::fs::read_to_string(dir.join("logs/tiny-sft-trainer-0.log")).unwrap();
    for rank in 0..2 {
        let joined = log
            .lines()
            .find(|l| l.starts_with(&format!("[rank {rank}] ")) && l.contains("joining the gang"))
            .unwrap_or_else(|| panic!("rank {rank} never joined:\n{log}"));
        assert!(joined.contains(&format!("rank={rank}")) && joined.contains("world=2"), "{joined}");
    }
    let m = metrics(&dir.join("metrics.jsonl"));
    assert_eq!(m.iter().map(|x| x["step"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(json(&dir.join("status.json"))["phase"], "Succeeded");
}

#[test]
fn a_permanent_error_in_the_children_exits_78() {
    let fx = Fixture::new(16, 2);
    let manifest = fx.path().join("bad.yaml");
    std::fs::write(&manifest, MANIFEST.replace("value: ring", "value: carrier-pigeon")).unwrap();
    let work = fx.path().join("work");
    let out = onevision_run(&manifest, &work, fx.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("tiny-sft-trainer-0 exited with code 78 (permanent error)"), "{stderr}");
    let log = std::fs::read_to_string(work.join("tiny-sft/logs/tiny-sft-trainer-0.log")).unwrap();
    assert!(log.contains("ONEVISION_COMM") && log.contains("exited with code 78"), "{log}");
}

/// Starts `onevision run` of a job too long to finish and returns, with its workdir, once two
/// steps are in metrics.jsonl (the gang is up and training).
fn start_long_run(fx: &Fixture) -> (std::process::Child, std::path::PathBuf) {
    let manifest = fx.path().join("long.yaml");
    std::fs::write(&manifest, MANIFEST.replace("maxSteps: 4", "maxSteps: 100000")).unwrap();
    let work = fx.path().join("work");
    let child = onevision_run(&manifest, &work, fx.path()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    wait_for_steps(&work.join("tiny-sft/metrics.jsonl"), 2);
    (child, work)
}

#[test]
fn a_killed_child_stops_its_sibling_and_the_pod_exits_with_its_code() {
    let fx = Fixture::new(32, 2);
    let (child, work) = start_long_run(&fx);
    let job = work.join("tiny-sft/job.yaml").display().to_string();
    let rank1 = trainer_pids(&job, "LOCAL_RANK=1");
    let all = trainer_pids(&job, "NPROC_PER_NODE=2");
    assert_eq!((rank1.len(), all.len()), (1, 3), "launcher + 2 ranks: {all:?}");
    unsafe {
        libc::kill(rank1[0], libc::SIGKILL);
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // 137 = 128 + SIGKILL, the killed child's status, not its sibling's.
    assert!(stderr.contains("tiny-sft-trainer-0 exited with code 137; backoffLimit 0 reached"), "{stderr}");
    let left = trainer_pids(&job, "NPROC_PER_NODE=2");
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn sigterm_reaches_every_child_which_checkpoints_and_the_pod_exits_130() {
    let fx = Fixture::new(32, 2);
    let (child, work) = start_long_run(&fx);
    // Only `onevision run` gets the signal; it SIGTERMs the pod's launcher, which must forward it.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(onevision::runtime::EXIT_INTERRUPTED), "{stderr}");
    let log = std::fs::read_to_string(work.join("tiny-sft/logs/tiny-sft-trainer-0.log")).unwrap();
    for rank in 0..2 {
        assert!(
            log.lines().any(|l| l.starts_with(&format!("[rank {rank}] ")) && l.contains("SIGTERM received")),
            "rank {rank} never got the SIGTERM:\n{log}"
        );
    }
    let step = json(&work.join("tiny-sft/status.json"))["progress"]["step"].as_u64().unwrap();
    assert!(work.join(format!("tiny-sft/checkpoints/ckpt-{step:010}")).is_dir(), "no checkpoint at step {step}");
    let job = work.join("tiny-sft/job.yaml").display().to_string();
    assert!(trainer_pids(&job, "NPROC_PER_NODE=2").is_empty());
}
