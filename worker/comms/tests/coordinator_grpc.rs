//! The coordinator over real gRPC on loopback: rendezvous, barrier, progress, shutdown, health,
//! message-size limits, status codes of bad requests, rollout registry, and an UpdateWeights
//! server built on `WeightUpdateAssembler`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use onevision_comms::coordinator::{
    serve_coordinator, ClientError, CoordinatorClient, CoordinatorConfig, RetryPolicy,
};
use onevision_comms::health::check_health;
use onevision_comms::weights::{
    weight_update_messages, OutgoingTensor, TensorSpec, WeightUpdateAssembler,
};
use onevision_proto::v1;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        call_timeout: Duration::from_secs(5),
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        give_up_after: Duration::from_secs(10),
        ..RetryPolicy::default()
    }
}

fn join_req(rank: u32, world: u32) -> v1::JoinRequest {
    v1::JoinRequest {
        rank,
        world_size: world,
        address: format!("127.0.0.1:{}", 30000 + rank),
        generation: 1,
        name: format!("trainer-{rank}"),
        nccl_unique_id: if rank == 0 { vec![0xAB; 128] } else { vec![] },
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_of_four_ranks_over_grpc() {
    let server = serve_coordinator(loopback(), CoordinatorConfig::new(4, 1)).await.unwrap();
    let mut tasks = Vec::new();
    for rank in [3u32, 1, 0, 2] {
        let client = CoordinatorClient::new(&server.endpoint(), fast_policy()).unwrap();
        tasks.push(tokio::spawn(async move {
            // Ranks arrive at different times.
            tokio::time::sleep(Duration::from_millis(100 * rank as u64)).await;
            client.join(join_req(rank, 4), Duration::from_secs(20)).await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap().expect("join succeeds"));
    }
    for a in &answers {
        assert_eq!(a.world_size, 4);
        assert_eq!(a.generation, 1);
        let addrs: Vec<_> = a.peers.iter().map(|p| (p.rank, p.address.clone())).collect();
        let want: Vec<_> = (0..4).map(|r| (r, format!("127.0.0.1:{}", 30000 + r))).collect();
        assert_eq!(addrs, want);
        assert_eq!(a.nccl_unique_id, vec![0xAB; 128]);
        assert_eq!(a.session_id, answers[0].session_id);
    }
    let mut ranks: Vec<u32> = answers.iter().map(|a| a.rank).collect();
    ranks.sort();
    assert_eq!(ranks, vec![0, 1, 2, 3]);
    assert_eq!(server.status().phase, v1::JobPhase::Running as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_rendezvous_names_the_missing_ranks() {
    let server = serve_coordinator(loopback(), CoordinatorConfig::new(3, 1)).await.unwrap();
    let client = CoordinatorClient::new(&server.endpoint(), fast_policy()).unwrap();
    let c2 = client.clone();
    let other = tokio::spawn(async move { c2.join(join_req(0, 3), Duration::from_millis(800)).await });
    let start = Instant::now();
    let err = client.join(join_req(1, 3), Duration::from_millis(800)).await.unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(err.to_string().contains("[2]"), "{err}");
    assert!(other.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_retries_until_the_coordinator_starts() {
    // Reserve a free port, release it, and start the server there only later.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let client = CoordinatorClient::new(&addr.to_string(), fast_policy()).unwrap();
    let joining = tokio::spawn(async move { client.join(join_req(0, 1), Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(600)).await;
    let _server = serve_coordinator(addr, CoordinatorConfig::new(1, 1)).await.unwrap();
    let resp = joining.await.unwrap().expect("join after retries");
    assert_eq!(resp.peers.len(), 1);
}

#[test]
fn client_outside_a_runtime_is_an_error_not_a_panic() {
    let err = CoordinatorClient::new("127.0.0.1:1", fast_policy()).err().expect("no runtime");
    assert!(matches!(err, ClientError::NoRuntime), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_coordinator_gives_up_with_a_clear_error() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let policy = RetryPolicy { give_up_after: Duration::from_millis(700), ..fast_policy() };
    let client = CoordinatorClient::new(&addr.to_string(), policy).unwrap();
    let start = Instant::now();
    let err = client
        .heartbeat(v1::HeartbeatRequest { rank: 0, generation: 1, step: 0 })
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.to_string().contains("unreachable"));
    assert!(matches!(
        CoordinatorClient::new("http://bad host:1", fast_policy()),
        Err(ClientError::InvalidEndpoint { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_progress_and_orderly_shutdown() {
    let server = serve_coordinator(loopback(), CoordinatorConfig::new(2, 1)).await.unwrap();
    let mut status_rx = server.subscribe_status();
    let c0 = CoordinatorClient::new(&server.endpoint(), fast_policy()).unwrap();
    let c1 = c0.clone();
    let (a, b) = tokio::join!(
        c0.join(join_req(0, 2), Duration::from_secs(10)),
        c1.join(join_req(1, 2), Duration::from_secs(10))
    );
    a.unwrap();
    b.unwrap();

    // Rank 1 arrives late: rank 0 must wait for it.
    let start = Instant::now();
    let late = tokio::spawn({
        let c1 = c1.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            c1.begin_step(1, 1, 0, Duration::from_secs(10)).await
        }
    });
    let r0 = c0.begin_step(0, 1, 0, Duration::from_secs(10)).await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(290));
    assert!(!r0.should_stop);
    assert!(!late.await.unwrap().unwrap().should_stop);

    let mut metrics = HashMap::new();
    metrics.insert("kl".to_string(), 0.01);
    let ack = c0
        .report_progress(v1::ProgressReport {
            rank: 0,
            generation: 1,
            phase: "grpo".into(),
            step: 1,
            total_steps: 10,
            loss: Some(0.5),
            reward: Some(0.75),
            accuracy: Some(0.6),
            metrics,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!ack.should_stop);
    status_rx.changed().await.unwrap();
    let st = c1.status().await.unwrap();
    let p = st.progress.expect("progress");
    assert_eq!((p.step, p.total_steps, p.reward), (1, 10, Some(0.75)));
    assert_eq!(p.metrics["kl"], 0.01);
    assert_eq!(status_rx.borrow().progress.as_ref().unwrap().step, 1);

    // Ctrl-C: both ranks are told to stop at the next step boundary.
    let phase = c1.shutdown("interrupted", v1::ShutdownMode::Graceful, false).await.unwrap();
    assert_eq!(phase, v1::JobPhase::Stopping);
    let (s0, s1) = tokio::join!(
        c0.begin_step(0, 1, 1, Duration::from_secs(5)),
        c1.begin_step(1, 1, 1, Duration::from_secs(5))
    );
    for s in [s0.unwrap(), s1.unwrap()] {
        assert!(s.should_stop);
        assert_eq!(s.stop_reason, "interrupted");
    }
    let phase = c0.shutdown("done", v1::ShutdownMode::Graceful, true).await.unwrap();
    assert_eq!(phase, v1::JobPhase::Succeeded);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_serving() {
    let server = serve_coordinator(loopback(), CoordinatorConfig::new(1, 0)).await.unwrap();
    let ep = server.endpoint();
    for svc in ["", "onevision.v1.Coordinator", "onevision.v1.RolloutRegistry"] {
        assert_eq!(check_health(&ep, svc, &fast_policy()).await.unwrap(), ServingStatus::Serving, "{svc}");
    }
    let err = check_health(&ep, "onevision.v1.Nope", &fast_policy()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_size_limit_gives_a_clear_error() {
    let mut cfg = CoordinatorConfig::new(1, 0);
    cfg.max_message_bytes = 1024;
    let server = serve_coordinator(loopback(), cfg).await.unwrap();
    let client = CoordinatorClient::new(&server.endpoint(), fast_policy()).unwrap();
    // Over the server's limit, within the client's (default 64 MiB): the server refuses it.
    let big = v1::ProgressReport { message: "x".repeat(4 * 1024), ..Default::default() };
    let err = client.report_progress(big.clone()).await.unwrap_err();
    assert!(matches!(err, ClientError::MessageTooLarge { .. }), "{err}");
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(err.to_string().contains("the limit is: 1024 bytes"), "{err}");

    // The client's own limit is enforced before sending.
    let small = RetryPolicy { max_message_bytes: 512, ..fast_policy() };
    let client = CoordinatorClient::new(&server.endpoint(), small).unwrap();
    let err = client.report_progress(big).await.unwrap_err();
    assert!(matches!(err, ClientError::MessageTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("the limit is: 512 bytes"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_documented_codes() {
    let server = serve_coordinator(loopback(), CoordinatorConfig::new(2, 1)).await.unwrap();
    let client = CoordinatorClient::new(&server.endpoint(), fast_policy()).unwrap();
    let t = Duration::from_secs(2);
    let code = |r: Result<v1::JoinResponse, ClientError>| r.unwrap_err().code();

    assert_eq!(code(client.join(join_req(7, 2), t).await), Code::InvalidArgument);
    assert_eq!(code(client.join(join_req(0, 3), t).await), Code::InvalidArgument);
    let mut stale = join_req(0, 2);
    stale.generation = 0;
    let err = client.join(stale, t).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.to_string().contains("generation"));
    let err = client.heartbeat(v1::HeartbeatRequest { rank: 1, generation: 1, step: 0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let bad_worker = v1::RegisterRolloutRequest { worker_id: "w".into(), address: String::new(), capacity: 1, model_version: 0 };
    assert_eq!(client.register_rollout(bad_worker).await.unwrap_err().code(), Code::InvalidArgument);
    let bad_progress = v1::ProgressReport { rank: 0, generation: 1, step: 5, total_steps: 2, ..Default::default() };
    assert_eq!(client.report_progress(bad_progress).await.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_rank_fails_the_job_and_heartbeats_say_stop() {
    let mut cfg = CoordinatorConfig::new(2, 1);
    cfg.heartbeat_interval = Duration::from_millis(50);
    cfg.heartbeat_timeout = Duration::from_millis(400);
    let server = serve_coordinator(loopback(), cfg).await.unwrap();
    let c = CoordinatorClient::new(&server.endpoint(), fast_policy()).unwrap();
    let (a, b) = tokio::join!(
        c.join(join_req(0, 2), Duration::from_secs(5)),
        c.join(join_req(1, 2), Duration::from_secs(5))
    );
    a.unwrap();
    b.unwrap();
    // Only rank 0 heartbeats; rank 1 "hangs".
    let mut monitor = c.spawn_heartbeat(0, 1, Duration::from_millis(50));
    let reason = tokio::time::timeout(Duration::from_secs(5), monitor.stopped())
        .await
        .expect("rank 0 is told to stop");
    assert!(reason.contains("rank 1"), "{reason}");
    let st = server.status();
    assert_eq!(st.phase, v1::JobPhase::Failed as i32);
    assert_eq!(st.dead_ranks, vec![1]);
    let err = c.begin_step(0, 1, 0, Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_workers_register_renew_and_leave() {
    let mut cfg = CoordinatorConfig::new(1, 0);
    cfg.rollout_lease_ttl = Duration::from_millis(300);
    let server = serve_coordinator(loopback(), cfg).await.unwrap();
    server.set_trainer_model_version(5);
    let c = CoordinatorClient::new(&server.endpoint(), fast_policy()).unwrap();
    let req = |id: &str| v1::RegisterRolloutRequest {
        worker_id: id.into(),
        address: format!("127.0.0.1:{}", 40000 + id.len()),
        capacity: 16,
        model_version: 0,
    };
    let a = c.keep_registered(req("a")).await.unwrap();
    assert_eq!(a.trainer_model_version(), 5);
    let b = c.keep_registered(req("bb")).await.unwrap();
    // Renewals keep both alive well past the TTL.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let ids: Vec<String> = c.list_rollouts().await.unwrap().into_iter().map(|w| w.worker_id).collect();
    assert_eq!(ids, vec!["a", "bb"]);
    // Clean scale-down: gone at once.
    assert!(a.release().await.unwrap());
    let ids: Vec<String> = server.rollout_workers().into_iter().map(|w| w.worker_id).collect();
    assert_eq!(ids, vec!["bb"]);
    // Killed worker: its lease stops being renewed and expires.
    drop(b);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(server.rollout_workers().is_empty());
    assert_eq!(server.status().rollout_workers, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_in_flight_never_re_registers_a_released_worker() {
    // Regression: release used to abort the renewal task, and a renewal already on the wire could
    // reach the coordinator after the Deregister and bring the worker back. With a 50 ms renewal
    // period and releases spread over it, some releases land while a renewal is in flight.
    let mut cfg = CoordinatorConfig::new(1, 0);
    cfg.rollout_lease_ttl = Duration::from_millis(150);
    let server = serve_coordinator(loopback(), cfg).await.unwrap();
    let c = CoordinatorClient::new(&server.endpoint(), fast_policy()).unwrap();
    for i in 0..40u64 {
        let id = format!("w{i}");
        let lease = c
            .keep_registered(v1::RegisterRolloutRequest {
                worker_id: id.clone(),
                address: "127.0.0.1:40000".into(),
                capacity: 1,
                model_version: 0,
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(45 + (i * 7) % 20)).await;
        assert!(lease.release().await.unwrap(), "{id} was registered until released");
        // Long enough for a stray renewal to land, shorter than the TTL it would refresh.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let ids: Vec<String> = server.rollout_workers().into_iter().map(|w| w.worker_id).collect();
        assert!(!ids.contains(&id), "{id} is registered again after release: {ids:?}");
    }
}

// ---- UpdateWeights over gRPC, with the assembler behind a minimal Rollout service ----

struct WeightsOnly {
    specs: HashMap<String, TensorSpec>,
    version: std::sync::Mutex<u64>,
}

#[tonic::async_trait]
impl v1::rollout_server::Rollout for WeightsOnly {
    type GenerateStream = tokio_stream::Empty<Result<v1::GenerateResponse, tonic::Status>>;

    async fn generate(
        &self,
        _r: tonic::Request<tonic::Streaming<v1::GenerateRequest>>,
    ) -> Result<tonic::Response<Self::GenerateStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("this test server only takes weights"))
    }

    async fn update_weights(
        &self,
        request: tonic::Request<tonic::Streaming<v1::UpdateWeightsRequest>>,
    ) -> Result<tonic::Response<v1::UpdateWeightsResponse>, tonic::Status> {
        let current = *self.version.lock().unwrap();
        let mut stream = request.into_inner();
        let mut asm = WeightUpdateAssembler::new(&self.specs, current);
        while let Some(msg) = stream.message().await? {
            asm.push(msg)?;
        }
        let update = asm.finish()?;
        *self.version.lock().unwrap() = update.version;
        Ok(tonic::Response::new(v1::UpdateWeightsResponse {
            version: update.version,
            tensors_updated: update.tensors.len() as u32,
            bytes_received: update.bytes,
            seconds: 0.0,
        }))
    }

    async fn info(&self, _r: tonic::Request<v1::InfoRequest>) -> Result<tonic::Response<v1::InfoResponse>, tonic::Status> {
        Ok(tonic::Response::new(v1::InfoResponse { model_version: *self.version.lock().unwrap(), ..Default::default() }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_weights_over_grpc_applies_or_rejects_with_codes() {
    let specs = HashMap::from([
        ("w".to_string(), TensorSpec { shape: vec![64, 64], dtype: v1::Dtype::F32 }),
        ("b".to_string(), TensorSpec { shape: vec![64], dtype: v1::Dtype::F32 }),
    ]);
    let svc = WeightsOnly { specs: specs.clone(), version: std::sync::Mutex::new(0) };
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                v1::rollout_server::RolloutServer::new(svc)
                    .max_decoding_message_size(onevision_proto::MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = onevision_comms::coordinator::lazy_channel(&addr.to_string(), &fast_policy()).unwrap();
    let mut client = v1::rollout_client::RolloutClient::new(channel);
    let tensor = |name: &str, n: usize| OutgoingTensor {
        name: name.into(),
        spec: specs[name].clone(),
        data: (0..n * 4).map(|i| i as u8).collect::<Vec<u8>>().into(),
    };
    let good = vec![tensor("w", 64 * 64), tensor("b", 64)];
    // Retry the first call until the server is accepting.
    let send = |client: &mut v1::rollout_client::RolloutClient<tonic::transport::Channel>, version: u64, ts: Vec<OutgoingTensor>| {
        let msgs: Vec<_> = weight_update_messages(version, &ts, 1000).collect();
        let mut c = client.clone();
        async move { c.update_weights(tokio_stream::iter(msgs)).await }
    };
    let mut resp = None;
    for _ in 0..50 {
        match send(&mut client, 1, good.clone()).await {
            Ok(r) => {
                resp = Some(r.into_inner());
                break;
            }
            Err(s) if s.code() == Code::Unavailable => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(s) => panic!("{s}"),
        }
    }
    let resp = resp.expect("server came up");
    assert_eq!((resp.version, resp.tensors_updated, resp.bytes_received), (1, 2, 64 * 64 * 4 + 64 * 4));
    assert_eq!(client.info(v1::InfoRequest {}).await.unwrap().into_inner().model_version, 1);

    // Stale version → FAILED_PRECONDITION.
    let s = send(&mut client, 1, good.clone()).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("stale"));
    // Unknown tensor → NOT_FOUND.
    let mut unknown = good.clone();
    unknown[1].name = "lm_head.weight".into();
    let s = send(&mut client, 2, unknown).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    assert!(s.message().contains("lm_head.weight"));
    // Shape mismatch → INVALID_ARGUMENT.
    let mut wrong = good.clone();
    wrong[0].spec.shape = vec![32, 128];
    let s = send(&mut client, 2, wrong).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    // Nothing of the rejected updates was applied.
    assert_eq!(client.info(v1::InfoRequest {}).await.unwrap().into_inner().model_version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_cpu_builds_a_working_ring_or_a_local_communicator() {
    use onevision_comms::{rendezvous_cpu, RendezvousOptions};
    // World of one: no sockets, identity collectives.
    let server = serve_coordinator(loopback(), CoordinatorConfig::new(1, 2)).await.unwrap();
    let client = CoordinatorClient::new(&server.endpoint(), fast_policy()).unwrap();
    let (join, comm) = rendezvous_cpu(&client, RendezvousOptions::new(0, 1, 2, loopback())).await.unwrap();
    assert_eq!((join.world_size, comm.world_size()), (1, 1));
    let mut v = vec![3.0f32];
    comm.all_reduce_sum_f32(&mut v).unwrap();
    assert_eq!(v, [3.0]);

    // World of two over loopback.
    let server = serve_coordinator(loopback(), CoordinatorConfig::new(2, 2)).await.unwrap();
    let client = CoordinatorClient::new(&server.endpoint(), fast_policy()).unwrap();
    let (a, b) = tokio::join!(
        rendezvous_cpu(&client, RendezvousOptions::new(0, 2, 2, loopback())),
        rendezvous_cpu(&client, RendezvousOptions::new(1, 2, 2, loopback()))
    );
    let (c0, c1) = (a.unwrap().1, b.unwrap().1);
    let t = std::thread::spawn(move || {
        let mut v = vec![1.0f32, 2.0];
        c1.all_reduce_sum_f32(&mut v).map(|_| v)
    });
    let mut v = vec![10.0f32, 20.0];
    c0.all_reduce_sum_f32(&mut v).unwrap();
    assert_eq!(v, [11.0, 22.0]);
    assert_eq!(t.join().unwrap().unwrap(), vec![11.0, 22.0]);
}
