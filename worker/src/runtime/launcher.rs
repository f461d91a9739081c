//! The per-GPU launcher of `onevision trainer` (torchrun's role).
//!
//! The operator counts one rank per GPU: `WORLD_SIZE = nodes × NPROC_PER_NODE`, and each pod gets
//! `NODE_RANK`. When `NPROC_PER_NODE > 1` and `LOCAL_RANK` is unset, `onevision trainer` does not
//! train itself: it starts `NPROC_PER_NODE` copies of its own executable with the same arguments
//! and environment plus, for child `i`,
//!
//! - `LOCAL_RANK=i` (the CUDA ordinal the NCCL communicator opens) and
//!   `RANK=NODE_RANK × NPROC_PER_NODE + i`;
//! - `ONEVISION_RING_BIND` = the pod's ring address with port `MASTER_PORT + i` (the planner
//!   declares those container ports, named `rendezvous` and `ring-1`…, so the chart's
//!   NetworkPolicy admits them); a port of 0 (the local runner: "any free port") stays 0;
//! - `ONEVISION_METRICS_ADDR` only for local rank 0 (the pod's one `metrics` port); the other
//!   children serve no `/metrics` (their step metrics equal rank 0's after the all-reduce).
//!
//! Child output is copied to the launcher's stdout/stderr line by line, prefixed `[rank N]`.
//! SIGTERM/SIGINT are forwarded; if a child fails, the others are stopped and the launcher exits
//! with the failed child's code (78 stays permanent for the operator).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use onevision_operator::env as k;

use super::dist::LOCAL_RANK_ENV;
use super::env::RING_BIND;
use super::signals::StopFlag;
use super::{Result, RuntimeError};

/// How long children get to checkpoint and exit after a SIGTERM before they are killed.
pub const STOP_GRACE: Duration = Duration::from_secs(60);

/// Parses an optional numeric variable; blank counts as unset.
fn num<T: std::str::FromStr>(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<T>> {
    match get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| RuntimeError::Config(format!("{name}={v:?} is not a valid non-negative number"))),
    }
}

/// The environment overrides of each child, or `None` when this process is itself a rank
/// (`NPROC_PER_NODE` ≤ 1, or `LOCAL_RANK` already set by a launcher). Pure: `get` reads the
/// launcher's environment.
pub fn child_envs(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Vec<BTreeMap<String, String>>>> {
    let nproc: u32 = num(get, k::NPROC_PER_NODE)?.unwrap_or(1);
    if nproc <= 1 || get(LOCAL_RANK_ENV).is_some_and(|v| !v.trim().is_empty()) {
        return Ok(None);
    }
    let node_rank: u32 = match num(get, k::NODE_RANK)? {
        Some(n) => n,
        None => num(get, k::RANK)?.unwrap_or(0),
    };
    let world: u32 = num(get, k::WORLD_SIZE)?.unwrap_or(nproc);
    // The pod's last rank must exist in the world.
    node_rank
        .checked_mul(nproc)
        .and_then(|r| r.checked_add(nproc - 1))
        .filter(|&r| r < world)
        .ok_or_else(|| {
            RuntimeError::Config(format!(
                "{}={node_rank} × {}={nproc} ranks do not fit in {}={world} (expected nodes × gpusPerNode)",
                k::NODE_RANK,
                k::NPROC_PER_NODE,
                k::WORLD_SIZE
            ))
        })?;
    let master_port: u16 = num(get, k::MASTER_PORT)?.unwrap_or(29500);
    let base: SocketAddr = match get(RING_BIND).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
        None => ([0, 0, 0, 0], master_port).into(),
        Some(v) => v
            .parse()
            .map_err(|_| RuntimeError::Config(format!("{RING_BIND}={v:?} is not host:port")))?,
    };
    // Ports other listeners of the pod already hold: a ring port on one of them could not bind.
    let port_of = |name: &str| get(name).and_then(|v| v.trim().rsplit_once(':').and_then(|(_, p)| p.parse::<u32>().ok()));
    let taken: Vec<(&str, u32)> =
        [k::COORDINATOR, k::METRICS_ADDR].iter().filter_map(|n| port_of(n).map(|p| (*n, p))).collect();
    (0..nproc)
        .map(|i| {
            let mut bind = base;
            if base.port() != 0 {
                let port = u16::try_from(u32::from(base.port()) + i).map_err(|_| {
                    RuntimeError::Config(format!(
                        "ring port {} + local rank {i} exceeds 65535; lower trainer.masterPort",
                        base.port()
                    ))
                })?;
                if let Some((name, _)) = taken.iter().find(|(_, p)| *p == u32::from(port)) {
                    return Err(RuntimeError::Config(format!(
                        "ring port {port} of local rank {i} (MASTER_PORT + {i}) is also {name}'s port; \
                         move trainer.masterPort or trainer.coordinatorPort apart by at least gpusPerNode"
                    )));
                }
                bind.set_port(port);
            }
            let mut m = BTreeMap::from([
                (LOCAL_RANK_ENV.to_string(), i.to_string()),
                (k::RANK.to_string(), (node_rank * nproc + i).to_string()),
                (k::NODE_RANK.to_string(), node_rank.to_string()),
                (k::WORLD_SIZE.to_string(), world.to_string()),
                (RING_BIND.to_string(), bind.to_string()),
            ]);
            if i > 0 {
                // One `/metrics` port per pod: empty disables the server in this child.
                m.insert(k::METRICS_ADDR.to_string(), String::new());
            }
            Ok(m)
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// A running child rank. A thread owns the `Child` and reports its exit on a channel, so the
/// launcher sees exits in the order they happened (the first failure is the cause, not the
/// ranks that failed because of it).
struct Rank {
    rank: String,
    pid: i32,
    exit: Option<i32>,
}

impl Rank {
    fn signal(&self, sig: i32) {
        if self.exit.is_none() {
            // SAFETY: kill(2) on our own child's pid, which stays reserved until its waiter
            // thread reaps it; no memory is touched.
            unsafe {
                libc::kill(self.pid, sig);
            }
        }
    }
}

/// `(index, exit code)` of each child as it exits (`128 + signal` when killed).
type Exits = std::sync::mpsc::Receiver<(usize, i32)>;

/// Copies `from` to `to` line by line with `prefix` (bytes, so non-UTF-8 output survives).
fn pump(from: impl Read + Send + 'static, prefix: String, stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(from);
        let mut line = Vec::new();
        while matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            if !line.ends_with(b"\n") {
                line.push(b'\n');
            }
            // One write per line under the lock, so lines of different ranks never interleave.
            let _ = if stderr {
                let mut o = std::io::stderr().lock();
                o.write_all(prefix.as_bytes()).and_then(|_| o.write_all(&line))
            } else {
                let mut o = std::io::stdout().lock();
                o.write_all(prefix.as_bytes()).and_then(|_| o.write_all(&line))
            };
            line.clear();
        }
    })
}

