//! Tracing: span helpers for the training loop and the rollout RPCs, and W3C trace context
//! (`traceparent`) carried in gRPC metadata so one trace follows a step from the trainer into
//! the rollout workers. The process subscriber and the OTLP exporter come from
//! `onevision-otel` (shared with the operator), re-exported here.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::Phase;

// Integer fields are recorded as i64: tracing-opentelemetry exports u64 values as strings, and
// trace backends only filter and sort numerically on integer attributes.

/// Span of one training step (all its optimizer iterations) on a trainer rank; `step` counts
/// from 1 like `metrics.jsonl`.
pub fn training_step_span(step: u64) -> tracing::Span {
    tracing::info_span!("training_step", step = step as i64, otel.kind = "internal")
}

/// Child span of a training step for one timed phase, named like the phase label of
/// `onevision_trainer_step_phase_seconds_total` (`rollout_wait`, `reference`, …). The trainer's
/// weight sync uses [`weight_sync_span`] instead (it carries the version).
pub fn phase_span(phase: Phase) -> tracing::Span {
    // Span names are static in `tracing`: one call site per phase.
    match phase {
        Phase::RolloutWait => tracing::info_span!("rollout_wait"),
        Phase::Reference => tracing::info_span!("reference"),
        Phase::ForwardBackward => tracing::info_span!("forward_backward"),
        Phase::Optimizer => tracing::info_span!("optimizer"),
        Phase::WeightSync => tracing::info_span!("weight_sync"),
        Phase::Checkpoint => tracing::info_span!("checkpoint"),
    }
}

/// Span of one prompt-group request on a rollout worker (server side) or the trainer (client).
pub fn rollout_request_span(group_id: &str, samples: u32) -> tracing::Span {
    tracing::info_span!("rollout_request", group_id, samples = i64::from(samples))
}

/// Span of pushing (trainer) or applying (rollout worker) weight version `version`.
pub fn weight_sync_span(version: u64) -> tracing::Span {
    tracing::info_span!("weight_sync", version = version as i64)
}

/// Which end of an RPC a span describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcSide {
    Client,
    Server,
}

/// Span of one `onevision.v1.Rollout` call (`method` = `Generate`, `UpdateWeights`, …) with the
/// worker it talks to (client) or is (server); exported as `onevision.v1.Rollout/<method>`
/// with span kind client/server. A server span gets its parent from [`set_remote_parent`].
pub fn rollout_rpc_span(method: &str, side: RpcSide, worker: &str) -> tracing::Span {
    let kind = match side {
        RpcSide::Client => "client",
        RpcSide::Server => "server",
    };
    tracing::info_span!(
        "rollout_rpc",
        otel.name = format!("onevision.v1.Rollout/{method}"),
        otel.kind = kind,
        rpc.system = "grpc",
        rpc.service = "onevision.v1.Rollout",
        rpc.method = method,
        worker,
    )
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

/// The interceptor type of a traced client: `RolloutClient<TracedChannel>`.
pub type TraceInterceptor = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
/// A channel whose calls carry the caller's trace context.
pub type TracedChannel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, TraceInterceptor>;

/// tonic client interceptor: `RolloutClient::with_interceptor(channel, trace_context_interceptor)`
/// sends the caller's current span as the remote parent of every request.
#[allow(clippy::result_large_err)] // the signature tonic's `Interceptor` requires
pub fn trace_context_interceptor(
    mut req: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    inject_trace_context(req.metadata_mut());
    Ok(req)
}

/// The tracing set-up of an `onevision` process in `role` (`trainer`, `rollout`, `run`, …):
/// service `onevision-<role>` and, where the operator's pod environment (or the local runner)
/// provides them, the resource attributes `k8s.namespace.name`, `k8s.pod.name`,
/// `onevision.job.name`, `onevision.job.kind`, `onevision.role`, `onevision.rank` (trainer) and
/// `onevision.replica_index`.
pub fn process_tracing(role: &str) -> onevision_otel::Tracing {
    use onevision_operator::env as k;
    let var = |key: &str| std::env::var(key).unwrap_or_default();
    let namespace = Some(var(k::JOB_NAMESPACE)).filter(|v| !v.is_empty()).unwrap_or_else(|| var(k::POD_NAMESPACE));
    let mut t = onevision_otel::Tracing::new(&format!("onevision-{role}"))
        .attribute("k8s.namespace.name", namespace)
        .attribute("k8s.pod.name", var(k::POD_NAME))
        .attribute("onevision.job.name", var(k::JOB_NAME))
        .attribute("onevision.job.kind", var(k::JOB_KIND))
        .attribute("onevision.role", role)
        .attribute("onevision.replica_index", var(k::REPLICA_INDEX));
    if role == "trainer" {
        t = t.attribute("onevision.rank", var(k::RANK));
    }
    t
}
