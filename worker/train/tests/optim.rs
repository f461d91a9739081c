use onevision_train::*;

fn t(shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::new(shape.to_vec(), data.to_vec()).unwrap()
}

#[test]
fn adamw_three_steps_hand_computed_f64() {
    // Oracle: the torch.optim.AdamW algorithm box (decoupled decay, then bias-corrected Adam),
    // evaluated by hand in f64 for lr 0.1, wd 0.01, β (0.9, 0.999), ε 1e-8. Step 1 in closed form:
    // p = 1·(1 − 0.001) − 0.1·0.5/(0.5 + 1e-8) = 0.899000002.
    let expected = [
        (
            1.0,
            [0.5, -0.25, 0.125],
            0.01,
            [0.899000002, 0.8714672987058463, 0.8365529176159483],
        ),
        (
            -2.0,
            [0.1, 0.2, -0.3],
            0.01,
            [-2.097999990000001, -2.1924201864887465, -2.1835678650525607],
        ),
        (
            -2.0,
            [0.1, 0.2, -0.3],
            0.0,
            [-2.099999990000001, -2.196518186478747, -2.18985828522905],
        ),
    ];
    for (p0, gs, wd, want) in expected {
        let h = AdamWHyper {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: wd,
        };
        let (mut p, mut m, mut v) = ([p0], [0.0f64], [0.0f64]);
        for (i, g) in gs.iter().enumerate() {
            adamw_update(&mut p, &[*g], &mut m, &mut v, i as u64 + 1, &h);
            // Same formula, different association order: a few ulps.
            assert!(
                (p[0] - want[i]).abs() < 1e-14,
                "step {}: {} vs {}",
                i + 1,
                p[0],
                want[i]
            );
        }
    }
}

#[test]
fn adamw_optimizer_groups_and_f32_master() {
    let mut params = TensorMap::new();
    params.insert(
        "model.layers.0.mlp.up_proj.weight".into(),
        t(&[2], &[1.0, -2.0]),
    );
    params.insert(
        "model.layers.0.self_attn.q_proj.bias".into(),
        t(&[1], &[-2.0]),
    );
    params.insert(
        "model.layers.0.input_layernorm.weight".into(),
        t(&[1], &[1.0]),
    );
    params.insert("visual.merger.ln_q.weight".into(), t(&[1], &[1.0]));
    params.insert("frozen.weight".into(), t(&[1], &[3.0]));
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    assert_eq!(
        opt.group_of("model.layers.0.self_attn.q_proj.bias").0,
        "no_decay"
    );
    assert_eq!(opt.group_of("model.norm.weight").0, "no_decay");
    assert_eq!(opt.group_of("visual.blocks.3.norm1.weight").0, "no_decay");
    assert_eq!(opt.group_of("visual.merger.ln_q.weight").0, "no_decay");
    assert_eq!(opt.group_of("model.embed_tokens.weight").0, "default");
    let steps: [[f32; 2]; 3] = [[0.5, 0.1], [-0.25, 0.2], [0.125, -0.3]];
    for s in steps {
        let mut grads = TensorMap::new();
        grads.insert("model.layers.0.mlp.up_proj.weight".into(), t(&[2], &s));
        grads.insert(
            "model.layers.0.self_attn.q_proj.bias".into(),
            t(&[1], &[s[1]]),
        );
        grads.insert(
            "model.layers.0.input_layernorm.weight".into(),
            t(&[1], &[0.0]),
        );
        opt.step(&mut params, &grads, 0.1).unwrap();
    }
    // f32 storage: within f32 rounding (rel 1e-6 over three steps) of the f64 oracle above.
    let w = &params["model.layers.0.mlp.up_proj.weight"].data;
    assert!((w[0] as f64 - 0.8365529176159483).abs() < 1e-6);
    assert!((w[1] as f64 - -2.1835678650525607).abs() < 1e-6);
    // The bias is in the no-decay group.
    assert!(
        (params["model.layers.0.self_attn.q_proj.bias"].data[0] as f64 - -2.18985828522905).abs()
            < 1e-6
    );
    // Zero gradient, no decay: unchanged.
    assert_eq!(params["model.layers.0.input_layernorm.weight"].data[0], 1.0);
    // No gradient: untouched and no state.
    assert_eq!(params["frozen.weight"].data[0], 3.0);
    assert!(!opt.state.contains_key("frozen.weight"));
    assert_eq!(opt.state["model.layers.0.mlp.up_proj.weight"].step, 3);
}

