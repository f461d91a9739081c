//! The `/metrics` HTTP endpoint (plus `/healthz`), served on the process's tokio runtime.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::task::JoinHandle;

use super::{Telemetry, TelemetryError};

/// Environment variable with the `/metrics` listen address (e.g. `0.0.0.0:9400`); the chart's
/// PodMonitor scrapes the port named `metrics`.
pub const METRICS_ADDR_ENV: &str = onevision_operator::env::METRICS_ADDR;

/// The metrics address from [`METRICS_ADDR_ENV`]; `Ok(None)` when unset or empty (no server).
pub fn metrics_addr_from_env() -> Result<Option<SocketAddr>, TelemetryError> {
    match std::env::var(METRICS_ADDR_ENV) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map(Some).map_err(|_| {
            TelemetryError::BadAddress { value: v, source_name: METRICS_ADDR_ENV.into() }
        }),
        _ => Ok(None),
    }
}

/// A running `/metrics` server; stops when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics(State(t): State<Telemetry>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], t.encode())
}

impl Telemetry {
    /// Serve `/metrics` and `/healthz` on `addr`. Must be called inside a tokio runtime.
    pub async fn serve(&self, addr: SocketAddr) -> Result<MetricsServer, TelemetryError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| TelemetryError::Bind { addr, source })?;
        let bound = listener.local_addr().map_err(|source| TelemetryError::Bind { addr, source })?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(self.clone());
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::warn!(%err, "metrics server stopped");
            }
        });
        Ok(MetricsServer { addr: bound, task })
    }
}
