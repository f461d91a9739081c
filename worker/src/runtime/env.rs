//! The environment a trainer pod gets from the operator (`onevision_operator::env`), parsed once.
//!
//! The local runner sets the same variables, plus [`RING_BIND`] so several ranks on one machine
//! do not all bind `MASTER_PORT`.

use std::net::SocketAddr;

use onevision_operator::env as k;

use super::dist::LOCAL_RANK_ENV as LOCAL_RANK;
use super::{Result, RuntimeError};

/// Where this rank's ring listener binds (`host:port`; port 0 picks a free one). Default:
/// `0.0.0.0:$MASTER_PORT`, reachable at `$POD_IP` (each pod has its own IP).
pub const RING_BIND: &str = "ONEVISION_RING_BIND";

/// What a trainer rank knows about itself and its gang.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerEnv {
    pub rank: u32,
    pub world_size: u32,
    pub job_name: String,
    pub namespace: String,
    /// `host:port` of rank 0's coordinator.
    pub coordinator: String,
    pub master_port: u16,
    /// Gang generation (operator restarts); > 0 means this gang replaces a failed one.
    pub restart_count: u64,
    /// Address other ranks reach this one at (`$POD_IP`, else the bound IP).
    pub advertise_host: Option<String>,
    pub pod_name: String,
    pub ring_bind: SocketAddr,
    /// This rank's GPU on its node (`LOCAL_RANK`, default 0).
    pub local_rank: u32,
    /// Index of this rank's pod (`NODE_RANK`, default `RANK / NPROC_PER_NODE`).
    pub node_rank: u32,
    /// Ranks per pod (`NPROC_PER_NODE`, default 1).
    pub nproc_per_node: u32,
}

fn parse<T: std::str::FromStr>(name: &str, get: &dyn Fn(&str) -> Option<String>, default: T) -> Result<T> {
    match get(name).filter(|v| !v.trim().is_empty()) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| {
            RuntimeError::Config(format!("environment variable {name}={v:?} is not a valid number/address"))
        }),
    }
}

