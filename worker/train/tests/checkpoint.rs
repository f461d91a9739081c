use onevision_train::checkpoint::{load, verify};
use onevision_train::*;
use std::collections::BTreeMap;
use std::fs;

fn state(step: u64) -> TrainingState {
    let mut weights = TensorMap::new();
    let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - step as f32).collect();
    weights.insert(
        "model.embed_tokens.weight".into(),
        Tensor::new(vec![3, 4], w).unwrap(),
    );
    weights.insert(
        "model.norm.weight".into(),
        Tensor::new(vec![4], vec![1.0, f32::MIN_POSITIVE, -0.0, 1e30]).unwrap(),
    );
    let mut optimizer = BTreeMap::new();
    optimizer.insert(
        "model.norm.weight".to_string(),
        ParamState {
            step: step + 1,
            m: Tensor::new(vec![4], vec![0.1, 0.2, 0.3, step as f32]).unwrap(),
            v: Tensor::new(vec![4], vec![1e-8, 2e-8, 3e-8, 4e-8]).unwrap(),
        },
    );
    TrainingState {
        step,
        weights,
        optimizer,
        schedule: Some(
            Schedule::new(ScheduleKind::Cosine, 1e-5, 100, Warmup::Ratio(0.05)).unwrap(),
        ),
        data_position: DataPosition {
            epoch: 1,
            index: 37 + step,
        },
        rng: vec![1, 2, 3, step as u8],
        metadata: serde_json::json!({"run": "test", "loss": 0.5}),
    }
}

#[test]
fn round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let m = CheckpointManager::new(dir.path(), 3).unwrap();
    let s = state(7);
    let p = m.save(&s).unwrap();
    assert!(p.ends_with("ckpt-0000000007"));
    let back = load(&p).unwrap();
    // Bit-exact, including -0.0 and subnormal edges.
    assert_eq!(back, s);
    assert_eq!(
        back.weights["model.norm.weight"].data[2].to_bits(),
        (-0.0f32).to_bits()
    );
    let man = verify(&p).unwrap();
    assert_eq!(man.step, 7);
    assert_eq!(man.files.len(), 3);
    let lv = m.latest_valid().unwrap();
    assert_eq!(lv.found.unwrap().1, s);
    assert!(lv.skipped.is_empty());
}

#[test]
fn keep_last_k_and_same_step_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let m = CheckpointManager::new(dir.path(), 2).unwrap();
    for step in [10, 20, 30, 40] {
        m.save(&state(step)).unwrap();
    }
    let steps: Vec<u64> = m.list().unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![30, 40]);
    // Saving a step again replaces it.
    let mut s = state(40);
    s.metadata = serde_json::json!({"again": true});
    m.save(&s).unwrap();
    assert_eq!(
        m.latest_valid().unwrap().found.unwrap().1.metadata,
        s.metadata
    );
    assert_eq!(m.list().unwrap().len(), 2);
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        2,
        "no temp dirs left"
    );
    assert!(CheckpointManager::new(dir.path(), 0).is_err());
}

#[test]
fn truncated_file_is_refused_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let m = CheckpointManager::new(dir.path(), 5).unwrap();
    m.save(&state(1)).unwrap();
    let newest = m.save(&state(2)).unwrap();
    let f = newest.join("weights.safetensors");
    let len = fs::metadata(&f).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let e = load(&newest).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, CheckpointError::Size { .. }), "{msg}");
    assert!(
        msg.contains("weights.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
    let lv = m.latest_valid().unwrap();
    let (p, s) = lv.found.unwrap();
    assert_eq!(
        (p.file_name().unwrap().to_str().unwrap(), s.step),
        ("ckpt-0000000001", 1)
    );
    assert_eq!(lv.skipped.len(), 1);
    assert_eq!(lv.skipped[0].0, newest);
}

#[test]
fn bit_flip_gives_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = CheckpointManager::new(dir.path(), 5).unwrap();
    let p = m.save(&state(3)).unwrap();
    let f = p.join("optimizer.safetensors");
    let mut bytes = fs::read(&f).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    fs::write(&f, &bytes).unwrap();
    let e = load(&p).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, CheckpointError::Checksum { .. }), "{msg}");
    assert!(
        msg.contains("optimizer.safetensors") && msg.contains("SHA-256 mismatch"),
        "{msg}"
    );
    // Nothing valid left.
    let lv = m.latest_valid().unwrap();
    assert!(lv.found.is_none());
    assert_eq!(lv.skipped.len(), 1);

    // A flipped bit in state.json too.
    let p = m.save(&state(4)).unwrap();
    let f = p.join("state.json");
    let mut bytes = fs::read(&f).unwrap();
    bytes[5] ^= 1;
    fs::write(&f, &bytes).unwrap();
    assert!(matches!(load(&p), Err(CheckpointError::Checksum { .. })));
    // Corrupt manifest → clear manifest error.
    fs::write(p.join("manifest.json"), b"{not json").unwrap();
    assert!(load(&p).unwrap_err().to_string().contains("bad manifest"));
}

