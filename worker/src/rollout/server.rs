//! The `onevision.v1.Rollout` gRPC service of a rollout worker, plus `grpc.health.v1`.
//!
//! Generation runs on one dedicated thread (the CPU backend parallelises each decode step over
//! all cores): the `Generate` handler validates each group, waits briefly for
//! `min_model_version`, and queues it; the thread decodes the queued groups together
//! (continuous batching with `BatchDecoder`: up to `capacity` sequences per decode step, a group
//! joins as soon as its G rows fit and leaves when its last sample finishes) and streams each
//! group's G completions and a `GroupDone` back as it completes.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use onevision_comms::weights::WeightUpdateAssembler;
use onevision_model::generate::{BatchDecoder, FinishedGroup, GroupJob};
use onevision_proto::v1;
use onevision_proto::v1::rollout_server::{Rollout, RolloutServer};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use super::engine::{model_status, Engine, GroupOutput, PreparedGroup};
use super::error::WorkerError;
use crate::telemetry::{rollout_request_span, rollout_rpc_span, set_remote_parent, RolloutMetrics, RpcSide};

/// Settings of the rollout server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub worker_id: String,
    /// Sequences decoded concurrently (advertised; the pool keeps about this many busy).
    pub capacity: u32,
    /// Prompt groups accepted and not finished beyond which new ones get RESOURCE_EXHAUSTED.
    pub queue_limit: usize,
    /// How long a group whose `min_model_version` is ahead of the worker waits for the update
    /// before it fails with FAILED_PRECONDITION.
    pub version_wait: Duration,
    /// gRPC message-size limit, both directions.
    pub max_message_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            worker_id: "rollout-0".into(),
            capacity: 64,
            queue_limit: 256,
            version_wait: Duration::from_secs(5),
            max_message_bytes: onevision_proto::MAX_MESSAGE_BYTES,
        }
    }
}

struct GenJob {
    request_id: u64,
    group: PreparedGroup,
    accepted: Instant,
    reply: mpsc::Sender<Result<v1::GenerateResponse, Status>>,
    /// The group's `rollout_request` span (child of the caller's trace), open until answered.
    span: tracing::Span,
}

struct Shared {
    engine: Arc<Engine>,
    cfg: ServerConfig,
    queued: AtomicUsize,
    active: AtomicUsize,
    metrics: Option<RolloutMetrics>,
    /// UpdateWeights calls are serialised (each validates against the version it started at).
    update_lock: tokio::sync::Mutex<()>,
    jobs: std::sync::mpsc::Sender<GenJob>,
}

impl Shared {
    fn set_queue_metric(&self) {
        if let Some(m) = &self.metrics {
            m.set_queue_depth(self.queued.load(Ordering::Relaxed));
        }
    }
}

/// The `Rollout` service implementation.
#[derive(Clone)]
pub struct RolloutService {
    shared: Arc<Shared>,
}

fn done(request_id: u64, completions: u32, code: Code, message: String, seconds: f64) -> v1::GenerateResponse {
    v1::GenerateResponse {
        request_id,
        event: Some(v1::generate_response::Event::Done(v1::GroupDone {
            completions,
            error_code: code as i32,
            error_message: message,
            seconds,
        })),
    }
}

fn generation_thread(shared: std::sync::Weak<Shared>, rx: std::sync::mpsc::Receiver<GenJob>) {
    let mut backlog: VecDeque<GenJob> = VecDeque::new();
    loop {
        if backlog.is_empty() {
            match rx.recv() {
                Ok(job) => backlog.push_back(job),
                Err(_) => return,
            }
        }
        let Some(sh) = shared.upgrade() else { return };
        // Let a waiting weight commit take the lock before the next session starts.
        while sh.engine.update_pending() {
            std::thread::sleep(Duration::from_millis(1));
        }
        run_session(&sh, &rx, &mut backlog);
    }
}

/// A group in the decode batch (its `GenJob::span` stays open until the group is answered).
struct Active {
    job: GenJob,
}

