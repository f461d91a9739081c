//! TCP ring collectives with every rank on its own thread (real sockets on loopback).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use onevision_comms::{
    ring_segment, ring_sum_order, shard_len, CommError, Communicator, RingConfig,
    TcpRingCommunicator,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn ring_configs(n: usize, tweak: impl Fn(&mut RingConfig)) -> Vec<(RingConfig, TcpListener)> {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind loopback")).collect();
    let peers: Vec<String> =
        listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let mut c = RingConfig::new(rank, n, peers.clone());
            c.connect_timeout = Duration::from_secs(20);
            c.op_timeout = Duration::from_secs(20);
            tweak(&mut c);
            (c, l)
        })
        .collect()
}

/// Connects an n-rank ring (each rank on a thread) and returns the communicators by rank.
fn connect_ring(n: usize, tweak: impl Fn(&mut RingConfig)) -> Vec<TcpRingCommunicator> {
    let handles: Vec<_> = ring_configs(n, tweak)
        .into_iter()
        .map(|(c, l)| std::thread::spawn(move || TcpRingCommunicator::connect_with_listener(c, l)))
        .collect();
    handles.into_iter().map(|h| h.join().unwrap().expect("ring connects")).collect()
}

/// Runs `f` on every rank concurrently; results by rank.
fn on_all<T: Send + 'static>(
    comms: Vec<TcpRingCommunicator>,
    f: impl Fn(&TcpRingCommunicator) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || f(&c))
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
}

fn rank_data(rank: usize, len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed * 1000 + rank as u64);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// The all-reduce result computed serially, in the ring's documented summation order.
fn serial_ring_sum(inputs: &[Vec<f32>], segs: &[std::ops::Range<usize>]) -> Vec<f32> {
    let n = inputs.len();
    let mut out = vec![0f32; inputs[0].len()];
    for (j, seg) in segs.iter().enumerate() {
        let order = ring_sum_order(n, j);
        for i in seg.clone() {
            let mut acc = inputs[order[0]][i];
            for &r in &order[1..] {
                acc += inputs[r][i];
            }
            out[i] = acc;
        }
    }
    out
}

fn check_all_reduce(n: usize, len: usize, chunk_bytes: usize) {
    let comms = connect_ring(n, |c| c.chunk_bytes = chunk_bytes);
    let inputs: Vec<Vec<f32>> = (0..n).map(|r| rank_data(r, len, len as u64)).collect();
    let inputs2 = inputs.clone();
    let results = on_all(comms, move |c| {
        let mut buf = inputs2[c.rank()].clone();
        c.all_reduce_sum_f32(&mut buf).map(|_| buf)
    });
    let segs: Vec<_> = (0..n).map(|j| ring_segment(len, n, j)).collect();
    let expected = serial_ring_sum(&inputs, &segs);
    for (r, res) in results.into_iter().enumerate() {
        let got = res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        // Bit-exact: same order of additions as the serial computation.
        assert!(
            got.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()),
            "rank {r} of {n}, len {len}: differs from the serial ring-order sum"
        );
        // And close to the plain rank-order sum (f32 reassociation error only).
        for i in 0..len {
            let plain: f32 = (0..n).map(|k| inputs[k][i]).sum();
            assert!((got[i] - plain).abs() <= 4.0 * n as f32 * f32::EPSILON, "elem {i}");
        }
    }
}

#[test]
fn all_reduce_2_3_4_ranks_matches_serial_sum_bit_exactly() {
    for n in [2, 3, 4] {
        for len in [0, 1, 3, 10, 1001] {
            check_all_reduce(n, len, 64);
        }
    }
}

#[test]
fn all_reduce_large_buffer_many_pipelined_chunks() {
    // 300k floats in 16 KiB chunks: ~18 chunks per segment and step.
    check_all_reduce(3, 300_000, 16 * 1024);
}

#[test]
fn all_reduce_integers_equal_rank_order_sum_and_mean() {
    let n = 4;
    let comms = connect_ring(n, |_| {});
    let results = on_all(comms, move |c| {
        let r = c.rank() as f32;
        let mut buf: Vec<f32> = (0..37).map(|i| i as f32 * (r + 1.0)).collect();
        c.all_reduce_sum_f32(&mut buf).unwrap();
        let mut mean: Vec<f32> = vec![r; 5];
        c.all_reduce_mean_f32(&mut mean).unwrap();
        (buf, mean)
    });
    for (buf, mean) in results {
        let expected: Vec<f32> = (0..37).map(|i| i as f32 * 10.0).collect();
        assert_eq!(buf, expected);
        assert_eq!(mean, vec![1.5; 5]);
    }
}

