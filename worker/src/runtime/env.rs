//! The environment a trainer pod gets from the operator (`onevision_operator::env`), parsed once.
//!
//! The local runner sets the same variables, plus [`RING_BIND`] so several ranks on one machine
//! do not all bind `MASTER_PORT`.

use std::net::SocketAddr;

use onevision_operator::env as k;

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
        // The operator counts one rank per GPU (WORLD_SIZE = nodes × NPROC_PER_NODE), but this
        // entrypoint is one rank per pod: refuse rather than wait forever for ranks nobody starts.
        let nproc: u32 = parse(k::NPROC_PER_NODE, get, 1)?;
        if nproc > 1 {
            return Err(RuntimeError::Config(format!(
                "{}={nproc}: trainer.gpusPerNode > 1 needs one trainer process per GPU, which \
                 `onevision trainer` does not launch yet; use gpusPerNode: 1 with more nodes",
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
        let multi: HashMap<&str, &str> = HashMap::from([(k::RANK, "0"), (k::WORLD_SIZE, "16"), (k::NPROC_PER_NODE, "8")]);
        let err = TrainerEnv::from_lookup(&|n| multi.get(n).map(|s| s.to_string())).unwrap_err();
        assert!(err.is_permanent() && err.to_string().contains("gpusPerNode"), "{err}");
        let one: HashMap<&str, &str> = HashMap::from([(k::RANK, "1"), (k::WORLD_SIZE, "2"), (k::NPROC_PER_NODE, "1")]);
        assert!(TrainerEnv::from_lookup(&|n| one.get(n).map(|s| s.to_string())).is_ok());
    }
}
