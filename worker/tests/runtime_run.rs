//! `onevision run` end to end on a tiny SFTJob (2 trainer processes on the TCP ring) followed by
//! a GRPOJob `fromSFTJob`: the files it writes and what they say.

mod runtime_common;


use runtime_common::{json, metrics, onevision_run, trainer_pids, wait_for_steps, Fixture};

const MANIFEST: &str = r#"
apiVersion: onevision.dev/v1alpha1
kind: GRPOJob
metadata: {name: tiny-grpo}
spec:
  model: {fromSFTJob: tiny-sft}
  dataset: {path: /data/data/train.jsonl}
  output: {path: /data/out/tiny-grpo}
  storage: {persistentVolumeClaim: {claimName: data}}
  trainer: {nodes: 1, image: onevision:test}
  rollout: {replicas: 0}
  grpo: {groupSize: 4, maxNewTokens: 24, temperature: 1.0, klBeta: 0.04, rewards: [{name: accuracy}, {name: format, weight: 0.5}]}
  hyperparameters: {learningRate: 1.0e-3, globalBatchSize: 8, microBatchSize: 4, maxSteps: 3}
  eval: {dataset: {path: /data/data/heldout.jsonl}}
  checkpoint: {everySteps: 2}
---
apiVersion: onevision.dev/v1alpha1
kind: SFTJob
metadata: {name: tiny-sft}
spec:
  model: {path: /data/model}
  dataset: {path: /data/data/train.jsonl}
  output: {path: /data/out/tiny-sft}
  storage: {persistentVolumeClaim: {claimName: data}}
  trainer: {nodes: 2, image: onevision:test}
  hyperparameters: {learningRate: 1.0e-2, globalBatchSize: 8, microBatchSize: 2, maxSteps: 6, lrSchedule: constant}
  eval: {dataset: {path: /data/data/heldout.jsonl}, everySteps: 3, sampling: {samples: 3, temperature: 1.0}}
  checkpoint: {everySteps: 3, keep: 2}
"#;