#[test]
fn adamw_errors_leave_state_untouched() {
    let mut params = TensorMap::new();
    params.insert("a".into(), t(&[2], &[1.0, 2.0]));
    params.insert("b".into(), t(&[1], &[1.0]));
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let mut grads = TensorMap::new();
    grads.insert("a".into(), t(&[2], &[1.0, 1.0]));
    grads.insert("b".into(), t(&[1], &[f32::NAN]));
    let e = opt.step(&mut params, &grads, 0.1).unwrap_err();
    assert!(matches!(&e, OptimError::NonFinite(n) if n == "b"), "{e}");
    assert_eq!(params["a"].data, vec![1.0, 2.0]);
    assert!(opt.state.is_empty());
    grads.insert("b".into(), t(&[2], &[0.0, 0.0]));
    assert!(matches!(
        opt.step(&mut params, &grads, 0.1),
        Err(OptimError::Shape { .. })
    ));
    grads.insert("b".into(), t(&[1], &[0.0]));
    grads.insert("c".into(), t(&[1], &[0.0]));
    assert!(matches!(
        opt.step(&mut params, &grads, 0.1),
        Err(OptimError::UnknownGrad(_))
    ));
    let bad = AdamWConfig {
        groups: vec![GroupSpec {
            name: "x".into(),
            patterns: vec!["(".into()],
            weight_decay: 0.0,
            lr_scale: 1.0,
        }],
        ..Default::default()
    };
    assert!(AdamW::new(bad)
        .unwrap_err()
        .to_string()
        .contains("group `x`"));
    assert!(AdamW::new(AdamWConfig {
        beta2: 1.0,
        ..Default::default()
    })
    .is_err());
}

#[test]
fn grad_norm_clipping() {
    let mut g = TensorMap::new();
    g.insert("a".into(), t(&[2], &[3.0, 0.0]));
    g.insert("b".into(), t(&[1], &[4.0]));
    // Norm 5 → scaled by 1/(5 + 1e-6) (torch's clip_coef).
    let n = clip_grad_norm(&mut g, 1.0).unwrap();
    assert!((n - 5.0).abs() < 1e-12);
    let coef = 1.0 / (5.0 + 1e-6);
    assert!((g["a"].data[0] as f64 - 3.0 * coef).abs() < 1e-6);
    assert!((g["b"].data[0] as f64 - 4.0 * coef).abs() < 1e-6);
    // Below the threshold: unchanged.
    let before = g.clone();
    let n2 = clip_grad_norm(&mut g, 10.0).unwrap();
    assert!((n2 - 1.0).abs() < 1e-5);
    assert_eq!(g, before);
    g.insert("c".into(), t(&[1], &[f32::INFINITY]));
    assert!(matches!(clip_grad_norm(&mut g, 1.0), Err(OptimError::NonFinite(n)) if n == "c"));
}

#[test]
fn grad_accumulation() {
    let mut acc = GradAccumulator::new();
    assert!(matches!(acc.take(), Err(OptimError::EmptyAccumulation)));
    for x in [1.0f32, 2.0, 6.0] {
        let mut g = TensorMap::new();
        g.insert("w".into(), t(&[2], &[x, -x]));
        acc.add(&g, 1.0 / 3.0).unwrap();
    }
    assert_eq!(acc.micro_batches(), 3);
    let mean = acc.take().unwrap();
    assert!((mean["w"].data[0] - 3.0).abs() < 1e-6 && (mean["w"].data[1] + 3.0).abs() < 1e-6);
    assert_eq!(acc.micro_batches(), 0);
    let mut g = TensorMap::new();
    g.insert("w".into(), t(&[2], &[1.0, 1.0]));
    acc.add(&g, 1.0).unwrap();
    g.insert("w".into(), t(&[3], &[1.0, 1.0, 1.0]));
    assert!(matches!(acc.add(&g, 1.0), Err(OptimError::Shape { .. })));
}

