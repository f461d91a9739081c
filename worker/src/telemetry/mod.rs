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
pub mod mfu;
mod server;
mod trace;

pub use metrics::{
    process_rss_bytes, GrpoMetrics, JobLabels, Phase, RewardStats, RolloutMetrics, StepMetrics,
    Telemetry, TrainerMetrics, REQUEST_LATENCY_BUCKETS,
};
pub use server::{metrics_addr_from_env, MetricsServer, METRICS_ADDR_ENV};
pub use onevision_otel::{init_tracing, otlp_endpoint_from_env, Tracing, TracingError, TracingGuard};
pub use trace::{
    extract_trace_context, inject_trace_context, phase_span, rollout_request_span, rollout_rpc_span,
    process_tracing, set_remote_parent, trace_context_interceptor, training_step_span, weight_sync_span, RpcSide,
    TraceInterceptor, TracedChannel,
};

/// Everything metrics set-up can fail with (tracing set-up: [`TracingError`]). Recording a
/// metric or a span never fails.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("metrics address {value:?} (from {source_name}) is not host:port, e.g. 0.0.0.0:9400")]
    BadAddress { value: String, source_name: String },
    #[error("cannot listen for /metrics on {addr}: {source} (is the port already in use?)")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
}