#[test]
fn run_writes_metrics_status_checkpoints_and_models_for_sft_then_grpo() {
    let fx = Fixture::new(32, 6);
    let manifest = fx.path().join("tiny.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let work = fx.path().join("work");
    let out = onevision_run(&manifest, &work, fx.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "onevision run failed: {stderr}");

    // SFT: listed second, run first; two ranks.
    let sft = work.join("tiny-sft");
    assert!(sft.join("logs/tiny-sft-trainer-0.log").is_file() && sft.join("logs/tiny-sft-trainer-1.log").is_file());
    let m = metrics(&sft.join("metrics.jsonl"));
    assert_eq!(m.iter().map(|x| x["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    for x in &m {
        assert_eq!(x["total_steps"], 6);
        assert_eq!(x["learning_rate"], 1.0e-2);
        let l = x["loss"].as_f64().unwrap();
        assert!(l.is_finite() && l > 0.0, "{x}");
        assert!(x["grad_norm"].as_f64().unwrap() > 0.0);
    }
    let (first, last) = (m[0]["loss"].as_f64().unwrap(), m[5]["loss"].as_f64().unwrap());
    assert!(last < first, "SFT loss did not decrease: {first} -> {last}");
    assert!(m[2].get("eval_accuracy").is_some(), "no evaluation at step 3: {}", m[2]);
    let st = json(&sft.join("status.json"));
    assert_eq!(st["kind"], "SFTJob");
    assert_eq!(st["phase"], "Succeeded");
    assert_eq!(st["restarts"], 0);
    assert_eq!(st["progress"]["step"], 6);
    assert_eq!(st["progress"]["totalSteps"], 6);
    assert_eq!(st["stepProgress"], "6/6");
    assert_eq!(st["modelPath"], fx.model().display().to_string());
    for when in ["before", "after"] {
        assert_eq!(st["evaluation"][when]["n"], 6, "{st}");
        let a = st["evaluation"][when]["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a));
        // Every held-out row is a colour question: one category holding all of them, summed over
        // both ranks' shards.
        let by = &st["evaluation"][when]["byCategory"];
        assert_eq!(by.as_object().map(|o| o.len()), Some(1), "{st}");
        assert_eq!((by["color"]["n"].as_u64(), by["color"]["accuracy"].as_f64()), (Some(6), Some(a)), "{st}");
        // eval.sampling: the mean over 3 samples of 6 questions (both ranks' shards), so a
        // multiple of 1/18, with its settings (topP defaulted).
        let s = &st["evaluation"][when]["sampled"];
        assert_eq!((s["samples"].as_u64(), s["temperature"].as_f64(), s["topP"].as_f64()), (Some(3), Some(1.0), Some(0.95)), "{st}");
        let sa = s["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&sa) && ((sa * 18.0).round() - sa * 18.0).abs() < 1e-9, "{st}");
        assert_eq!(s["byCategory"]["color"].as_f64(), Some(sa), "{st}");
    }
    assert!(m[2]["eval_accuracy_sampled"].as_f64().is_some(), "no sampled evaluation at step 3: {}", m[2]);
    assert!(st["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "Succeeded" && c["status"] == "True"));
    assert!(sft.join("checkpoints/ckpt-0000000006").is_dir());
    assert!(sft.join("config.json").is_file() && sft.join("model.safetensors").is_file() && sft.join("tokenizer.json").is_file());

    // GRPO from the SFT job's exported model.
    let grpo = work.join("tiny-grpo");
    let m = metrics(&grpo.join("metrics.jsonl"));
    assert_eq!(m.len(), 3);
    for x in &m {
        for k in ["reward", "reward/accuracy", "reward/format", "accuracy", "kl", "entropy", "clip_fraction", "time/rollout_wait", "time/reference"] {
            assert!(x[k].as_f64().is_some_and(f64::is_finite), "missing {k}: {x}");
        }
        let len = x["response_length"].as_f64().unwrap();
        assert!(len > 0.0 && len <= 24.0, "{x}");
        let z = x["zero_advantage_fraction"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&z));
        assert_eq!(x["sampling_rounds"], 1.0, "no dynamic sampling, one round: {x}");
        assert!((0.0..=1.5).contains(&x["reward"].as_f64().unwrap()));
    }
    let st = json(&grpo.join("status.json"));
    assert_eq!(st["kind"], "GRPOJob");
    assert_eq!(st["phase"], "Succeeded");
    assert_eq!(st["modelPath"], sft.display().to_string());
    assert_eq!(st["evaluation"]["after"]["n"], 6);
    assert!(st["evaluation"]["after"].get("sampled").is_none(), "no eval.sampling, no sampled block: {st}");
    assert!(st["progress"]["reward"].as_f64().is_some());
    assert!(grpo.join("model.safetensors").is_file());

    // Running the same file again does not redo finished jobs.
    let again = onevision_run(&manifest, &work, fx.path()).output().unwrap();
    assert!(again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(stderr.matches("already succeeded").count(), 2, "{stderr}");
}

#[test]
fn run_fails_with_a_clear_message_and_a_failed_status_on_missing_data() {
    let fx = Fixture::new(8, 2);
    let manifest = fx.path().join("bad.yaml");
    std::fs::write(&manifest, MANIFEST.split("---").nth(1).unwrap().replace("train.jsonl", "missing.jsonl")).unwrap();
    let work = fx.path().join("work");
    let out = onevision_run(&manifest, &work, fx.path()).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing.jsonl") && stderr.contains("does not exist"), "{stderr}");
    assert!(stderr.contains("permanent"), "{stderr}");
    let st = json(&work.join("tiny-sft/status.json"));
    assert_eq!(st["phase"], "Failed");
    assert!(st["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "Failed" && c["reason"] == "PermanentError"), "{st}");
}

/// Runs MANIFEST's GRPOJob alone for 2 steps from the untrained model, with `edit` applied to its
/// text; asserts it succeeded. Returns the job's directory and its metrics.
fn run_grpo_alone(fx: &Fixture, edit: impl Fn(String) -> String) -> (std::path::PathBuf, Vec<serde_json::Value>) {
    let manifest = fx.path().join("grpo.yaml");
    let text = MANIFEST.split("---").next().unwrap().replace("{fromSFTJob: tiny-sft}", "{path: /data/model}").replace("maxSteps: 3", "maxSteps: 2");
    std::fs::write(&manifest, edit(text)).unwrap();
    let work = fx.path().join("work");
    let out = onevision_run(&manifest, &work, fx.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = work.join("tiny-grpo");
    let m = metrics(&dir.join("metrics.jsonl"));
    assert_eq!(m.len(), 2);
    assert_eq!(json(&dir.join("status.json"))["phase"], "Succeeded");
    (dir, m)
}

#[test]
fn grpo_with_rollout_workers_generates_remotely_and_pushes_each_version() {
    let fx = Fixture::new(16, 4);
    let (dir, m) = run_grpo_alone(&fx, |t| t.replace("replicas: 0", "replicas: 2"));
    assert!(m.iter().all(|x| x["time/weight_sync"].as_f64().unwrap() > 0.0), "no weight sync recorded");
    // Both workers served (registered) and received every version the trainer produced.
    let trainer_log = std::fs::read_to_string(dir.join("logs/tiny-grpo-trainer-0.log")).unwrap();
    assert!(trainer_log.contains("GRPO completions from rollout workers"), "{trainer_log}");
    for i in 0..2 {
        let log = std::fs::read_to_string(dir.join(format!("logs/tiny-grpo-rollout-{i}.log"))).unwrap();
        assert!(log.contains("version=2"), "worker {i} never got version 2:\n{log}");
    }
}

/// DAPO dynamic sampling on the untrained model: no completion is correct or well-formed, so every
/// group's rewards are all 0 — no spread. Each step samples `maxRounds` rounds of fresh prompts,
/// drops every group, warns, and trains on nothing (zero loss and gradient); the job still succeeds.
#[test]
fn dynamic_sampling_refills_up_to_max_rounds_and_drops_groups_without_a_spread() {
    let fx = Fixture::new(16, 2);
    let (dir, m) = run_grpo_alone(&fx, |t| t.replace("klBeta: 0.04,", "klBeta: 0.0, dynamicSampling: {maxRounds: 3},"));
    for x in &m {
        assert_eq!(x["reward"], 0.0, "the untrained model earned a reward, pick another fixture: {x}");
        assert_eq!(x["sampling_rounds"], 3.0, "{x}");
        assert_eq!(x["zero_advantage_fraction"], 1.0, "{x}");
        assert_eq!((x["loss"].as_f64(), x["grad_norm"].as_f64()), (Some(0.0), Some(0.0)), "dropped groups were trained on: {x}");
    }
    let log = std::fs::read_to_string(dir.join("logs/tiny-grpo-trainer-0.log")).unwrap();
    assert_eq!(log.matches("dynamic sampling: too few prompt groups").count(), 2, "{log}");
}

#[test]
fn interrupting_run_leaves_a_checkpoint_and_rerunning_resumes_to_the_end() {
    let fx = Fixture::new(64, 2);
    let manifest = fx.path().join("long.yaml");
    let text = MANIFEST.split("---").nth(1).unwrap().replace("maxSteps: 6", "maxSteps: 300").replace("everySteps: 3, keep: 2", "everySteps: 1000, keep: 2");
    std::fs::write(&manifest, text).unwrap();
    let work = fx.path().join("work");
    let child = onevision_run(&manifest, &work, fx.path()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let metrics_file = work.join("tiny-sft/metrics.jsonl");
    wait_for_steps(&metrics_file, 3);
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(onevision::runtime::EXIT_INTERRUPTED), "{stderr}");
    assert!(stderr.contains("run the same command again to resume"), "{stderr}");
    let st = json(&work.join("tiny-sft/status.json"));
    let step = st["progress"]["step"].as_u64().unwrap();
    assert!((3..300).contains(&step), "{st}");
    assert!(work.join(format!("tiny-sft/checkpoints/ckpt-{step:010}")).is_dir(), "no checkpoint at step {step}");

    let again = onevision_run(&manifest, &work, fx.path()).output().unwrap();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let m = metrics(&metrics_file);
    assert_eq!(m.len(), 300);
    assert!(m.iter().enumerate().all(|(i, x)| x["step"] == (i + 1) as u64), "steps not contiguous after resume");
    assert_eq!(json(&work.join("tiny-sft/status.json"))["phase"], "Succeeded");
}

#[test]
fn a_killed_rank_restarts_the_gang_from_the_last_checkpoint_and_the_curve_continues() {
    let fx = Fixture::new(64, 2);
    let manifest = fx.path().join("gang.yaml");
    let text = MANIFEST.split("---").nth(1).unwrap().replace("maxSteps: 6", "maxSteps: 200").replace("everySteps: 3, keep: 2", "everySteps: 5, keep: 2");
    std::fs::write(&manifest, text).unwrap();
    let work = fx.path().join("work");
    let child = onevision_run(&manifest, &work, fx.path()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let metrics_file = work.join("tiny-sft/metrics.jsonl");
    wait_for_steps(&metrics_file, 7);
    let job = work.join("tiny-sft/job.yaml").display().to_string();
    let rank1 = *trainer_pids(&job, "ONEVISION_REPLICA_INDEX=1").first().expect("rank 1 process");
    unsafe {
        libc::kill(rank1, libc::SIGKILL);
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("restarting the gang (1/3)"), "{stderr}");
    let st = json(&work.join("tiny-sft/status.json"));
    assert_eq!(st["phase"], "Succeeded");
    assert_eq!(st["restarts"], 1);
    let m = metrics(&metrics_file);
    assert_eq!(m.len(), 200, "the curve must continue from the checkpoint without gaps or duplicates");
    assert!(m.iter().enumerate().all(|(i, x)| x["step"] == (i + 1) as u64));
    let log = std::fs::read_to_string(work.join("tiny-sft/logs/tiny-sft-trainer-0.log")).unwrap();
    assert!(log.contains("resumed"), "the restarted gang did not resume from a checkpoint:\n{log}");
}
