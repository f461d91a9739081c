//! The Prometheus side of `onevision::telemetry`: what the exposition text contains after the
//! typed recorders ran, that it follows the naming and label conventions the dashboards rely on,
//! and that `/metrics` serves it over real HTTP.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use onevision::telemetry::{
    metrics_addr_from_env, GrpoMetrics, JobLabels, Phase, RewardStats, StepMetrics, Telemetry,
    TelemetryError, METRICS_ADDR_ENV,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One sample line of the exposition: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the sample lines of OpenMetrics text (comments skipped). Label values in these tests
/// never contain `,` `"` or `}`, so a split-based parser is enough.
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|e| panic!("value of {line:?}: {e}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let labels = body
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("label {kv:?} in {line:?}"));
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.push(Sample { name, labels, value });
    }
    out
}

/// The value of the one sample named `name` whose labels include all of `want`.
fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    let hits: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect();
    assert_eq!(hits.len(), 1, "expected one sample {name}{want:?}, got {hits:?}");
    hits[0].value
}

fn job() -> JobLabels {
    JobLabels::new("team-a", "grpo-geo", "GRPOJob")
}

fn grpo_step(step: u64) -> StepMetrics {
    StepMetrics {
        step,
        total_steps: 100,
        loss: 0.25,
        learning_rate: 1e-6,
        grad_norm: 1.5,
        tokens_per_second: 1234.5,
        samples_per_second: 8.0,
        mfu: Some(0.41),
        phase_seconds: vec![(Phase::RolloutWait, 2.0), (Phase::ForwardBackward, 0.5), (Phase::Optimizer, 0.25)],
        grpo: Some(GrpoMetrics {
            rewards: vec![
                RewardStats { name: "accuracy".into(), mean: 0.625, std: 0.5 },
                RewardStats { name: "format".into(), mean: 1.0, std: 0.0 },
                RewardStats { name: "total".into(), mean: 1.625, std: 0.5 },
            ],
            accuracy: 0.625,
            kl: 0.002,
            clip_fraction: 0.125,
            entropy: 0.75,
            response_length: 212.0,
            zero_advantage_fraction: 0.25,
            sampling_rounds: 1.5,
        }),
    }
}

/// Records every trainer and rollout signal once, so every family has samples.
fn record_everything(t: &Telemetry) {
    let trainer = t.trainer(&job());
    trainer.record_step(&grpo_step(3));
    trainer.add_phase_seconds(Phase::Reference, 0.125);
    trainer.add_phase_seconds(Phase::WeightSync, 0.0625);
    trainer.add_phase_seconds(Phase::Checkpoint, 1.0);
    trainer.set_accuracy("eval", 0.5);
    trainer.set_rollout_workers(2);
    trainer.checkpoint_saved(1_700_000_000);
    trainer.set_memory("host_rss", "0", 1 << 30);
    let rollout = t.rollout(&job(), "rollout-0");
    rollout.request_finished(640, 0.3);
    rollout.request_finished(360, 7.0);
    rollout.add_generated_tokens(100);
    rollout.set_queue_depth(3);
    rollout.set_batch_occupancy(6, 8);
    rollout.set_weight_version(4, 6);
    rollout.set_memory("device", 2 << 30);
}

#[test]
fn a_grpo_step_is_exported_with_its_values_and_job_labels() {
    let t = Telemetry::new();
    let trainer = t.trainer(&job());
    trainer.record_step(&grpo_step(1));
    trainer.record_step(&grpo_step(2));
    let s = parse(&t.encode());
    let j = [("namespace", "team-a"), ("job_name", "grpo-geo"), ("kind", "GRPOJob")];
    assert_eq!(value(&s, "onevision_trainer_step", &j), 2.0);
    assert_eq!(value(&s, "onevision_trainer_total_steps", &j), 100.0);
    assert_eq!(value(&s, "onevision_trainer_loss", &j), 0.25);
    assert_eq!(value(&s, "onevision_trainer_learning_rate", &j), 1e-6);
    assert_eq!(value(&s, "onevision_trainer_grad_norm", &j), 1.5);
    assert_eq!(value(&s, "onevision_trainer_tokens_per_second", &j), 1234.5);
    assert_eq!(value(&s, "onevision_trainer_samples_per_second", &j), 8.0);
    assert_eq!(value(&s, "onevision_trainer_mfu_ratio", &j), 0.41);
    assert_eq!(value(&s, "onevision_trainer_kl", &j), 0.002);
    assert_eq!(value(&s, "onevision_trainer_clip_fraction_ratio", &j), 0.125);
    assert_eq!(value(&s, "onevision_trainer_entropy", &j), 0.75);
    assert_eq!(value(&s, "onevision_trainer_response_length_tokens", &j), 212.0);
    assert_eq!(value(&s, "onevision_trainer_zero_advantage_fraction_ratio", &j), 0.25);
    assert_eq!(value(&s, "onevision_trainer_sampling_rounds", &j), 1.5);
    assert_eq!(value(&s, "onevision_trainer_accuracy_ratio", &[("split", "train")]), 0.625);
    assert_eq!(value(&s, "onevision_trainer_reward_mean", &[("reward", "format")]), 1.0);
    assert_eq!(value(&s, "onevision_trainer_reward_mean", &[("reward", "total")]), 1.625);
    assert_eq!(value(&s, "onevision_trainer_reward_std", &[("reward", "accuracy")]), 0.5);
    // Phase seconds are counters: two steps add up.
    assert_eq!(value(&s, "onevision_trainer_step_phase_seconds_total", &[("phase", "rollout_wait")]), 4.0);
    assert_eq!(value(&s, "onevision_trainer_step_phase_seconds_total", &[("phase", "optimizer")]), 0.5);
}

