//! The "Operator" Grafana dashboard against a real operator: `onevision-operator` reconciles an
//! SFTJob on the local cluster (its pod run by the test node agent with a stand-in `onevision`
//! that sleeps), a real Prometheus (`scripts/install-prometheus` or `$PROMETHEUS`) scrapes the
//! operator's `/metrics`, and every PromQL expression of `operator.json` must return data through
//! Prometheus's HTTP API. (The worker dashboards are checked in worker/tests/telemetry_prometheus.rs.)
//! The same operator exports its `reconcile` spans over OTLP (`OTEL_EXPORTER_OTLP_ENDPOINT`) to an
//! in-process receiver, flushing them when it stops.
//!
//! Skipped with a message without a cluster or Prometheus, except under CI=true where it fails.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use onevision_tests::{workspace_binary, workspace_root, BackgroundProcess, Cluster, NodeAgentConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// The worker tests' OTLP receiver (one copy of it in the repository).
#[path = "../../worker/tests/otlp_receiver/mod.rs"]
mod otlp_receiver;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

fn prometheus_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("PROMETHEUS").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let script = workspace_root().join("scripts/install-prometheus");
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} exited with {}", script.display(), out.status));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").trim()))
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    onevision_comms::ports::free_port().unwrap()
}

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

/// (finite value found, raw body) of an instant query.
async fn query(web: SocketAddr, expr: &str) -> (bool, String) {
    match get(web, &format!("/api/v1/query?query={}", percent_encode(expr))).await {
        Ok((200, body)) => {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let ok = v["data"]["result"].as_array().is_some_and(|r| {
                r.iter().any(|s| s["value"][1].as_str().and_then(|x| x.parse::<f64>().ok()).is_some_and(f64::is_finite))
            });
            (ok, body)
        }
        Ok((code, body)) => (false, format!("HTTP {code}: {body}")),
        Err(e) => (false, e.to_string()),
    }
}

const FAKE_ONEVISION: &str = "#!/bin/sh\n# Stand-in worker: keeps the pod running.\nexec sleep 600\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operator_dashboard_expression_returns_data() {
    let setup = Cluster::shared().and_then(|c| c.kubectl_path().map(|_| c)).map_err(|e| e.to_string());
    let (cluster, prometheus) = match setup.and_then(|c| prometheus_binary().map(|p| (c, p))) {
        Ok(v) => v,
        Err(e) if in_ci() => panic!("CI=true and the operator dashboard test cannot run: {e}"),
        Err(e) => {
            eprintln!("SKIPPED (set CI=true to make this fail): {e}");
            return;
        }
    };
    let crds = workspace_root().join("charts/onevision/crds/onevision.dev.yaml");
    cluster
        .kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", crds.to_str().unwrap()])
        .expect("install the CRDs");
    cluster
        .kubectl_ok(&["wait", "--for=condition=Established", "--timeout=60s", "crd/sftjobs.onevision.dev"])
        .expect("CRDs established");
    let ns = cluster.fresh_namespace("prom-operator").await.expect("namespace");

    let fake = tempfile::tempdir().unwrap();
    let script = fake.path().join("onevision");
    std::fs::write(&script, FAKE_ONEVISION).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = cluster
        .start_node_agent(NodeAgentConfig { path_prepend: vec![fake.path().to_path_buf()], ..NodeAgentConfig::for_namespace(&ns) })
        .await
        .expect("node agent");

    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let receiver = otlp_receiver::Receiver::default();
    let otlp = receiver.start().await;
    let mut cmd = Command::new(workspace_binary("onevision-operator", "onevision-operator").expect("build the operator"));
    cmd.args(["run", "--namespace", &ns, "--metrics-addr", &metrics.to_string()])
        .env("KUBECONFIG", cluster.kubeconfig())
        .env("RUST_LOG", "info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"));
    for k in ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER"] {
        cmd.env_remove(k);
    }
    let mut operator = BackgroundProcess::spawn("onevision-operator", cmd, &fake.path().join("operator.log")).expect("operator");

    cluster
        .apply_yaml(
            &ns,
            "apiVersion: onevision.dev/v1alpha1\nkind: SFTJob\nmetadata: {name: prom-sft}\nspec:\n  model: {path: /data/model}\n  \
             dataset: {path: /data/data/train.jsonl}\n  output: {path: /data/out/prom-sft}\n  \
             storage: {persistentVolumeClaim: {claimName: data}}\n  trainer: {nodes: 1, image: onevision:test}\n  \
             hyperparameters: {learningRate: 1.0e-5, globalBatchSize: 8, microBatchSize: 1}\n",
        )
        .expect("create the SFTJob");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: onevision-operator\n    static_configs: [{{targets: ['{metrics}']}}]\n"
        ),
    )
    .unwrap();
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log_path = dir.path().join("prometheus.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let _prom = Killed(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={web}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start Prometheus"),
    );

    // Pods running (the creation-to-running histogram has a sample) and several scrapes; the job is
    // annotated every second meanwhile so reconciles keep happening (rates over the window > 0).
    let ready = "onevision_operator_time_to_all_pods_running_seconds_count > 0 \
                 and count_over_time(onevision_operator_reconciles_total[1m]) >= 5";
    let start = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let _ = cluster.kubectl(&["-n", &ns, "annotate", "--overwrite", "sftjob/prom-sft", &format!("onevision.dev/test-tick={n}")]);
        if query(web, ready).await.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "operator not scraped with a running job; operator log:\n{}\nPrometheus log:\n{}",
            operator.log(),
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }

    let path = workspace_root().join("charts/onevision/dashboards/operator.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            checked += 1;
            let (ok, body) = query(web, expr).await;
            if !ok {
                failures.push(format!("{}: {expr}\n  -> {body}", p["title"]));
            }
        }
    }
    assert!(checked >= 6);
    assert!(failures.is_empty(), "{} of {checked} operator dashboard expressions returned no data:\n{}", failures.len(), failures.join("\n"));

    // The operator bounds its own shutdown at 14 s (docs/operator.md); 20 s leaves headroom.
    operator.stop_gracefully(Duration::from_secs(20)).await.expect("stop the operator");
    // Stopping flushed the reconcile spans: one per reconcile, naming the object.
    let ours = |r: &otlp_receiver::Received| {
        r.span.name == "reconcile"
            && otlp_receiver::attr_str(&r.span, "kind") == Some("SFTJob")
            && otlp_receiver::attr_str(&r.span, "namespace") == Some(ns.as_str())
            && otlp_receiver::attr_str(&r.span, "name") == Some("prom-sft")
    };
    let spans = receiver.wait_for(Duration::from_secs(20), |s| s.iter().filter(|r| ours(r)).count() >= 5).await;
    let reconciles: Vec<_> = spans.iter().filter(|r| ours(r)).collect();
    assert!(
        reconciles.len() >= 5,
        "{} reconcile spans of SFTJob {ns}/prom-sft reached the OTLP receiver; received: {:?}",
        reconciles.len(),
        spans.iter().map(|r| (&r.service, &r.span.name)).collect::<Vec<_>>()
    );
    assert!(reconciles.iter().all(|r| r.service == "onevision-operator"));
    agent.stop().await.expect("stop the node agent");
    cluster.delete_namespace(&ns).await.expect("delete namespace");
}
