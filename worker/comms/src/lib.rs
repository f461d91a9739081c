//! Communication layer of onevision trainer ranks and rollout workers.
//!
//! - [`Communicator`]: collectives between data-parallel trainer ranks. [`TcpRingCommunicator`]
//!   is the CPU implementation (ring all-reduce between processes over TCP, deterministic, with
//!   timeouts), [`LocalCommunicator`] serves a world of one. The NCCL implementation lives in
//!   `onevision-cuda` (`onevision_cuda::nccl_comm`), which depends on this crate for the trait.
//! - [`coordinator`]: the gRPC coordinator hosted by trainer rank 0 (rendezvous, heartbeats,
//!   step barrier, progress, shutdown, rollout registry) and its retrying client.
//! - [`rendezvous_cpu`]: Join + ring connection in one call; [`rendezvous_nccl`]: Join that
//!   publishes (rank 0) or receives (other ranks) the NCCL unique id.
//! - [`weights`]: chunking and validating `UpdateWeights` streams.
//! - [`health`]: `grpc.health.v1` checks.
//! - [`ports`]: ports chosen for processes told where to listen before they start.

mod communicator;
pub mod coordinator;
mod error;
pub mod health;
pub mod ports;
mod rendezvous;
mod ring;
pub mod weights;

pub use communicator::{check_root, check_scatter_lens, shard_len, Communicator, LocalCommunicator};
pub use error::CommError;
pub use rendezvous::{rendezvous_cpu, rendezvous_nccl, RendezvousError, RendezvousOptions, NCCL_UNIQUE_ID_BYTES};
pub use ring::{ring_segment, ring_sum_order, RingConfig, TcpRingCommunicator};

/// The communicator for a rank: local for a world of one, otherwise a TCP ring on `listener`.
pub fn connect_cpu(
    config: RingConfig,
    listener: std::net::TcpListener,
) -> Result<Box<dyn Communicator>, CommError> {
    if config.world_size == 1 {
        return Ok(Box::new(LocalCommunicator));
    }
    Ok(Box::new(TcpRingCommunicator::connect_with_listener(config, listener)?))
}
