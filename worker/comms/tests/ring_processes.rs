//! Trainer ranks as separate OS processes: the test binary re-executes itself with
//! `ONEVISION_COMMS_TEST_ROLE` set. Each child binds a ring listener, joins the coordinator over
//! gRPC (the production rendezvous), builds the TCP ring from the returned peer list and runs
//! collectives; results come back through files.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use onevision_comms::coordinator::{serve_coordinator, CoordinatorClient, CoordinatorConfig, RetryPolicy};
use onevision_comms::{rendezvous_cpu, ring_segment, ring_sum_order, RendezvousOptions};
use onevision_proto::v1;

const ROLE: &str = "ONEVISION_COMMS_TEST_ROLE";
const LEN: usize = 10_007;

fn rank_data(rank: usize) -> Vec<f32> {
    // Deterministic, non-integer values so the summation order matters.
    (0..LEN).map(|i| ((i * 31 + rank * 17) % 1000) as f32 / 7.0 - 60.0 + rank as f32 * 0.1).collect()
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

struct ChildEnv {
    rank: usize,
    world: usize,
    coordinator: String,
    out: PathBuf,
    mode: String,
}

fn child_env() -> Option<ChildEnv> {
    let mode = std::env::var(ROLE).ok()?;
    let get = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set for the child"));
    Some(ChildEnv {
        rank: get("RANK").parse().unwrap(),
        world: get("WORLD_SIZE").parse().unwrap(),
        coordinator: get("COORDINATOR"),
        out: PathBuf::from(get("OUT_DIR")),
        mode,
    })
}

/// Child process body: join, ring, collectives, write results. Returns the exit code.
fn run_child(env: ChildEnv) -> i32 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let client = CoordinatorClient::new(&env.coordinator, RetryPolicy::default()).unwrap();
    let mut opts = RendezvousOptions::new(env.rank as u32, env.world as u32, 4, "127.0.0.1:0".parse().unwrap());
    opts.name = format!("child-{}", env.rank);
    opts.join_timeout = Duration::from_secs(60);
    opts.ring.chunk_bytes = 4096;
    opts.ring.op_timeout = Duration::from_secs(20);
    let (join, comm) = rt.block_on(rendezvous_cpu(&client, opts)).expect("rendezvous");
    assert_eq!(join.peers.len(), env.world);
    let _hb = client.spawn_heartbeat(env.rank as u32, 4, Duration::from_millis(100));

    if env.mode == "victim" {
        // Die abruptly after the rendezvous, like an OOM-killed pod.
        std::process::exit(17);
    }

    let result = (|| -> Result<Vec<u8>, onevision_comms::CommError> {
        let mut buf = rank_data(env.rank);
        comm.all_reduce_sum_f32(&mut buf)?;
        let mut shard = vec![0f32; 3];
        let input: Vec<f32> = (0..3 * env.world).map(|i| (i * (env.rank + 1)) as f32).collect();
        comm.reduce_scatter_sum_f32(&input, &mut shard)?;
        let mut gathered = vec![0f32; 2 * env.world];
        comm.all_gather_f32(&[env.rank as f32, -(env.rank as f32)], &mut gathered)?;
        let mut b = if env.rank == 1 { vec![42.5f32, -1.0] } else { vec![0.0; 2] };
        comm.broadcast_f32(&mut b, 1)?;
        comm.barrier()?;
        let mut out = to_bytes(&buf);
        out.extend(to_bytes(&shard));
        out.extend(to_bytes(&gathered));
        out.extend(to_bytes(&b));
        Ok(out)
    })();
    let path = env.out.join(format!("rank{}", env.rank));
    match result {
        Ok(bytes) => {
            rt.block_on(client.report_progress(v1::ProgressReport {
                rank: env.rank as u32,
                generation: 4,
                phase: "test".into(),
                step: 1,
                total_steps: 1,
                loss: Some(env.rank as f64),
                ..Default::default()
            }))
            .expect("progress");
            std::fs::write(path, bytes).unwrap();
            0
        }
        Err(e) => {
            std::fs::write(path.with_extension("err"), format!("{e}\npeer_failure={}", e.is_peer_failure()))
                .unwrap();
            3
        }
    }
}

fn spawn_children(test: &str, world: usize, coordinator: &str, out: &Path, victim: Option<usize>) -> Vec<Child> {
    let exe = std::env::current_exe().unwrap();
    (0..world)
        .map(|rank| {
            Command::new(&exe)
                .args([test, "--exact", "--nocapture", "--test-threads=1"])
                .env(ROLE, if Some(rank) == victim { "victim" } else { "rank" })
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("COORDINATOR", coordinator)
                .env("OUT_DIR", out)
                .spawn()
                .expect("spawn child")
        })
        .collect()
}

