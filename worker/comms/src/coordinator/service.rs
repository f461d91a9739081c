//! The tonic services around [`CoordinatorState`]: `onevision.v1.Coordinator`,
//! `onevision.v1.RolloutRegistry` and `grpc.health.v1.Health`, served by trainer rank 0.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use onevision_proto::v1;
use onevision_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use onevision_proto::v1::rollout_registry_server::{RolloutRegistry, RolloutRegistryServer};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use super::state::{CoordError, CoordinatorConfig, CoordinatorState, StepOutcome};

/// Failure to start or run a gRPC server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot bind the coordinator on {addr}: {source} (is another process using the port?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("coordinator server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("invalid coordinator configuration: {0}")]
    Config(String),
    #[error("coordinator server task ended abnormally: {0}")]
    Task(String),
}

struct Shared {
    state: Mutex<CoordinatorState>,
    /// Woken on every state change so that held Join/BeginStep calls re-check.
    changed: Notify,
    status: watch::Sender<v1::JobStatus>,
    /// Set when the server stops: held calls end instead of delaying the shutdown.
    closing: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, CoordinatorState> {
        // The state has no invariants a panicking holder could break halfway that matter more
        // than keeping the job's control plane alive.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` to the state, then publishes the status and wakes waiters.
    fn mutate<T>(&self, f: impl FnOnce(&mut CoordinatorState, Instant) -> T) -> T {
        let now = Instant::now();
        let (out, status) = {
            let mut st = self.lock();
            let out = f(&mut st, now);
            (out, st.status(now))
        };
        self.status.send_replace(status);
        self.changed.notify_waiters();
        out
    }

    /// Re-evaluates `check` on every state change until it yields a value or `deadline` passes.
    async fn wait_for<T>(
        &self,
        deadline: Instant,
        mut check: impl FnMut(&mut CoordinatorState) -> Result<Option<T>, CoordError>,
    ) -> Result<Option<T>, CoordError> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before checking, so a change between check and await is not missed.
            notified.as_mut().enable();
            if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(CoordError::Unavailable("the coordinator is shutting down".into()));
            }
            if let Some(v) = check(&mut self.lock())? {
                return Ok(Some(v));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let _ = tokio::time::timeout(deadline - now, notified).await;
        }
    }

    fn wait_deadline(&self, wait_timeout_ms: u32) -> Instant {
        let max = self.lock().config().max_wait;
        let asked = if wait_timeout_ms == 0 { max } else { Duration::from_millis(wait_timeout_ms as u64) };
        Instant::now() + asked.min(max)
    }
}

/// The `Coordinator` and `RolloutRegistry` services over one shared state.
#[derive(Clone)]
pub struct CoordinatorService {
    shared: Arc<Shared>,
}

