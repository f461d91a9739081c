//! Errors of the collective communicators.

use std::time::Duration;

/// An error from a collective operation or the ring rendezvous.
///
/// Any error other than [`CommError::InvalidArgument`] leaves the ring out of sync, so the
/// communicator refuses further work ([`CommError::Poisoned`]) and the gang must restart.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("invalid communicator configuration: {0}")]
    Config(String),

    #[error("ring rendezvous of rank {rank} failed: {detail}")]
    Rendezvous { rank: usize, detail: String },

    #[error(
        "rank {peer} ({addr}) closed the connection during {op}: that process (or one beyond it \
         in the ring) died or failed; the gang must restart"
    )]
    PeerClosed { peer: usize, addr: String, op: &'static str },

    #[error(
        "no progress with rank {peer} ({addr}) for {timeout:?} during {op}: the peer is hung or \
         unreachable (raise the op timeout if steps are legitimately this uneven)"
    )]
    Timeout { peer: usize, addr: String, op: &'static str, timeout: Duration },

    #[error("I/O error with rank {peer} ({addr}) during {op}: {source}")]
    Io {
        peer: usize,
        addr: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "collective mismatch during {op}: {detail} (all ranks must call the same collectives, in \
         the same order, with the same sizes)"
    )]
    Mismatch { op: &'static str, detail: String },

    #[error("invalid argument to {op}: {detail}")]
    InvalidArgument { op: &'static str, detail: String },

    #[error("communicator unusable after an earlier failure ({0}); the gang must restart")]
    Poisoned(String),

    /// A device collective (NCCL) did not finish in time; the communicator was aborted.
    #[error(
        "{backend} {op} on rank {rank} did not complete within {timeout:?}: a peer is dead or hung, \
         so the communicator was aborted and the gang must restart (raise ONEVISION_COMM_TIMEOUT_SECS \
         if steps are legitimately this uneven)"
    )]
    CollectiveTimeout { backend: &'static str, op: &'static str, rank: usize, timeout: Duration },

    /// A device collective (NCCL) or its host<->device copies failed.
    #[error("{backend} {op} failed on rank {rank}: {detail}; the gang must restart")]
    Device { backend: &'static str, op: &'static str, rank: usize, detail: String },
}

impl CommError {
    /// True when the error means another rank is gone or hung (restart the gang), as opposed to a
    /// bug in this process's arguments.
    pub fn is_peer_failure(&self) -> bool {
        matches!(
            self,
            CommError::PeerClosed { .. }
                | CommError::Timeout { .. }
                | CommError::Io { .. }
                | CommError::Poisoned(_)
                | CommError::Rendezvous { .. }
                | CommError::CollectiveTimeout { .. }
                | CommError::Device { .. }
        )
    }
}
