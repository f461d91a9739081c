//! A real Prometheus (the Debian package, via `scripts/install-prometheus` or `$PROMETHEUS`)
//! scrapes the worker telemetry over HTTP while a simulated GRPO job records steps and rollout
//! requests through the real recorders, and every PromQL expression of the "Training job" and
//! "Rollout pool" dashboards is evaluated through Prometheus's HTTP API: each must return data.
//!
//! A second test does the same against a real local run: `onevision run` of a tiny GRPOJob (one
//! trainer process serving `/metrics` on the port the local runner gave it, found by Prometheus
//! through the run's `metrics-targets.json` file_sd list), checking every "Training job" panel
//! (rollout panels need workers). The run sets `ONEVISION_PEAK_TFLOPS`, without which a CPU run
//! has no MFU, so the MFU panel must have data too.
//!
//! Without Prometheus the tests are skipped with a message, except under CI=true where it fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use onevision::telemetry::{GrpoMetrics, JobLabels, Phase, RewardStats, StepMetrics, Telemetry};
use serde_json::Value;

mod runtime_common;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `$PROMETHEUS`, else the path `scripts/install-prometheus` prints.
fn prometheus_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("PROMETHEUS").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let script = repo().join("scripts/install-prometheus");
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} exited with {}", script.display(), out.status));
    }
    let path = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").trim().to_string();
    Ok(PathBuf::from(path))
}

/// Kills Prometheus when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops `onevision run` with SIGTERM (it then stops its trainer processes), SIGKILL after 15 s.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HTTP/1.0 GET; returns (status code, body).
async fn get(addr: SocketAddr, path_and_query: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `expr` of a dashboard JSON, with the template variables set as Grafana's "All" does.
fn dashboard_exprs(file: &str) -> Vec<(String, String)> {
    let path = repo().join("charts/onevision/dashboards").join(file);
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap().replace("$namespace", ".*").replace("$job", ".*");
            out.push((format!("{file} / {}", p["title"].as_str().unwrap()), expr));
        }
    }
    out
}

/// A GRPO job with two rollout workers, recording through the real recorders every 100 ms.
fn simulate(t: &Telemetry, tick: u64) {
    let job = JobLabels::new("team-a", "grpo-demo", "GRPOJob");
    let trainer = t.trainer(&job);
    let x = tick as f64;
    trainer.record_step(&StepMetrics {
        step: tick,
        total_steps: 10_000,
        loss: 1.0 / (1.0 + x),
        learning_rate: 1e-6,
        grad_norm: 0.8,
        tokens_per_second: 1500.0,
        samples_per_second: 6.0,
        mfu: Some(0.35),
        phase_seconds: vec![
            (Phase::RolloutWait, 0.04),
            (Phase::Reference, 0.01),
            (Phase::ForwardBackward, 0.03),
            (Phase::Optimizer, 0.01),
            (Phase::WeightSync, 0.005),
        ],
        grpo: Some(GrpoMetrics {
            rewards: vec![
                RewardStats { name: "accuracy".into(), mean: 0.5, std: 0.4 },
                RewardStats { name: "total".into(), mean: 1.4, std: 0.4 },
            ],
            accuracy: 0.5,
            kl: 0.01,
            clip_fraction: 0.05,
            entropy: 0.6,
            response_length: 180.0,
            zero_advantage_fraction: 0.1,
            sampling_rounds: 1.0,
        }),
    });
    trainer.set_rollout_workers(2);
    if tick.is_multiple_of(10) {
        trainer.checkpoint_saved(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64);
        trainer.add_phase_seconds(Phase::Checkpoint, 0.2);
    }
    trainer.set_memory("host_rss", "0", onevision::telemetry::process_rss_bytes().unwrap_or(1 << 28));
    for w in ["rollout-0", "rollout-1"] {
        let r = t.rollout(&job, w);
        r.request_finished(256, 0.3 + 0.1 * (tick % 5) as f64);
        r.set_queue_depth((tick % 3) as usize);
        r.set_batch_occupancy(6, 8);
        r.set_weight_version(tick.saturating_sub(1), tick);
        r.set_memory("host_rss", 1 << 28);
    }
}

