//! The NCCL [`Communicator`] against the TCP ring.
//!
//! - `host_plan_accepts_what_the_ring_accepts` (no GPU): the size arithmetic of the NCCL host
//!   path (which calls it makes, with which counts, including the ZeRO-1 padded variants) agrees
//!   with the ring on the same lengths.
//! - `nccl_matches_ring_*` and `watchdog_*` (>= 2 GPUs, one rank per GPU as threads of this
//!   process; skipped with a printed reason elsewhere): all-reduce, reduce-scatter, all-gather
//!   (plain and padded), broadcast and barrier give the ring's results on the same inputs; a rank
//!   that never enters a collective makes its peer fail with `CollectiveTimeout` instead of hanging.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use onevision_comms::{shard_len, CommError, Communicator, RingConfig, TcpRingCommunicator};
use onevision_cuda::gpu::Gpu;
use onevision_cuda::nccl_comm::{HostPlan, NcclCommunicator, NcclOptions};

/// `world` ring ranks on loopback, connected concurrently.
fn ring_gang(world: usize) -> Vec<TcpRingCommunicator> {
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let mut cfg = RingConfig::new(r, world, peers.clone());
            cfg.connect_timeout = Duration::from_secs(10);
            cfg.op_timeout = Duration::from_secs(10);
            std::thread::spawn(move || TcpRingCommunicator::connect_with_listener(cfg, l).unwrap())
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Runs `f(rank, comm)` on every rank concurrently; results in rank order.
fn on_all<C: Communicator, T: Send>(comms: &[C], f: impl Fn(usize, &C) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.iter().enumerate().map(|(r, c)| s.spawn({
            let f = &f;
            move || f(r, c)
        })).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Deterministic inputs of rank `r`: sizes that are not multiples of anything convenient.
fn input(r: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919 + r * 104_729) % 1000) as f32 / 250.0 - 2.0).collect()
}

#[test]
fn host_plan_accepts_what_the_ring_accepts() {
    let world = 3;
    let ring = ring_gang(world);
    // (input, output) pairs, valid and not, for reduce-scatter (input = world * output) and
    // all-gather (output = world * input).
    let cases = [(0, 0), (3, 1), (30, 10), (31, 10), (30, 11), (29, 10), (10, 30), (9, 3), (1, 3), (3, 9)];
    for &(a, b) in &cases {
        let rs = on_all(&ring, |_, c| c.reduce_scatter_sum_f32(&vec![1.0; a], &mut vec![0.0; b]).is_ok());
        let plan = HostPlan::reduce_scatter(a, b, world);
        assert!(rs.iter().all(|&ok| ok == plan.is_ok()), "reduce_scatter {a}->{b}: ring {rs:?}, plan {plan:?}");
        if let Ok(p) = plan {
            assert_eq!((p.upload, p.download, p.count), (a, b, b));
        }
        let ag = on_all(&ring, |_, c| c.all_gather_f32(&vec![1.0; a], &mut vec![0.0; b]).is_ok());
        let plan = HostPlan::all_gather(a, b, world);
        assert!(ag.iter().all(|&ok| ok == plan.is_ok()), "all_gather {a}->{b}: ring {ag:?}, plan {plan:?}");
        if let Ok(p) = plan {
            assert_eq!((p.upload, p.download, p.count), (a, b, a));
        }
        if let Err(e) = HostPlan::reduce_scatter(a, b, world) {
            assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
        }
    }
    // ZeRO-1 padding: for any flattened length the padded calls reach the device path with
    // sizes it accepts, and the ring's padded results are what the NCCL path must reproduce
    // (same trait default methods, same shard arithmetic).
    for len in [1usize, 2, 3, 4, 10, 11, 12, 1000, 1001] {
        let k = shard_len(len, world);
        let p = HostPlan::reduce_scatter(k * world, k, world).unwrap();
        assert_eq!((p.upload, p.count), (k * world, k));
        let p = HostPlan::all_gather(k, k * world, world).unwrap();
        assert_eq!((p.upload, p.download), (k, k * world));
        let shards = on_all(&ring, |r, c| {
            let mut out = vec![f32::NAN; k];
            c.reduce_scatter_sum_padded_f32(&input(r, len), &mut out).unwrap();
            out
        });
        let sum: Vec<f32> = (0..len).map(|i| (0..world).map(|r| input(r, len)[i]).sum()).collect();
        for (r, s) in shards.iter().enumerate() {
            for (j, &v) in s.iter().enumerate() {
                let want = sum.get(r * k + j).copied().unwrap_or(0.0);
                assert!((v - want).abs() <= 1e-5 * want.abs().max(1.0), "len {len} rank {r} [{j}]: {v} vs {want}");
            }
        }
        let gathered = on_all(&ring, |r, c| {
            let mut out = vec![f32::NAN; len];
            c.all_gather_padded_f32(&shards[r], &mut out).unwrap();
            out
        });
        for g in &gathered {
            assert_eq!(g, &gathered[0]);
            assert_eq!(g.len(), len);
        }
    }
}

