//! One call from "I am rank r of n" to a connected CPU communicator: bind the ring listener,
//! Join the coordinator with its address, then connect the ring to the returned peers. For NCCL,
//! [`rendezvous_nccl`]: rank 0 publishes the NCCL unique id in its Join, every rank gets it back in
//! the Join answer (the communicator itself is created by `onevision-cuda`).

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use onevision_proto::v1;

use crate::coordinator::{ClientError, CoordinatorClient};
use crate::{connect_cpu, CommError, Communicator, RingConfig};

/// What a trainer rank knows at start (from the operator's env).
#[derive(Debug, Clone)]
pub struct RendezvousOptions {
    pub rank: u32,
    pub world_size: u32,
    pub generation: u64,
    /// Where the ring listener binds, e.g. `0.0.0.0:29501` in a pod, `127.0.0.1:0` locally.
    pub bind: SocketAddr,
    /// Host other ranks use to reach this one (pod IP / DNS name); `None` = the bound IP.
    pub advertise_host: Option<String>,
    /// Pod or process name, for messages.
    pub name: String,
    pub join_timeout: Duration,
    /// Ring settings (op timeout, chunk size, connect timeout); rank/world/peers are filled in.
    pub ring: RingConfig,
}

impl RendezvousOptions {
    pub fn new(rank: u32, world_size: u32, generation: u64, bind: SocketAddr) -> Self {
        RendezvousOptions {
            rank,
            world_size,
            generation,
            bind,
            advertise_host: None,
            name: format!("rank-{rank}"),
            join_timeout: Duration::from_secs(600),
            ring: RingConfig::new(rank as usize, world_size as usize, Vec::new()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("cannot bind the ring listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("joining the coordinator failed: {0}")]
    Join(#[from] ClientError),
    #[error("the coordinator answered with {got} peers for world size {want}")]
    BadPeers { got: usize, want: u32 },
    #[error(transparent)]
    Ring(#[from] CommError),
    #[error("ring connection task failed: {0}")]
    Task(String),
    /// Rank 0 and this rank disagree on the communicator (one picked NCCL, the other the ring),
    /// e.g. GPUs on some nodes only, or ONEVISION_COMM set on some ranks only.
    #[error("{0}")]
    CommMismatch(String),
}

/// Length of an NCCL unique id (`ncclUniqueId`, `NCCL_UNIQUE_ID_BYTES` in nccl.h).
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

fn join_request(opts: &RendezvousOptions, address: String, nccl_unique_id: Vec<u8>) -> v1::JoinRequest {
    v1::JoinRequest {
        rank: opts.rank,
        world_size: opts.world_size,
        address,
        generation: opts.generation,
        name: opts.name.clone(),
        nccl_unique_id,
        ..Default::default()
    }
}

/// Joins the job for an NCCL gang and returns the coordinator's answer and the NCCL unique id
/// every rank must initialise its communicator with. Rank 0 passes the id it created
/// (`ncclGetUniqueId`); the other ranks pass `None` and receive rank 0's id. No ring listener is
/// bound: the address sent is informational (`nccl://host`).
pub async fn rendezvous_nccl(
    client: &CoordinatorClient,
    opts: RendezvousOptions,
    unique_id: Option<[u8; NCCL_UNIQUE_ID_BYTES]>,
) -> Result<(v1::JoinResponse, [u8; NCCL_UNIQUE_ID_BYTES]), RendezvousError> {
    if (opts.rank == 0) != unique_id.is_some() {
        return Err(RendezvousError::CommMismatch(format!(
            "rank {} {} an NCCL unique id: only rank 0 creates it",
            opts.rank,
            if unique_id.is_some() { "passed" } else { "did not pass" }
        )));
    }
    let host = opts.advertise_host.clone().unwrap_or_else(|| opts.name.clone());
    let id = unique_id.map(|b| b.to_vec()).unwrap_or_default();
    let join = client.join(join_request(&opts, format!("nccl://{host}"), id), opts.join_timeout).await?;
    if join.peers.len() != opts.world_size as usize {
        return Err(RendezvousError::BadPeers { got: join.peers.len(), want: opts.world_size });
    }
    let got: [u8; NCCL_UNIQUE_ID_BYTES] = join.nccl_unique_id.as_slice().try_into().map_err(|_| {
        RendezvousError::CommMismatch(format!(
            "rank {} selected NCCL but the coordinator holds a {}-byte NCCL id (want {NCCL_UNIQUE_ID_BYTES}): \
             rank 0 selected the TCP ring; set the same ONEVISION_COMM on every rank",
            opts.rank,
            join.nccl_unique_id.len()
        ))
    })?;
    if let Some(mine) = unique_id {
        if mine != got {
            return Err(RendezvousError::CommMismatch(
                "the coordinator answered rank 0 with an NCCL id other than the one it published".into(),
            ));
        }
    }
    Ok((join, got))
}

/// Joins the job and returns the coordinator's answer and a connected communicator
/// ([`crate::LocalCommunicator`] for a world of one).
pub async fn rendezvous_cpu(
    client: &CoordinatorClient,
    opts: RendezvousOptions,
) -> Result<(v1::JoinResponse, Box<dyn Communicator>), RendezvousError> {
    let listener =
        TcpListener::bind(opts.bind).map_err(|source| RendezvousError::Bind { addr: opts.bind, source })?;
    let local = listener.local_addr().map_err(|source| RendezvousError::Bind { addr: opts.bind, source })?;
    let host = opts.advertise_host.clone().unwrap_or_else(|| local.ip().to_string());
    let address = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", local.port()) // IPv6 literal
    } else {
        format!("{host}:{}", local.port())
    };
    let join = client.join(join_request(&opts, address, Vec::new()), opts.join_timeout).await?;
    if join.peers.len() != opts.world_size as usize {
        return Err(RendezvousError::BadPeers { got: join.peers.len(), want: opts.world_size });
    }
    if !join.nccl_unique_id.is_empty() {
        return Err(RendezvousError::CommMismatch(format!(
            "rank {} selected the TCP ring but rank 0 published an NCCL id (it selected NCCL): \
             set the same ONEVISION_COMM on every rank, and GPUs on all nodes or none",
            opts.rank
        )));
    }
    let mut ring = opts.ring.clone();
    ring.rank = opts.rank as usize;
    ring.world_size = opts.world_size as usize;
    ring.generation = join.generation;
    ring.peers = join.peers.iter().map(|p| p.address.clone()).collect();
    // The ring rendezvous blocks on sockets: keep it off the async workers.
    let comm = tokio::task::spawn_blocking(move || connect_cpu(ring, listener))
        .await
        .map_err(|e| RendezvousError::Task(e.to_string()))??;
    Ok((join, comm))
}