#[test]
fn crash_in_the_middle_leaves_old_state_usable() {
    let dir = tempfile::tempdir().unwrap();
    let m = CheckpointManager::new(dir.path(), 3).unwrap();
    m.save(&state(5)).unwrap();
    // A save that died before the rename: a temp dir with partial files.
    let tmp = dir.path().join(".tmp-ckpt-0000000006-999");
    fs::create_dir(&tmp).unwrap();
    fs::write(tmp.join("weights.safetensors"), b"partial").unwrap();
    // A final-looking dir without a manifest (e.g. copied by hand, or a foreign tool).
    let bare = dir.path().join("ckpt-0000000007");
    fs::create_dir(&bare).unwrap();
    fs::write(bare.join("weights.safetensors"), b"x").unwrap();
    assert_eq!(m.list().unwrap().len(), 2); // temp dir not listed
    let lv = m.latest_valid().unwrap();
    assert_eq!(lv.found.unwrap().1.step, 5);
    assert!(matches!(
        lv.skipped[0].1,
        CheckpointError::MissingManifest { .. }
    ));
    // The next save removes the temp dir.
    m.save(&state(8)).unwrap();
    assert!(!tmp.exists());
    assert_eq!(m.clean_temp().unwrap(), 0);
    // A missing listed file.
    let p = m.save(&state(9)).unwrap();
    fs::remove_file(p.join("state.json")).unwrap();
    assert!(matches!(load(&p), Err(CheckpointError::MissingFile { .. })));
}

#[test]
fn resume_continues_bit_identically() {
    // Train 6 AdamW steps straight vs 3 steps, checkpoint, reload into a fresh optimizer, 3 more.
    let grad = |step: u64| {
        let mut g = TensorMap::new();
        let d: Vec<f32> = (0..12)
            .map(|i| ((i as f32 + 1.0) * (step as f32 + 0.5)).sin())
            .collect();
        g.insert(
            "model.embed_tokens.weight".into(),
            Tensor::new(vec![3, 4], d).unwrap(),
        );
        g
    };
    let sched = Schedule::new(ScheduleKind::Cosine, 1e-2, 6, Warmup::Steps(1)).unwrap();
    let run = |opt: &mut AdamW, w: &mut TensorMap, from: u64, to: u64| {
        for s in from..to {
            opt.step(w, &grad(s), sched.lr(s)).unwrap();
        }
    };
    let mut w_a = state(0).weights;
    let mut opt_a = AdamW::new(AdamWConfig::default()).unwrap();
    run(&mut opt_a, &mut w_a, 0, 6);

    let dir = tempfile::tempdir().unwrap();
    let m = CheckpointManager::new(dir.path(), 1).unwrap();
    let mut w_b = state(0).weights;
    let mut opt_b = AdamW::new(AdamWConfig::default()).unwrap();
    run(&mut opt_b, &mut w_b, 0, 3);
    let mut st = state(3);
    st.weights = w_b;
    st.optimizer = opt_b.state.clone();
    st.schedule = Some(sched);
    m.save(&st).unwrap();
    let back = m.latest_valid().unwrap().found.unwrap().1;
    let mut w_c = back.weights;
    let mut opt_c = AdamW::new(AdamWConfig::default()).unwrap();
    opt_c.state = back.optimizer;
    run(&mut opt_c, &mut w_c, back.step, 6);
    assert_eq!(w_a, w_c);
}

/// ZeRO-1: two ranks write their shards of the moments into one checkpoint; loading reassembles
/// exactly the unsharded state, a missing rank's shard blocks the commit, and a corrupted shard
/// makes the whole checkpoint fall back to the previous one.
#[test]
fn sharded_checkpoint_round_trips_and_is_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let m = CheckpointManager::new(dir.path(), 3).unwrap();
    let mut s = state(4);
    s.optimizer.insert(
        "model.embed_tokens.weight".into(),
        ParamState {
            step: 5,
            m: Tensor::new(vec![3, 4], (0..12).map(|i| i as f32).collect()).unwrap(),
            v: Tensor::new(vec![3, 4], (0..12).map(|i| i as f32 * 1e-3).collect()).unwrap(),
        },
    );
    s.optimizer.get_mut("model.norm.weight").unwrap().step = 5;
    let layout = FlatLayout::new(s.weights.iter().map(|(n, t)| (n.clone(), t.shape.clone())));
    let shards: Vec<ShardedAdamW> = (0..2)
        .map(|r| ShardedAdamW::new(AdamWConfig::default(), &layout, r, 2, &s.weights, &s.optimizer).unwrap())
        .collect();
    let write = |step: u64, ranks: &[usize]| {
        m.begin_sharded(step).unwrap();
        for &r in ranks {
            let (mm, vv) = shards[r].moments();
            m.write_shard(step, &OptimizerShard { rank: r, world_size: 2, pieces: shards[r].pieces(), m: mm, v: vv }).unwrap();
        }
    };
    let mut bare = s.clone();
    bare.optimizer.clear();

    // Rank 1 never wrote its shard: no checkpoint appears.
    write(4, &[0]);
    assert!(matches!(m.commit_sharded(&bare, 2), Err(CheckpointError::MissingFile { .. })));
    assert!(m.list().unwrap().is_empty());

    write(4, &[0, 1]);
    let p = m.commit_sharded(&bare, 2).unwrap();
    assert_eq!(verify(&p).unwrap().files.len(), 4, "weights, state and two shards");
    assert_eq!(load(&p).unwrap(), s, "moments reassembled exactly");

    // A newer checkpoint with a corrupted shard is refused; the one above is used.
    let mut s8 = bare.clone();
    s8.step = 8;
    write(8, &[0, 1]);
    let p8 = m.commit_sharded(&s8, 2).unwrap();
    let shard = p8.join("optimizer-rank-00001-of-00002.safetensors");
    let mut bytes = fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&shard, bytes).unwrap();
    let lv = m.latest_valid().unwrap();
    assert_eq!(lv.found.unwrap().0, p);
    assert!(matches!(lv.skipped[0].1, CheckpointError::Checksum { .. }));
}
