//! OTLP trace export and W3C trace context over gRPC, end to end on loopback: an in-process OTLP
//! receiver (opentelemetry-proto's tonic `TraceService`) collects what `init_tracing` exports,
//! and one trace crosses a real gRPC call from a "trainer" client to a "rollout worker" server
//! (the onevision.v1 Rollout service) through `trace_context_interceptor` / `set_remote_parent`.
//!
//! One test per binary: `init_tracing` installs the process-wide subscriber and reads `OTEL_*`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use onevision::telemetry::{
    init_tracing, otlp_endpoint_from_env, rollout_request_span, set_remote_parent, trace_context_interceptor,
    training_step_span, TelemetryError,
};
use onevision_proto::v1::rollout_client::RolloutClient;
use onevision_proto::v1::rollout_server::{Rollout, RolloutServer};
use onevision_proto::v1::{
    GenerateRequest, GenerateResponse, InfoRequest, InfoResponse, UpdateWeightsRequest, UpdateWeightsResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span as OtlpSpan;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// Collects every span exported to it, with the `service.name` of its resource.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, OtlpSpan)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    AnyValue::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A rollout worker's Rollout service whose `Info` handler runs in a span parented by the
/// caller's trace context, as the real worker's handlers do.
#[derive(Clone, Default)]
struct Worker {
    with_remote_parent: Arc<AtomicUsize>,
    without_remote_parent: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Rollout for Worker {
    type GenerateStream = tonic::codegen::BoxStream<GenerateResponse>;

    async fn generate(
        &self,
        _request: Request<Streaming<GenerateRequest>>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn update_weights(
        &self,
        _request: Request<Streaming<UpdateWeightsRequest>>,
    ) -> Result<Response<UpdateWeightsResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn info(&self, request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let span = tracing::info_span!("rollout_info", otel.kind = "server", worker = "rollout-0");
        if set_remote_parent(&span, request.metadata()) {
            self.with_remote_parent.fetch_add(1, Ordering::SeqCst);
        } else {
            self.without_remote_parent.fetch_add(1, Ordering::SeqCst);
        }
        async {
            tracing::info!("answering Info");
            Ok(Response::new(InfoResponse { worker_id: "rollout-0".into(), ..Default::default() }))
        }
        .instrument(span)
        .await
    }
}

async fn loopback() -> (TcpIncoming, std::net::SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().unwrap();
    (TcpIncoming::from(listener), addr)
}

fn attr_int(span: &OtlpSpan, key: &str) -> Option<i64> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        AnyValue::IntValue(i) => Some(*i),
        _ => None,
    })
}

fn find<'a>(spans: &'a [(String, OtlpSpan)], name: &str) -> Vec<&'a OtlpSpan> {
    spans.iter().filter(|(_, s)| s.name == name).map(|(_, s)| s).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_and_one_trace_crosses_grpc() {
    // Endpoint selection from the standard OTEL_* environment.
    for k in ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME"] {
        std::env::remove_var(k);
    }
    assert_eq!(otlp_endpoint_from_env(), None, "no endpoint: export off");
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
    assert_eq!(otlp_endpoint_from_env().as_deref(), Some("http://collector:4317"));
    std::env::set_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317");
    assert_eq!(otlp_endpoint_from_env().as_deref(), Some("http://traces:4317"), "the traces-specific variable wins");
    std::env::set_var("OTEL_TRACES_EXPORTER", "none");
    assert_eq!(otlp_endpoint_from_env(), None);
    std::env::remove_var("OTEL_TRACES_EXPORTER");
    std::env::set_var("OTEL_SDK_DISABLED", "true");
    assert_eq!(otlp_endpoint_from_env(), None);
    std::env::remove_var("OTEL_SDK_DISABLED");
    std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");

    let receiver = Receiver::default();
    let (incoming, otlp_addr) = loopback().await;
    tokio::spawn(Server::builder().add_service(TraceServiceServer::new(receiver.clone())).serve_with_incoming(incoming));
    let worker = Worker::default();
    let (incoming, worker_addr) = loopback().await;
    tokio::spawn(Server::builder().add_service(RolloutServer::new(worker.clone())).serve_with_incoming(incoming));

    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp_addr}"));
    std::env::set_var("OTEL_SERVICE_NAME", "onevision-trainer-test");
    let guard = init_tracing("onevision").expect("install the subscriber with OTLP export");
    assert!(guard.exporting());
    assert!(matches!(init_tracing("again"), Err(TelemetryError::SubscriberInstalled(_))));

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{worker_addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the rollout worker");
    let mut traced = RolloutClient::with_interceptor(channel.clone(), trace_context_interceptor);
    let mut untraced = RolloutClient::new(channel);

    // The trainer's step: one rollout request span around a real gRPC call.
    let answer = async {
        async { traced.info(InfoRequest {}).await }.instrument(rollout_request_span("group-7", 4)).await
    }
    .instrument(training_step_span(42))
    .await
    .expect("Info call");
    assert_eq!(answer.into_inner().worker_id, "rollout-0");
    // Control: without the interceptor the worker finds no remote parent.
    untraced.info(InfoRequest {}).await.expect("untraced Info call");
    assert_eq!(worker.with_remote_parent.load(Ordering::SeqCst), 1);
    assert_eq!(worker.without_remote_parent.load(Ordering::SeqCst), 1);

    // Dropping the guard flushes the batch exporter (blocking: off the async workers).
    tokio::task::spawn_blocking(move || drop(guard)).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = receiver.spans.lock().unwrap().clone();
        if find(&spans, "rollout_info").len() >= 2 || Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    let step = *find(&spans, "training_step").first().unwrap_or_else(|| panic!("no training_step span in {names:?}"));
    let request = *find(&spans, "rollout_request").first().unwrap_or_else(|| panic!("no rollout_request span in {names:?}"));
    let served = find(&spans, "rollout_info");
    assert_eq!(served.len(), 2, "{names:?}");
    assert!(spans.iter().all(|(svc, _)| svc == "onevision-trainer-test"), "OTEL_SERVICE_NAME names the service");

    assert_eq!(step.trace_id.len(), 16);
    assert_eq!(attr_int(step, "step"), Some(42), "{:?}", step.attributes);
    assert_eq!(attr_int(request, "samples"), Some(4), "{:?}", request.attributes);
    assert_eq!(request.trace_id, step.trace_id);
    assert_eq!(request.parent_span_id, step.span_id);
    // The server span continues the caller's trace: same trace id, parent = the client span.
    let child: Vec<_> = served.iter().filter(|s| s.trace_id == step.trace_id).collect();
    assert_eq!(child.len(), 1, "exactly one server span joins the step's trace");
    assert_eq!(child[0].parent_span_id, request.span_id);
    assert_eq!(child[0].kind, opentelemetry_proto::tonic::trace::v1::span::SpanKind::Server as i32);
    // The untraced call started a trace of its own.
    let orphan: Vec<_> = served.iter().filter(|s| s.trace_id != step.trace_id).collect();
    assert_eq!(orphan.len(), 1);
    assert!(orphan[0].parent_span_id.is_empty());
}
