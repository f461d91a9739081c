//! The local control plane behaves like a cluster: kube-controller-manager garbage-collects
//! owned objects, the API server enforces RBAC, kubectl works against it.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use onevision_tests::wait_for;

#[tokio::test]
async fn owned_configmap_is_garbage_collected() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = onevision_tests::require_cluster!();
    let ns = cluster.fresh_namespace("harness-gc").await?;
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client().await?, &ns);
    let owner = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("owner".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    let child = ConfigMap {
        metadata: ObjectMeta {
            name: Some("child".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: "owner".into(),
                uid: owner.metadata.uid.clone().unwrap_or_default(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        ..Default::default()
    };
    cms.create(&PostParams::default(), &child).await?;
    cms.delete("owner", &DeleteParams::background()).await?;
    wait_for(
        "child ConfigMap garbage-collected by kube-controller-manager",
        Duration::from_secs(60),
        || {
            let cms = cms.clone();
            async move {
                cms.get_opt("child")
                    .await
                    .map(|c| c.is_none().then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn kubectl_talks_to_the_cluster_and_rbac_is_enforced(
) -> Result<(), Box<dyn std::error::Error>> {
    let cluster = onevision_tests::require_cluster!();
    let ns = cluster.fresh_namespace("harness-kubectl").await?;
    let out = cluster.kubectl_ok(&[
        "get",
        "namespace",
        &ns,
        "-o",
        "jsonpath={.metadata.labels.onevision\\.dev/test}",
    ])?;
    assert_eq!(out, "true");
    // The default ServiceAccount has no rights: RBAC is on (not AlwaysAllow).
    let sa = format!("system:serviceaccount:{ns}:default");
    let denied = cluster.kubectl(&["auth", "can-i", "list", "pods", "-n", &ns, "--as", &sa])?;
    assert_eq!(String::from_utf8_lossy(&denied.stdout).trim(), "no");
    let allowed = cluster.kubectl_ok(&["auth", "can-i", "list", "pods", "-n", &ns])?;
    assert_eq!(allowed.trim(), "yes");
    // kube-root-ca.crt is published into every namespace (root CA publisher controller).
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client().await?, &ns);
    wait_for(
        "kube-root-ca.crt ConfigMap",
        Duration::from_secs(30),
        || {
            let cms = cms.clone();
            async move { cms.get_opt("kube-root-ca.crt").await.map(|c| c.map(|_| ())) }
        },
    )
    .await?;
    Ok(())
}
