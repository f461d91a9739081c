//! NCCL selection and rendezvous, the parts that run without a GPU: the NCCL unique id travels
//! from rank 0 to rank 1 intact through the real coordinator; a gang whose ranks disagree on the
//! communicator fails with a clear error instead of hanging; `onevision trainer` with
//! `ONEVISION_COMM=nccl` on a machine without CUDA exits with the permanent-error code and says
//! why; a GPU job on such a machine (the local runner on a laptop) trains on the ring instead.
//! (NCCL collectives themselves: worker/cuda/tests/nccl_comm.rs, on >= 2 GPUs.)

mod runtime_common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use onevision_comms::coordinator::{serve_coordinator_on, CoordinatorClient, CoordinatorConfig, RetryPolicy};
use onevision_comms::{rendezvous_cpu, rendezvous_nccl, RendezvousError, RendezvousOptions, NCCL_UNIQUE_ID_BYTES};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A coordinator for a world of two on loopback, and a client per rank.
async fn gang() -> (onevision_comms::coordinator::CoordinatorServerHandle, CoordinatorClient, CoordinatorClient) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = serve_coordinator_on(listener, CoordinatorConfig::new(2, 0)).await.unwrap();
    let endpoint = format!("http://{addr}");
    let c0 = CoordinatorClient::new(&endpoint, RetryPolicy::default()).unwrap();
    let c1 = CoordinatorClient::new(&endpoint, RetryPolicy::default()).unwrap();
    (server, c0, c1)
}

fn opts(rank: u32) -> RendezvousOptions {
    let mut o = RendezvousOptions::new(rank, 2, 0, "127.0.0.1:0".parse().unwrap());
    o.join_timeout = Duration::from_secs(20);
    o.ring.connect_timeout = Duration::from_secs(2);
    o.ring.op_timeout = Duration::from_secs(5);
    o
}