/// Starts Prometheus scraping every second the targets `sd` names (a `static_configs` or
/// `file_sd_configs` entry); returns (process guard, web address, log path).
fn start_prometheus(prometheus: &Path, dir: &Path, sd: &str) -> (Killed, SocketAddr, PathBuf) {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: onevision-workers\n    {sd}\n"
        ),
    )
    .unwrap();
    let web: SocketAddr = format!("127.0.0.1:{}", runtime_common::free_port()).parse().unwrap();
    let log_path = dir.join("prometheus.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", prometheus.display()));
    (Killed(child), web, log_path)
}

/// Evaluates `exprs`; returns the failures (no finite value).
async fn failing(web: SocketAddr, exprs: &[(String, String)]) -> Vec<String> {
    let mut failures = Vec::new();
    for (panel, expr) in exprs {
        let (code, body) = get(web, &format!("/api/v1/query?query={}", percent_encode(expr))).await.expect("query Prometheus");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
        let finite = result.iter().any(|s| {
            s["value"][1].as_str().and_then(|x| x.parse::<f64>().ok()).is_some_and(f64::is_finite)
        });
        if code != 200 || v["status"] != "success" || !finite {
            failures.push(format!("{panel}: {expr}\n  -> HTTP {code}: {body}"));
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_grpo_run_fills_the_training_dashboard() {
    let prometheus = match prometheus_binary() {
        Ok(p) => p,
        Err(e) if in_ci() => panic!("CI=true and Prometheus is unavailable: {e}"),
        Err(e) => {
            eprintln!("SKIPPED (set CI=true to make this fail): {e}");
            return;
        }
    };
    let fx = runtime_common::Fixture::new(32, 6);
    let manifest = fx.path().join("grpo.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: onevision.dev/v1alpha1\nkind: GRPOJob\nmetadata: {name: obs-grpo}\nspec:\n\
         \x20 model: {path: /data/model}\n  dataset: {path: /data/data/train.jsonl}\n  output: {path: /data/out/obs-grpo}\n\
         \x20 storage: {persistentVolumeClaim: {claimName: data}}\n\
         \x20 trainer: {nodes: 1, image: onevision:test, masterPort: MASTER, coordinatorPort: COORD}\n  rollout: {replicas: 0}\n\
         \x20 grpo: {groupSize: 4, maxNewTokens: 16, temperature: 1.0, klBeta: 0.04, rewards: [{name: accuracy}, {name: format, weight: 0.5}]}\n\
         \x20 hyperparameters: {learningRate: 1.0e-3, globalBatchSize: 8, microBatchSize: 4, maxSteps: 2000}\n\
         \x20 checkpoint: {everySteps: 2}\n",
    )
    .unwrap();
    // Free ports instead of the defaults (29500, 50051), which other local runs may hold.
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("MASTER", &runtime_common::free_port().to_string())
        .replace("COORD", &runtime_common::free_port().to_string());
    std::fs::write(&manifest, text).unwrap();
    let run_log = fx.path().join("run.log");
    let run = Command::new(env!("CARGO_BIN_EXE_onevision"))
        .arg("run")
        .arg(&manifest)
        .arg("--workdir")
        .arg(fx.path().join("work"))
        .arg("--data-root")
        .arg(fx.path())
        .arg("--no-progress-bars")
        // A CPU has no datasheet peak: give one so that the trainer exports MFU.
        .env("ONEVISION_PEAK_TFLOPS", "0.05")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&run_log).unwrap())
        .stderr(std::fs::File::create(fx.path().join("run.err")).unwrap())
        .spawn()
        .expect("start onevision run");
    let _run = Stopped(run);
    // The planner gives the trainer ONEVISION_METRICS_ADDR=0.0.0.0:9400; the local runner moves
    // it to a free port and lists it for Prometheus.
    let targets = fx.path().join("work/obs-grpo/metrics-targets.json");
    let start = Instant::now();
    while !targets.exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "the run wrote no {}", targets.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed: Value = serde_json::from_str(&std::fs::read_to_string(&targets).unwrap()).unwrap();
    assert_eq!(listed[0]["labels"]["role"], "trainer", "{listed}");
    assert_eq!(listed[0]["labels"]["pod"], "obs-grpo-trainer-0", "{listed}");
    let dir = tempfile::tempdir().unwrap();
    let sd = format!("file_sd_configs: [{{files: ['{}'], refresh_interval: 1s}}]", targets.display());
    let (_prom, web, log_path) = start_prometheus(&prometheus, dir.path(), &sd);

    // The trainer has done a few steps (and a checkpoint) and been scraped a few times.
    let ready = "onevision_trainer_step >= 3 and count_over_time(onevision_trainer_step[1m]) >= 4 and onevision_trainer_last_checkpoint_timestamp_seconds > 0";
    let start = Instant::now();
    loop {
        if let Ok((200, body)) = get(web, &format!("/api/v1/query?query={}", percent_encode(ready))).await {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if v["data"]["result"].as_array().is_some_and(|r| !r.is_empty()) {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the run's trainer was not scraped with 3 steps; Prometheus log:\n{}\nrun stdout:\n{}\nrun stderr:\n{}\ntrainer log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default(),
            std::fs::read_to_string(&run_log).unwrap_or_default(),
            std::fs::read_to_string(fx.path().join("run.err")).unwrap_or_default(),
            std::fs::read_to_string(fx.path().join("work/obs-grpo/logs/obs-grpo-trainer-0.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let exprs: Vec<(String, String)> = dashboard_exprs("training-job.json");
    assert!(exprs.iter().any(|(panel, _)| panel.contains("MFU")), "no MFU panel in {exprs:?}");
    assert!(exprs.len() >= 16, "{} expressions", exprs.len());
    let failures = failing(web, &exprs).await;
    assert!(failures.is_empty(), "{} of {} expressions returned no data from the real run:\n{}", failures.len(), exprs.len(), failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_dashboard_expression_returns_data_from_a_real_prometheus() {
    let prometheus = match prometheus_binary() {
        Ok(p) => p,
        Err(e) if in_ci() => panic!("CI=true and Prometheus is unavailable: {e}"),
        Err(e) => {
            eprintln!("SKIPPED (set CI=true to make this fail): {e}");
            return;
        }
    };

    let telemetry = Telemetry::new();
    let server = telemetry.serve("127.0.0.1:0".parse().unwrap()).await.expect("metrics server");
    let target = server.local_addr();
    let t = telemetry.clone();
    let sim = tokio::spawn(async move {
        for tick in 1.. {
            simulate(&t, tick);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let (_prom, web, log_path) = start_prometheus(&prometheus, dir.path(), &format!("static_configs: [{{targets: ['{target}']}}]"));
    let show_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Ready, then scraped the target successfully a few times (rate() needs two samples).
    let start = Instant::now();
    loop {
        let q = format!("/api/v1/query?query={}", percent_encode("count_over_time(up{job=\"onevision-workers\"}[1m]) >= 4 and up == 1"));
        if let Ok((200, body)) = get(web, &q).await {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if v["data"]["result"].as_array().is_some_and(|r| !r.is_empty()) {
                break;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "Prometheus never scraped {target}; its log:\n{}", show_log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let mut exprs = dashboard_exprs("training-job.json");
    exprs.extend(dashboard_exprs("rollout-pool.json"));
    assert!(exprs.len() >= 25, "{} expressions", exprs.len());
    let failures = failing(web, &exprs).await;
    sim.abort();
    assert!(failures.is_empty(), "{} of {} dashboard expressions returned no data:\n{}", failures.len(), exprs.len(), failures.join("\n"));
}
