//! Trainer rank 0 publishes its progress as its own pod's `onevision.dev/progress` annotation; the
//! operator reads it back (`planner::progress_from_pod`) into the job's `status.progress`, which is
//! what `kubectl get sftjob` prints. In a cluster only (the service account's in-cluster
//! credentials, `POD_NAME`, `POD_NAMESPACE`); the operator gives trainer pods a `<job>-worker` service account
//! allowed to get/patch exactly this pod (docs/operator.md, "Worker identity"). Publishing never fails training: errors are logged once.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use onevision_operator::api::Progress;
use onevision_operator::labels;

/// At most one patch per interval (the last step is always published).
const MIN_INTERVAL: Duration = Duration::from_secs(2);

pub struct PodProgress {
    rt: tokio::runtime::Runtime,
    api: Api<Pod>,
    pod: String,
    last: Option<Instant>,
    warned: bool,
}

impl PodProgress {
    /// `None` outside a cluster (no `KUBERNETES_SERVICE_HOST`, `POD_NAME` or `POD_NAMESPACE`) or
    /// when the in-cluster client cannot be built (logged).
    pub fn from_env() -> Option<PodProgress> {
        std::env::var_os("KUBERNETES_SERVICE_HOST")?;
        let pod = std::env::var("POD_NAME").ok().filter(|s| !s.is_empty())?;
        let ns = std::env::var("POD_NAMESPACE").ok().filter(|s| !s.is_empty())?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        let client = match rt.block_on(kube::Client::try_default()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no in-cluster Kubernetes client: job status will not show progress");
                return None;
            }
        };
        Some(PodProgress { rt, api: Api::namespaced(client, &ns), pod, last: None, warned: false })
    }

    /// Patch the annotation with `p` (rate-limited; the final step always goes out).
    pub fn publish(&mut self, p: &Progress) {
        let last_step = p.total_steps.is_some_and(|t| p.step >= t);
        if !last_step && self.last.is_some_and(|t| t.elapsed() < MIN_INTERVAL) {
            return;
        }
        let value = match serde_json::to_string(p) {
            Ok(v) => v,
            Err(_) => return,
        };
        let patch = serde_json::json!({"metadata": {"annotations": {labels::PROGRESS: value}}});
        let res = self.rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                self.api.patch(&self.pod, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await
        });
        match res {
            Ok(Ok(_)) => self.last = Some(Instant::now()),
            Ok(Err(e)) if !self.warned => {
                self.warned = true;
                tracing::warn!(pod = %self.pod, error = %e, "cannot annotate the pod with progress (may its service account patch pods?)");
            }
            Err(_) if !self.warned => {
                self.warned = true;
                tracing::warn!(pod = %self.pod, "annotating the pod with progress timed out");
            }
            _ => {}
        }
    }
}
