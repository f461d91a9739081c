//! Traces of a real local run: `onevision run` of a tiny SFTJob and a tiny GRPOJob with one
//! rollout worker, exporting to an in-process OTLP receiver through the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`.
//! The trainer and the rollout worker are separate processes; their spans must join in one
//! trace per training step: the worker's `Generate` server span is a child of the trainer's
//! client span (W3C `traceparent` over gRPC), which descends from the `training_step` span.

mod otlp_receiver;
mod runtime_common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use otlp_receiver::{attr_int, attr_str, named, Receiver, Received};
use runtime_common::{free_port, Fixture};

/// Walks the parents of `span` inside its service's spans; true when `ancestor` is among them.
fn descends_from(spans: &[&Received], span: &Received, ancestor: &Received) -> bool {
    let by_id: HashMap<&[u8], &Received> = spans.iter().map(|r| (r.span.span_id.as_slice(), *r)).collect();
    let mut cur = span;
    for _ in 0..64 {
        if cur.span.parent_span_id.is_empty() {
            return false;
        }
        if cur.span.parent_span_id == ancestor.span.span_id {
            return true;
        }
        match by_id.get(cur.span.parent_span_id.as_slice()) {
            Some(p) => cur = p,
            None => return false,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_run_exports_step_spans_and_one_trace_per_grpo_step_across_trainer_and_rollout_worker() {
    let receiver = Receiver::default();
    let otlp = receiver.start().await;

    let fx = Fixture::new(16, 4);
    let manifest = fx.path().join("traced.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: onevision.dev/v1alpha1\nkind: GRPOJob\nmetadata: {{name: traced}}\nspec:\n\
             \x20 model: {{path: /data/model}}\n  dataset: {{path: /data/data/train.jsonl}}\n  output: {{path: /data/out/traced}}\n\
             \x20 storage: {{persistentVolumeClaim: {{claimName: data}}}}\n\
             \x20 trainer: {{nodes: 1, image: onevision:test, masterPort: {}, coordinatorPort: {}}}\n  rollout: {{replicas: 1}}\n\
             \x20 grpo: {{groupSize: 4, maxNewTokens: 8, temperature: 1.0, rewards: [{{name: accuracy}}]}}\n\
             \x20 hyperparameters: {{learningRate: 1.0e-3, globalBatchSize: 4, microBatchSize: 4, maxSteps: 2}}\n\
             \x20 eval: {{dataset: {{path: /data/data/heldout.jsonl}}}}\n---\n\
             apiVersion: onevision.dev/v1alpha1\nkind: SFTJob\nmetadata: {{name: traced-sft}}\nspec:\n\
             \x20 model: {{path: /data/model}}\n  dataset: {{path: /data/data/train.jsonl}}\n  output: {{path: /data/out/traced-sft}}\n\
             \x20 storage: {{persistentVolumeClaim: {{claimName: data}}}}\n\
             \x20 trainer: {{nodes: 1, image: onevision:test, masterPort: {}, coordinatorPort: {}}}\n\
             \x20 hyperparameters: {{learningRate: 1.0e-3, globalBatchSize: 4, microBatchSize: 4, maxSteps: 2}}\n\
             \x20 eval: {{dataset: {{path: /data/data/heldout.jsonl}}}}\n",
            free_port(),
            free_port(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_onevision"));
    cmd.arg("run")
        .arg(&manifest)
        .arg("--workdir")
        .arg(fx.path().join("work"))
        .arg("--data-root")
        .arg(fx.path())
        .arg("--no-progress-bars")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"));
    for k in ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_RESOURCE_ATTRIBUTES"] {
        cmd.env_remove(k);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().expect("start onevision run");
    let logs = fx.path().join("work/traced/logs");
    let log = |pod: &str| std::fs::read_to_string(logs.join(format!("{pod}.log"))).unwrap_or_default();
    assert!(
        out.status.success(),
        "onevision run failed:\n{}\ntrainer:\n{}\nrollout:\n{}",
        String::from_utf8_lossy(&out.stderr),
        log("traced-trainer-0"),
        log("traced-rollout-0")
    );

    // Every process flushed its spans on exit (the rollout worker on SIGTERM from the runner).
    let served = |s: &[Received]| {
        s.iter().any(|r| r.service == "onevision-rollout" && r.span.name == "onevision.v1.Rollout/Generate")
            && named(s, "training_step").len() >= 4
    };
    let spans = receiver.wait_for(Duration::from_secs(20), served).await;
    let names: Vec<(&str, &str)> = spans.iter().map(|r| (r.service.as_str(), r.span.name.as_str())).collect();
    let job = |r: &Received| r.resource.get("onevision.job.name").cloned().unwrap_or_default();
    let trainer: Vec<&Received> = spans.iter().filter(|r| r.service == "onevision-trainer" && job(r) == "traced").collect();
    let rollout: Vec<&Received> = spans.iter().filter(|r| r.service == "onevision-rollout").collect();
    assert!(!trainer.is_empty() && !rollout.is_empty(), "spans from both processes: {names:?}");

    // The resources say which job, role and rank sent them.
    let t = &trainer[0].resource;
    assert_eq!(t.get("onevision.job.name").map(String::as_str), Some("traced"), "{t:?}");
    assert_eq!(t.get("onevision.rank").map(String::as_str), Some("0"), "{t:?}");
    assert_eq!(t.get("k8s.pod.name").map(String::as_str), Some("traced-trainer-0"), "{t:?}");
    let r = &rollout[0].resource;
    assert_eq!(r.get("onevision.role").map(String::as_str), Some("rollout"), "{r:?}");
    assert_eq!(r.get("k8s.namespace.name").map(String::as_str), Some("default"), "{r:?}");

    // SFT steps: forward/backward and optimizer phases, nothing of GRPO.
    let sft: Vec<&Received> = spans.iter().filter(|r| r.service == "onevision-trainer" && job(r) == "traced-sft").collect();
    let sft_steps: Vec<&Received> = sft.iter().copied().filter(|r| r.span.name == "training_step").collect();
    let mut numbers: Vec<i64> = sft_steps.iter().filter_map(|r| attr_int(&r.span, "step")).collect();
    numbers.sort();
    // A repeated step means a trainer attempt failed and the gang restarted: say why.
    assert_eq!(numbers, [1, 2], "SFT steps: {names:?}\nonevision run stderr:\n{}\nSFT trainer log:\n{}", String::from_utf8_lossy(&out.stderr), std::fs::read_to_string(fx.path().join("work/traced-sft/logs/traced-sft-trainer-0.log")).unwrap_or_default());
    for step in &sft_steps {
        for phase in ["forward_backward", "optimizer"] {
            assert!(sft.iter().any(|r| r.span.name == phase && r.span.parent_span_id == step.span.span_id), "SFT step without {phase}");
        }
    }
    assert!(!sft.iter().any(|r| r.span.name == "rollout_wait" || r.span.name == "weight_sync"), "{names:?}");

    // One step span per step, numbered like metrics.jsonl, each with its phases as children.
    let steps: Vec<&Received> = trainer.iter().copied().filter(|r| r.span.name == "training_step").collect();
    let mut numbers: Vec<i64> = steps.iter().filter_map(|r| attr_int(&r.span, "step")).collect();
    numbers.sort();
    assert_eq!(numbers, [1, 2], "{names:?}");
    for step in &steps {
        for phase in ["rollout_wait", "forward_backward", "optimizer", "weight_sync"] {
            assert!(
                trainer.iter().any(|r| r.span.name == phase && descends_from(&trainer, r, step)),
                "step {:?} has no {phase} span: {names:?}",
                attr_int(&step.span, "step")
            );
        }
    }

    // The worker's Generate span continues the step's trace: its parent is the trainer's client
    // span of the same call, which descends from the training step.
    let generate: Vec<&Received> = rollout
        .iter()
        .copied()
        .filter(|r| r.span.name == "onevision.v1.Rollout/Generate")
        .collect();
    assert!(!generate.is_empty(), "{names:?}");
    let mut crossing = 0;
    for server in &generate {
        assert_eq!(server.span.kind, SpanKind::Server as i32);
        assert_eq!(attr_str(&server.span, "worker"), Some("traced-rollout-0"));
        let Some(step) = steps.iter().find(|s| s.span.trace_id == server.span.trace_id) else { continue };
        let client = trainer
            .iter()
            .find(|r| r.span.span_id == server.span.parent_span_id)
            .unwrap_or_else(|| panic!("the Generate server span's parent is not a trainer span: {names:?}"));
        assert_eq!(client.span.name, "onevision.v1.Rollout/Generate");
        assert_eq!(client.span.kind, SpanKind::Client as i32);
        assert!(descends_from(&trainer, client, step), "the client call is not inside the step span");
        // The groups the worker generated are children of its Generate span.
        assert!(
            rollout.iter().any(|r| r.span.name == "rollout_request" && r.span.parent_span_id == server.span.span_id),
            "no rollout_request under the worker's Generate span: {names:?}"
        );
        crossing += 1;
    }
    assert!(crossing >= 2, "{crossing} Generate calls joined a step's trace (one per step expected): {names:?}");

    // Weight pushes cross too: the worker applies version 1 inside step 1's trace.
    let update = rollout
        .iter()
        .find(|r| r.span.name == "onevision.v1.Rollout/UpdateWeights")
        .unwrap_or_else(|| panic!("no UpdateWeights span from the worker: {names:?}"));
    assert!(steps.iter().any(|s| s.span.trace_id == update.span.trace_id), "UpdateWeights outside every step trace");
    assert!(
        rollout.iter().any(|r| r.span.name == "weight_sync" && r.span.parent_span_id == update.span.span_id),
        "{names:?}"
    );
}
