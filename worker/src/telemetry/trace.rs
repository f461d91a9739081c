//! Tracing: the process subscriber (stderr logs + optional OTLP export), span helpers for the
//! training loop, and W3C trace context (`traceparent`) carried in gRPC metadata so one trace
//! follows a step from the trainer into the rollout workers.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use super::TelemetryError;

/// The OTLP traces endpoint from the standard environment: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
/// else `OTEL_EXPORTER_OTLP_ENDPOINT`. `None` (tracing export off) when unset, empty, or when
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
pub fn otlp_endpoint_from_env() -> Option<String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return None;
    }
    var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// An OTLP/gRPC tracer provider exporting to `endpoint` in batches; `OTEL_SERVICE_NAME` (else
/// `service_name`) names the service. Must be called inside a tokio runtime (tonic's channel
/// runs on it).
pub fn tracer_provider(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter { endpoint: endpoint.into(), detail: e.to_string() })?;
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| service_name.to_string());
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(name).build())
        .build())
}

/// Keeps the OTLP exporter alive; dropping it flushes the spans still buffered.
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

/// Install the process-wide subscriber: logs to stderr filtered by `RUST_LOG` (default `info`),
/// plus OTLP span export when [`otlp_endpoint_from_env`] gives an endpoint. Also installs the
/// W3C trace-context propagator globally. Call once, early in `main`; keep the guard until exit.
pub fn init_tracing(service_name: &str) -> Result<TracingGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let (provider, runtime) = match otlp_endpoint_from_env() {
        None => (None, None),
        Some(endpoint) => match tokio::runtime::Handle::try_current() {
            Ok(_) => (Some(tracer_provider(&endpoint, service_name)?), None),
            Err(_) => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("otlp-export")
                    .enable_all()
                    .build()
                    .map_err(TelemetryError::Runtime)?;
                let p = {
                    let _enter = rt.enter();
                    tracer_provider(&endpoint, service_name)?
                };
                (Some(p), Some(rt))
            }
        },
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("onevision")));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::SubscriberInstalled(e.to_string()))?;
    Ok(TracingGuard { provider, runtime })
}

// Integer fields are recorded as i64: tracing-opentelemetry exports u64 values as strings, and
// trace backends only filter and sort numerically on integer attributes.

/// Span of one optimizer step on a trainer rank.
pub fn training_step_span(step: u64) -> tracing::Span {
    tracing::info_span!("training_step", step = step as i64, otel.kind = "internal")
}

/// Span of one prompt-group request on a rollout worker (server side) or the trainer (client).
pub fn rollout_request_span(group_id: &str, samples: u32) -> tracing::Span {
    tracing::info_span!("rollout_request", group_id, samples = i64::from(samples))
}

/// Span of pushing (trainer) or applying (rollout worker) weight version `version`.
pub fn weight_sync_span(version: u64) -> tracing::Span {
    tracing::info_span!("weight_sync", version = version as i64)
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Keys and values from the W3C propagator are always valid ASCII metadata.
        if let (Ok(k), Ok(v)) =
            (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_str()))
        {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Write the current span's trace context (`traceparent`, `tracestate`) into `metadata`.
/// A no-op when the current span is not recorded by an OpenTelemetry layer.
pub fn inject_trace_context(metadata: &mut MetadataMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
}

/// The remote parent context carried in `metadata` (empty context when there is none).
pub fn extract_trace_context(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// Make `span` a child of the trace context in `metadata` (server side of a call). Returns
/// whether a remote parent was found.
pub fn set_remote_parent(span: &tracing::Span, metadata: &MetadataMap) -> bool {
    use opentelemetry::trace::TraceContextExt;
    let cx = extract_trace_context(metadata);
    if !cx.span().span_context().is_valid() {
        return false;
    }
    span.set_parent(cx).is_ok()
}

/// tonic client interceptor: `RolloutClient::with_interceptor(channel, trace_context_interceptor)`
/// sends the caller's current span as the remote parent of every request.
#[allow(clippy::result_large_err)] // the signature tonic's `Interceptor` requires
pub fn trace_context_interceptor(
    mut req: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    inject_trace_context(req.metadata_mut());
    Ok(req)
}
