//! MFU in `metrics.jsonl` from a real `onevision run` on the CPU (tiny model): with
//! `ONEVISION_PEAK_TFLOPS` every SFT step's `mfu` equals the step's model FLOPs (recomputed here
//! from the dataset and `onevision_model::flops`) over its logged time × the peak, and every GRPO
//! step has an MFU whose implied FLOPs lie within what its batch can hold; without the variable
//! (a CPU has no datasheet peak) there is no `mfu` key.

mod runtime_common;

use std::path::Path;
use std::process::Command;

use onevision::training::Encoder;
use onevision_data::{Dataset, ReadOptions};
use onevision_model::flops::{train_step_flops, VisionTrainable};
use onevision_model::{PromptInput, Qwen25VlConfig};
use runtime_common::{free_port, metrics, Fixture};

const PEAK_TFLOPS: f64 = 1.0;

// Every step is the whole 4-row training set (globalBatchSize 4), in whatever order, so each
// step's FLOPs are the same sum over the dataset. freezeVision defaults to true: the vision tower
// runs forward only, the merger trains.
const MANIFEST: &str = r#"
apiVersion: onevision.dev/v1alpha1
kind: SFTJob
metadata: {name: mfu-sft}
spec:
  model: {path: /data/model}
  dataset: {path: /data/data/train.jsonl}
  output: {path: /data/out/mfu-sft}
  storage: {persistentVolumeClaim: {claimName: data}}
  trainer: {nodes: 1, image: onevision:test, masterPort: MASTER, coordinatorPort: COORD}
  hyperparameters: {learningRate: 1.0e-3, globalBatchSize: 4, microBatchSize: 2, maxSteps: 2, maxSeqLen: 4096, lrSchedule: constant}
  eval: {dataset: {path: /data/data/heldout.jsonl}, everySteps: 100}
  checkpoint: {everySteps: 100}
---
apiVersion: onevision.dev/v1alpha1
kind: GRPOJob
metadata: {name: mfu-grpo}
spec:
  model: {fromSFTJob: mfu-sft}
  dataset: {path: /data/data/train.jsonl}
  output: {path: /data/out/mfu-grpo}
  storage: {persistentVolumeClaim: {claimName: data}}
  trainer: {nodes: 1, image: onevision:test, masterPort: MASTER, coordinatorPort: COORD}
  rollout: {replicas: 0}
  grpo: {groupSize: 2, maxNewTokens: 8, temperature: 1.0, klBeta: 0.04, rewards: [{name: accuracy}]}
  hyperparameters: {learningRate: 1.0e-3, globalBatchSize: 4, microBatchSize: 4, maxSteps: 2, maxSeqLen: 4096}
  eval: {dataset: {path: /data/data/heldout.jsonl}, everySteps: 100}
  checkpoint: {everySteps: 100}
"#;

/// `onevision run` of `manifest` with `ONEVISION_PEAK_TFLOPS` set to `peak` (removed when `None`).
fn run(fx: &Fixture, manifest: &str, work: &str, peak: Option<f64>) {
    let path = fx.path().join(format!("{work}.yaml"));
    let text = manifest.replace("MASTER", &free_port().to_string()).replace("COORD", &free_port().to_string());
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_onevision"));
    cmd.arg("run").arg(&path).arg("--workdir").arg(fx.path().join(work)).arg("--data-root").arg(fx.path());
    match peak {
        Some(p) => cmd.env("ONEVISION_PEAK_TFLOPS", p.to_string()),
        None => cmd.env_remove("ONEVISION_PEAK_TFLOPS"),
    };
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "onevision run failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn prompts(model: &Path, data: &Path, f: impl Fn(&Encoder, &onevision_data::Sample) -> PromptInput) -> Vec<PromptInput> {
    let enc = Encoder::from_dir(model).unwrap();
    let ds = Dataset::open(data, &ReadOptions { check_image_files: true, ..Default::default() }).unwrap();
    (0..ds.len()).map(|i| f(&enc, &ds.get(i).unwrap())).collect()
}

fn num(m: &serde_json::Value, k: &str) -> f64 {
    m[k].as_f64().unwrap_or_else(|| panic!("no number `{k}` in {m}"))
}

