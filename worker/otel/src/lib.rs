//! The process-wide tracing set-up shared by the `onevision` worker binary and
//! `onevision-operator`: logs on stderr (`RUST_LOG`) plus OpenTelemetry span export over
//! OTLP/gRPC, configured by the standard environment (an unset endpoint means no export).
//!
//! ```no_run
//! let _guard = onevision_otel::Tracing::new("onevision-trainer")
//!     .attribute("k8s.namespace.name", "default")
//!     .init()
//!     .expect("tracing set-up");
//! tracing::info_span!("work").in_scope(|| tracing::info!("exported when OTEL_EXPORTER_OTLP_ENDPOINT is set"));
//! // Dropping the guard flushes the spans still buffered.
//! ```

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::resource::{
    EnvResourceDetector, ResourceDetector, SdkProvidedResourceDetector, TelemetryResourceDetector,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// What setting up tracing can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("OTLP exporter for {endpoint}: {detail} (check OTEL_EXPORTER_OTLP_ENDPOINT)")]
    Exporter { endpoint: String, detail: String },
    #[error("tracing subscriber already installed in this process: {0}")]
    SubscriberInstalled(String),
    #[error("cannot start the runtime for the OTLP exporter: {0}")]
    Runtime(std::io::Error),
}

fn env_var(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

/// The OTLP traces endpoint from the standard environment: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
/// else `OTEL_EXPORTER_OTLP_ENDPOINT`. `None` (tracing export off) when unset, empty, or when
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
pub fn otlp_endpoint_from_env() -> Option<String> {
    if env_var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env_var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return None;
    }
    env_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env_var("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// The resource of this process: `attributes` (e.g. the job and rank), then whatever
/// `OTEL_RESOURCE_ATTRIBUTES` says (the user's word wins), then `service.name` =
/// `OTEL_SERVICE_NAME`, else `service_name`.
pub fn resource(service_name: &str, attributes: &[(String, String)]) -> Resource {
    let name = env_var("OTEL_SERVICE_NAME").unwrap_or_else(|| service_name.to_string());
    let detected: Vec<Box<dyn ResourceDetector>> = vec![
        Box::new(SdkProvidedResourceDetector),
        Box::new(TelemetryResourceDetector),
        Box::new(EnvResourceDetector::new()),
    ];
    Resource::builder_empty()
        .with_attributes(
            attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .with_detectors(&detected)
        .with_service_name(name)
        .build()
}

/// An OTLP/gRPC tracer provider exporting to `endpoint` in batches. Must be called inside a
/// tokio runtime (tonic's channel runs on it).
pub fn tracer_provider(
    endpoint: &str,
    resource: Resource,
) -> Result<SdkTracerProvider, TracingError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TracingError::Exporter {
            endpoint: endpoint.into(),
            detail: e.to_string(),
        })?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Keeps the OTLP exporter alive; dropping it flushes the spans still buffered. Keep it until
/// the process exits (drop it before `std::process::exit`, which runs no destructors).
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
    // The exporter's tonic channel runs here when the caller had no runtime of its own.
    runtime: Option<tokio::runtime::Runtime>,
}

impl TracingGuard {
    /// Whether spans are exported (an OTLP endpoint was configured).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(err) = p.shutdown() {
                eprintln!("warning: flushing OTLP spans failed: {err}");
            }
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Builder of the process subscriber; see the crate docs.
#[derive(Debug, Clone)]
pub struct Tracing {
    service_name: String,
    default_filter: String,
    attributes: Vec<(String, String)>,
}

impl Tracing {
    /// `service_name` names the service unless `OTEL_SERVICE_NAME` is set.
    pub fn new(service_name: &str) -> Self {
        Tracing {
            service_name: service_name.into(),
            default_filter: "info".into(),
            attributes: Vec::new(),
        }
    }

    /// The log filter when `RUST_LOG` is unset (default `info`).
    pub fn default_filter(mut self, filter: &str) -> Self {
        self.default_filter = filter.into();
        self
    }

    /// A resource attribute of every exported span (ignored when `value` is empty).
    pub fn attribute(mut self, key: &str, value: impl Into<String>) -> Self {
        let value = value.into();
        if !value.is_empty() {
            self.attributes.push((key.into(), value));
        }
        self
    }

    /// Installs the process-wide subscriber: logs to stderr filtered by `RUST_LOG` (else the
    /// default filter; colours only on a terminal, so log files stay plain), plus OTLP span
    /// export when [`otlp_endpoint_from_env`] gives an endpoint. Also installs the W3C
    /// trace-context propagator globally. Call once, early in `main`.
    pub fn init(self) -> Result<TracingGuard, TracingError> {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let filter = EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new(&self.default_filter));
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        let (provider, runtime) = match otlp_endpoint_from_env() {
            None => (None, None),
            Some(endpoint) => {
                let resource = resource(&self.service_name, &self.attributes);
                match tokio::runtime::Handle::try_current() {
                    Ok(_) => (Some(tracer_provider(&endpoint, resource)?), None),
                    Err(_) => {
                        let rt = tokio::runtime::Builder::new_multi_thread()
                            .worker_threads(1)
                            .thread_name("otlp-export")
                            .enable_all()
                            .build()
                            .map_err(TracingError::Runtime)?;
                        let p = {
                            let _enter = rt.enter();
                            tracer_provider(&endpoint, resource)?
                        };
                        (Some(p), Some(rt))
                    }
                }
            }
        };
        let otel = provider
            .as_ref()
            .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("onevision")));
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .with(otel)
            .try_init()
            .map_err(|e| TracingError::SubscriberInstalled(e.to_string()))?;
        Ok(TracingGuard { provider, runtime })
    }
}