impl TrainerEnv {
    /// From the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(&|n| std::env::var(n).ok())
    }

    /// From any lookup (tests pass a map). Missing variables take single-process defaults, so
    /// `onevision trainer --job FILE` also works by hand.
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let world_size: u32 = parse(k::WORLD_SIZE, get, 1)?;
        let rank: u32 = parse(k::RANK, get, 0)?;
        if world_size == 0 || rank >= world_size {
            return Err(RuntimeError::Config(format!(
                "{}={rank} must be below {}={world_size} (and the world at least 1)",
                k::RANK,
                k::WORLD_SIZE
            )));
        }
        // One rank per GPU: `onevision trainer` launches NPROC_PER_NODE children (runtime::launcher),
        // each with LOCAL_RANK set; a rank must fit its node's slots.
        let nproc: u32 = parse(k::NPROC_PER_NODE, get, 1)?;
        let local_rank: u32 = parse(LOCAL_RANK, get, 0)?;
        let node_rank: u32 = parse(k::NODE_RANK, get, rank / nproc.max(1))?;
        if nproc == 0 || local_rank >= nproc {
            return Err(RuntimeError::Config(format!(
                "{LOCAL_RANK}={local_rank} must be below {}={nproc} (and NPROC_PER_NODE at least 1)",
                k::NPROC_PER_NODE
            )));
        }
        let master_port: u16 = parse(k::MASTER_PORT, get, 29500)?;
        let coordinator = get(k::COORDINATOR)
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| "127.0.0.1:50051".to_string());
        let pod_ip = get(k::POD_IP).filter(|v| !v.trim().is_empty());
        let default_bind: SocketAddr = ([0, 0, 0, 0], master_port).into();
        let ring_bind = parse(RING_BIND, get, default_bind)?;
        Ok(TrainerEnv {
            rank,
            world_size,
            job_name: get(k::JOB_NAME).unwrap_or_else(|| "job".into()),
            namespace: get(k::JOB_NAMESPACE).unwrap_or_else(|| "default".into()),
            coordinator,
            master_port,
            restart_count: parse(k::RESTART_COUNT, get, 0)?,
            advertise_host: pod_ip,
            pod_name: get(k::POD_NAME).unwrap_or_else(|| format!("rank-{rank}")),
            ring_bind,
            local_rank,
            node_rank,
            nproc_per_node: nproc,
        })
    }

    /// Where rank 0 binds its coordinator: all interfaces on the port of `$ONEVISION_COORDINATOR`.
    pub fn coordinator_bind(&self) -> Result<SocketAddr> {
        let port = self
            .coordinator
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .ok_or_else(|| {
                RuntimeError::Config(format!(
                    "{}={:?} is not host:port",
                    k::COORDINATOR,
                    self.coordinator
                ))
            })?;
        Ok(([0, 0, 0, 0], port).into())
    }

    /// `http://host:port` of the coordinator for clients.
    pub fn coordinator_endpoint(&self) -> String {
        if self.coordinator.contains("://") {
            self.coordinator.clone()
        } else {
            format!("http://{}", self.coordinator)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn parses_operator_env_and_rejects_bad_rank() {
        let m: HashMap<&str, &str> = HashMap::from([
            (k::RANK, "1"),
            (k::WORLD_SIZE, "2"),
            (k::COORDINATOR, "job-trainer-0.job-trainer.ns.svc:50051"),
            (k::RESTART_COUNT, "3"),
            (k::POD_IP, "10.0.0.7"),
        ]);
        let e = TrainerEnv::from_lookup(&|n| m.get(n).map(|s| s.to_string())).unwrap();
        assert_eq!((e.rank, e.world_size, e.restart_count), (1, 2, 3));
        assert_eq!(e.coordinator_bind().unwrap(), "0.0.0.0:50051".parse().unwrap());
        assert_eq!(e.coordinator_endpoint(), "http://job-trainer-0.job-trainer.ns.svc:50051");
        assert_eq!(e.advertise_host.as_deref(), Some("10.0.0.7"));
        let bad: HashMap<&str, &str> = HashMap::from([(k::RANK, "2"), (k::WORLD_SIZE, "2")]);
        let err = TrainerEnv::from_lookup(&|n| bad.get(n).map(|s| s.to_string())).unwrap_err();
        assert!(err.is_permanent(), "{err}");
        // A child of the per-GPU launcher: pod 1 of 2 with 8 GPUs, local rank 3.
        let multi: HashMap<&str, &str> = HashMap::from([
            (k::RANK, "11"),
            (k::WORLD_SIZE, "16"),
            (k::NPROC_PER_NODE, "8"),
            (k::NODE_RANK, "1"),
            (LOCAL_RANK, "3"),
        ]);
        let e = TrainerEnv::from_lookup(&|n| multi.get(n).map(|s| s.to_string())).unwrap();
        assert_eq!((e.rank, e.local_rank, e.node_rank, e.nproc_per_node), (11, 3, 1, 8));
        for (name, value) in [(LOCAL_RANK, "8"), (LOCAL_RANK, "x"), (k::NODE_RANK, "-1"), (k::NPROC_PER_NODE, "0")] {
            let mut m = multi.clone();
            m.insert(name, value);
            let err = TrainerEnv::from_lookup(&|n| m.get(n).map(|s| s.to_string())).unwrap_err();
            assert!(err.is_permanent() && err.to_string().contains(name), "{name}={value}: {err}");
        }
        let one: HashMap<&str, &str> = HashMap::from([(k::RANK, "1"), (k::WORLD_SIZE, "2"), (k::NPROC_PER_NODE, "1")]);
        assert!(TrainerEnv::from_lookup(&|n| one.get(n).map(|s| s.to_string())).is_ok());
    }
}
