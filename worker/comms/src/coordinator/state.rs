//! The coordinator as a pure state machine: no I/O, no clocks of its own (callers pass `now`), no
//! waiting. The tonic service in `service.rs` wraps it and turns "not ready yet" into waits.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use onevision_proto::v1;

/// Settings of the coordinator hosted by trainer rank 0.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub world_size: u32,
    /// Restart count of the gang (set by the operator); ranks of other generations are rejected.
    pub generation: u64,
    /// NCCL unique id handed to every rank; if empty, rank 0's Join may provide it.
    pub nccl_unique_id: Vec<u8>,
    pub heartbeat_interval: Duration,
    /// A rank silent for this long after the rendezvous is declared dead and the job fails.
    pub heartbeat_timeout: Duration,
    /// Upper bound on how long the server holds a Join or BeginStep call.
    pub max_wait: Duration,
    /// Rollout workers that do not renew within this are dropped from the registry.
    pub rollout_lease_ttl: Duration,
    /// gRPC message-size limit (both directions) of the coordinator server.
    pub max_message_bytes: usize,
}

impl CoordinatorConfig {
    pub fn new(world_size: u32, generation: u64) -> Self {
        CoordinatorConfig {
            world_size,
            generation,
            nccl_unique_id: Vec::new(),
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(30),
            max_wait: Duration::from_secs(600),
            rollout_lease_ttl: Duration::from_secs(15),
            max_message_bytes: onevision_proto::MAX_MESSAGE_BYTES,
        }
    }
}

/// A request the coordinator refuses; maps 1:1 onto gRPC status codes (see docs/proto.md).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordError {
    /// INVALID_ARGUMENT: the request itself is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// FAILED_PRECONDITION: valid request, wrong moment (stale generation, step out of order).
    #[error("{0}")]
    FailedPrecondition(String),
    /// ABORTED: the gang failed (dead rank, rank restarted); every rank must exit and restart.
    #[error("{0}")]
    Aborted(String),
    /// DEADLINE_EXCEEDED: the wait for the other ranks ran out.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// NOT_FOUND.
    #[error("{0}")]
    NotFound(String),
    /// UNAVAILABLE: the coordinator is shutting down.
    #[error("{0}")]
    Unavailable(String),
}

impl From<CoordError> for tonic::Status {
    fn from(e: CoordError) -> Self {
        match e {
            CoordError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            CoordError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            CoordError::Aborted(m) => tonic::Status::aborted(m),
            CoordError::DeadlineExceeded(m) => tonic::Status::deadline_exceeded(m),
            CoordError::NotFound(m) => tonic::Status::not_found(m),
            CoordError::Unavailable(m) => tonic::Status::unavailable(m),
        }
    }
}

#[derive(Debug, Clone)]
struct Member {
    address: String,
    name: String,
    last_seen: Instant,
    step: u64,
}

#[derive(Debug, Clone)]
struct Stop {
    reason: String,
    completed: bool,
    immediate: bool,
}

#[derive(Debug, Clone)]
struct RolloutEntry {
    address: String,
    capacity: u32,
    model_version: u64,
    last_seen: Instant,
}

/// Result of asking to begin a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// Every rank is here (or the job is stopping): go ahead with this answer.
    Ready(v1::BeginStepResponse),
    /// Other ranks have not arrived yet.
    Waiting,
}

/// The coordinator's state: membership, the step barrier, stop/failure, progress, rollout
/// registry.
#[derive(Debug)]
pub struct CoordinatorState {
    cfg: CoordinatorConfig,
    session_id: String,
    members: BTreeMap<u32, Member>,
    rendezvous_done: bool,
    /// Step the barrier currently gathers, with the ranks already there.
    gathering: Option<(u64, BTreeSet<u32>)>,
    /// Last step every rank was released into.
    released: Option<u64>,
    stop: Option<Stop>,
    failure: Option<String>,
    dead_ranks: Vec<u32>,
    progress: BTreeMap<u32, v1::ProgressReport>,
    rollouts: BTreeMap<String, RolloutEntry>,
    trainer_model_version: u64,
}

