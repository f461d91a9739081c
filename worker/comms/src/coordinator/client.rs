//! Client side of the coordinator: retries with exponential backoff on transient failures,
//! a deadline on every call, long-poll loops for the rendezvous and the step barrier, a
//! background heartbeat, and the rollout-worker lease.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use onevision_proto::v1;
use onevision_proto::v1::coordinator_client::CoordinatorClient as RawCoordinator;
use onevision_proto::v1::rollout_registry_client::RolloutRegistryClient as RawRegistry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// How calls are retried and bounded.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Deadline of one attempt of a short call (held calls get their wait added).
    pub call_timeout: Duration,
    pub connect_timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Total time a call keeps retrying transient failures (UNAVAILABLE, lost deadline).
    pub give_up_after: Duration,
    /// gRPC message-size limit, both directions.
    pub max_message_bytes: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            call_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            give_up_after: Duration::from_secs(120),
            max_message_bytes: onevision_proto::MAX_MESSAGE_BYTES,
        }
    }
}

/// A failed coordinator call, after retries.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint {endpoint:?}: {detail}")]
    InvalidEndpoint { endpoint: String, detail: String },

    #[error("gRPC clients must be created inside a tokio runtime (use Runtime::enter or block_on)")]
    NoRuntime,

    #[error("{op} rejected by the coordinator ({code:?}): {message}")]
    Rejected { op: &'static str, code: Code, message: String },

    #[error(
        "{op}: message too large ({message}); the limit is set by max_message_bytes on both \
         ends — send less per call (weights go in chunks)"
    )]
    MessageTooLarge { op: &'static str, message: String },

    #[error(
        "{op}: coordinator at {endpoint} unreachable for {elapsed:?} after {attempts} attempts; \
         last error ({code:?}): {message}"
    )]
    Unreachable {
        op: &'static str,
        endpoint: String,
        attempts: u32,
        elapsed: Duration,
        code: Code,
        message: String,
    },
}

impl ClientError {
    /// The gRPC code behind the error (`Unavailable` when the coordinator was unreachable).
    pub fn code(&self) -> Code {
        match self {
            ClientError::InvalidEndpoint { .. } => Code::InvalidArgument,
            ClientError::NoRuntime => Code::FailedPrecondition,
            ClientError::Rejected { code, .. } | ClientError::Unreachable { code, .. } => *code,
            ClientError::MessageTooLarge { .. } => Code::OutOfRange,
        }
    }
}

/// `host:port` or a full URI → a URI tonic accepts.
pub fn normalize_endpoint(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

/// A lazily connecting channel (the server may not be up yet; calls retry until it is).
/// Must be called inside a tokio runtime (the channel spawns its worker task).
pub fn lazy_channel(endpoint: &str, policy: &RetryPolicy) -> Result<Channel, ClientError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(ClientError::NoRuntime);
    }
    let uri = normalize_endpoint(endpoint);
    let ep = Endpoint::from_shared(uri.clone()).map_err(|e| ClientError::InvalidEndpoint {
        endpoint: endpoint.to_string(),
        detail: e.to_string(),
    })?;
    Ok(ep
        .connect_timeout(policy.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .connect_lazy())
}

fn is_transient(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable)
        // tonic reports a connection that broke mid-call like this.
        || (status.code() == Code::Unknown && status.message().contains("transport"))
}

fn is_too_large(status: &Status) -> bool {
    status.code() == Code::OutOfRange && status.message().contains("message length too large")
}