/// One generation session under one weights version: decodes the queued groups together,
/// admitting more whenever their rows fit in `capacity`, until no group is left; once a weight
/// commit waits, no new group joins, so the session ends with the groups in flight.
fn run_session(sh: &Shared, rx: &std::sync::mpsc::Receiver<GenJob>, backlog: &mut VecDeque<GenJob>) {
    let capacity = sh.cfg.capacity.max(1) as usize;
    let (model, version) = sh.engine.session();
    let mut dec = BatchDecoder::new(&model);
    let mut active: HashMap<u64, Active> = HashMap::new();
    let mut next_tag = 0u64;
    loop {
        if !sh.engine.update_pending() {
            while let Ok(job) = rx.try_recv() {
                backlog.push_back(job);
            }
            let mut rows = dec.live_rows();
            let mut admit = Vec::new();
            while let Some(job) = backlog.front() {
                let n = job.group.group_size;
                // An empty batch takes any group, even one larger than the capacity.
                if rows > 0 && rows + n > capacity {
                    break;
                }
                let job = backlog.pop_front().expect("front exists");
                sh.queued.fetch_sub(1, Ordering::Relaxed);
                // The client went away (stream closed): skip the work.
                if job.reply.is_closed() {
                    continue;
                }
                rows += n;
                admit.push(job);
            }
            sh.set_queue_metric();
            if !admit.is_empty() {
                admit_groups(sh, &mut dec, &mut active, &mut next_tag, admit, version);
            }
        }
        if dec.is_idle() {
            break;
        }
        let live = dec.live_rows();
        sh.active.store(live, Ordering::Relaxed);
        if let Some(m) = &sh.metrics {
            m.set_batch_occupancy(live.min(capacity), capacity);
        }
        match dec.step() {
            Ok(finished) => {
                for f in finished {
                    finish(sh, &mut active, f, version);
                }
            }
            Err(e) => {
                // A failed decode step leaves the batch unusable: fail its groups, keep serving.
                let st = model_status(e);
                for (_, a) in active.drain() {
                    send_failure(&a.job, &st);
                }
                break;
            }
        }
    }
    sh.active.store(0, Ordering::Relaxed);
    if let Some(m) = &sh.metrics {
        m.set_batch_occupancy(0, capacity);
    }
}

/// Prefills the admitted groups (together; one by one when that fails, so that a bad group
/// fails alone) and adds them to the batch.
fn admit_groups(
    sh: &Shared,
    dec: &mut BatchDecoder<'_>,
    active: &mut HashMap<u64, Active>,
    next_tag: &mut u64,
    admit: Vec<GenJob>,
    version: u64,
) {
    let tags: Vec<u64> = (0..admit.len() as u64).map(|i| *next_tag + i).collect();
    *next_tag += admit.len() as u64;
    let all: Vec<GroupJob<'_>> = tags.iter().zip(&admit).map(|(&t, j)| job_of(t, j)).collect();
    let results: Vec<(u64, Result<Vec<FinishedGroup>, Status>)> = match dec.add_groups(&all) {
        Ok(done) => vec![(u64::MAX, Ok(done))],
        Err(_) if admit.len() > 1 => {
            tags.iter().zip(&admit).map(|(&t, j)| (t, dec.add_groups(&[job_of(t, j)]).map_err(model_status))).collect()
        }
        Err(e) => vec![(tags[0], Err(model_status(e)))],
    };
    drop(all);
    let mut failed: HashMap<u64, Status> = HashMap::new();
    let mut done_now = Vec::new();
    for (tag, r) in results {
        match r {
            Ok(done) => done_now.extend(done),
            Err(st) => {
                failed.insert(tag, st);
            }
        }
    }
    for (tag, job) in tags.into_iter().zip(admit) {
        if let Some(st) = failed.remove(&tag) {
            send_failure(&job, &st);
            continue;
        }
        active.insert(tag, Active { job });
    }
    for f in done_now {
        finish(sh, active, f, version);
    }
}

