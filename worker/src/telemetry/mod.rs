//! Observability for trainer ranks and rollout workers: Prometheus metrics on `/metrics`,
//! OpenTelemetry traces exported over OTLP, and W3C trace context carried in gRPC metadata.
//!
//! ```no_run
//! # async fn demo() -> Result<(), onevision::telemetry::TelemetryError> {
//! use onevision::telemetry::{JobLabels, StepMetrics, Telemetry};
//! let telemetry = Telemetry::new();
//! let job = JobLabels::new("default", "grpo-demo", "GRPOJob");
//! let trainer = telemetry.trainer(&job);
//! let _server = telemetry.serve("127.0.0.1:9400".parse().unwrap()).await?;
//! trainer.record_step(&StepMetrics { step: 1, total_steps: 10, loss: 0.7, ..Default::default() });
//! # Ok(()) }
//! ```
//!
//! Metric names follow `onevision_<component>_<what>_<unit>` and are the ones the Grafana
//! dashboards (`scripts/gen-dashboards.py`) query; `docs/observability.md` lists them all.

mod metrics;
mod server;
mod trace;

pub use metrics::{
    process_rss_bytes, GrpoMetrics, JobLabels, Phase, RewardStats, RolloutMetrics, StepMetrics,
    Telemetry, TrainerMetrics, REQUEST_LATENCY_BUCKETS,
};
pub use server::{metrics_addr_from_env, MetricsServer, METRICS_ADDR_ENV};
pub use trace::{
    extract_trace_context, init_tracing, inject_trace_context, otlp_endpoint_from_env,
    rollout_request_span, set_remote_parent, trace_context_interceptor, tracer_provider,
    training_step_span, weight_sync_span, TracingGuard,
};

/// Everything telemetry set-up can fail with. Recording a metric or a span never fails.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("metrics address {value:?} (from {source_name}) is not host:port, e.g. 0.0.0.0:9400")]
    BadAddress { value: String, source_name: String },
    #[error("cannot listen for /metrics on {addr}: {source} (is the port already in use?)")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("OTLP exporter for {endpoint}: {detail} (check OTEL_EXPORTER_OTLP_ENDPOINT)")]
    Exporter { endpoint: String, detail: String },
    #[error("tracing subscriber already installed in this process: {0}")]
    SubscriberInstalled(String),
    #[error("cannot start the runtime for the OTLP exporter: {0}")]
    Runtime(std::io::Error),
}
