//! Every manifest in `examples/` is accepted by the real API server with the onevision CRDs
//! installed (`kubectl apply --dry-run=server`: schema, CEL rules and admission all run, nothing
//! is persisted). Needs a cluster (docs/testing.md): skipped with a message without one, failing
//! under CI=true.

use std::path::PathBuf;

use onevision_tests::workspace_root;

#[tokio::test]
async fn every_example_applies_cleanly() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = onevision_tests::require_cluster!();
    cluster.install_onevision_crds()?;
    let ns = cluster.fresh_namespace("examples").await?;
    let mut examples: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("examples"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    examples.retain(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    examples.sort();
    let names: Vec<String> = examples
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .collect();
    for must in ["sft.yaml", "grpo.yaml"] {
        assert!(
            names.iter().any(|n| n == must),
            "examples/{must} missing: {names:?}"
        );
    }
    let mut failures = vec![];
    for path in &examples {
        let p = path.to_string_lossy().to_string();
        let out = cluster.kubectl(&["-n", &ns, "apply", "--dry-run=server", "-f", &p])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            failures.push(format!(
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        } else if !stdout.contains("(server dry run)") {
            failures.push(format!(
                "{}: kubectl printed no server dry-run result: {stdout}",
                path.display()
            ));
        }
    }
    cluster.delete_namespace(&ns).await?;
    assert!(
        failures.is_empty(),
        "examples refused by the API server:\n{}",
        failures.join("\n")
    );
    Ok(())
}
