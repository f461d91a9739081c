//! Pod networking.
//!
//! `netns` mode: each pod gets a network namespace `ovp-<agentpid>-<n>` whose `eth0` is one end
//! of a veth pair; the other end hangs on bridge `br0` inside the agent's own hub namespace
//! `ovh-<agentpid>`. Pods get 10.213.x.y/16 and reach each other over the bridge; nothing is
//! added to the host's network namespace. Host loopback services (the API server, ports from
//! `hostPorts`) are reachable inside a pod at 127.0.0.1:<port> through a forwarder whose listening
//! socket the agent opens inside the pod namespace (setns on a short-lived thread).
//!
//! `loopback` mode (no root / no netns): pods share the host network and each gets its own
//! 127.x.y.z address (advertised as podIP and in /etc/hosts; all of 127/8 is local on Linux).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::process::Command;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::config::NetworkMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    Netns,
    Loopback,
}

pub struct Network {
    pub mode: Resolved,
    pid: u32,
    next: AtomicU32,
    hub: String,
    host_ports: Vec<u16>,
}

/// Where a pod's network lives.
#[derive(Debug, Clone)]
pub struct PodNet {
    pub ip: String,
    /// `Some(name)` in netns mode.
    pub netns: Option<String>,
    pub index: u32,
}

async fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output().await?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl Network {
    pub async fn new(mode: NetworkMode, host_ports: Vec<u16>) -> io::Result<Network> {
        let pid = std::process::id();
        let hub = format!("ovh-{pid}");
        let mut net = Network {
            mode: Resolved::Loopback,
            pid,
            next: AtomicU32::new(2),
            hub,
            host_ports,
        };
        if mode == NetworkMode::Loopback {
            return Ok(net);
        }
        cleanup_stale().await;
        let setup = async {
            ip(&["netns", "add", &net.hub]).await?;
            ip(&["-n", &net.hub, "link", "set", "lo", "up"]).await?;
            ip(&["-n", &net.hub, "link", "add", "br0", "type", "bridge"]).await?;
            ip(&["-n", &net.hub, "link", "set", "br0", "up"]).await
        };
        match setup.await {
            Ok(()) => net.mode = Resolved::Netns,
            Err(e) if mode == NetworkMode::Auto => {
                warn!("network namespaces unavailable ({e}); pods share the host network with 127.x.y.z addresses");
                let _ = ip(&["netns", "del", &net.hub]).await;
            }
            Err(e) => return Err(e),
        }
        Ok(net)
    }

    pub fn allocate(&self) -> PodNet {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        match self.mode {
            Resolved::Netns => PodNet {
                ip: format!("10.213.{}.{}", (n >> 8) & 0xff, n & 0xff),
                netns: Some(format!("ovp-{}-{n}", self.pid)),
                index: n,
            },
            // Second octet from the pid so two agents on one host do not hand out the same address.
            Resolved::Loopback => PodNet {
                ip: format!(
                    "127.{}.{}.{}",
                    100 + self.pid % 100,
                    (n >> 8) & 0xff,
                    n & 0xff
                ),
                netns: None,
                index: n,
            },
        }
    }

    /// Creates the pod's namespace, wires it to the hub bridge and starts the host-port forwarders.
    pub async fn setup(&self, pod: &PodNet) -> io::Result<Vec<JoinHandle<()>>> {
        let Some(ns) = &pod.netns else {
            return Ok(vec![]);
        };
        let veth = format!("v{}", pod.index);
        ip(&["netns", "add", ns]).await?;
        ip(&[
            "-n", &self.hub, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
            ns,
        ])
        .await?;
        ip(&["-n", &self.hub, "link", "set", &veth, "master", "br0", "up"]).await?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/16", pod.ip),
            "dev",
            "eth0",
        ])
        .await?;
        ip(&["-n", ns, "link", "set", "eth0", "up"]).await?;
        ip(&["-n", ns, "link", "set", "lo", "up"]).await?;
        let mut tasks = Vec::new();
        for &port in &self.host_ports {
            let listener = bind_in_netns(ns, port).await?;
            tasks.push(tokio::spawn(forward(listener, port)));
        }
        Ok(tasks)
    }

    /// Kills whatever still runs in the pod's namespace and deletes it (with its veth pair).
    pub async fn teardown(&self, pod: &PodNet) {
        let Some(ns) = &pod.netns else { return };
        kill_netns_pids(ns).await;
        if let Err(e) = ip(&["netns", "del", ns]).await {
            debug!("{e}");
        }
    }

    pub async fn shutdown(&self) {
        if self.mode == Resolved::Netns {
            kill_netns_pids(&self.hub).await;
            let _ = ip(&["netns", "del", &self.hub]).await;
        }
    }
}

async fn kill_netns_pids(ns: &str) {
    if let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .await
    {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<libc::pid_t>() {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Removes namespaces left by agents that died without cleaning up (their pid is gone).
async fn cleanup_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output().await else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let owner = name
            .strip_prefix("ovp-")
            .and_then(|r| r.split('-').next())
            .or_else(|| name.strip_prefix("ovh-"))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = owner {
            if !pid_alive(pid) {
                kill_netns_pids(name).await;
                let _ = ip(&["netns", "del", name]).await;
            }
        }
    }
}

/// Binds 127.0.0.1:`port` inside network namespace `ns`. A fresh OS thread does the setns so
/// no pooled thread is left in the wrong namespace; the socket keeps its namespace afterwards.
async fn bind_in_netns(ns: &str, port: u16) -> io::Result<tokio::net::TcpListener> {
    let path = format!("/var/run/netns/{ns}");
    let std_listener = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || -> io::Result<std::net::TcpListener> {
            let f = std::fs::File::open(&path)?;
            // SAFETY: setns on a valid fd; affects only this short-lived thread.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let l = std::net::TcpListener::bind(("127.0.0.1", port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .map_err(|_| io::Error::other("netns bind thread panicked"))?
    })
    .await
    .map_err(io::Error::other)??;
    tokio::net::TcpListener::from_std(std_listener)
}

async fn forward(listener: tokio::net::TcpListener, port: u16) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            // e.g. EMFILE: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Ok(mut outbound) => {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                Err(e) => debug!("forward to host port {port}: {e}"),
            }
        });
    }
}