/// One NCCL rank per GPU (threads of this process), or `None` with the reason printed.
fn nccl_gang(world_max: usize, opts: NcclOptions) -> Option<Vec<NcclCommunicator>> {
    if !onevision_cuda::gpu::driver_available() {
        eprintln!("skipped: no CUDA driver on this machine");
        return None;
    }
    if !onevision_cuda::nccl::nccl_available() {
        eprintln!("skipped: libnccl.so.2 not found");
        return None;
    }
    let gpus: Vec<Arc<Gpu>> = (0..world_max).map_while(|i| Gpu::new(i).ok()).collect();
    if gpus.len() < 2 {
        eprintln!("skipped: NCCL needs one GPU per rank and this machine has {} (need >= 2)", gpus.len());
        return None;
    }
    let world = gpus.len();
    let id = onevision_cuda::nccl::unique_id().unwrap();
    // ncclCommInitRank is collective: every rank must be inside it at once.
    let hs: Vec<_> = gpus
        .into_iter()
        .enumerate()
        .map(|(r, g)| std::thread::spawn(move || NcclCommunicator::new(g, id, r, world, opts).unwrap()))
        .collect();
    Some(hs.into_iter().map(|h| h.join().unwrap()).collect())
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{what} [{i}]: nccl {x} vs ring {y}");
    }
}

#[test]
fn nccl_matches_ring_on_every_collective() {
    let Some(nccl) = nccl_gang(8, NcclOptions { timeout: Duration::from_secs(60), init_timeout: Duration::from_secs(60) })
    else {
        return;
    };
    let world = nccl.len();
    let ring = ring_gang(world);
    for len in [1usize, 1000, 4099, (1 << 20) + 3] {
        let run = |comm_is_nccl: bool| -> Vec<Vec<f32>> {
            let f = |r: usize, c: &dyn Communicator| {
                let mut v = input(r, len);
                c.all_reduce_sum_f32(&mut v).unwrap();
                v
            };
            if comm_is_nccl { on_all(&nccl, |r, c| f(r, c)) } else { on_all(&ring, |r, c| f(r, c)) }
        };
        let (n, g) = (run(true), run(false));
        for r in 0..world {
            close(&n[r], &g[r], &format!("all_reduce len {len} rank {r}"));
        }
        // Padded reduce-scatter + all-gather (ZeRO-1), which exercise the plain ones too.
        let k = shard_len(len, world);
        let rs = |c: &dyn Communicator, r: usize| {
            let mut out = vec![f32::NAN; k];
            c.reduce_scatter_sum_padded_f32(&input(r, len), &mut out).unwrap();
            let mut back = vec![f32::NAN; len];
            c.all_gather_padded_f32(&out, &mut back).unwrap();
            (out, back)
        };
        let n = on_all(&nccl, |r, c| rs(c, r));
        let g = on_all(&ring, |r, c| rs(c, r));
        for r in 0..world {
            close(&n[r].0, &g[r].0, &format!("reduce_scatter len {len} rank {r}"));
            close(&n[r].1, &g[r].1, &format!("all_gather len {len} rank {r}"));
        }
    }
    let b = on_all(&nccl, |r, c| {
        let mut buf: Vec<u8> = (0..77).map(|i| (i + r * 3) as u8).collect();
        c.broadcast_bytes(&mut buf, world - 1).unwrap();
        c.barrier().unwrap();
        buf
    });
    let want: Vec<u8> = (0..77).map(|i| (i + (world - 1) * 3) as u8).collect();
    assert!(b.iter().all(|x| x == &want), "broadcast");
    // Argument errors are caught before NCCL and do not poison the communicator.
    assert!(matches!(nccl[0].all_gather_f32(&[1.0], &mut [0.0; 3]), Err(CommError::InvalidArgument { .. })));
    let ok = on_all(&nccl, |_, c| c.barrier().is_ok());
    assert!(ok.iter().all(|&x| x));
}

#[test]
fn watchdog_turns_a_missing_peer_into_a_timeout() {
    let timeout = Duration::from_secs(3);
    let Some(mut nccl) = nccl_gang(2, NcclOptions { timeout, init_timeout: Duration::from_secs(60) }) else {
        return;
    };
    // One collective together first: NCCL connects peers lazily on the first collective, and the
    // case to test is a peer that dies mid-training, after its connections exist.
    let ok = on_all(&nccl, |_, c| c.all_reduce_sum_f32(&mut [1.0]).is_ok());
    assert!(ok.iter().all(|&x| x));
    // Then rank 1 never enters the all-reduce (a dead or hung peer).
    let idle = nccl.pop().unwrap();
    let t = Instant::now();
    let mut v = vec![1.0f32; 1024];
    let e = nccl[0].all_reduce_sum_f32(&mut v).unwrap_err();
    let took = t.elapsed();
    match &e {
        CommError::CollectiveTimeout { op, rank, timeout: t, .. } => {
            assert_eq!((*op, *rank, *t), ("all_reduce", 0, timeout));
        }
        other => panic!("want CollectiveTimeout, got {other}"),
    }
    assert!(took >= timeout && took < timeout + Duration::from_secs(15), "took {took:?}");
    assert!(e.to_string().contains("all_reduce") && e.to_string().contains("rank 0"), "{e}");
    // Aborted: later calls fail at once instead of touching the dead communicator.
    assert!(matches!(nccl[0].barrier(), Err(CommError::Poisoned(_))));
    std::mem::forget(idle); // its peer is gone: destroying it could wait on the aborted rank
}