fn job_of(tag: u64, j: &GenJob) -> GroupJob<'_> {
    GroupJob { tag, prompt: &j.group.prompt, n: j.group.group_size, params: &j.group.params, first_stream: 0 }
}

/// Streams a completed group's completions and its `GroupDone`.
fn finish(sh: &Shared, active: &mut HashMap<u64, Active>, f: FinishedGroup, version: u64) {
    let Some(a) = active.remove(&f.tag) else { return };
    let job = a.job;
    let _in_group = job.span.enter();
    let secs = job.accepted.elapsed().as_secs_f64();
    let out = GroupOutput::new(f.generations, job.group.params.max_new_tokens, version);
    if let Some(m) = &sh.metrics {
        m.request_finished(out.tokens, secs);
    }
    let count = out.completions.len() as u32;
    for c in out.completions {
        let msg = v1::GenerateResponse { request_id: job.request_id, event: Some(v1::generate_response::Event::Completion(c)) };
        if job.reply.blocking_send(Ok(msg)).is_err() {
            return;
        }
    }
    let _ = job.reply.blocking_send(Ok(done(job.request_id, count, Code::Ok, String::new(), secs)));
}

fn send_failure(job: &GenJob, st: &Status) {
    tracing::warn!(parent: &job.span, request_id = job.request_id, code = ?st.code(), "group failed: {}", st.message());
    let secs = job.accepted.elapsed().as_secs_f64();
    let _ = job.reply.blocking_send(Ok(done(job.request_id, 0, st.code(), st.message().to_string(), secs)));
}

impl RolloutService {
    /// Starts the generation thread.
    pub fn new(engine: Arc<Engine>, cfg: ServerConfig, metrics: Option<RolloutMetrics>) -> Result<Self, WorkerError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            engine,
            cfg,
            queued: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            metrics,
            update_lock: tokio::sync::Mutex::new(()),
            jobs: tx,
        });
        let weak = Arc::downgrade(&shared);
        // The decode loop runs *on* a worker of its own rayon pool (as many threads as the global
        // pool, i.e. RAYON_NUM_THREADS), so each of the ~30 parallel products per decode step is
        // a fork-join among pool workers rather than a hand-off from an outside thread that
        // sleeps and wakes around every one. Its own pool, not the global one: the loop blocks
        // while idle, and request preparation (images) still needs the global pool then.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("rollout-gen-{i}"))
            .build()
            .map_err(|e| WorkerError::Thread(std::io::Error::other(e)))?;
        std::thread::Builder::new()
            .name("rollout-generate".into())
            .spawn(move || pool.install(|| generation_thread(weak, rx)))
            .map_err(WorkerError::Thread)?;
        Ok(RolloutService { shared })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.shared.engine
    }

    /// Validates one group, waits for its min version, queues it. Errors become its GroupDone.
    async fn accept(
        shared: Arc<Shared>,
        request_id: u64,
        group: v1::PromptGroup,
        reply: mpsc::Sender<Result<v1::GenerateResponse, Status>>,
    ) {
        let accepted = Instant::now();
        let fail = |st: Status| done(request_id, 0, st.code(), st.message().to_string(), accepted.elapsed().as_secs_f64());
        if shared.queued.load(Ordering::Relaxed) >= shared.cfg.queue_limit {
            let st = Status::resource_exhausted(format!(
                "rollout worker {} has {} groups queued (limit {}); retry on another worker",
                shared.cfg.worker_id, shared.cfg.queue_limit, shared.cfg.queue_limit
            ));
            let _ = reply.send(Ok(fail(st))).await;
            return;
        }
        if group.min_model_version > shared.engine.version() {
            let mut rx = shared.engine.subscribe_version();
            let want = group.min_model_version;
            let ok = matches!(
                tokio::time::timeout(shared.cfg.version_wait, rx.wait_for(|v| *v >= want)).await,
                Ok(Ok(_))
            );
            if !ok {
                let st = Status::failed_precondition(format!(
                    "stale weights: worker {} serves version {}, the group needs at least {want}; push weights first",
                    shared.cfg.worker_id,
                    shared.engine.version()
                ));
                let _ = reply.send(Ok(fail(st))).await;
                return;
            }
        }
        // Image decoding and preprocessing are CPU work: off the async threads.
        let sh = shared.clone();
        let prepared = tokio::task::spawn_blocking(move || sh.engine.prepare(&group)).await;
        let prepared = match prepared {
            Ok(Ok(p)) => p,
            Ok(Err(st)) => {
                let _ = reply.send(Ok(fail(st))).await;
                return;
            }
            Err(e) => {
                let _ = reply.send(Ok(fail(Status::internal(format!("request preparation failed: {e}"))))).await;
                return;
            }
        };
        shared.queued.fetch_add(1, Ordering::Relaxed);
        shared.set_queue_metric();
        let job = GenJob { request_id, group: prepared, accepted, reply: reply.clone(), span: tracing::Span::current() };
        if shared.jobs.send(job).is_err() {
            shared.queued.fetch_sub(1, Ordering::Relaxed);
            let _ = reply.send(Ok(fail(Status::unavailable("the generation thread stopped")))).await;
        }
    }
}

