//! Operator metrics (`/metrics`, Prometheus text format) and the health endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::api::JobPhase;

type Labels = Vec<(String, String)>;

fn kind_label(kind: &str) -> Labels {
    vec![("kind".into(), kind.into())]
}

/// All operator metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    duration: Family<Labels, Histogram>,
    jobs: Family<Labels, Gauge>,
    gang_restarts: Family<Labels, Counter>,
    time_to_running: Family<Labels, Histogram>,
    /// Last known phase of every job ("kind/ns/name"), the source of the `jobs` gauge.
    phases: Mutex<HashMap<String, (String, JobPhase)>>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Register every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("onevision_operator");
        let reconciles = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let duration = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        let jobs = Family::<Labels, Gauge>::default();
        let gang_restarts = Family::<Labels, Counter>::default();
        let time_to_running = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.5, 2.0, 14))
        });
        registry.register("reconciles", "Reconciles run, by kind", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconcile errors, by kind and error",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration, by kind",
            duration.clone(),
        );
        registry.register("jobs", "Jobs by kind and phase", jobs.clone());
        registry.register(
            "gang_restarts",
            "Trainer gang restarts, by kind",
            gang_restarts.clone(),
        );
        registry.register(
            "time_to_all_pods_running_seconds",
            "Seconds from job creation to all trainer pods running",
            time_to_running.clone(),
        );
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            jobs,
            gang_restarts,
            time_to_running,
            phases: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
        }
    }

    /// Count one reconcile and its duration.
    pub fn reconciled(&self, kind: &str, took: Duration) {
        self.reconciles.get_or_create(&kind_label(kind)).inc();
        self.duration
            .get_or_create(&kind_label(kind))
            .observe(took.as_secs_f64());
    }

    /// Count one reconcile error.
    pub fn error(&self, kind: &str, error: &str) {
        self.errors
            .get_or_create(&vec![
                ("kind".into(), kind.into()),
                ("error".into(), error.into()),
            ])
            .inc();
    }

    /// Count gang restarts.
    pub fn gang_restarted(&self, kind: &str, n: u64) {
        self.gang_restarts
            .get_or_create(&kind_label(kind))
            .inc_by(n);
    }

    /// Record creation-to-running latency of a job.
    pub fn all_pods_running(&self, kind: &str, seconds: f64) {
        self.time_to_running
            .get_or_create(&kind_label(kind))
            .observe(seconds.max(0.0));
    }

    /// Record the phase of a job (None: the job is gone).
    pub fn job_phase(&self, kind: &str, key: String, phase: Option<JobPhase>) {
        // A poisoned lock only means another reconcile panicked mid-update; the map is still usable.
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        match phase {
            Some(p) => {
                phases.insert(key, (kind.to_string(), p));
            }
            None => {
                phases.remove(&key);
            }
        }
        let mut counts: HashMap<(String, JobPhase), i64> = HashMap::new();
        for (k, p) in phases.values() {
            *counts.entry((k.clone(), *p)).or_default() += 1;
        }
        for k in ["SFTJob", "GRPOJob"] {
            for p in JobPhase::ALL {
                let n = counts.get(&(k.to_string(), p)).copied().unwrap_or(0);
                self.jobs
                    .get_or_create(&vec![
                        ("kind".into(), k.into()),
                        ("phase".into(), p.as_str().into()),
                    ])
                    .set(n);
            }
        }
    }

    /// Mark the operator ready (controllers started).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether the operator is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

async fn metrics_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

async fn ready_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_by_phase_follow_updates_and_deletions() {
        let m = Metrics::new();
        m.job_phase("SFTJob", "a".into(), Some(JobPhase::Running));
        m.job_phase("SFTJob", "b".into(), Some(JobPhase::Running));
        m.job_phase("GRPOJob", "c".into(), Some(JobPhase::Failed));
        let text = m.render();
        assert!(
            text.contains(r#"onevision_operator_jobs{kind="SFTJob",phase="Running"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"onevision_operator_jobs{kind="GRPOJob",phase="Failed"} 1"#),
            "{text}"
        );
        m.job_phase("SFTJob", "a".into(), Some(JobPhase::Succeeded));
        m.job_phase("SFTJob", "b".into(), None);
        let text = m.render();
        assert!(
            text.contains(r#"onevision_operator_jobs{kind="SFTJob",phase="Running"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"onevision_operator_jobs{kind="SFTJob",phase="Succeeded"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn counters_and_histograms_are_exported() {
        let m = Metrics::new();
        m.reconciled("SFTJob", Duration::from_millis(3));
        m.error("SFTJob", "Kube");
        m.gang_restarted("GRPOJob", 2);
        m.all_pods_running("SFTJob", 4.0);
        let text = m.render();
        assert!(
            text.contains(r#"onevision_operator_reconciles_total{kind="SFTJob"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"onevision_operator_reconcile_errors_total{kind="SFTJob",error="Kube"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"onevision_operator_gang_restarts_total{kind="GRPOJob"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("onevision_operator_reconcile_duration_seconds_count{kind=\"SFTJob\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "onevision_operator_time_to_all_pods_running_seconds_sum{kind=\"SFTJob\"} 4.0"
            ),
            "{text}"
        );
    }
}