#[test]
fn nccl_unique_id_reaches_every_rank_intact() {
    let rt = rt();
    rt.block_on(async {
        let (server, c0, c1) = gang().await;
        // Every byte value, so truncation at a NUL or re-encoding would show.
        let mut id = [0u8; NCCL_UNIQUE_ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
        id[0] = 0;
        id[NCCL_UNIQUE_ID_BYTES - 1] = 0xFF;
        // Rank 1 joins first: it must wait for rank 0's id, not get an empty one.
        let r1 = tokio::spawn(async move { rendezvous_nccl(&c1, opts(1), None).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (j0, id0) = rendezvous_nccl(&c0, opts(0), Some(id)).await.unwrap();
        let (j1, id1) = r1.await.unwrap().unwrap();
        assert_eq!(id0, id);
        assert_eq!(id1, id, "rank 1 got a different NCCL id");
        assert_eq!((j0.world_size, j1.world_size, j1.rank), (2, 2, 1));
        assert_eq!(j1.peers.len(), 2);
        assert!(j1.peers.iter().all(|p| p.address.starts_with("nccl://")), "{:?}", j1.peers);
        drop(server);
    });
}

#[test]
fn ranks_disagreeing_on_the_communicator_fail_clearly() {
    let rt = rt();
    // Rank 0 on NCCL, rank 1 on the ring: rank 1 sees the published id and refuses.
    rt.block_on(async {
        let (server, c0, c1) = gang().await;
        let r0 = tokio::spawn(async move { rendezvous_nccl(&c0, opts(0), Some([5; NCCL_UNIQUE_ID_BYTES])).await });
        let e = match rendezvous_cpu(&c1, opts(1)).await {
            Err(e) => e,
            Ok(_) => panic!("ring rank connected to an NCCL gang"),
        };
        assert!(matches!(e, RendezvousError::CommMismatch(_)), "{e}");
        assert!(e.to_string().contains("ONEVISION_COMM"), "{e}");
        let _ = r0.await.unwrap().unwrap();
        drop(server);
    });
    // Rank 0 on the ring, rank 1 on NCCL: rank 1 finds no id.
    rt.block_on(async {
        let (server, c0, c1) = gang().await;
        let r1 = tokio::spawn(async move { rendezvous_nccl(&c1, opts(1), None).await });
        // Rank 0's ring connect fails (rank 1 never listens) after the join; only the join matters.
        let r0 = tokio::spawn(async move { rendezvous_cpu(&c0, opts(0)).await.map(|_| ()) });
        let e = r1.await.unwrap().unwrap_err();
        assert!(matches!(e, RendezvousError::CommMismatch(_)), "{e}");
        assert!(e.to_string().contains("0-byte NCCL id"), "{e}");
        let _ = r0.await;
        drop(server);
    });
    // Only rank 0 may create the id.
    rt.block_on(async {
        let (server, _c0, c1) = gang().await;
        let e = rendezvous_nccl(&c1, opts(1), Some([1; NCCL_UNIQUE_ID_BYTES])).await.unwrap_err();
        assert!(e.to_string().contains("only rank 0"), "{e}");
        drop(server);
    });
}

fn trainer_with(comm: &str, gpus_per_node: i32) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    // Paths that do not exist: the communicator is chosen before anything is read.
    std::fs::write(
        &job,
        format!(
            r#"apiVersion: onevision.dev/v1alpha1
kind: SFTJob
metadata: {{name: nccl, namespace: default}}
spec:
  model: {{path: {d}/model}}
  dataset: {{path: {d}/train.jsonl}}
  output: {{path: {d}/out}}
  trainer: {{nodes: 1, gpusPerNode: {gpus_per_node}, image: x}}
  hyperparameters: {{learningRate: 1.0e-3, globalBatchSize: 2, microBatchSize: 1, maxSteps: 1}}
"#,
            d = dir.path().display()
        ),
    )
    .unwrap();
    let port = runtime_common::free_port();
    Command::new(env!("CARGO_BIN_EXE_onevision"))
        .args(["trainer", "--job"])
        .arg(&job)
        .env("ONEVISION_COMM", comm)
        .env("ONEVISION_COORDINATOR", format!("127.0.0.1:{port}"))
        .env("ONEVISION_RING_BIND", "127.0.0.1:0")
        .env_remove("WORLD_SIZE")
        .env_remove("RANK")
        .env_remove("LOCAL_RANK")
        .output()
        .unwrap()
}

#[test]
fn forced_nccl_without_cuda_is_a_permanent_error() {
    if onevision_cuda::gpu::driver_available() && onevision_cuda::nccl::nccl_available() {
        eprintln!("skipped: this machine has a CUDA driver and NCCL, so ONEVISION_COMM=nccl is valid here");
        return;
    }
    for gpus in [0, 1] {
        let out = trainer_with("nccl", gpus);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(onevision::EXIT_PERMANENT), "gpusPerNode {gpus}: {stderr}");
        assert!(stderr.contains("ONEVISION_COMM=nccl, but NCCL cannot run on this machine"), "{stderr}");
        assert!(stderr.contains("ONEVISION_COMM=ring"), "the message must say how to get going: {stderr}");
        if !onevision_cuda::gpu::driver_available() {
            assert!(stderr.contains("no CUDA driver"), "{stderr}");
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = trainer_with("gloo", 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(onevision::EXIT_PERMANENT), "{stderr}");
    assert!(stderr.contains("must be `ring` or `nccl`"), "{stderr}");
}

#[test]
fn gpu_job_without_cuda_trains_on_the_ring() {
    if onevision_cuda::gpu::driver_available() && onevision_cuda::nccl::nccl_available() {
        eprintln!("skipped: this machine has a CUDA driver and NCCL, so the job would pick NCCL");
        return;
    }
    let fx = runtime_common::Fixture::new(8, 0);
    let out = fx.path().join("out");
    let job = fx.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            r#"apiVersion: onevision.dev/v1alpha1
kind: SFTJob
metadata: {{name: gpu-on-cpu, namespace: default}}
spec:
  model: {{path: {model}}}
  dataset: {{path: {train}}}
  output: {{path: {out}}}
  trainer: {{nodes: 2, gpusPerNode: 1, image: x}}
  hyperparameters: {{learningRate: 1.0e-3, globalBatchSize: 2, microBatchSize: 1, maxSteps: 1, seed: 1}}
"#,
            model = fx.model().display(),
            train = fx.train().display(),
            out = out.display()
        ),
    )
    .unwrap();
    let port = runtime_common::free_port();
    let logs: Vec<_> = (0..2).map(|r| fx.path().join(format!("rank{r}.log"))).collect();
    let mut children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_onevision"))
                .args(["trainer", "--job"])
                .arg(&job)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("ONEVISION_COORDINATOR", format!("127.0.0.1:{port}"))
                .env("ONEVISION_RING_BIND", "127.0.0.1:0")
                .env("POD_IP", "127.0.0.1")
                .env("RUST_LOG", "info")
                .env_remove("ONEVISION_COMM")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&logs[rank]).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut codes = [None, None];
    while codes.iter().any(Option::is_none) && Instant::now() < deadline {
        for (c, code) in children.iter_mut().zip(codes.iter_mut()) {
            if code.is_none() {
                *code = c.try_wait().unwrap().map(|s| s.code());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for c in &mut children {
        let _ = c.kill();
    }
    for (r, log) in logs.iter().enumerate() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert_eq!(codes[r], Some(Some(0)), "rank {r} failed:\n{text}");
        assert!(text.contains("NCCL is unavailable") && text.contains("using the CPU ring"), "rank {r}:\n{text}");
        assert!(text.contains("communicator: TCP ring"), "rank {r}:\n{text}");
    }
    assert!(out.join("metrics.jsonl").exists());
}