impl CoordinatorService {
    pub fn new(cfg: CoordinatorConfig) -> Self {
        let session_id = format!(
            "{:016x}",
            rand::random::<u64>() ^ std::process::id() as u64
        );
        let mut state = CoordinatorState::new(cfg, session_id);
        let status = state.status(Instant::now());
        CoordinatorService {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                changed: Notify::new(),
                status: watch::channel(status).0,
                closing: Default::default(),
            }),
        }
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn join(&self, request: Request<v1::JoinRequest>) -> Result<Response<v1::JoinResponse>, Status> {
        let req = request.into_inner();
        let deadline = self.shared.wait_deadline(req.wait_timeout_ms);
        self.shared.mutate(|st, now| st.join(&req, now))?;
        tracing::info!(rank = req.rank, address = %req.address, name = %req.name, "rank joined");
        let rank = req.rank;
        match self.shared.wait_for(deadline, |st| st.join_result(rank)).await? {
            Some(resp) => Ok(Response::new(resp)),
            None => {
                let missing = self.shared.lock().missing_ranks();
                Err(CoordError::DeadlineExceeded(format!(
                    "rendezvous incomplete: ranks {missing:?} of {} have not joined (are their \
                     pods running and able to reach the coordinator?)",
                    req.world_size
                ))
                .into())
            }
        }
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.shared.mutate(|st, now| st.heartbeat(&req, now))?))
    }

    async fn begin_step(
        &self,
        request: Request<v1::BeginStepRequest>,
    ) -> Result<Response<v1::BeginStepResponse>, Status> {
        let req = request.into_inner();
        let deadline = self.shared.wait_deadline(req.wait_timeout_ms);
        if let StepOutcome::Ready(r) = self.shared.mutate(|st, now| st.begin_step(&req, now))? {
            return Ok(Response::new(r));
        }
        let step = req.step;
        let outcome = self
            .shared
            .wait_for(deadline, |st| match st.step_outcome(step)? {
                StepOutcome::Ready(r) => Ok(Some(r)),
                StepOutcome::Waiting => Ok(None),
            })
            .await?;
        match outcome {
            Some(r) => {
                // The release changed the state (published status, woke the other waiters).
                self.shared.mutate(|_, _| ());
                Ok(Response::new(r))
            }
            None => {
                let missing = self.shared.lock().missing_at_step(step);
                Err(CoordError::DeadlineExceeded(format!(
                    "step {step} barrier timed out: ranks {missing:?} did not arrive"
                ))
                .into())
            }
        }
    }

    async fn report_progress(
        &self,
        request: Request<v1::ProgressReport>,
    ) -> Result<Response<v1::ProgressAck>, Status> {
        let report = request.into_inner();
        Ok(Response::new(self.shared.mutate(|st, now| st.report_progress(report, now))?))
    }

    async fn get_status(
        &self,
        _request: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::JobStatus>, Status> {
        Ok(Response::new(self.shared.lock().status(Instant::now())))
    }

    async fn shutdown(
        &self,
        request: Request<v1::ShutdownRequest>,
    ) -> Result<Response<v1::ShutdownResponse>, Status> {
        let req = request.into_inner();
        tracing::info!(reason = %req.reason, completed = req.completed, "shutdown requested");
        let phase = self.shared.mutate(|st, _| st.shutdown(&req));
        Ok(Response::new(v1::ShutdownResponse { phase: phase as i32 }))
    }
}

#[tonic::async_trait]
impl RolloutRegistry for CoordinatorService {
    async fn register(
        &self,
        request: Request<v1::RegisterRolloutRequest>,
    ) -> Result<Response<v1::RegisterRolloutResponse>, Status> {
        let req = request.into_inner();
        let resp = self.shared.mutate(|st, now| st.register_rollout(&req, now))?;
        if resp.newly_registered {
            tracing::info!(worker = %req.worker_id, address = %req.address, "rollout worker registered");
        }
        Ok(Response::new(resp))
    }

    async fn deregister(
        &self,
        request: Request<v1::DeregisterRolloutRequest>,
    ) -> Result<Response<v1::DeregisterRolloutResponse>, Status> {
        let id = request.into_inner().worker_id;
        let was_registered = self.shared.mutate(|st, _| st.deregister_rollout(&id));
        Ok(Response::new(v1::DeregisterRolloutResponse { was_registered }))
    }

    async fn list_rollouts(
        &self,
        _request: Request<v1::ListRolloutsRequest>,
    ) -> Result<Response<v1::ListRolloutsResponse>, Status> {
        let workers = self.shared.lock().rollouts(Instant::now());
        Ok(Response::new(v1::ListRolloutsResponse { workers }))
    }
}

/// A running coordinator server. Dropping it stops the server.
pub struct CoordinatorServerHandle {
    addr: SocketAddr,
    service: CoordinatorService,
    health: tonic_health::server::HealthReporter,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    ticker: JoinHandle<()>,
}

/// Binds `addr` (port 0 picks a free port) and serves the coordinator, the rollout registry and
/// `grpc.health.v1` (reporting SERVING for `""`, `onevision.v1.Coordinator` and
/// `onevision.v1.RolloutRegistry`).
pub async fn serve_coordinator(
    addr: SocketAddr,
    cfg: CoordinatorConfig,
) -> Result<CoordinatorServerHandle, ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    serve_coordinator_on(listener, cfg).await
}