fn jittered(d: Duration) -> Duration {
    // ±20% so that ranks restarted together do not retry in lockstep.
    d.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

/// Runs `attempt` until it succeeds, fails permanently, or `policy.give_up_after` passes.
/// Each attempt is bounded by `attempt_timeout` on the client side (the server also receives it
/// as the gRPC deadline).
pub async fn with_retry<T, F, Fut>(
    policy: &RetryPolicy,
    endpoint: &str,
    op: &'static str,
    attempt_timeout: Duration,
    mut attempt: F,
) -> Result<T, ClientError>
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let start = Instant::now();
    let mut backoff = policy.initial_backoff;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let status = match tokio::time::timeout(attempt_timeout, attempt(attempt_timeout)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(s)) => s,
            Err(_) => Status::deadline_exceeded(format!("no answer within {attempt_timeout:?}")),
        };
        if is_too_large(&status) {
            return Err(ClientError::MessageTooLarge { op, message: status.message().to_string() });
        }
        // Our own lost deadline is transient (all coordinator calls are idempotent); a
        // DEADLINE_EXCEEDED with the server's own explanation is handled by the long-poll loops.
        let own_deadline = status.code() == Code::DeadlineExceeded
            && status.message().starts_with("no answer within");
        if !(is_transient(&status) || own_deadline) {
            return Err(ClientError::Rejected {
                op,
                code: status.code(),
                message: status.message().to_string(),
            });
        }
        let elapsed = start.elapsed();
        if elapsed + backoff > policy.give_up_after {
            return Err(ClientError::Unreachable {
                op,
                endpoint: endpoint.to_string(),
                attempts,
                elapsed,
                code: status.code(),
                message: status.message().to_string(),
            });
        }
        tracing::debug!(op, attempts, code = ?status.code(), msg = status.message(), "retrying");
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(policy.max_backoff);
    }
}

fn request<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// How long the server may hold one long-poll attempt (Join, BeginStep); the loop re-asks.
const LONG_POLL: Duration = Duration::from_secs(30);

/// Client of the coordinator and the rollout registry (cheap to clone).
#[derive(Clone)]
pub struct CoordinatorClient {
    endpoint: String,
    policy: RetryPolicy,
    coordinator: RawCoordinator<Channel>,
    registry: RawRegistry<Channel>,
}