#[test]
fn sft_steps_export_no_grpo_series_and_no_mfu_when_unknown() {
    let t = Telemetry::new();
    let trainer = t.trainer(&JobLabels::new("default", "sft-1", "SFTJob"));
    trainer.record_step(&StepMetrics { step: 1, total_steps: 5, loss: 2.5, ..Default::default() });
    let text = t.encode();
    let names: BTreeSet<String> = parse(&text).into_iter().map(|s| s.name).collect();
    assert!(names.contains("onevision_trainer_loss"), "{text}");
    for absent in ["onevision_trainer_kl", "onevision_trainer_reward_mean", "onevision_trainer_mfu_ratio", "onevision_rollout_requests_total"] {
        assert!(!names.contains(absent), "{absent} exported for an SFT step without it:\n{text}");
    }
}

#[test]
fn bad_phase_readings_never_decrease_a_counter() {
    let t = Telemetry::new();
    let trainer = t.trainer(&job());
    trainer.add_phase_seconds(Phase::Optimizer, 1.5);
    trainer.add_phase_seconds(Phase::Optimizer, -3.0);
    trainer.add_phase_seconds(Phase::Optimizer, f64::NAN);
    trainer.add_phase_seconds(Phase::Optimizer, f64::INFINITY);
    let s = parse(&t.encode());
    assert_eq!(value(&s, "onevision_trainer_step_phase_seconds_total", &[("phase", "optimizer")]), 1.5);
}

#[test]
fn rollout_counters_histogram_and_version_lag() {
    let t = Telemetry::new();
    let r = t.rollout(&job(), "w1");
    r.request_finished(100, 0.2);
    r.request_finished(50, 3.0);
    r.request_finished(10, f64::NAN); // counted, latency dropped
    r.set_batch_occupancy(3, 4);
    r.set_batch_occupancy(1, 0); // no slots: 0, not NaN
    r.set_weight_version(7, 5); // a worker ahead of a stale trainer view: lag 0, not negative
    let s = parse(&t.encode());
    let w = [("worker", "w1"), ("job_name", "grpo-geo")];
    assert_eq!(value(&s, "onevision_rollout_generated_tokens_total", &w), 160.0);
    assert_eq!(value(&s, "onevision_rollout_requests_total", &w), 3.0);
    assert_eq!(value(&s, "onevision_rollout_request_duration_seconds_count", &w), 2.0);
    assert!((value(&s, "onevision_rollout_request_duration_seconds_sum", &w) - 3.2).abs() < 1e-9);
    assert_eq!(value(&s, "onevision_rollout_request_duration_seconds_bucket", &[("le", "0.25")]), 1.0);
    assert_eq!(value(&s, "onevision_rollout_request_duration_seconds_bucket", &[("le", "5.0")]), 2.0);
    assert_eq!(value(&s, "onevision_rollout_request_duration_seconds_bucket", &[("le", "+Inf")]), 2.0);
    assert_eq!(value(&s, "onevision_rollout_batch_occupancy_ratio", &w), 0.0);
    assert_eq!(value(&s, "onevision_rollout_weight_version", &w), 7.0);
    assert_eq!(value(&s, "onevision_rollout_weight_version_lag", &w), 0.0);
    r.set_weight_version(5, 9);
    let s = parse(&t.encode());
    assert_eq!(value(&s, "onevision_rollout_weight_version_lag", &w), 4.0);
}

/// Every exported series is `onevision_<component>_<what>[_<unit>]` with a known component and
/// carries the job's namespace/job_name/kind labels (the dashboards filter on them).
#[test]
fn every_series_follows_the_naming_and_label_conventions() {
    let t = Telemetry::new();
    record_everything(&t);
    let text = t.encode();
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics text must end with # EOF");
    let samples = parse(&text);
    assert!(samples.len() > 40, "{text}");
    for s in &samples {
        let rest = s.name.strip_prefix("onevision_").unwrap_or_else(|| panic!("{} lacks the onevision_ prefix", s.name));
        let (component, what) = rest.split_once('_').unwrap_or_else(|| panic!("{} has no <what>", s.name));
        assert!(["trainer", "rollout"].contains(&component), "{}: unknown component", s.name);
        assert!(
            !what.is_empty() && what.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{}: not snake_case",
            s.name
        );
        for l in ["namespace", "job_name", "kind"] {
            assert!(s.labels.contains_key(l), "{} {:?} lacks label {l}", s.name, s.labels);
        }
        // `job` is Prometheus's own target label; a series label of that name would be renamed.
        assert!(!s.labels.contains_key("job"), "{}: label `job` clashes with the scrape job", s.name);
    }
    // Every family has a HELP text.
    let families: BTreeSet<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    for f in &families {
        assert!(text.contains(&format!("# HELP {f} ")), "family {f} has no HELP");
    }
}

