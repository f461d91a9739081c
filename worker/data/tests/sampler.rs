use onevision_data::*;
use std::collections::BTreeSet;

fn cfg(seed: u64, rank: usize, world: usize) -> ShardConfig {
    ShardConfig {
        seed,
        shuffle: true,
        rank,
        world_size: world,
    }
}

#[test]
fn shuffle_is_deterministic_permutation() {
    let a = epoch_order(100, 0, &cfg(7, 0, 1)).unwrap();
    assert_eq!(a, epoch_order(100, 0, &cfg(7, 0, 1)).unwrap());
    assert_ne!(
        a,
        epoch_order(100, 1, &cfg(7, 0, 1)).unwrap(),
        "epochs reshuffle"
    );
    assert_ne!(
        a,
        epoch_order(100, 0, &cfg(8, 0, 1)).unwrap(),
        "seeds differ"
    );
    assert_ne!(a, (0..100).collect::<Vec<_>>());
    let mut s = a.clone();
    s.sort();
    assert_eq!(s, (0..100).collect::<Vec<_>>());
    let plain = ShardConfig {
        shuffle: false,
        ..cfg(7, 0, 1)
    };
    assert_eq!(epoch_order(5, 3, &plain).unwrap(), vec![0, 1, 2, 3, 4]);
}

#[test]
fn sharding_is_disjoint_and_equal() {
    let n = 103;
    let world = 4;
    let mut all = BTreeSet::new();
    for r in 0..world {
        let o = epoch_order(n, 2, &cfg(1, r, world)).unwrap();
        assert_eq!(o.len(), n / world);
        for i in o {
            assert!(all.insert(i), "index {i} on two ranks");
        }
    }
    assert_eq!(all.len(), (n / world) * world);
    assert!(epoch_order(10, 0, &cfg(1, 4, 4)).is_err());
    assert!(epoch_order(10, 0, &cfg(1, 0, 0)).is_err());
}

#[test]
fn fixed_batches() {
    let c = cfg(3, 0, 1);
    let b = epoch_batches(
        10,
        None,
        0,
        &c,
        &Batching::Fixed {
            batch_size: 4,
            drop_last: false,
        },
    )
    .unwrap();
    assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4, 2]);
    let b = epoch_batches(
        10,
        None,
        0,
        &c,
        &Batching::Fixed {
            batch_size: 4,
            drop_last: true,
        },
    )
    .unwrap();
    assert_eq!(b.len(), 2);
    assert!(epoch_batches(
        10,
        None,
        0,
        &c,
        &Batching::Fixed {
            batch_size: 0,
            drop_last: true
        }
    )
    .is_err());
}

#[test]
fn token_bucketing_respects_budget_and_equal_counts() {
    let n = 200;
    let lengths: Vec<usize> = (0..n).map(|i| 10 + (i * 37) % 300).collect();
    let mut lengths_with_giant = lengths.clone();
    lengths_with_giant[5] = 5000; // longer than the budget: alone in its batch
    let batching = Batching::ByTokens {
        max_tokens: 1024,
        window: 64,
    };
    let world = 3;
    let mut counts = Vec::new();
    let mut seen = BTreeSet::new();
    for r in 0..world {
        let b = epoch_batches(
            n,
            Some(&lengths_with_giant),
            1,
            &cfg(9, r, world),
            &batching,
        )
        .unwrap();
        counts.push(b.len());
        for batch in &b {
            let longest = batch.iter().map(|&i| lengths_with_giant[i]).max().unwrap();
            assert!(
                batch.len() * longest <= 1024 || batch.len() == 1,
                "batch {batch:?} over budget"
            );
            for &i in batch {
                assert!(seen.insert(i), "sample {i} twice");
            }
        }
    }
    assert!(counts.iter().all(|c| *c == counts[0]), "{counts:?}");
    // Bucketing reduces padding versus the shuffled order in the same batch sizes.
    let b = epoch_batches(n, Some(&lengths), 0, &cfg(9, 0, 1), &batching).unwrap();
    let padded: usize = b
        .iter()
        .map(|x| x.len() * x.iter().map(|&i| lengths[i]).max().unwrap())
        .sum();
    let real: usize = b.iter().flatten().map(|&i| lengths[i]).sum();
    assert!(
        (padded as f64) < 1.25 * real as f64,
        "padding {padded} vs {real}"
    );
    assert!(epoch_batches(n, None, 0, &cfg(9, 0, 1), &batching).is_err());
    assert!(epoch_batches(n, Some(&lengths[..5]), 0, &cfg(9, 0, 1), &batching).is_err());
}

#[test]
fn cursor_resumes_exactly_across_epochs() {
    let lengths: Vec<usize> = (0..50).map(|i| 1 + i % 7).collect();
    for batching in [
        Batching::Fixed {
            batch_size: 6,
            drop_last: true,
        },
        Batching::ByTokens {
            max_tokens: 20,
            window: 16,
        },
        Batching::Packed {
            max_tokens: 20,
            window: 16,
        },
    ] {
        let mut a = BatchCursor::new(
            50,
            Some(lengths.clone()),
            cfg(5, 1, 2),
            batching,
            Position::default(),
        )
        .unwrap();
        let mut first = Vec::new();
        for _ in 0..7 {
            first.push(a.next_batch().unwrap());
        }
        let saved = a.position();
        let straight: Vec<_> = (0..15).map(|_| a.next_batch().unwrap()).collect();
        // Crossed at least one epoch boundary.
        assert!(straight.last().unwrap().0.epoch >= 1, "{batching:?}");
        let mut b =
            BatchCursor::new(50, Some(lengths.clone()), cfg(5, 1, 2), batching, saved).unwrap();
        let resumed: Vec<_> = (0..15).map(|_| b.next_batch().unwrap()).collect();
        assert_eq!(straight, resumed);
        assert_eq!(first[0].0, Position { epoch: 0, index: 0 });
    }
    // A dataset too small for the world size yields no batches: an error, not a hang.
    let mut c = BatchCursor::new(
        1,
        None,
        cfg(0, 0, 2),
        Batching::Fixed {
            batch_size: 1,
            drop_last: false,
        },
        Position::default(),
    )
    .unwrap();
    assert!(c.next_batch().is_err());
}

#[test]
fn packing_fills_rows_without_crossing_budget() {
    let n = 120;
    let lengths: Vec<usize> = (0..n).map(|i| 5 + (i * 53) % 200).collect();
    let batching = Batching::Packed {
        max_tokens: 512,
        window: 40,
    };
    let mut seen = BTreeSet::new();
    let mut counts = Vec::new();
    for r in 0..2 {
        let packs = epoch_batches(n, Some(&lengths), 0, &cfg(4, r, 2), &batching).unwrap();
        counts.push(packs.len());
        for p in &packs {
            let total: usize = p.iter().map(|&i| lengths[i]).sum();
            assert!(total <= 512, "pack {p:?} has {total} tokens");
            for &i in p {
                assert!(seen.insert(i));
            }
        }
        // First-fit-decreasing packs densely: average fill above 80% of the budget.
        let used: usize = packs.iter().flatten().map(|&i| lengths[i]).sum();
        assert!(
            used as f64 > 0.8 * 512.0 * packs.len() as f64,
            "{used} tokens in {} packs",
            packs.len()
        );
    }
    assert_eq!(counts[0], counts[1]);
    assert_eq!(cu_seqlens(&[3, 5, 2]), vec![0, 3, 8, 10]);
    assert_eq!(cu_seqlens(&[]), vec![0]);
}