#[test]
fn mfu_is_the_steps_model_flops_over_its_time_and_the_peak() {
    let fx = Fixture::new(4, 2);
    run(&fx, MANIFEST, "with-peak", Some(PEAK_TFLOPS));
    let cfg = Qwen25VlConfig::from_dir(fx.model()).unwrap();

    // SFT: forward + backward over every full training sequence (prompt, answer, image tokens).
    let sft = prompts(&fx.model(), &fx.train(), |e, s| e.encode_sft(s).unwrap().input);
    assert!(sft.iter().all(|p| p.input_ids.len() < 4096 && !p.image_grid_thw.is_empty()));
    let flops = train_step_flops(&cfg, &sft, VisionTrainable { tower: false, merger: true });
    let m = metrics(&fx.path().join("with-peak/mfu-sft/metrics.jsonl"));
    assert_eq!(m.len(), 2);
    for x in &m {
        let secs = num(x, "time/forward_backward") + num(x, "time/optimizer");
        let expected = flops / (secs * PEAK_TFLOPS * 1e12);
        // Both sides are the same few f64 operations on exactly representable integers and the
        // logged times (JSON round-trips f64 exactly); only the order of the time sum may differ.
        let rel = (num(x, "mfu") - expected).abs() / expected;
        assert!(rel < 1e-9, "mfu {} vs {expected} (rel {rel}) in {x}", x["mfu"]);
    }

    // GRPO: the update's FLOPs over its forward_backward + optimizer time. Completion lengths
    // are not logged, so bound the implied FLOPs: at least one shortest prompt with one
    // completion token, at most every training prompt × groupSize with maxNewTokens each.
    let grpo = prompts(&fx.model(), &fx.train(), |e, s| e.encode_prompt(s).unwrap());
    let trainable = VisionTrainable { tower: false, merger: true };
    let with_completion = |p: &PromptInput, n: usize| PromptInput { input_ids: vec![0; p.input_ids.len() + n], ..p.clone() };
    let lower = grpo.iter().map(|p| train_step_flops(&cfg, [&with_completion(p, 1)], trainable)).fold(f64::INFINITY, f64::min);
    let longest: Vec<PromptInput> = grpo.iter().flat_map(|p| [with_completion(p, 8), with_completion(p, 8)]).collect();
    let upper = train_step_flops(&cfg, &longest, trainable);
    let m = metrics(&fx.path().join("with-peak/mfu-grpo/metrics.jsonl"));
    assert_eq!(m.len(), 2);
    for x in &m {
        let implied = num(x, "mfu") * (num(x, "time/forward_backward") + num(x, "time/optimizer")) * PEAK_TFLOPS * 1e12;
        assert!(implied >= lower * (1.0 - 1e-9) && implied <= upper * (1.0 + 1e-9), "implied FLOPs {implied} outside [{lower}, {upper}]: {x}");
    }
}

#[test]
fn without_a_peak_a_cpu_run_logs_no_mfu() {
    let fx = Fixture::new(4, 2);
    let sft_only = MANIFEST.split("---").next().unwrap();
    run(&fx, sft_only, "no-peak", None);
    let m = metrics(&fx.path().join("no-peak/mfu-sft/metrics.jsonl"));
    assert_eq!(m.len(), 2);
    assert!(m.iter().all(|x| x.get("mfu").is_none() && x.get("loss").is_some()), "{m:?}");
}

#[test]
fn an_unusable_peak_fails_the_run_naming_the_variable() {
    let fx = Fixture::new(4, 2);
    let path = fx.path().join("bad.yaml");
    let text = MANIFEST.split("---").next().unwrap().replace("MASTER", &free_port().to_string()).replace("COORD", &free_port().to_string());
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_onevision"))
        .arg("run")
        .arg(&path)
        .arg("--workdir")
        .arg(fx.path().join("bad"))
        .arg("--data-root")
        .arg(fx.path())
        .env("ONEVISION_PEAK_TFLOPS", "fast")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let log = std::fs::read_to_string(fx.path().join("bad/mfu-sft/logs/mfu-sft-trainer-0.log")).unwrap_or_default();
    let all = format!("{}{}{log}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    assert!(all.contains("ONEVISION_PEAK_TFLOPS=\"fast\""), "{all}");
}