fn spawn(
    index: usize,
    exe: &std::path::Path,
    args: &[OsString],
    env: &BTreeMap<String, String>,
    exits: &std::sync::mpsc::Sender<(usize, i32)>,
) -> Result<(Rank, Vec<std::thread::JoinHandle<()>>)> {
    use std::os::unix::process::CommandExt;
    let rank = env.get(k::RANK).cloned().unwrap_or_default();
    let mut cmd = Command::new(exe);
    cmd.args(args).envs(env).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe. If the launcher dies without forwarding (SIGKILL, OOM),
    // the kernel sends the child SIGTERM instead of leaving it orphaned in the pod.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| RuntimeError::Config(format!("cannot start trainer rank {rank} ({}): {e}", exe.display())))?;
    let prefix = format!("[rank {rank}] ");
    let mut pumps = Vec::new();
    if let Some(o) = child.stdout.take() {
        pumps.push(pump(o, prefix.clone(), false));
    }
    if let Some(e) = child.stderr.take() {
        pumps.push(pump(e, prefix, true));
    }
    let pid = child.id() as i32;
    let tx = exits.clone();
    std::thread::spawn(move || {
        use std::os::unix::process::ExitStatusExt;
        let code = match child.wait() {
            Ok(st) => st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)),
            Err(_) => 1,
        };
        let _ = tx.send((index, code));
    });
    Ok((Rank { rank, pid, exit: None }, pumps))
}

/// Runs the children this process's environment asks for and waits for them. `Ok(false)`: this
/// process is a rank itself (see [`child_envs`]); `Ok(true)`: every child succeeded.
pub fn run_if_launcher() -> Result<bool> {
    let Some(envs) = child_envs(&|n| std::env::var(n).ok())? else {
        return Ok(false);
    };
    let exe = std::env::current_exe().map_err(super::io_err("current executable"))?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RuntimeError::Config(format!("cannot start the async runtime: {e}")))?;
    // A thread drives the signal listeners while this one supervises.
    let stop = {
        let _g = rt.enter();
        StopFlag::install(&rt)
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let driver = std::thread::spawn(move || rt.block_on(async { let _ = done_rx.await; }));
    tracing::info!(children = envs.len(), "launching one trainer rank per GPU");
    let mut ranks = Vec::new();
    let mut pumps = Vec::new();
    let (tx, exits) = std::sync::mpsc::channel();
    for (i, env) in envs.iter().enumerate() {
        match spawn(i, &exe, &args, env, &tx) {
            Ok((r, p)) => {
                ranks.push(r);
                pumps.extend(p);
            }
            Err(e) => {
                stop_all(&mut ranks, &exits, Duration::from_secs(10));
                let _ = done_tx.send(());
                return Err(e);
            }
        }
    }
    drop(tx);
    let outcome = supervise(&mut ranks, &exits, &stop);
    let _ = done_tx.send(());
    let _ = driver.join();
    for p in pumps {
        let _ = p.join();
    }
    outcome.map(|()| true)
}