/// `Tracing::new(service_name).init()`.
pub fn init_tracing(service_name: &str) -> Result<TracingGuard, TracingError> {
    Tracing::new(service_name).init()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(r: &Resource, key: &str) -> Option<String> {
        r.get(&opentelemetry::Key::from(key.to_string()))
            .map(|v| v.to_string())
    }

    // One test: it changes the process environment.
    #[test]
    fn endpoint_and_resource_follow_the_otel_environment() {
        for k in [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_SDK_DISABLED",
            "OTEL_TRACES_EXPORTER",
            "OTEL_SERVICE_NAME",
            "OTEL_RESOURCE_ATTRIBUTES",
        ] {
            std::env::remove_var(k);
        }
        assert_eq!(otlp_endpoint_from_env(), None, "no endpoint: export off");
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        assert_eq!(
            otlp_endpoint_from_env().as_deref(),
            Some("http://collector:4317")
        );
        std::env::set_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317");
        assert_eq!(
            otlp_endpoint_from_env().as_deref(),
            Some("http://traces:4317"),
            "the traces variable wins"
        );
        std::env::set_var("OTEL_TRACES_EXPORTER", "none");
        assert_eq!(otlp_endpoint_from_env(), None);
        std::env::remove_var("OTEL_TRACES_EXPORTER");
        std::env::set_var("OTEL_SDK_DISABLED", "true");
        assert_eq!(otlp_endpoint_from_env(), None);
        std::env::remove_var("OTEL_SDK_DISABLED");
        std::env::set_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", " ");
        assert_eq!(
            otlp_endpoint_from_env().as_deref(),
            Some("http://collector:4317"),
            "blank = unset"
        );

        let ours = [
            ("onevision.rank".to_string(), "1".to_string()),
            ("k8s.namespace.name".to_string(), "ns".to_string()),
        ];
        let r = resource("onevision-trainer", &ours);
        assert_eq!(
            attr(&r, "service.name").as_deref(),
            Some("onevision-trainer")
        );
        assert_eq!(attr(&r, "onevision.rank").as_deref(), Some("1"));
        std::env::set_var("OTEL_SERVICE_NAME", "custom");
        std::env::set_var(
            "OTEL_RESOURCE_ATTRIBUTES",
            "k8s.namespace.name=from-env,team=ml",
        );
        let r = resource("onevision-trainer", &ours);
        assert_eq!(
            attr(&r, "service.name").as_deref(),
            Some("custom"),
            "OTEL_SERVICE_NAME wins"
        );
        assert_eq!(
            attr(&r, "k8s.namespace.name").as_deref(),
            Some("from-env"),
            "the user's attributes win"
        );
        assert_eq!(attr(&r, "team").as_deref(), Some("ml"));
        assert_eq!(attr(&r, "onevision.rank").as_deref(), Some("1"));
        for k in [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_SERVICE_NAME",
            "OTEL_RESOURCE_ATTRIBUTES",
        ] {
            std::env::remove_var(k);
        }
    }
}