/// Waits for every child (killing the rest after `limit`); exit codes by rank.
fn wait_all(children: &mut [Child], limit: Duration) -> Vec<Option<i32>> {
    let deadline = Instant::now() + limit;
    let mut codes = vec![None; children.len()];
    let mut done = vec![false; children.len()];
    while done.iter().any(|d| !d) && Instant::now() < deadline {
        for (i, c) in children.iter_mut().enumerate() {
            if !done[i] {
                if let Ok(Some(st)) = c.try_wait() {
                    codes[i] = st.code();
                    done[i] = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, c) in children.iter_mut().enumerate() {
        if !done[i] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    codes
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("onevision-comms-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn collectives_across_os_processes() {
    if let Some(env) = child_env() {
        std::process::exit(run_child(env));
    }
    let world = 3;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(serve_coordinator("127.0.0.1:0".parse().unwrap(), CoordinatorConfig::new(world as u32, 4)))
        .unwrap();
    let out = scratch_dir("procs");
    let mut children = spawn_children("collectives_across_os_processes", world, &server.endpoint(), &out, None);
    let codes = wait_all(&mut children, Duration::from_secs(120));
    for (r, code) in codes.iter().enumerate() {
        let err = std::fs::read_to_string(out.join(format!("rank{r}.err"))).unwrap_or_default();
        assert_eq!(*code, Some(0), "rank {r} failed: {err}");
    }

    // Serial reference, in the ring's documented order.
    let inputs: Vec<Vec<f32>> = (0..world).map(rank_data).collect();
    let mut expected = vec![0f32; LEN];
    for j in 0..world {
        let order = ring_sum_order(world, j);
        for i in ring_segment(LEN, world, j) {
            expected[i] = order[1..].iter().fold(inputs[order[0]][i], |acc, &r| acc + inputs[r][i]);
        }
    }
    for r in 0..world {
        let got = from_bytes(&std::fs::read(out.join(format!("rank{r}"))).unwrap());
        let (sum, rest) = got.split_at(LEN);
        assert!(
            sum.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()),
            "rank {r}: all-reduce differs from the serial sum"
        );
        let (shard, rest) = rest.split_at(3);
        // input_r[i] = i * (r + 1): the sum over ranks is i * (1 + 2 + 3) = 6i, exact in f32.
        let want: Vec<f32> = (0..3).map(|k| ((r * 3 + k) * 6) as f32).collect();
        assert_eq!(shard, want.as_slice(), "reduce_scatter on rank {r}");
        let (gathered, b) = rest.split_at(2 * world);
        let want: Vec<f32> = (0..world).flat_map(|q| [q as f32, -(q as f32)]).collect();
        assert_eq!(gathered, want.as_slice());
        assert_eq!(b, &[42.5, -1.0]);
    }
    let status = server.status();
    assert_eq!(status.joined_ranks, vec![0, 1, 2]);
    assert_eq!(status.progress.expect("progress").phase, "test");
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn killed_process_fails_the_others_and_the_coordinator_notices() {
    if let Some(env) = child_env() {
        std::process::exit(run_child(env));
    }
    let world = 3;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = CoordinatorConfig::new(world as u32, 4);
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.heartbeat_timeout = Duration::from_millis(1500);
    let server = rt.block_on(serve_coordinator("127.0.0.1:0".parse().unwrap(), cfg)).unwrap();
    let out = scratch_dir("victim");
    let start = Instant::now();
    let mut children = spawn_children(
        "killed_process_fails_the_others_and_the_coordinator_notices",
        world,
        &server.endpoint(),
        &out,
        Some(1),
    );
    let codes = wait_all(&mut children, Duration::from_secs(60));
    let elapsed = start.elapsed();
    assert_eq!(codes[1], Some(17), "the victim exits on its own");
    for r in [0, 2] {
        assert_eq!(codes[r], Some(3), "rank {r} must fail with an error, not hang or succeed");
        let err = std::fs::read_to_string(out.join(format!("rank{r}.err"))).unwrap();
        assert!(err.contains("peer_failure=true"), "rank {r}: {err}");
    }
    // op_timeout is 20 s; a dead process is detected by its closed sockets long before.
    assert!(elapsed < Duration::from_secs(18), "took {elapsed:?}");

    // The coordinator declares the silent rank dead after the heartbeat timeout.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = server.status();
        if st.phase == v1::JobPhase::Failed as i32 {
            assert!(st.dead_ranks.contains(&1), "{st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "coordinator never noticed: {st:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(out);
}
