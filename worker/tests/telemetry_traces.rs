//! OTLP trace export and W3C trace context over gRPC, end to end on loopback: an in-process OTLP
//! receiver (opentelemetry-proto's tonic `TraceService`) collects what `init_tracing` exports,
//! and one trace crosses a real gRPC call from a "trainer" client to a "rollout worker" server
//! (the onevision.v1 Rollout service) through `trace_context_interceptor` / `set_remote_parent`.
//!
//! One test per binary: `init_tracing` installs the process-wide subscriber and reads `OTEL_*`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod otlp_receiver;

use onevision::telemetry::{
    init_tracing, otlp_endpoint_from_env, rollout_request_span, set_remote_parent, trace_context_interceptor,
    training_step_span, TracingError,
};
use otlp_receiver::{attr_int, named, Receiver, Received};
use onevision_proto::v1::rollout_client::RolloutClient;
use onevision_proto::v1::rollout_server::{Rollout, RolloutServer};
use onevision_proto::v1::{
    GenerateRequest, GenerateResponse, InfoRequest, InfoResponse, UpdateWeightsRequest, UpdateWeightsResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span as OtlpSpan;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

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

fn find<'a>(spans: &'a [Received], name: &str) -> Vec<&'a OtlpSpan> {
    named(spans, name).into_iter().map(|r| &r.span).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_and_one_trace_crosses_grpc() {
    for k in ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME"] {
        std::env::remove_var(k);
    }
    assert_eq!(otlp_endpoint_from_env(), None, "no endpoint: export off");
    // (The endpoint rules themselves are unit-tested in onevision-otel.)

    let receiver = Receiver::default();
    let otlp_addr = receiver.start().await;
    let worker = Worker::default();
    let (incoming, worker_addr) = loopback().await;
    tokio::spawn(Server::builder().add_service(RolloutServer::new(worker.clone())).serve_with_incoming(incoming));

    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp_addr}"));
    std::env::set_var("OTEL_SERVICE_NAME", "onevision-trainer-test");
    let guard = init_tracing("onevision").expect("install the subscriber with OTLP export");
    assert!(guard.exporting());
    assert!(matches!(init_tracing("again"), Err(TracingError::SubscriberInstalled(_))));

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

    let spans = receiver.wait_for(Duration::from_secs(20), |s| named(s, "rollout_info").len() >= 2).await;
    let names: Vec<&str> = spans.iter().map(|r| r.span.name.as_str()).collect();
    let step = *find(&spans, "training_step").first().unwrap_or_else(|| panic!("no training_step span in {names:?}"));
    let request = *find(&spans, "rollout_request").first().unwrap_or_else(|| panic!("no rollout_request span in {names:?}"));
    let served = find(&spans, "rollout_info");
    assert_eq!(served.len(), 2, "{names:?}");
    assert!(spans.iter().all(|r| r.service == "onevision-trainer-test"), "OTEL_SERVICE_NAME names the service");

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
