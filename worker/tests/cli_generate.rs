//! `onevision generate --format json` on the transformers fixtures must reproduce transformers'
//! prompt ids and greedy tokens exactly (tests/reference/generate.py wrote greedy.json with
//! `model.generate(do_sample=False)`), and `--dump-first-logits` must equal its first-step logits.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/fixtures")
}

fn run_generate(ckpt: &Path, case: &Value, extra: &[&str]) -> Value {
    let case_dir = ckpt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_onevision"));
    cmd.arg("generate").arg("--model").arg(ckpt.join("model"));
    for img in case["images"].as_array().unwrap() {
        cmd.arg("--image").arg(case_dir.join(img.as_str().unwrap()));
    }
    cmd.args(["--prompt", case["prompt"].as_str().unwrap()]);
    cmd.args(["--max-new-tokens", &case["max_new_tokens"].to_string(), "--temperature", "0", "--format", "json"]);
    cmd.args(extra);
    let out = cmd.output().expect("spawn onevision");
    assert!(out.status.success(), "onevision generate failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().expect("no output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

#[test]
fn json_output_equals_transformers_greedy_tokens() {
    for ckpt in ["tiny-tied-f32", "tiny-untied-bf16"] {
        let dir = fixtures().join(ckpt);
        let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
        assert!(cases.len() >= 3, "fixture {ckpt} has too few cases");
        for case in &cases {
            let name = case["name"].as_str().unwrap();
            let expected: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(name).join("greedy.json")).unwrap()).unwrap();
            let got = run_generate(&dir, case, &[]);
            assert_eq!(got["prompt_token_ids"], expected["prompt_token_ids"], "{ckpt}/{name}: prompt ids");
            assert_eq!(got["token_ids"], expected["token_ids"], "{ckpt}/{name}: greedy tokens");
            assert_eq!(got["text"], expected["text"], "{ckpt}/{name}: decoded text");
        }
    }
}

#[test]
fn dump_first_logits_matches_transformers_last_prefill_row() {
    let dir = fixtures().join("tiny-tied-f32");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let case = cases.iter().find(|c| c["name"] == "one_image").expect("one_image case");
    let tmp = tempfile::tempdir().unwrap();
    let npy = tmp.path().join("first.npy");
    run_generate(&dir, case, &["--dump-first-logits", npy.to_str().unwrap()]);
    let got = onevision_model::npy::Npy::read(&npy).unwrap();
    let want = onevision_model::npy::Npy::read(dir.join("one_image/logits.npy")).unwrap();
    let (v, w) = (got.to_f32(), want.to_f32());
    let vocab = *want.shape.last().unwrap();
    assert_eq!(got.shape, vec![vocab]);
    let last = &w[w.len() - vocab..];
    // f32 end to end: the model's parity tests hold logits to 1e-4 relative error; same bound here.
    let num: f64 = v.iter().zip(last).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = last.iter().map(|b| (*b as f64).powi(2)).sum();
    assert!((num / den).sqrt() < 1e-4, "relative error {}", (num / den).sqrt());
}

#[test]
fn unreadable_image_is_a_clear_error() {
    let dir = fixtures().join("tiny-tied-f32");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_onevision"))
        .args(["generate", "--model"])
        .arg(dir.join("model"))
        .arg("--image")
        .arg(&bad)
        .args(["--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.png"), "error should name the file: {err}");
    assert!(!err.contains("panicked"), "must not panic: {err}");
}