#[tonic::async_trait]
impl Rollout for RolloutService {
    type GenerateStream = ReceiverStream<Result<v1::GenerateResponse, Status>>;

    async fn generate(
        &self,
        request: Request<Streaming<v1::GenerateRequest>>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        // The stream's span continues the trainer's trace (W3C `traceparent` in the metadata).
        let span = rollout_rpc_span("Generate", RpcSide::Server, &self.shared.cfg.worker_id);
        set_remote_parent(&span, request.metadata());
        let mut inbound = request.into_inner();
        // Room for a few groups' completions; the generation thread blocks when the client
        // reads slowly, which is the backpressure we want.
        let (tx, rx) = mpsc::channel(256);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut pending: Vec<JoinHandle<()>> = Vec::new();
            loop {
                let msg = match inbound.next().await {
                    None => break,
                    Some(Ok(m)) => m,
                    Some(Err(st)) => {
                        // The client reset the stream: nothing to answer to.
                        tracing::debug!(code = ?st.code(), msg = st.message(), "Generate request stream ended with an error");
                        break;
                    }
                };
                let Some(group) = msg.group else {
                    let _ = tx.send(Err(Status::invalid_argument("GenerateRequest without a group"))).await;
                    break;
                };
                let id = group.request_id;
                pending.retain(|h| !h.is_finished());
                let group_span = rollout_request_span(&id.to_string(), group.group_size);
                pending.push(tokio::spawn(
                    RolloutService::accept(shared.clone(), id, group, tx.clone()).instrument(group_span),
                ));
            }
            // The response stream ends once every accepted group has been answered: `tx`
            // clones live in the queued jobs and are dropped when they finish.
            for h in pending {
                let _ = h.await;
            }
        }.instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn update_weights(
        &self,
        request: Request<Streaming<v1::UpdateWeightsRequest>>,
    ) -> Result<Response<v1::UpdateWeightsResponse>, Status> {
        // Open for the whole call (span time runs from creation to drop), parented by the caller.
        let rpc = rollout_rpc_span("UpdateWeights", RpcSide::Server, &self.shared.cfg.worker_id);
        set_remote_parent(&rpc, request.metadata());
        let start = Instant::now();
        let mut inbound = request.into_inner();
        let _guard = self.shared.update_lock.lock().await;
        let engine = self.shared.engine.clone();
        let mut asm = WeightUpdateAssembler::new(engine.specs(), engine.version());
        while let Some(msg) = inbound.next().await {
            let msg = msg.map_err(|st| Status::aborted(format!("UpdateWeights stream broke ({}); nothing was applied, resend", st.message())))?;
            asm.push(msg).map_err(Status::from)?;
        }
        let update = asm.finish().map_err(Status::from)?;
        let bytes = update.bytes;
        let count = update.tensors.len() as u32;
        let span = rpc.in_scope(|| crate::telemetry::weight_sync_span(update.version));
        let e2 = engine.clone();
        let version = tokio::task::spawn_blocking(move || span.in_scope(|| e2.apply(update)))
            .await
            .map_err(|e| Status::internal(format!("weight update task failed: {e}")))??;
        if let Some(m) = &self.shared.metrics {
            m.set_weight_version(version, version);
        }
        tracing::info!(version, tensors = count, bytes, seconds = start.elapsed().as_secs_f64(), "weights updated");
        Ok(Response::new(v1::UpdateWeightsResponse {
            version,
            tensors_updated: count,
            bytes_received: bytes,
            seconds: start.elapsed().as_secs_f64(),
        }))
    }