impl CoordinatorClient {
    /// Does not connect yet: the coordinator may start after this rank.
    pub fn new(endpoint: &str, policy: RetryPolicy) -> Result<Self, ClientError> {
        let channel = lazy_channel(endpoint, &policy)?;
        let limit = policy.max_message_bytes;
        Ok(CoordinatorClient {
            endpoint: normalize_endpoint(endpoint),
            coordinator: RawCoordinator::new(channel.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            registry: RawRegistry::new(channel)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            policy,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Refuses a request over the size limit before sending it: tonic's own encode-side check
    /// aborts the HTTP/2 stream and surfaces as an opaque "h2 protocol error".
    fn check_size<M: prost::Message>(&self, op: &'static str, msg: &M) -> Result<(), ClientError> {
        let len = msg.encoded_len();
        if len > self.policy.max_message_bytes {
            return Err(ClientError::MessageTooLarge {
                op,
                message: format!(
                    "request is {len} bytes, the limit is: {} bytes",
                    self.policy.max_message_bytes
                ),
            });
        }
        Ok(())
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Joins the rendezvous and waits (re-polling) until every rank joined or `timeout` passed.
    pub async fn join(&self, req: v1::JoinRequest, timeout: Duration) -> Result<v1::JoinResponse, ClientError> {
        self.check_size("Join", &req)?;
        let start = Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            let wait = left.min(LONG_POLL);
            let mut r = req.clone();
            r.wait_timeout_ms = wait.as_millis().max(1) as u32;
            let c = self.coordinator.clone();
            let res = with_retry(&self.policy, &self.endpoint, "Join", wait + self.policy.call_timeout, |t| {
                let mut c = c.clone();
                let r = r.clone();
                async move { c.join(request(r, t)).await.map(|x| x.into_inner()) }
            })
            .await;
            match res {
                Err(ClientError::Rejected { code: Code::DeadlineExceeded, .. })
                    if start.elapsed() < timeout => continue,
                other => return other,
            }
        }
    }

    pub async fn heartbeat(&self, req: v1::HeartbeatRequest) -> Result<v1::HeartbeatResponse, ClientError> {
        let c = self.coordinator.clone();
        with_retry(&self.policy, &self.endpoint, "Heartbeat", self.policy.call_timeout, |t| {
            let mut c = c.clone();
            let r = req;
            async move { c.heartbeat(request(r, t)).await.map(|x| x.into_inner()) }
        })
        .await
    }

    /// The step barrier: returns when every rank asked to begin `step` (or the job stops);
    /// fails with DEADLINE_EXCEEDED naming the missing ranks after `timeout`.
    pub async fn begin_step(
        &self,
        rank: u32,
        generation: u64,
        step: u64,
        timeout: Duration,
    ) -> Result<v1::BeginStepResponse, ClientError> {
        let start = Instant::now();
        loop {
            let wait = timeout.saturating_sub(start.elapsed()).min(LONG_POLL);
            let req = v1::BeginStepRequest {
                rank,
                generation,
                step,
                wait_timeout_ms: wait.as_millis().max(1) as u32,
            };
            let c = self.coordinator.clone();
            let res = with_retry(&self.policy, &self.endpoint, "BeginStep", wait + self.policy.call_timeout, |t| {
                let mut c = c.clone();
                let r = req;
                async move { c.begin_step(request(r, t)).await.map(|x| x.into_inner()) }
            })
            .await;
            match res {
                Err(ClientError::Rejected { code: Code::DeadlineExceeded, .. })
                    if start.elapsed() < timeout => continue,
                other => return other,
            }
        }
    }

    pub async fn report_progress(&self, report: v1::ProgressReport) -> Result<v1::ProgressAck, ClientError> {
        self.check_size("ReportProgress", &report)?;
        let c = self.coordinator.clone();
        with_retry(&self.policy, &self.endpoint, "ReportProgress", self.policy.call_timeout, |t| {
            let mut c = c.clone();
            let r = report.clone();
            async move { c.report_progress(request(r, t)).await.map(|x| x.into_inner()) }
        })
        .await
    }

    pub async fn status(&self) -> Result<v1::JobStatus, ClientError> {
        let c = self.coordinator.clone();
        with_retry(&self.policy, &self.endpoint, "GetStatus", self.policy.call_timeout, |t| {
            let mut c = c.clone();
            async move { c.get_status(request(v1::GetStatusRequest {}, t)).await.map(|x| x.into_inner()) }
        })
        .await
    }

    pub async fn shutdown(&self, reason: &str, mode: v1::ShutdownMode, completed: bool) -> Result<v1::JobPhase, ClientError> {
        let req = v1::ShutdownRequest { reason: reason.to_string(), mode: mode as i32, completed };
        self.check_size("Shutdown", &req)?;
        let c = self.coordinator.clone();
        let resp = with_retry(&self.policy, &self.endpoint, "Shutdown", self.policy.call_timeout, |t| {
            let mut c = c.clone();
            let r = req.clone();
            async move { c.shutdown(request(r, t)).await.map(|x| x.into_inner()) }
        })
        .await?;
        Ok(resp.phase())
    }

    /// Heartbeats every `interval` in the background; see [`HeartbeatMonitor`].
    pub fn spawn_heartbeat(&self, rank: u32, generation: u64, interval: Duration) -> HeartbeatMonitor {
        let step = Arc::new(AtomicU64::new(0));
        let (tx, rx) = watch::channel(None::<String>);
        let client = self.clone();
        let step2 = step.clone();
        let task = tokio::spawn(async move {
            loop {
                let req = v1::HeartbeatRequest { rank, generation, step: step2.load(Ordering::Relaxed) };
                let verdict = match client.heartbeat(req).await {
                    Ok(r) if r.should_stop => Some(r.stop_reason),
                    Ok(_) => None,
                    Err(e) => Some(format!("heartbeat failed: {e}")),
                };
                if let Some(reason) = verdict {
                    tx.send_replace(Some(reason));
                    return;
                }
                tokio::time::sleep(interval).await;
            }
        });
        HeartbeatMonitor { step, stop: rx, task }
    }

    // ---- rollout registry ----

    pub async fn register_rollout(
        &self,
        req: v1::RegisterRolloutRequest,
    ) -> Result<v1::RegisterRolloutResponse, ClientError> {
        self.check_size("Register", &req)?;
        let c = self.registry.clone();
        with_retry(&self.policy, &self.endpoint, "Register", self.policy.call_timeout, |t| {
            let mut c = c.clone();
            let r = req.clone();
            async move { c.register(request(r, t)).await.map(|x| x.into_inner()) }
        })
        .await
    }

    pub async fn deregister_rollout(&self, worker_id: &str) -> Result<bool, ClientError> {
        let req = v1::DeregisterRolloutRequest { worker_id: worker_id.to_string() };
        let c = self.registry.clone();
        let r = with_retry(&self.policy, &self.endpoint, "Deregister", self.policy.call_timeout, |t| {
            let mut c = c.clone();
            let r = req.clone();
            async move { c.deregister(request(r, t)).await.map(|x| x.into_inner()) }
        })
        .await?;
        Ok(r.was_registered)
    }

    pub async fn list_rollouts(&self) -> Result<Vec<v1::RolloutWorkerInfo>, ClientError> {
        let c = self.registry.clone();
        let r = with_retry(&self.policy, &self.endpoint, "ListRollouts", self.policy.call_timeout, |t| {
            let mut c = c.clone();
            async move { c.list_rollouts(request(v1::ListRolloutsRequest {}, t)).await.map(|x| x.into_inner()) }
        })
        .await?;
        Ok(r.workers)
    }

    /// Registers a rollout worker and keeps renewing its lease (every third of the TTL) until
    /// [`RolloutLease::release`] or drop.
    pub async fn keep_registered(&self, req: v1::RegisterRolloutRequest) -> Result<RolloutLease, ClientError> {
        let first = self.register_rollout(req.clone()).await?;
        let period = Duration::from_millis((first.lease_ttl_ms / 3).max(50) as u64);
        let client = self.clone();
        let worker_id = req.worker_id.clone();
        let version = Arc::new(AtomicU64::new(req.model_version));
        let v2 = version.clone();
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stop_rx.changed() => return,
                }
                let mut r = req.clone();
                r.model_version = v2.load(Ordering::Relaxed);
                // Not raced against the stop signal: a renewal already on the wire must be answered
                // before `release` deregisters, or it could land after and re-register us.
                if let Err(e) = client.register_rollout(r).await {
                    // Keep trying: the trainer may be restarting; a new coordinator re-learns us.
                    tracing::warn!(error = %e, "rollout lease renewal failed");
                }
            }
        });
        Ok(RolloutLease {
            client: self.clone(),
            worker_id,
            trainer_model_version: first.trainer_model_version,
            version,
            stop: stop_tx,
            task: Some(task),
        })
    }
}

