//! `onevision report DIR`: a generated metrics.jsonl (written by `StepMetrics::to_json`, as the
//! trainer does) becomes valid PNG plots of the requested size and an index.html showing them;
//! a malformed line is an error naming the file and line.

use std::path::Path;
use std::process::Command;

use onevision::cli::report::{generate, read_metrics, ReportError};
use onevision::telemetry::{GrpoMetrics, Phase, RewardStats, StepMetrics};

fn grpo_run(steps: u64) -> String {
    let mut out = String::new();
    for s in 1..=steps {
        let x = s as f64;
        let m = StepMetrics {
            step: s,
            total_steps: steps,
            loss: 1.0 / x,
            learning_rate: 1e-6,
            grad_norm: 0.5,
            tokens_per_second: 900.0 + 10.0 * x,
            samples_per_second: 4.0,
            mfu: None,
            phase_seconds: vec![(Phase::RolloutWait, 0.5), (Phase::ForwardBackward, 0.25 + 0.01 * x)],
            grpo: Some(GrpoMetrics {
                rewards: vec![
                    RewardStats { name: "accuracy".into(), mean: x / (steps as f64), std: 0.1 },
                    RewardStats { name: "format".into(), mean: 1.0, std: 0.0 },
                ],
                accuracy: x / (steps as f64),
                kl: 0.001 * x,
                clip_fraction: 0.1,
                entropy: 0.7,
                response_length: 120.0,
                zero_advantage_fraction: 0.2,
                sampling_rounds: 1.0,
            }),
        };
        out.push_str(&m.to_json().to_string());
        out.push('\n');
    }
    out
}

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

#[test]
fn grpo_run_gives_every_plot_and_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    std::fs::write(&metrics, grpo_run(30)).unwrap();
    let report = generate(&metrics, dir.path(), (640, 360)).expect("report");
    assert_eq!(report.steps, 30);
    let names: Vec<String> =
        report.plots.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["loss.png", "reward.png", "accuracy.png", "kl.png", "throughput.png", "step_time.png"]);
    let html = std::fs::read_to_string(&report.index).unwrap();
    for p in &report.plots {
        assert_eq!(png_size(p), (640, 360), "{}", p.display());
        // Decodes as an image and is not blank: the curves and labels drew pixels.
        let img = image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_rgb8();
        let non_white = img.pixels().filter(|px| px.0 != [255, 255, 255]).count();
        assert!(non_white > 2000, "{} is nearly blank ({non_white} non-white pixels)", p.display());
        let name = p.file_name().unwrap().to_string_lossy();
        assert!(html.contains(&format!("src=\"{name}\"")), "index.html does not show {name}");
    }
    assert!(html.contains("30 steps (1 to 30)"), "{html}");
    assert!(html.contains("<th>reward/format</th>"), "last-step table: {html}");
}

#[test]
fn sft_run_skips_plots_without_data() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    let lines: String = (1..=5)
        .map(|s| {
            StepMetrics { step: s, loss: 3.0 - s as f64 * 0.1, tokens_per_second: 500.0, ..Default::default() }
                .to_json()
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&metrics, lines).unwrap();
    let out = dir.path().join("plots");
    let report = generate(&metrics, &out, (400, 300)).expect("report");
    let names: Vec<String> =
        report.plots.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["loss.png", "throughput.png"]);
    assert!(!out.join("reward.png").exists());
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(!html.contains("reward.png"));
}

#[test]
fn held_out_evaluations_are_plotted_under_the_keys_the_trainer_writes() {
    // An SFT run has no training accuracy; its held-out evaluations (every 2 steps here) are the
    // accuracy plot's only data, under the keys runtime/trainer.rs adds to the step's line.
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    let lines: String = (1..=4)
        .map(|s| {
            let mut line = StepMetrics { step: s, loss: 2.0, ..Default::default() }.to_json();
            if s % 2 == 0 {
                line["eval_accuracy"] = serde_json::json!(0.1 * s as f64);
                line["eval_accuracy_sampled"] = serde_json::json!(0.05 * s as f64);
            }
            line.to_string() + "\n"
        })
        .collect();
    std::fs::write(&metrics, lines).unwrap();
    let report = generate(&metrics, dir.path(), (400, 300)).expect("report");
    let names: Vec<String> = report.plots.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["loss.png", "accuracy.png", "throughput.png"]);
    let html = std::fs::read_to_string(dir.path().join("index.html")).unwrap();
    assert!(html.contains("accuracy.png"), "{html}");
}

#[test]
fn malformed_lines_are_errors_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    let good = grpo_run(2);
    for (bad, needle) in [
        ("{\"step\": 3, \"loss\": 0.5", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ("{\"loss\": 0.5}", "`step`"),
        ("{\"step\": -1}", "`step`"),
        ("{\"step\": 3, \"loss\": \"high\"}", "`loss` must be a number"),
    ] {
        std::fs::write(&metrics, format!("{good}\n{bad}\n")).unwrap();
        let err = read_metrics(&metrics).unwrap_err();
        // Line 4: two good lines, one blank line (skipped but counted), then the bad one.
        assert!(matches!(err, ReportError::Line { line: 4, .. }), "{bad}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains("metrics.jsonl:4:") && msg.contains(needle), "{bad}: {msg}");
    }
    std::fs::write(&metrics, "\n\n").unwrap();
    assert!(matches!(read_metrics(&metrics), Err(ReportError::Empty { .. })));
    let missing = read_metrics(&dir.path().join("nope.jsonl")).unwrap_err();
    assert!(matches!(missing, ReportError::Read { .. }) && missing.to_string().contains("nope.jsonl"));
}

#[test]
fn the_cli_writes_the_report_and_fails_on_a_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("metrics.jsonl"), grpo_run(5)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_onevision"))
        .args(["report", "--width", "320", "--height", "200"])
        .arg(dir.path())
        .output()
        .expect("run onevision report");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("5 steps, 6 plots"));
    assert_eq!(png_size(&dir.path().join("kl.png")), (320, 200));
    assert!(dir.path().join("index.html").is_file());

    std::fs::write(dir.path().join("metrics.jsonl"), "{\"step\": 1}\nnot json\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_onevision")).arg("report").arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("metrics.jsonl:2:"), "{stderr}");
}