/// Every onevision_trainer_*/onevision_rollout_* metric the Grafana dashboards query is one the
/// recorders export (the dashboards would show "No data" forever otherwise).
#[test]
fn every_worker_metric_the_dashboards_query_is_exported() {
    let t = Telemetry::new();
    record_everything(&t);
    let exported: BTreeSet<String> = parse(&t.encode()).into_iter().map(|s| s.name).collect();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/onevision/dashboards");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dashboard dir entry").path();
        let text = std::fs::read_to_string(&path).expect("dashboard JSON");
        let mut rest = text.as_str();
        while let Some(i) = rest.find("onevision_") {
            let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            rest = &rest[i + name.len()..];
            if name.starts_with("onevision_operator_") {
                continue; // the operator's own registry (operator crate)
            }
            assert!(exported.contains(&name), "{} queries {name}, which no recorder exports", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} worker metric references found in {}", dir.display());
}

#[test]
fn step_json_has_the_fields_report_reads() {
    let v = grpo_step(7).to_json();
    assert_eq!(v["step"], 7);
    assert_eq!(v["loss"], 0.25);
    assert_eq!(v["reward"], 1.625, "reward is the `total` reward when present");
    assert_eq!(v["reward/format"], 1.0);
    assert_eq!(v["reward_std/accuracy"], 0.5);
    assert_eq!(v["accuracy"], 0.625);
    assert_eq!(v["kl"], 0.002);
    assert_eq!(v["time/rollout_wait"], 2.0);
    assert_eq!(v["tokens_per_second"], 1234.5);
    assert_eq!(v["mfu"], 0.41);
    let sft = StepMetrics { step: 1, loss: 1.0, ..Default::default() }.to_json();
    assert!(sft.get("reward").is_none() && sft.get("mfu").is_none(), "{sft}");
}

/// Sends one HTTP/1.0 request and returns (status line, headers, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to the metrics server");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.expect("send request");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read response");
    let text = String::from_utf8(buf).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header/body separator");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_ascii_lowercase(), body.to_string())
}

#[tokio::test]
async fn metrics_endpoint_serves_the_registry_over_http() {
    let t = Telemetry::new();
    let server = t.serve("127.0.0.1:0".parse().unwrap()).await.expect("bind an ephemeral port");
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);

    // Recorded after the server started: every scrape encodes the live registry.
    t.trainer(&job()).record_step(&grpo_step(5));
    let (status, headers, body) = http_get(addr, "/metrics").await;
    assert!(status.contains(" 200"), "{status}");
    assert!(headers.contains("content-type: application/openmetrics-text"), "{headers}");
    let s = parse(&body);
    assert_eq!(value(&s, "onevision_trainer_step", &[("job_name", "grpo-geo")]), 5.0);

    t.trainer(&job()).record_step(&grpo_step(6));
    let (_, _, body) = http_get(addr, "/metrics").await;
    assert_eq!(value(&parse(&body), "onevision_trainer_step", &[("job_name", "grpo-geo")]), 6.0);

    let (status, _, body) = http_get(addr, "/healthz").await;
    assert!(status.contains(" 200") && body == "ok", "{status} {body}");
    let (status, _, _) = http_get(addr, "/nope").await;
    assert!(status.contains(" 404"), "{status}");

    // A second server on the same port fails with an error naming the address.
    match t.serve(addr).await {
        Err(e @ TelemetryError::Bind { .. }) => assert!(e.to_string().contains(&addr.to_string()), "{e}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("bound {addr} twice"),
    }

    // Dropping the handle stops the server.
    drop(server);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "server still listening after drop");
}

#[test]
fn metrics_address_from_the_environment() {
    // The only test in this binary that touches this variable.
    std::env::remove_var(METRICS_ADDR_ENV);
    assert_eq!(metrics_addr_from_env().unwrap(), None);
    std::env::set_var(METRICS_ADDR_ENV, " 0.0.0.0:9400 ");
    assert_eq!(metrics_addr_from_env().unwrap(), Some("0.0.0.0:9400".parse().unwrap()));
    std::env::set_var(METRICS_ADDR_ENV, "9400");
    let err = metrics_addr_from_env().unwrap_err();
    assert!(matches!(err, TelemetryError::BadAddress { .. }));
    assert!(err.to_string().contains(METRICS_ADDR_ENV) && err.to_string().contains("host:port"), "{err}");
    std::env::remove_var(METRICS_ADDR_ENV);
}
