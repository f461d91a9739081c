//! The coordinator hosted by trainer rank 0: rendezvous, heartbeats, step barrier, progress,
//! orderly shutdown, and the rollout-worker registry.
//!
//! Rollout workers are found through registration, not discovery: each worker calls
//! `RolloutRegistry.Register` on the coordinator (address from the operator's env) and renews the
//! lease every third of its TTL; a worker that stops renewing (killed pod) drops out after the
//! TTL and a `Deregister` removes it at once (clean scale-down). The trainer's rollout pool reads
//! [`CoordinatorServerHandle::rollout_workers`].

mod client;
mod service;
mod state;

pub use client::{
    lazy_channel, normalize_endpoint, with_retry, ClientError, CoordinatorClient, HeartbeatMonitor,
    RetryPolicy, RolloutLease,
};
pub use service::{serve_coordinator, serve_coordinator_on, CoordinatorServerHandle, CoordinatorService, ServeError};
pub use state::{CoordError, CoordinatorConfig, CoordinatorState, StepOutcome};