#[test]
fn reduce_scatter_2_3_4_ranks() {
    for n in [2, 3, 4] {
        let k = 50;
        let comms = connect_ring(n, |c| c.chunk_bytes = 40);
        let inputs: Vec<Vec<f32>> = (0..n).map(|r| rank_data(r, n * k, 7)).collect();
        let inputs2 = inputs.clone();
        let results = on_all(comms, move |c| {
            let mut out = vec![0f32; k];
            c.reduce_scatter_sum_f32(&inputs2[c.rank()], &mut out).map(|_| out)
        });
        let segs: Vec<_> = (0..n).map(|j| j * k..(j + 1) * k).collect();
        let full = serial_ring_sum(&inputs, &segs);
        for (r, res) in results.into_iter().enumerate() {
            let got = res.unwrap();
            assert_eq!(got.len(), k);
            for (a, b) in got.iter().zip(&full[r * k..(r + 1) * k]) {
                assert_eq!(a.to_bits(), b.to_bits(), "n={n} rank {r}");
            }
        }
    }
}

#[test]
fn all_gather_2_3_4_ranks() {
    for n in [2, 3, 4] {
        let k = 33;
        let comms = connect_ring(n, |c| c.chunk_bytes = 32);
        let results = on_all(comms, move |c| {
            let input = rank_data(c.rank(), k, 9);
            let mut out = vec![0f32; n * k];
            c.all_gather_f32(&input, &mut out).map(|_| out)
        });
        let expected: Vec<f32> = (0..n).flat_map(|r| rank_data(r, k, 9)).collect();
        for res in results {
            assert_eq!(res.unwrap(), expected);
        }
    }
}

/// ZeRO-1 shapes: flattened parameter vectors whose length is not a multiple of the world size.
/// Reference: the naive per-element sum over ranks of the zero-padded inputs, sliced per rank.
#[test]
fn padded_reduce_scatter_and_all_gather_match_a_naive_reference_2_and_3_ranks() {
    for n in [2usize, 3] {
        // Odd lengths not divisible by 2 or 3, plus 6 (divisible: the unpadded path).
        for len in [1usize, 5, 6, 7, 101, 1001] {
            let k = shard_len(len, n);
            let comms = connect_ring(n, |c| c.chunk_bytes = 24);
            let inputs: Vec<Vec<f32>> = (0..n).map(|r| rank_data(r, len, 11 + len as u64)).collect();
            let inputs2 = inputs.clone();
            let results = on_all(comms, move |c| {
                let mut shard = vec![f32::NAN; k];
                c.reduce_scatter_sum_padded_f32(&inputs2[c.rank()], &mut shard)?;
                // Gather the summed shards back: every rank must end with the full sum.
                let mut full = vec![f32::NAN; len];
                c.all_gather_padded_f32(&shard, &mut full)?;
                Ok::<_, CommError>((shard, full))
            });
            let naive: Vec<f32> = (0..len).map(|i| (0..n).map(|r| inputs[r][i]).sum()).collect();
            for (r, res) in results.into_iter().enumerate() {
                let (shard, full) = res.unwrap_or_else(|e| panic!("n={n} len={len} rank {r}: {e}"));
                assert_eq!(shard.len(), k);
                for (j, got) in shard.iter().enumerate() {
                    let want = naive.get(r * k + j).copied().unwrap_or(0.0);
                    // Only the summation order can differ from the naive sum (f32 reassociation).
                    assert!(
                        (got - want).abs() <= 4.0 * n as f32 * f32::EPSILON,
                        "n={n} len={len} rank {r} shard[{j}] {got} vs {want}"
                    );
                }
                for i in 0..len {
                    assert!((full[i] - naive[i]).abs() <= 4.0 * n as f32 * f32::EPSILON, "n={n} len={len} [{i}]");
                }
            }
        }
    }
}

#[test]
fn padded_collectives_refuse_wrong_shard_lengths() {
    let comms = connect_ring(2, |_| {});
    let results = on_all(comms, |c| {
        let mut short = vec![0f32; 3];
        let rs = c.reduce_scatter_sum_padded_f32(&[1.0; 7], &mut short);
        let mut out = vec![0f32; 7];
        let ag = c.all_gather_padded_f32(&[1.0; 3], &mut out);
        (rs, ag)
    });
    for (rs, ag) in results {
        assert!(matches!(rs, Err(CommError::InvalidArgument { .. })), "{rs:?}");
        assert!(matches!(ag, Err(CommError::InvalidArgument { .. })), "{ag:?}");
    }
}

#[test]
fn broadcast_from_every_root_2_3_4_ranks() {
    for n in [2, 3, 4] {
        let comms = connect_ring(n, |c| c.chunk_bytes = 100);
        let results = on_all(comms, move |c| {
            let mut got = Vec::new();
            for root in 0..n {
                let mut bytes: Vec<u8> = if c.rank() == root {
                    (0..1000).map(|i| (i * 7 + root) as u8).collect()
                } else {
                    vec![0; 1000]
                };
                c.broadcast_bytes(&mut bytes, root).unwrap();
                let mut floats =
                    if c.rank() == root { rank_data(root, 77, 3) } else { vec![0.0; 77] };
                c.broadcast_f32(&mut floats, root).unwrap();
                let mut empty: [u8; 0] = [];
                c.broadcast_bytes(&mut empty, root).unwrap();
                got.push((bytes, floats));
            }
            got
        });
        for per_rank in results {
            for (root, (bytes, floats)) in per_rank.into_iter().enumerate() {
                let want: Vec<u8> = (0..1000).map(|i| (i * 7 + root) as u8).collect();
                assert_eq!(bytes, want);
                assert_eq!(floats, rank_data(root, 77, 3));
            }
        }
    }
}