impl CoordinatorState {
    pub fn new(cfg: CoordinatorConfig, session_id: String) -> Self {
        CoordinatorState {
            cfg,
            session_id,
            members: BTreeMap::new(),
            rendezvous_done: false,
            gathering: None,
            released: None,
            stop: None,
            failure: None,
            dead_ranks: Vec::new(),
            progress: BTreeMap::new(),
            rollouts: BTreeMap::new(),
            trainer_model_version: 0,
        }
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    fn check_rank(&self, rank: u32, generation: u64) -> Result<(), CoordError> {
        if rank >= self.cfg.world_size {
            return Err(CoordError::InvalidArgument(format!(
                "rank {rank} is out of range for world size {}",
                self.cfg.world_size
            )));
        }
        if generation != self.cfg.generation {
            return Err(CoordError::FailedPrecondition(format!(
                "rank {rank} belongs to generation {generation} but the coordinator runs \
                 generation {}: a pod from another restart of the gang; it must exit",
                self.cfg.generation
            )));
        }
        Ok(())
    }

    fn check_failed(&self) -> Result<(), CoordError> {
        match &self.failure {
            Some(f) => Err(CoordError::Aborted(format!("the gang failed: {f}; restart it"))),
            None => Ok(()),
        }
    }

    fn check_member(&self, rank: u32) -> Result<(), CoordError> {
        if !self.members.contains_key(&rank) {
            return Err(CoordError::FailedPrecondition(format!(
                "rank {rank} has not joined; call Join first"
            )));
        }
        Ok(())
    }

    /// Registers a rank (idempotent). Returns whether anything changed (waiters should re-check).
    pub fn join(&mut self, req: &v1::JoinRequest, now: Instant) -> Result<bool, CoordError> {
        self.check_rank(req.rank, req.generation)?;
        self.check_failed()?;
        if req.world_size != self.cfg.world_size {
            return Err(CoordError::InvalidArgument(format!(
                "rank {} says world size {} but the coordinator expects {}: the ranks were \
                 started with different WORLD_SIZE",
                req.rank, req.world_size, self.cfg.world_size
            )));
        }
        if req.address.trim().is_empty() {
            return Err(CoordError::InvalidArgument(format!(
                "rank {} sent an empty ring address",
                req.rank
            )));
        }
        if !req.nccl_unique_id.is_empty() {
            if req.rank != 0 {
                return Err(CoordError::InvalidArgument(format!(
                    "rank {} sent an NCCL unique id; only rank 0 creates it",
                    req.rank
                )));
            }
            if self.cfg.nccl_unique_id.is_empty() {
                self.cfg.nccl_unique_id = req.nccl_unique_id.clone();
            }
        }
        if let Some(m) = self.members.get_mut(&req.rank) {
            if m.address == req.address {
                m.last_seen = now;
                return Ok(false);
            }
            if self.rendezvous_done {
                let msg = format!(
                    "rank {} rejoined from {} (was {}) after the rendezvous: it restarted, so \
                     the whole gang must restart",
                    req.rank, req.address, m.address
                );
                self.fail(msg.clone());
                return Err(CoordError::Aborted(msg));
            }
        }
        // New rank, or a rank whose pod restarted before the rendezvous completed.
        self.members.insert(
            req.rank,
            Member { address: req.address.clone(), name: req.name.clone(), last_seen: now, step: 0 },
        );
        if self.members.len() as u32 == self.cfg.world_size && !self.rendezvous_done {
            self.rendezvous_done = true;
            // Liveness is judged from here on; nobody could heartbeat while blocked in Join.
            for m in self.members.values_mut() {
                m.last_seen = now;
            }
        }
        Ok(true)
    }

    /// The Join answer once all ranks are in; `None` while waiting.
    pub fn join_result(&self, rank: u32) -> Result<Option<v1::JoinResponse>, CoordError> {
        self.check_failed()?;
        if !self.rendezvous_done {
            return Ok(None);
        }
        Ok(Some(v1::JoinResponse {
            rank,
            world_size: self.cfg.world_size,
            generation: self.cfg.generation,
            peers: self
                .members
                .iter()
                .map(|(r, m)| v1::PeerInfo { rank: *r, address: m.address.clone() })
                .collect(),
            nccl_unique_id: self.cfg.nccl_unique_id.clone(),
            session_id: self.session_id.clone(),
            heartbeat_interval_ms: duration_ms(self.cfg.heartbeat_interval),
            heartbeat_timeout_ms: duration_ms(self.cfg.heartbeat_timeout),
        }))
    }

    pub fn missing_ranks(&self) -> Vec<u32> {
        (0..self.cfg.world_size).filter(|r| !self.members.contains_key(r)).collect()
    }

    pub fn rendezvous_complete(&self) -> bool {
        self.rendezvous_done
    }

    fn stop_fields(&self) -> (bool, String) {
        match (&self.failure, &self.stop) {
            (Some(f), _) => (true, format!("gang failed: {f}")),
            (None, Some(s)) => (true, s.reason.clone()),
            (None, None) => (false, String::new()),
        }
    }

    /// A failed gang or an IMMEDIATE shutdown: ranks abandon the current step.
    fn stop_now(&self) -> bool {
        self.failure.is_some() || self.stop.as_ref().is_some_and(|s| s.immediate)
    }

    pub fn heartbeat(
        &mut self,
        req: &v1::HeartbeatRequest,
        now: Instant,
    ) -> Result<v1::HeartbeatResponse, CoordError> {
        self.check_rank(req.rank, req.generation)?;
        self.check_member(req.rank)?;
        if let Some(m) = self.members.get_mut(&req.rank) {
            m.last_seen = now;
            m.step = req.step;
        }
        let (should_stop, stop_reason) = self.stop_fields();
        Ok(v1::HeartbeatResponse {
            should_stop,
            stop_reason,
            dead_ranks: self.dead_ranks.clone(),
            stop_immediately: self.stop_now(),
        })
    }

    /// Declares ranks dead whose last sign of life is older than the heartbeat timeout. Returns
    /// true if this changed the state (the job just failed).
    pub fn check_liveness(&mut self, now: Instant) -> bool {
        if !self.rendezvous_done || self.failure.is_some() || self.stop.is_some() {
            return false;
        }
        let timeout = self.cfg.heartbeat_timeout;
        let dead: Vec<u32> = self
            .members
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.last_seen) > timeout)
            .map(|(r, _)| *r)
            .collect();
        if dead.is_empty() {
            return false;
        }
        let names: Vec<String> = dead
            .iter()
            .map(|r| {
                let m = &self.members[r];
                format!("rank {r} ({} {})", m.name, m.address)
            })
            .collect();
        self.fail(format!("{} sent no heartbeat for {:?}", names.join(", "), timeout));
        self.dead_ranks = dead;
        true
    }

    fn fail(&mut self, reason: String) {
        if self.failure.is_none() {
            self.failure = Some(reason);
        }
    }

    /// A rank arrives at the barrier for `step` (idempotent, so retries are safe).
    pub fn begin_step(
        &mut self,
        req: &v1::BeginStepRequest,
        now: Instant,
    ) -> Result<StepOutcome, CoordError> {
        self.check_rank(req.rank, req.generation)?;
        self.check_failed()?;
        self.check_member(req.rank)?;
        if !self.rendezvous_done {
            return Err(CoordError::FailedPrecondition(format!(
                "rank {} asked to begin step {} before the rendezvous completed",
                req.rank, req.step
            )));
        }
        if let Some(m) = self.members.get_mut(&req.rank) {
            m.last_seen = now;
            m.step = req.step;
        }
        let step = req.step;
        if let Some(released) = self.released {
            if step == released {
                // A retry of a call whose answer was lost.
                return Ok(self.step_ready(step));
            }
            if step < released {
                return Err(CoordError::FailedPrecondition(format!(
                    "rank {} asked to begin step {step}, but step {released} already began",
                    req.rank
                )));
            }
        }
        if self.stop.is_some() {
            // Everyone passed the previous barrier and nobody passed this one, so all ranks stop
            // at the same step boundary.
            return Ok(self.step_ready(step));
        }
        if let Some((s, ranks)) = &self.gathering {
            if *s != step {
                let msg = format!(
                    "ranks disagree on the step: rank {} asked for step {step} while ranks {:?} \
                     wait at step {s}",
                    req.rank, ranks
                );
                self.fail(msg.clone());
                return Err(CoordError::Aborted(msg));
            }
        }
        self.gathering.get_or_insert_with(|| (step, BTreeSet::new())).1.insert(req.rank);
        self.step_outcome(step)
    }

    /// Re-check of a waiting BeginStep.
    pub fn step_outcome(&mut self, step: u64) -> Result<StepOutcome, CoordError> {
        self.check_failed()?;
        if self.released.is_some_and(|r| r >= step) || self.stop.is_some() {
            return Ok(self.step_ready(step));
        }
        let all_here = matches!(&self.gathering, Some((s, ranks))
            if *s == step && ranks.len() as u32 == self.cfg.world_size);
        if all_here {
            self.gathering = None;
            self.released = Some(step);
            return Ok(self.step_ready(step));
        }
        Ok(StepOutcome::Waiting)
    }

    /// Ranks not yet at the barrier for `step`.
    pub fn missing_at_step(&self, step: u64) -> Vec<u32> {
        match &self.gathering {
            Some((s, ranks)) if *s == step => {
                (0..self.cfg.world_size).filter(|r| !ranks.contains(r)).collect()
            }
            _ => (0..self.cfg.world_size).collect(),
        }
    }

    fn step_ready(&self, step: u64) -> StepOutcome {
        let (should_stop, stop_reason) = self.stop_fields();
        StepOutcome::Ready(v1::BeginStepResponse { step, should_stop, stop_reason })
    }

    pub fn report_progress(
        &mut self,
        report: v1::ProgressReport,
        now: Instant,
    ) -> Result<v1::ProgressAck, CoordError> {
        self.check_rank(report.rank, report.generation)?;
        if report.total_steps > 0 && report.step > report.total_steps {
            return Err(CoordError::InvalidArgument(format!(
                "rank {} reported step {} of {}",
                report.rank, report.step, report.total_steps
            )));
        }
        for (k, v) in [("loss", report.loss), ("reward", report.reward), ("accuracy", report.accuracy)] {
            if v.is_some_and(|v| v.is_nan()) {
                tracing::warn!(rank = report.rank, step = report.step, "progress {k} is NaN");
            }
        }
        if let Some(m) = self.members.get_mut(&report.rank) {
            m.last_seen = now;
        }
        self.progress.insert(report.rank, report);
        let (should_stop, stop_reason) = self.stop_fields();
        Ok(v1::ProgressAck { should_stop, stop_reason, stop_immediately: self.stop_now() })
    }

    /// Requests an orderly stop. Returns the resulting phase.
    pub fn shutdown(&mut self, req: &v1::ShutdownRequest) -> v1::JobPhase {
        let reason = if req.reason.is_empty() { "shutdown requested".to_string() } else { req.reason.clone() };
        let immediate = req.mode() == v1::ShutdownMode::Immediate;
        match &mut self.stop {
            // A later request may upgrade an earlier one (Ctrl-C twice, or the final report).
            Some(s) => {
                s.completed |= req.completed;
                s.immediate |= immediate;
            }
            None => self.stop = Some(Stop { reason, completed: req.completed, immediate }),
        }
        self.phase()
    }

    pub fn phase(&self) -> v1::JobPhase {
        if self.failure.is_some() {
            v1::JobPhase::Failed
        } else if let Some(s) = &self.stop {
            if s.completed { v1::JobPhase::Succeeded } else { v1::JobPhase::Stopping }
        } else if self.rendezvous_done {
            v1::JobPhase::Running
        } else {
            v1::JobPhase::Rendezvous
        }
    }

    pub fn status(&mut self, now: Instant) -> v1::JobStatus {
        self.expire_rollouts(now);
        let progress = self
            .progress
            .get(&0)
            .or_else(|| self.progress.values().next())
            .cloned();
        let message = match (&self.failure, &self.stop) {
            (Some(f), _) => f.clone(),
            (None, Some(s)) => s.reason.clone(),
            (None, None) if !self.rendezvous_done => {
                format!("waiting for ranks {:?}", self.missing_ranks())
            }
            _ => progress.as_ref().map(|p| p.message.clone()).unwrap_or_default(),
        };
        v1::JobStatus {
            phase: self.phase() as i32,
            generation: self.cfg.generation,
            world_size: self.cfg.world_size,
            joined_ranks: self.members.keys().copied().collect(),
            progress,
            message,
            rollout_workers: self.rollouts.len() as u32,
            dead_ranks: self.dead_ranks.clone(),
        }
    }

    // ---- rollout registry ----

    fn expire_rollouts(&mut self, now: Instant) {
        let ttl = self.cfg.rollout_lease_ttl;
        self.rollouts.retain(|id, w| {
            let alive = now.saturating_duration_since(w.last_seen) <= ttl;
            if !alive {
                tracing::warn!(worker = %id, address = %w.address, "rollout worker lease expired");
            }
            alive
        });
    }

    pub fn register_rollout(
        &mut self,
        req: &v1::RegisterRolloutRequest,
        now: Instant,
    ) -> Result<v1::RegisterRolloutResponse, CoordError> {
        if req.worker_id.trim().is_empty() {
            return Err(CoordError::InvalidArgument("rollout worker_id is empty".into()));
        }
        if req.address.trim().is_empty() {
            return Err(CoordError::InvalidArgument(format!(
                "rollout worker {} sent an empty address",
                req.worker_id
            )));
        }
        if req.capacity == 0 {
            return Err(CoordError::InvalidArgument(format!(
                "rollout worker {} has capacity 0",
                req.worker_id
            )));
        }
        self.expire_rollouts(now);
        let entry = RolloutEntry {
            address: req.address.clone(),
            capacity: req.capacity,
            model_version: req.model_version,
            last_seen: now,
        };
        let newly_registered = self.rollouts.insert(req.worker_id.clone(), entry).is_none();
        Ok(v1::RegisterRolloutResponse {
            lease_ttl_ms: duration_ms(self.cfg.rollout_lease_ttl),
            trainer_model_version: self.trainer_model_version,
            newly_registered,
        })
    }

    pub fn deregister_rollout(&mut self, worker_id: &str) -> bool {
        self.rollouts.remove(worker_id).is_some()
    }

    /// Live rollout workers, ordered by id.
    pub fn rollouts(&mut self, now: Instant) -> Vec<v1::RolloutWorkerInfo> {
        self.expire_rollouts(now);
        self.rollouts
            .iter()
            .map(|(id, w)| v1::RolloutWorkerInfo {
                worker_id: id.clone(),
                address: w.address.clone(),
                capacity: w.capacity,
                model_version: w.model_version,
                last_seen_ms_ago: now.saturating_duration_since(w.last_seen).as_millis() as u64,
            })
            .collect()
    }

    /// Records the newest weights version the trainer published (told to registering workers).
    pub fn set_trainer_model_version(&mut self, version: u64) {
        self.trainer_model_version = self.trainer_model_version.max(version);
    }

    /// Records that a worker now serves `version` (after a successful UpdateWeights).
    pub fn set_rollout_version(&mut self, worker_id: &str, version: u64) -> Result<(), CoordError> {
        match self.rollouts.get_mut(worker_id) {
            Some(w) => {
                w.model_version = version;
                Ok(())
            }
            None => Err(CoordError::NotFound(format!("rollout worker {worker_id} is not registered"))),
        }
    }
}