/// Waits for every child; on the first failure stops the rest and returns that child's code.
fn supervise(ranks: &mut [Rank], exits: &Exits, stop: &StopFlag) -> Result<()> {
    let mut forwarded = false;
    while ranks.iter().any(|r| r.exit.is_none()) {
        if stop.is_set() && !forwarded {
            // Children checkpoint at their next step boundary and exit 130.
            tracing::warn!("{}: forwarding SIGTERM to the trainer ranks", stop.reason());
            ranks.iter().for_each(|r| r.signal(libc::SIGTERM));
            forwarded = true;
        }
        match exits.recv_timeout(Duration::from_millis(100)) {
            Ok((i, code)) => {
                ranks[i].exit = Some(code);
                if code != 0 {
                    let rank = ranks[i].rank.clone();
                    stop_all(ranks, exits, STOP_GRACE);
                    return Err(RuntimeError::RankExited { rank, code });
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    Ok(())
}

/// SIGTERM to every running child, SIGKILL after `grace`; returns once all are reaped.
fn stop_all(ranks: &mut [Rank], exits: &Exits, grace: Duration) {
    ranks.iter().for_each(|r| r.signal(libc::SIGTERM));
    let deadline = Instant::now() + grace;
    let mut killed = false;
    while ranks.iter().any(|r| r.exit.is_none()) {
        let now = Instant::now();
        if now >= deadline && !killed {
            ranks.iter().for_each(|r| r.signal(libc::SIGKILL));
            killed = true;
        }
        match exits.recv_timeout(deadline.saturating_duration_since(now).max(Duration::from_millis(100))) {
            Ok((i, code)) => ranks[i].exit = Some(code),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envs(pairs: &[(&str, &str)]) -> Result<Option<Vec<BTreeMap<String, String>>>> {
        let m: BTreeMap<&str, &str> = pairs.iter().copied().collect();
        child_envs(&|n| m.get(n).map(|s| s.to_string()))
    }

    #[test]
    fn ranks_ports_and_metrics_of_each_child() {
        // Pod 1 of 2 with 4 GPUs: global ranks 4..8, ring ports MASTER_PORT+i, metrics on local 0.
        let v = envs(&[
            (k::NPROC_PER_NODE, "4"),
            (k::NODE_RANK, "1"),
            (k::RANK, "1"),
            (k::WORLD_SIZE, "8"),
            (k::MASTER_PORT, "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(v.len(), 4);
        for (i, m) in v.iter().enumerate() {
            assert_eq!(m[LOCAL_RANK_ENV], i.to_string());
            assert_eq!(m[k::RANK], (4 + i).to_string());
            assert_eq!(m[RING_BIND], format!("0.0.0.0:{}", 29500 + i));
            assert_eq!(m.get(k::METRICS_ADDR).map(String::as_str), (i > 0).then_some(""));
        }
        // The local runner's "any free port" stays 0 for every child.
        let v = envs(&[(k::NPROC_PER_NODE, "2"), (k::WORLD_SIZE, "2"), (RING_BIND, "127.0.0.1:0")]).unwrap().unwrap();
        assert_eq!(v[1][RING_BIND], "127.0.0.1:0");
        assert_eq!(v[1][k::RANK], "1");
    }

    #[test]
    fn not_a_launcher_for_one_gpu_or_inside_a_child() {
        assert_eq!(envs(&[]).unwrap(), None);
        assert_eq!(envs(&[(k::NPROC_PER_NODE, "1"), (k::WORLD_SIZE, "3")]).unwrap(), None);
        assert_eq!(envs(&[(k::NPROC_PER_NODE, "2"), (LOCAL_RANK_ENV, "1")]).unwrap(), None);
    }

    #[test]
    fn bad_settings_are_permanent_errors() {
        for bad in [
            vec![(k::NPROC_PER_NODE, "two")],
            vec![(k::NPROC_PER_NODE, "2"), (k::NODE_RANK, "-1")],
            // Node 1 with 2 GPUs needs a world of at least 4.
            vec![(k::NPROC_PER_NODE, "2"), (k::NODE_RANK, "1"), (k::WORLD_SIZE, "3")],
            vec![(k::NPROC_PER_NODE, "2"), (k::WORLD_SIZE, "2"), (k::MASTER_PORT, "65535")],
            vec![(k::NPROC_PER_NODE, "2"), (k::WORLD_SIZE, "2"), (RING_BIND, "nowhere")],
            vec![(k::NPROC_PER_NODE, "4"), (k::WORLD_SIZE, "4"), (k::MASTER_PORT, "9398"), (k::METRICS_ADDR, "0.0.0.0:9400")],
        ] {
            let e = envs(&bad).unwrap_err();
            assert!(e.is_permanent(), "{bad:?}: {e}");
        }
    }
}
