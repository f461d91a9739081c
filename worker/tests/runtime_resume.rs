//! Checkpoint and resume through the real entrypoint (`onevision trainer --job FILE`): a run
//! resumed from a checkpoint continues with exactly the losses of an uninterrupted run, a
//! corrupted latest checkpoint is refused with a warning and the previous one used, and
//! SIGTERM stops at a step boundary leaving a resumable checkpoint.

mod runtime_common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use runtime_common::{json, metrics, Fixture};

fn job_file(fx: &Fixture, out: &Path, max_steps: u32, every: u32) -> std::path::PathBuf {
    let text = format!(
        r#"apiVersion: onevision.dev/v1alpha1
kind: SFTJob
metadata: {{name: resume, namespace: default}}
spec:
  model: {{path: {model}}}
  dataset: {{path: {train}}}
  output: {{path: {out}}}
  trainer: {{nodes: 1, image: x}}
  hyperparameters: {{learningRate: 3.0e-3, globalBatchSize: 4, microBatchSize: 2, maxSteps: {max_steps}, lrSchedule: cosine, warmupSteps: 1, seed: 5}}
  checkpoint: {{everySteps: {every}, keep: 3}}
"#,
        model = fx.model().display(),
        train = fx.train().display(),
        out = out.display(),
    );
    let p = out.with_extension("yaml");
    std::fs::write(&p, text).unwrap();
    p
}

fn trainer(job: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_onevision"));
    c.args(["trainer", "--job"]).arg(job);
    // A world of one on a free coordinator port; no operator env needed.
    let port = runtime_common::free_port();
    c.env("ONEVISION_COORDINATOR", format!("127.0.0.1:{port}")).env("ONEVISION_RING_BIND", "127.0.0.1:0");
    c
}

fn run_ok(job: &Path) -> Output {
    let out = trainer(job).output().unwrap();
    assert!(out.status.success(), "trainer failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn losses(dir: &Path) -> Vec<(u64, f64)> {
    metrics(&dir.join("metrics.jsonl")).iter().map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap())).collect()
}

#[test]
fn resume_continues_the_loss_curve_and_a_corrupted_latest_checkpoint_falls_back() {
    let fx = Fixture::new(32, 2);
    let full = fx.path().join("full");
    run_ok(&job_file(&fx, &full, 6, 3));
    let reference = losses(&full);
    assert_eq!(reference.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    assert!(full.join("checkpoints/ckpt-0000000003").is_dir() && full.join("checkpoints/ckpt-0000000006").is_dir());

    // Resume from step 3: keep only that checkpoint, as if the gang died after step 4.
    let resumed = fx.path().join("resumed");
    std::fs::create_dir_all(resumed.join("checkpoints")).unwrap();
    copy_dir(&full.join("checkpoints/ckpt-0000000003"), &resumed.join("checkpoints/ckpt-0000000003"));
    let out = run_ok(&job_file(&fx, &resumed, 6, 3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resumed"), "{stderr}");
    let got = losses(&resumed);
    assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), vec![4, 5, 6]);
    for ((s, a), (_, b)) in got.iter().zip(&reference[3..]) {
        assert_eq!(a, b, "step {s}: resumed loss {a} != uninterrupted loss {b}");
    }

    // Corrupt the newest checkpoint of a copy of the finished run and extend it by 0 steps:
    // the trainer must refuse ckpt-6, warn, resume from ckpt-3 and redo steps 4..6 identically.
    let corrupt = fx.path().join("corrupt");
    std::fs::create_dir_all(corrupt.join("checkpoints")).unwrap();
    for c in ["ckpt-0000000003", "ckpt-0000000006"] {
        copy_dir(&full.join("checkpoints").join(c), &corrupt.join("checkpoints").join(c));
    }
    let victim = std::fs::read_dir(corrupt.join("checkpoints/ckpt-0000000006"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("checkpoint has safetensors files");
    let mut bytes = std::fs::read(&victim).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xFF;
    std::fs::write(&victim, bytes).unwrap();
    let out = run_ok(&job_file(&fx, &corrupt, 6, 3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WARN") && stderr.contains("ckpt-0000000006") && stderr.contains("refused"), "{stderr}");
    let got = losses(&corrupt);
    assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), vec![4, 5, 6]);
    for ((s, a), (_, b)) in got.iter().zip(&reference[3..]) {
        assert_eq!(a, b, "step {s}: loss after falling back {a} != {b}");
    }
    assert_eq!(json(&corrupt.join("status.json"))["phase"], "Succeeded");
}

#[test]
fn sigterm_stops_at_a_step_boundary_with_a_resumable_checkpoint() {
    let fx = Fixture::new(64, 2);
    let out_dir = fx.path().join("run");
    let job = job_file(&fx, &out_dir, 400, 1000);
    let mut child = trainer(&job).stderr(std::process::Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    while metrics_lines(&out_dir) < 2 {
        assert!(t.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(onevision::runtime::EXIT_INTERRUPTED));
    let done = metrics_lines(&out_dir) as u64;
    assert!(done < 400, "stopped only at the end");
    let ckpt = out_dir.join(format!("checkpoints/ckpt-{done:010}"));
    assert!(ckpt.is_dir(), "no checkpoint at the stop step {done}");
    assert_eq!(json(&out_dir.join("status.json"))["progress"]["step"], done);
}

fn metrics_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