#[test]
fn schedules_match_hf_lambdas() {
    use std::f64::consts::PI;
    // Cosine, 100 steps, warmup ratio 0.05 → ceil(5) = 5 warmup steps.
    let s = Schedule::new(ScheduleKind::Cosine, 1e-5, 100, Warmup::Ratio(0.05)).unwrap();
    assert_eq!(s.warmup_steps, 5);
    assert_eq!(s.lr(0), 0.0);
    assert!((s.lr(2) - 1e-5 * 2.0 / 5.0).abs() < 1e-20);
    assert!((s.lr(5) - 1e-5).abs() < 1e-20);
    let mid = 5 + 95 / 2;
    let want = 1e-5 * 0.5 * (1.0 + (PI * (mid - 5) as f64 / 95.0).cos());
    assert!((s.lr(mid) - want).abs() < 1e-20);
    assert!(s.lr(100).abs() < 1e-20);
    assert!(s.lr(1000).abs() < 1e-20); // past the end: stays at the floor
                                       // Ratio rounding up: 0.05·30 = 1.5 → 2.
    assert_eq!(
        Schedule::new(ScheduleKind::Cosine, 1.0, 30, Warmup::Ratio(0.05))
            .unwrap()
            .warmup_steps,
        2
    );

    let l = Schedule::new(ScheduleKind::Linear, 2.0, 10, Warmup::Steps(2)).unwrap();
    let got: Vec<f64> = (0..11).map(|i| l.lr(i)).collect();
    let want = [0.0, 1.0, 2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25, 0.0];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{got:?}");
    }
    let c = Schedule::new(ScheduleKind::Constant, 3.0, 10, Warmup::Steps(3)).unwrap();
    assert_eq!((c.lr(0), c.lr(1), c.lr(3), c.lr(50)), (0.0, 1.0, 3.0, 3.0));
    let c0 = Schedule::new(ScheduleKind::Constant, 3.0, 10, Warmup::Steps(0)).unwrap();
    assert_eq!(c0.lr(0), 3.0);
    // Floor.
    let f = Schedule::new(ScheduleKind::Linear, 1.0, 10, Warmup::Steps(0))
        .unwrap()
        .with_min_lr_ratio(0.1)
        .unwrap();
    assert!((f.lr(10) - 0.1).abs() < 1e-12 && (f.lr(5) - 0.55).abs() < 1e-12);
    assert_eq!(
        Schedule::new(ScheduleKind::Linear, 1.0, 10, Warmup::Ratio(1.5)).unwrap_err(),
        ScheduleError::Ratio(1.5)
    );
    assert!(Schedule::new(ScheduleKind::Linear, f64::NAN, 10, Warmup::Steps(0)).is_err());
}