    async fn info(&self, _request: Request<v1::InfoRequest>) -> Result<Response<v1::InfoResponse>, Status> {
        let sh = &self.shared;
        Ok(Response::new(v1::InfoResponse {
            worker_id: sh.cfg.worker_id.clone(),
            model_name: sh.engine.config().model_name.clone(),
            model_version: sh.engine.version(),
            capacity: sh.cfg.capacity,
            queue_depth: sh.queued.load(Ordering::Relaxed) as u32,
            active_sequences: sh.active.load(Ordering::Relaxed) as u32,
            max_context_tokens: sh.engine.max_context_tokens() as u32,
        }))
    }
}

/// A running rollout server. Dropping it stops the server.
pub struct RolloutServerHandle {
    addr: SocketAddr,
    service: RolloutService,
    health: tonic_health::server::HealthReporter,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

/// Serves the Rollout service and `grpc.health.v1` (SERVING for `""` and
/// `onevision.v1.Rollout`) on `listener`, with the message-size limits of `cfg`.
pub async fn serve_rollout(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    cfg: ServerConfig,
    metrics: Option<RolloutMetrics>,
) -> Result<RolloutServerHandle, WorkerError> {
    let addr = listener
        .local_addr()
        .map_err(|source| WorkerError::Bind { addr: SocketAddr::from(([0, 0, 0, 0], 0)), source })?;
    let limit = cfg.max_message_bytes;
    if let Some(m) = &metrics {
        m.set_weight_version(engine.version(), engine.version());
        m.set_queue_depth(0);
    }
    let service = RolloutService::new(engine, cfg, metrics)?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RolloutServer<RolloutService>>().await;
    let svc = RolloutServer::new(service.clone()).max_decoding_message_size(limit).max_encoding_message_size(limit);
    let (tx, rx) = oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(health_service)
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            }),
    );
    tracing::info!(%addr, "rollout worker serving");
    Ok(RolloutServerHandle { addr, service, health, shutdown: Some(tx), server: Some(server) })
}

impl RolloutServerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn engine(&self) -> &Arc<Engine> {
        self.service.engine()
    }

    /// Reports NOT_SERVING (new work goes elsewhere), then stops accepting connections and
    /// waits up to `drain` for in-flight calls to finish.
    pub async fn stop(mut self, drain: Duration) -> Result<(), WorkerError> {
        self.health.set_not_serving::<RolloutServer<RolloutService>>().await;
        self.health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.server.take() {
            Some(task) => match tokio::time::timeout(drain, task).await {
                Ok(Ok(r)) => r.map_err(WorkerError::from),
                Ok(Err(e)) => Err(WorkerError::Task(e.to_string())),
                Err(_) => {
                    tracing::warn!(?drain, "in-flight rollout calls did not finish in time; exiting anyway");
                    Ok(())
                }
            },
            None => Ok(()),
        }
    }
}

impl Drop for RolloutServerHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.server.take() {
            t.abort();
        }
    }
}