#[test]
fn barrier_waits_for_the_slowest_rank() {
    let comms = connect_ring(3, |_| {});
    let start = Instant::now();
    let times = on_all(comms, move |c| {
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(400));
        }
        c.barrier().unwrap();
        start.elapsed()
    });
    for t in times {
        assert!(t >= Duration::from_millis(390), "left the barrier after {t:?}");
    }
}

#[test]
fn mismatched_sizes_are_an_error_not_a_hang() {
    let comms = connect_ring(2, |c| c.op_timeout = Duration::from_secs(5));
    let start = Instant::now();
    let results = on_all(comms, |c| {
        let mut buf = vec![1.0f32; 10 + 2 * c.rank()];
        c.all_reduce_sum_f32(&mut buf)
    });
    assert!(start.elapsed() < Duration::from_secs(4));
    for r in results {
        let e = r.unwrap_err();
        assert!(
            matches!(e, CommError::Mismatch { .. } | CommError::PeerClosed { .. }),
            "unexpected {e}"
        );
    }
}

#[test]
fn dead_peer_gives_errors_to_the_others_quickly() {
    let op_timeout = Duration::from_secs(10);
    let mut comms = connect_ring(4, |c| c.op_timeout = op_timeout);
    // Rank 2 "dies": its sockets close without it ever entering the collective.
    drop(comms.remove(2));
    let start = Instant::now();
    let results = on_all(comms, |c| {
        let mut buf = vec![1.0f32; 1000];
        let first = c.all_reduce_sum_f32(&mut buf);
        let second = c.all_reduce_sum_f32(&mut buf);
        (c.rank(), first, second)
    });
    let elapsed = start.elapsed();
    // Well within the op timeout: closed sockets propagate around the ring at once.
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    for (rank, first, second) in results {
        let e = first.expect_err("collective with a dead peer must fail");
        assert!(e.is_peer_failure(), "rank {rank}: {e}");
        assert!(matches!(second, Err(CommError::Poisoned(_))), "rank {rank}: {second:?}");
    }
}

#[test]
fn hung_peer_times_out() {
    let op_timeout = Duration::from_millis(800);
    let comms = connect_ring(3, |c| c.op_timeout = op_timeout);
    let start = Instant::now();
    let results = on_all(comms, move |c| {
        if c.rank() == 0 {
            // Alive but never joins the collective; keeps its sockets open past the others.
            std::thread::sleep(Duration::from_secs(3));
            return Ok(());
        }
        let mut buf = vec![1.0f32; 100];
        let r = c.all_reduce_sum_f32(&mut buf);
        assert!(start.elapsed() < Duration::from_millis(2500), "no error within the timeout");
        r
    });
    let errors: Vec<_> = results.into_iter().skip(1).map(|r| r.unwrap_err()).collect();
    assert!(
        errors.iter().any(|e| matches!(e, CommError::Timeout { .. })),
        "expected a timeout among {errors:?}"
    );
    assert!(errors.iter().all(|e| e.is_peer_failure()));
}

#[test]
fn missing_peer_fails_the_rendezvous_after_the_timeout() {
    let mut cfgs = ring_configs(3, |c| c.connect_timeout = Duration::from_millis(700));
    cfgs.pop(); // rank 2 never starts
    let start = Instant::now();
    let handles: Vec<_> = cfgs
        .into_iter()
        .map(|(c, l)| std::thread::spawn(move || TcpRingCommunicator::connect_with_listener(c, l)))
        .collect();
    for h in handles {
        let e = h.join().unwrap().err().expect("rendezvous must fail");
        assert!(matches!(e, CommError::Rendezvous { .. }), "{e}");
    }
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn wrong_generation_is_rejected_at_rendezvous() {
    let cfgs = ring_configs(2, |c| c.connect_timeout = Duration::from_millis(800));
    let handles: Vec<_> = cfgs
        .into_iter()
        .map(|(mut c, l)| {
            c.generation = c.rank as u64; // rank 1 is from another restart
            std::thread::spawn(move || TcpRingCommunicator::connect_with_listener(c, l))
        })
        .collect();
    for h in handles {
        let e = h.join().unwrap().err().expect("must be rejected");
        let msg = e.to_string();
        assert!(msg.contains("generation") || msg.contains("rejected"), "{msg}");
    }
}