/// Like [`serve_coordinator`] on an already bound listener.
pub async fn serve_coordinator_on(
    listener: tokio::net::TcpListener,
    cfg: CoordinatorConfig,
) -> Result<CoordinatorServerHandle, ServeError> {
    if cfg.world_size == 0 {
        return Err(ServeError::Config("world_size must be at least 1".into()));
    }
    if cfg.heartbeat_interval.is_zero() || cfg.heartbeat_timeout <= cfg.heartbeat_interval {
        return Err(ServeError::Config(format!(
            "heartbeat timeout ({:?}) must exceed the interval ({:?})",
            cfg.heartbeat_timeout, cfg.heartbeat_interval
        )));
    }
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let limit = cfg.max_message_bytes;
    let tick = (cfg.heartbeat_interval / 2).max(Duration::from_millis(20));
    let service = CoordinatorService::new(cfg);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    health.set_serving::<RolloutRegistryServer<CoordinatorService>>().await;

    let coordinator = CoordinatorServer::new(service.clone())
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let registry = RolloutRegistryServer::new(service.clone())
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);

    let (tx, rx) = oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(health_service)
            .add_service(coordinator)
            .add_service(registry)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            }),
    );

    // Liveness is judged on a timer too, so a dead rank fails the job even when nobody calls.
    let shared = service.shared.clone();
    let ticker = tokio::spawn(async move {
        loop {
            tokio::time::sleep(tick).await;
            let failed = shared.lock().check_liveness(Instant::now());
            if failed {
                let status = shared.lock().status(Instant::now());
                tracing::error!(message = %status.message, "trainer rank lost");
                shared.mutate(|_, _| ());
            }
        }
    });

    tracing::info!(%addr, "coordinator serving");
    Ok(CoordinatorServerHandle {
        addr,
        service,
        health,
        shutdown: Some(tx),
        server: Some(server),
        ticker,
    })
}

impl CoordinatorServerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ip:port` for clients on this machine.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The job status as of now (what the operator / local runner publishes).
    pub fn status(&self) -> v1::JobStatus {
        self.service.shared.lock().status(Instant::now())
    }

    /// Updated on every change (progress report, join, stop, failure).
    pub fn subscribe_status(&self) -> watch::Receiver<v1::JobStatus> {
        self.service.shared.status.subscribe()
    }

    /// Rollout workers with a live lease, ordered by id.
    pub fn rollout_workers(&self) -> Vec<v1::RolloutWorkerInfo> {
        self.service.shared.lock().rollouts(Instant::now())
    }

    pub fn set_trainer_model_version(&self, version: u64) {
        self.service.shared.mutate(|st, _| st.set_trainer_model_version(version));
    }

    /// Records that a rollout worker now serves `version` (after UpdateWeights succeeded).
    pub fn set_rollout_version(&self, worker_id: &str, version: u64) -> Result<(), CoordError> {
        self.service.shared.mutate(|st, _| st.set_rollout_version(worker_id, version))
    }

    /// Same as the Shutdown RPC, from inside rank 0.
    pub fn request_stop(&self, reason: &str, completed: bool) -> v1::JobPhase {
        let req = v1::ShutdownRequest {
            reason: reason.to_string(),
            mode: v1::ShutdownMode::Graceful as i32,
            completed,
        };
        self.service.shared.mutate(|st, _| st.shutdown(&req))
    }

    /// Reports NOT_SERVING, then stops the server after in-flight calls finish.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        self.health.set_not_serving::<CoordinatorServer<CoordinatorService>>().await;
        self.health.set_not_serving::<RolloutRegistryServer<CoordinatorService>>().await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Held Join/BeginStep calls re-check, see `closing` and end.
        self.service.shared.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        self.service.shared.changed.notify_waiters();
        match self.server.take() {
            Some(task) => match task.await {
                Ok(r) => r.map_err(ServeError::from),
                Err(e) => Err(ServeError::Task(e.to_string())),
            },
            None => Ok(()),
        }
    }
}

impl Drop for CoordinatorServerHandle {
    fn drop(&mut self) {
        self.ticker.abort();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
