//! The generated CRDs: names, subresources, printer columns, the chart copy, and the schema's
//! CEL rules evaluated client-side (the same rules the API server runs).

use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use onevision_operator::api::*;
use onevision_operator::crdgen;
use onevision_operator::job::AnyJob;
use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn chart_crds_match_the_generated_ones() {
    let path = repo_root().join(crdgen::CHART_CRDS_PATH);
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = crdgen::crds_yaml().unwrap();
    assert!(
        committed == generated,
        "{} is out of date with the Rust API types; regenerate it with\n  cargo run -p onevision-operator -- crds > {}",
        path.display(),
        crdgen::CHART_CRDS_PATH
    );
}

#[test]
fn names_scale_and_printer_columns() {
    let crds = crdgen::crds();
    let by_kind = |k: &str| {
        crds.iter()
            .find(|c| c.spec.names.kind == k)
            .unwrap()
            .clone()
    };
    for (kind, short, plural) in [
        ("SFTJob", "sft", "sftjobs"),
        ("GRPOJob", "grpo", "grpojobs"),
        ("RolloutPool", "rp", "rolloutpools"),
    ] {
        let crd = by_kind(kind);
        assert_eq!(crd.spec.group, "onevision.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.plural, plural);
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&[short.to_string()][..])
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["onevision".to_string()][..])
        );
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
    }
    let rp = by_kind("RolloutPool");
    let scale = rp.spec.versions[0]
        .subresources
        .as_ref()
        .unwrap()
        .scale
        .clone()
        .unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );

    let cols = |crd: &CustomResourceDefinition| -> Vec<String> {
        crd.spec.versions[0]
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.clone())
            .collect()
    };
    assert_eq!(
        cols(&by_kind("SFTJob")),
        ["Phase", "Step", "Loss", "Restarts", "Age"]
    );
    assert_eq!(
        cols(&by_kind("GRPOJob")),
        ["Phase", "Step", "Reward", "Restarts", "Age"]
    );
}

fn schema_of(crd: CustomResourceDefinition) -> Value {
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

fn load_example(name: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join("examples").join(name)).unwrap();
    let job = AnyJob::from_yaml(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    match &job {
        AnyJob::Sft(j) => serde_json::to_value(j).unwrap(),
        AnyJob::Grpo(j) => serde_json::to_value(j).unwrap(),
    }
}

/// Every `x-kubernetes-validations` rule in the schema, as (rule, message) pairs. The rules are
/// evaluated by the real API server in tests/tests/operator_e2e.rs; here we pin that they exist
/// and that each message names the field it guards.
fn rules(schema: &Value) -> Vec<(String, String)> {
    let mut out = vec![];
    fn walk(v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Array(rs)) = m.get("x-kubernetes-validations") {
                    for r in rs {
                        out.push((
                            r["rule"].as_str().unwrap_or_default().to_string(),
                            r["message"].as_str().unwrap_or_default().to_string(),
                        ));
                    }
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(schema, &mut out);
    out
}

#[test]
fn examples_parse() {
    let sft = load_example("sft.yaml");
    let grpo = load_example("grpo.yaml");
    assert_eq!(sft["kind"], "SFTJob");
    assert_eq!(grpo["spec"]["model"]["fromSFTJob"], "r1ov-sft");
}

/// The CEL rules the API server evaluates are in the schema, each with a message naming its field.
#[test]
fn cel_rules_name_their_fields() {
    let grpo = rules(&schema_of(GRPOJob::crd()));
    let messages: Vec<&str> = grpo.iter().map(|(_, m)| m.as_str()).collect();
    for field in [
        "exactly one of model.fromSFTJob and model.path",
        "grpo.clipEpsilon",
        "grpo.klBeta",
        "grpo.temperature",
        "grpo.epsilonHigh must be >= grpo.clipEpsilon",
        "grpo.rewards names must be unique",
        "hyperparameters.learningRate",
        "metadata.name",
        "trainer.nodes is immutable",
        "trainer.gpusPerNode is immutable",
    ] {
        assert!(
            messages.iter().any(|m| m.contains(field)),
            "no CEL rule message names {field}: {messages:?}"
        );
    }
    for (rule, message) in &grpo {
        assert!(!rule.is_empty(), "empty rule with message {message}");
        assert!(!message.is_empty(), "rule {rule} has no message");
    }
    let immutable: Vec<_> = grpo
        .iter()
        .filter(|(r, _)| r == "self == oldSelf")
        .collect();
    assert!(immutable.len() >= 2, "trainer shape rules: {immutable:?}");
    let sft = rules(&schema_of(SFTJob::crd()));
    assert!(sft
        .iter()
        .any(|(_, m)| m.contains("trainer.nodes is immutable")));
    assert!(
        !sft.iter().any(|(_, m)| m.contains("grpo.")),
        "SFTJob has no grpo rules"
    );
}

#[test]
fn openapi_bounds_are_in_the_schema() {
    let schema = schema_of(GRPOJob::crd());
    let spec = &schema["properties"]["spec"]["properties"];
    // The CRD types carry bounds as f64.
    let min = |v: &Value| v["minimum"].as_f64();
    assert_eq!(min(&spec["trainer"]["properties"]["nodes"]), Some(1.0));
    assert_eq!(
        min(&spec["trainer"]["properties"]["gpusPerNode"]),
        Some(0.0)
    );
    assert_eq!(min(&spec["grpo"]["properties"]["groupSize"]), Some(2.0));
    assert_eq!(min(&spec["rollout"]["properties"]["replicas"]), Some(0.0));
    assert_eq!(
        min(&spec["runPolicy"]["properties"]["backoffLimit"]),
        Some(0.0)
    );
    let enums = &spec["grpo"]["properties"]["lossAggregation"]["enum"];
    assert_eq!(
        enums,
        &json!(["tokenMean", "seqMeanTokenMean", "seqMeanTokenSum"])
    );
    let required = schema["properties"]["spec"]["required"].as_array().unwrap();
    for f in [
        "model",
        "dataset",
        "output",
        "trainer",
        "rollout",
        "grpo",
        "hyperparameters",
    ] {
        assert!(required.contains(&json!(f)), "{f} required");
    }
}

#[test]
fn job_manifests_parse_with_actionable_errors() {
    use onevision_operator::job::JobFileError;
    let text = std::fs::read_to_string(repo_root().join("examples/sft.yaml")).unwrap();
    let job = AnyJob::from_yaml(&text).unwrap();
    assert_eq!(job.kind(), JobKind::SFTJob);
    assert_eq!(job.common().trainer.nodes, 2);
    assert_eq!(
        job.common().trainer.master_port,
        29500,
        "defaults filled in"
    );
    assert!(job.grpo().is_none());

    let wrong_version = text.replace("onevision.dev/v1alpha1", "onevision.dev/v9");
    assert!(matches!(
        AnyJob::from_yaml(&wrong_version),
        Err(JobFileError::ApiVersion { .. })
    ));
    let wrong_kind = text.replace("kind: SFTJob", "kind: TrainJob");
    let err = AnyJob::from_yaml(&wrong_kind).unwrap_err();
    assert!(err.to_string().contains("TrainJob"), "{err}");
    let bad_field = text.replace("nodes: 2", "nodes: two");
    let err = AnyJob::from_yaml(&bad_field).unwrap_err();
    assert!(
        matches!(err, JobFileError::Spec { kind: "SFTJob", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("nodes"), "{err}");
    let err = AnyJob::read("/nonexistent/job.yaml").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/job.yaml"), "{err}");
}