/// The background heartbeat of a trainer rank.
pub struct HeartbeatMonitor {
    step: Arc<AtomicU64>,
    stop: watch::Receiver<Option<String>>,
    task: JoinHandle<()>,
}

impl HeartbeatMonitor {
    /// Reported with the next heartbeat.
    pub fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
    }

    /// `Some(reason)` once the coordinator said stop or could not be reached within the retry
    /// policy (the rank should checkpoint and exit).
    pub fn stop_reason(&self) -> Option<String> {
        self.stop.borrow().clone()
    }

    /// Resolves when a stop reason appears.
    pub async fn stopped(&mut self) -> String {
        loop {
            if let Some(r) = self.stop.borrow_and_update().clone() {
                return r;
            }
            if self.stop.changed().await.is_err() {
                return "heartbeat task ended".to_string();
            }
        }
    }
}

impl Drop for HeartbeatMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A rollout worker's registration, renewed in the background.
pub struct RolloutLease {
    client: CoordinatorClient,
    worker_id: String,
    trainer_model_version: u64,
    version: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl RolloutLease {
    /// The trainer's weights version when the worker registered.
    pub fn trainer_model_version(&self) -> u64 {
        self.trainer_model_version
    }

    /// The model version announced with the next renewal.
    pub fn set_model_version(&self, version: u64) {
        self.version.store(version, Ordering::Relaxed);
    }

    /// Stops renewing and deregisters (a clean scale-down). Waits for a renewal in flight first so
    /// that it cannot reach the coordinator after the deregistration.
    pub async fn release(mut self) -> Result<bool, ClientError> {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.client.deregister_rollout(&self.worker_id).await
    }
}

impl Drop for RolloutLease {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