/// ZeRO-1: the shards of 2 and 3 ranks, each updated with its slice of the flattened gradient,
/// reassemble to exactly what one unsharded AdamW computes (same f64 arithmetic per element, so
/// bit-identical), including parameter groups (no decay on `norm`) and shards that split a
/// parameter. Layout of 3·5 + 4 + 2 = 21 elements: not divisible by 2, split mid-tensor by 3.
#[test]
fn sharded_adamw_equals_full_adamw() {
    let mut params = TensorMap::new();
    params.insert("a.weight".into(), t(&[3, 5], &(0..15).map(|i| i as f32 * 0.1 - 0.7).collect::<Vec<_>>()));
    params.insert("b.norm.weight".into(), t(&[4], &[1.0, 0.9, 1.1, 1.2]));
    params.insert("c.bias".into(), t(&[2], &[0.05, -0.05]));
    let layout = FlatLayout::new(params.iter().map(|(n, p)| (n.clone(), p.shape.clone())));
    assert_eq!(layout.len(), 21);
    let cfg = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
    let grads_at = |step: usize| -> Vec<f32> { (0..21).map(|i| ((i * 7 + step * 3) % 11) as f32 * 0.01 - 0.05).collect() };

    let mut full = AdamW::new(cfg.clone()).unwrap();
    let mut full_params = params.clone();
    for step in 0..3 {
        let flat = grads_at(step);
        let grads: TensorMap = layout
            .entries()
            .iter()
            .map(|e| (e.name.clone(), t(&e.shape, &flat[e.range()])))
            .collect();
        full.step(&mut full_params, &grads, 1e-2).unwrap();
    }

    for world in [2usize, 3] {
        let mut shards: Vec<ShardedAdamW> = (0..world)
            .map(|r| ShardedAdamW::new(cfg.clone(), &layout, r, world, &params, &Default::default()).unwrap())
            .collect();
        let total: usize = shards.iter().map(|s| s.range().len()).sum();
        assert_eq!(total, 21, "shards cover the vector exactly");
        for step in 0..3 {
            let flat = grads_at(step);
            for s in &mut shards {
                s.step(&flat[s.range()], 1e-2).unwrap();
            }
        }
        let gathered: Vec<f32> = shards.iter().flat_map(|s| s.master().to_vec()).collect();
        for e in layout.entries() {
            assert_eq!(&gathered[e.range()], full_params[&e.name].data.as_slice(), "world {world}: {}", e.name);
            // Moments too, reassembled from the pieces.
            for s in &shards {
                for p in s.pieces().iter().filter(|p| p.name == e.name) {
                    assert_eq!(&s.moments().0[p.local.clone()], &full.state[&e.name].m.data[p.param.clone()]);
                    assert_eq!(&s.moments().1[p.local.clone()], &full.state[&e.name].v.data[p.param.clone()]);
                    assert_eq!(p.step, 3);
                }
            }
        }
        // Memory: each shard holds ≈ 1/world of master + moments.
        let per_rank = shards[0].state_bytes();
        assert_eq!(per_rank, layout.shard_len(world) * 3 * 4);
        // Restarting a shard from the full state continues identically.
        let again = ShardedAdamW::new(cfg.clone(), &layout, 1, world, &full_params, &full.state).unwrap();
        assert_eq!(again.master(), shards[1].master());
        assert_eq!(again.moments(), shards[1].moments());
        assert_eq!(again.pieces(), shards[1].pieces());
    }
}

#[test]
fn sharded_adamw_refuses_bad_input_without_changing_state() {
    let mut params = TensorMap::new();
    params.insert("w".into(), t(&[5], &[1.0; 5]));
    let layout = FlatLayout::new([("w".to_string(), vec![5])]);
    let cfg = AdamWConfig::default();
    assert!(ShardedAdamW::new(cfg.clone(), &layout, 2, 2, &params, &Default::default()).is_err());
    let mut s = ShardedAdamW::new(cfg.clone(), &layout, 1, 2, &params, &Default::default()).unwrap();
    assert_eq!(s.range(), 3..5);
    assert!(matches!(s.step(&[0.1; 3], 1e-3), Err(OptimError::Shard(_))));
    assert!(matches!(s.step(&[0.1, f32::NAN], 1e-3), Err(OptimError::NonFinite(n)) if n == "w"));
    assert_eq!(s.master(), &[1.0, 1.0]);
    assert_eq!(s.pieces()[0].step, 0);
    // A rank past the end of a tiny vector owns nothing and steps on nothing.
    let tiny = FlatLayout::new([("w".to_string(), vec![1])]);
    let mut p1 = TensorMap::new();
    p1.insert("w".into(), t(&[1], &[2.0]));
    let mut empty = ShardedAdamW::new(cfg, &tiny, 1, 2, &p1, &Default::default()).unwrap();
    assert!(empty.range().is_empty());
    empty.step(&[], 1e-3).unwrap();
}
