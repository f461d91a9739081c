//! One call from "I am rank r of n" to a connected CPU communicator: bind the ring listener,
//! Join the coordinator with its address, then connect the ring to the returned peers.

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
    let join = client
        .join(
            v1::JoinRequest {
                rank: opts.rank,
                world_size: opts.world_size,
                address,
                generation: opts.generation,
                name: opts.name.clone(),
                ..Default::default()
            },
            opts.join_timeout,
        )
        .await?;
    if join.peers.len() != opts.world_size as usize {
        return Err(RendezvousError::BadPeers { got: join.peers.len(), want: opts.world_size });
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