fn duration_ms(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join_req(rank: u32, world: u32) -> v1::JoinRequest {
        v1::JoinRequest {
            rank,
            world_size: world,
            address: format!("127.0.0.1:{}", 9000 + rank),
            generation: 1,
            ..Default::default()
        }
    }

    fn step_req(rank: u32, step: u64) -> v1::BeginStepRequest {
        v1::BeginStepRequest { rank, generation: 1, step, wait_timeout_ms: 0 }
    }

    fn joined(world: u32, now: Instant) -> CoordinatorState {
        let mut s = CoordinatorState::new(CoordinatorConfig::new(world, 1), "s".into());
        for r in 0..world {
            s.join(&join_req(r, world), now).unwrap();
        }
        s
    }

    #[test]
    fn rendezvous_completes_when_all_ranks_joined() {
        let now = Instant::now();
        let mut s = CoordinatorState::new(CoordinatorConfig::new(3, 1), "s".into());
        let mut r0 = join_req(0, 3);
        r0.nccl_unique_id = vec![7; 128];
        s.join(&r0, now).unwrap();
        s.join(&join_req(2, 3), now).unwrap();
        assert_eq!(s.join_result(0).unwrap(), None);
        assert_eq!(s.missing_ranks(), vec![1]);
        assert_eq!(s.phase(), v1::JobPhase::Rendezvous);
        s.join(&join_req(1, 3), now).unwrap();
        let resp = s.join_result(1).unwrap().expect("complete");
        assert_eq!(resp.rank, 1);
        assert_eq!(resp.peers.len(), 3);
        assert_eq!(resp.peers[2].address, "127.0.0.1:9002");
        assert_eq!(resp.nccl_unique_id, vec![7; 128]);
        assert_eq!(s.phase(), v1::JobPhase::Running);
        // Idempotent retry.
        assert!(!s.join(&join_req(1, 3), now).unwrap());
    }

    #[test]
    fn bad_joins_get_precise_errors() {
        let now = Instant::now();
        let mut s = CoordinatorState::new(CoordinatorConfig::new(2, 1), "s".into());
        assert!(matches!(s.join(&join_req(5, 2), now), Err(CoordError::InvalidArgument(_))));
        assert!(matches!(s.join(&join_req(0, 3), now), Err(CoordError::InvalidArgument(_))));
        let mut stale = join_req(0, 2);
        stale.generation = 0;
        assert!(matches!(s.join(&stale, now), Err(CoordError::FailedPrecondition(_))));
        let mut nccl = join_req(1, 2);
        nccl.nccl_unique_id = vec![1];
        assert!(matches!(s.join(&nccl, now), Err(CoordError::InvalidArgument(_))));
        // A rank restarting before the rendezvous completes simply replaces its address.
        s.join(&join_req(1, 2), now).unwrap();
        let mut moved = join_req(1, 2);
        moved.address = "127.0.0.1:1".into();
        s.join(&moved, now).unwrap();
        s.join(&join_req(0, 2), now).unwrap();
        // After it, a restarted rank aborts the gang.
        let mut again = join_req(1, 2);
        again.address = "127.0.0.1:2".into();
        assert!(matches!(s.join(&again, now), Err(CoordError::Aborted(_))));
        assert_eq!(s.phase(), v1::JobPhase::Failed);
    }

    #[test]
    fn barrier_releases_only_when_every_rank_arrived() {
        let now = Instant::now();
        let mut s = joined(3, now);
        assert_eq!(s.begin_step(&step_req(0, 4), now).unwrap(), StepOutcome::Waiting);
        assert_eq!(s.begin_step(&step_req(2, 4), now).unwrap(), StepOutcome::Waiting);
        assert_eq!(s.missing_at_step(4), vec![1]);
        match s.begin_step(&step_req(1, 4), now).unwrap() {
            StepOutcome::Ready(r) => assert!(!r.should_stop && r.step == 4),
            o => panic!("{o:?}"),
        }
        // Waiters re-checking see the release; retries are idempotent.
        assert!(matches!(s.step_outcome(4).unwrap(), StepOutcome::Ready(_)));
        assert!(matches!(s.begin_step(&step_req(0, 4), now).unwrap(), StepOutcome::Ready(_)));
        assert!(matches!(s.begin_step(&step_req(0, 3), now), Err(CoordError::FailedPrecondition(_))));
        // Disagreeing ranks abort the gang.
        assert_eq!(s.begin_step(&step_req(0, 5), now).unwrap(), StepOutcome::Waiting);
        assert!(matches!(s.begin_step(&step_req(1, 6), now), Err(CoordError::Aborted(_))));
        assert!(matches!(s.step_outcome(5), Err(CoordError::Aborted(_))));
    }

    #[test]
    fn shutdown_stops_everyone_at_the_same_boundary() {
        let now = Instant::now();
        let mut s = joined(2, now);
        assert_eq!(s.begin_step(&step_req(0, 1), now).unwrap(), StepOutcome::Waiting);
        let phase = s.shutdown(&v1::ShutdownRequest { reason: "ctrl-c".into(), ..Default::default() });
        assert_eq!(phase, v1::JobPhase::Stopping);
        for r in [0, 1] {
            match s.begin_step(&step_req(r, 1), now).unwrap() {
                StepOutcome::Ready(resp) => {
                    assert!(resp.should_stop);
                    assert_eq!(resp.stop_reason, "ctrl-c");
                }
                o => panic!("{o:?}"),
            }
        }
        let hb = s.heartbeat(&v1::HeartbeatRequest { rank: 1, generation: 1, step: 1 }, now).unwrap();
        assert!(hb.should_stop && !hb.stop_immediately);
        s.shutdown(&v1::ShutdownRequest { mode: v1::ShutdownMode::Immediate as i32, ..Default::default() });
        let hb = s.heartbeat(&v1::HeartbeatRequest { rank: 1, generation: 1, step: 1 }, now).unwrap();
        assert!(hb.should_stop && hb.stop_immediately);
        let phase = s.shutdown(&v1::ShutdownRequest { completed: true, ..Default::default() });
        assert_eq!(phase, v1::JobPhase::Succeeded);
    }

    #[test]
    fn silent_rank_is_declared_dead() {
        let t0 = Instant::now();
        let mut s = joined(2, t0);
        let cfg_timeout = s.config().heartbeat_timeout;
        let hb = |r| v1::HeartbeatRequest { rank: r, generation: 1, step: 0 };
        let t1 = t0 + cfg_timeout / 2;
        s.heartbeat(&hb(0), t1).unwrap();
        assert!(!s.check_liveness(t1));
        let t2 = t0 + cfg_timeout + Duration::from_secs(1);
        assert!(s.check_liveness(t2));
        let resp = s.heartbeat(&hb(0), t2).unwrap();
        assert!(resp.should_stop);
        assert_eq!(resp.dead_ranks, vec![1]);
        assert_eq!(s.phase(), v1::JobPhase::Failed);
        assert!(matches!(s.begin_step(&step_req(0, 1), t2), Err(CoordError::Aborted(_))));
    }

    #[test]
    fn progress_becomes_status() {
        let now = Instant::now();
        let mut s = joined(2, now);
        let mut p = v1::ProgressReport {
            rank: 1,
            generation: 1,
            phase: "sft".into(),
            step: 3,
            total_steps: 10,
            loss: Some(2.5),
            ..Default::default()
        };
        s.report_progress(p.clone(), now).unwrap();
        assert_eq!(s.status(now).progress.unwrap().step, 3);
        p.rank = 0;
        p.step = 4;
        p.metrics.insert("grad_norm".into(), 1.25);
        s.report_progress(p.clone(), now).unwrap();
        let st = s.status(now);
        assert_eq!(st.progress.as_ref().unwrap().step, 4);
        assert_eq!(st.progress.unwrap().metrics["grad_norm"], 1.25);
        p.step = 11;
        assert!(matches!(s.report_progress(p, now), Err(CoordError::InvalidArgument(_))));
    }

    #[test]
    fn rollout_leases_expire() {
        let t0 = Instant::now();
        let mut s = joined(1, t0);
        let req = v1::RegisterRolloutRequest {
            worker_id: "w1".into(),
            address: "127.0.0.1:7000".into(),
            capacity: 8,
            model_version: 0,
        };
        s.set_trainer_model_version(3);
        let r = s.register_rollout(&req, t0).unwrap();
        assert!(r.newly_registered);
        assert_eq!(r.trainer_model_version, 3);
        assert!(!s.register_rollout(&req, t0).unwrap().newly_registered);
        assert_eq!(s.rollouts(t0).len(), 1);
        let ttl = s.config().rollout_lease_ttl;
        assert!(s.rollouts(t0 + ttl + Duration::from_millis(1)).is_empty());
        let mut bad = req.clone();
        bad.capacity = 0;
        assert!(matches!(s.register_rollout(&bad, t0), Err(CoordError::InvalidArgument(_))));
        assert!(matches!(s.set_rollout_version("nope", 1), Err(CoordError::NotFound(_))));
    }
}
