//! Full-model backward: every parameter's gradient against a central-difference directional
//! derivative of loss = Σ c ⊙ logits, on a tiny random model with an image and a padded batch.
mod common;
use common::*;
use onevision_model::{CpuBackend, PromptInput, Qwen25Vl, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;

fn prompts() -> Vec<PromptInput> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut ids = vec![3, 41];
    ids.extend([40; 6]);
    ids.extend([42, 5, 6]);
    vec![
        PromptInput { input_ids: ids, pixel_values: Some(Tensor::from_f32(&[24, 1176], rand_vec(&mut r, 24 * 1176)).unwrap()), image_grid_thw: vec![[1, 4, 6]] },
        PromptInput { input_ids: vec![7, 9, 11, 13], ..Default::default() },
    ]
}

fn loss(model: &Qwen25Vl, ps: &[PromptInput], c: &[f32]) -> f64 {
    let f = model.forward_train(ps).unwrap();
    f.logits.as_f32().unwrap().iter().zip(c).map(|(a, b)| *a as f64 * *b as f64).sum()
}

#[test]
fn forward_train_matches_inference_logits() {
    let cfg = tiny_config(false, 64);
    let m = Qwen25Vl::from_weights(cfg.clone(), tiny_weights(&cfg, 1), Arc::new(CpuBackend)).unwrap();
    let ps = prompts();
    let f = m.forward_train(&ps).unwrap();
    let (pre, _) = m.prefill(&ps, 0, true).unwrap();
    assert_eq!(f.pad, vec![0, 7]);
    let (a, b) = (f.logits.as_f32().unwrap(), pre.logits.as_f32().unwrap());
    // Same kernels; prefill differs only by the KV-cache copy, so results are bitwise equal.
    assert_eq!(a, b);
}

/// f32 central differences with eps 1e-2 along a random ±1 direction: rounding of the f64-summed
/// loss is ~1e-5/eps = 1e-3 absolute, truncation ~1e-4 relative, while a wrong or missing
/// gradient term is O(1) relative; hence 1e-2 relative + 5e-3 absolute.
#[test]
fn every_parameter_gradient_matches_finite_differences() {
    for tie in [true, false] {
        let cfg = tiny_config(tie, 64);
        let w = tiny_weights(&cfg, 2);
        let be = Arc::new(CpuBackend);
        let m = Qwen25Vl::from_weights(cfg.clone(), w.clone(), be.clone()).unwrap();
        let ps = prompts();
        let f = m.forward_train(&ps).unwrap();
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let v = cfg.text.vocab_size;
        let mut c = rand_vec(&mut r, f.logits.numel());
        // Padding rows carry no loss (their logits are meaningless).
        for (bi, &p) in f.pad.iter().enumerate() {
            let t = f.logits.dim(1);
            c[bi * t * v..(bi * t + p) * v].iter_mut().for_each(|x| *x = 0.0);
        }
        let grads = m.backward(&f.tape, &Tensor::from_f32(f.logits.shape(), c.clone()).unwrap()).unwrap();
        let names: Vec<String> = cfg.expected_tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(grads.keys().cloned().collect::<Vec<_>>(), { let mut n = names.clone(); n.sort(); n }, "one gradient per parameter");
        let mut bad = Vec::new();
        for name in &names {
            let t = &w[name];
            // Keep each output's change ~1e-2 whatever the fan-in: eps = 1e-2/√fan_in.
            let fan_in = if t.rank() > 1 { t.numel() / t.dim(0) } else { t.numel() };
            let eps = 1e-2f32 / (fan_in as f32).sqrt();
            let dir: Vec<f32> = (0..t.numel()).map(|_| if r.random::<bool>() { 1.0 } else { -1.0 }).collect();
            let an: f64 = grads[name].as_f32().unwrap().iter().zip(&dir).map(|(g, d)| *g as f64 * *d as f64).sum();
            let shifted = |s: f32| {
                let mut w2: BTreeMap<String, Tensor> = w.clone();
                let vals = t.as_f32().unwrap().iter().zip(&dir).map(|(x, d)| x + s * d).collect();
                w2.insert(name.clone(), Tensor::from_f32(t.shape(), vals).unwrap());
                loss(&Qwen25Vl::from_weights(cfg.clone(), w2, be.clone()).unwrap(), &ps, &c)
            };
            let num = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
            if (num - an).abs() > 1e-2 * an.abs() + 5e-3 {
                bad.push(format!("tie={tie} {name}: numeric {num} vs analytic {an}"));
            }
        }
        assert!(bad.is_empty(), "{bad:#?}");
    }
}

/// Activation recomputation re-runs the same kernels on the same inputs, so gradients are bitwise
/// equal to the stored-activation path, while the tape keeps only each layer's input.
#[test]
fn recomputation_gives_identical_gradients_with_less_saved_memory() {
    let cfg = tiny_config(true, 64);
    let w = tiny_weights(&cfg, 4);
    let mut m = Qwen25Vl::from_weights(cfg.clone(), w, Arc::new(CpuBackend)).unwrap();
    let ps = prompts();
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let full = m.forward_train(&ps).unwrap();
    let c = Tensor::from_f32(full.logits.shape(), rand_vec(&mut r, full.logits.numel())).unwrap();
    let g_full = m.backward(&full.tape, &c).unwrap();
    m.set_recompute(true);
    assert!(m.recompute());
    let re = m.forward_train(&ps).unwrap();
    assert_eq!(re.logits.as_f32().unwrap(), full.logits.as_f32().unwrap(), "forward unchanged");
    // 11 saved tensors per layer become 1 (its input); q/k/v and the MLP ones are the big ones.
    assert!(
        re.tape.saved_bytes() * 4 < full.tape.saved_bytes(),
        "recompute tape {} B vs full {} B",
        re.tape.saved_bytes(),
        full.tape.saved_bytes()
    );
    let g_re = m.backward(&re.tape, &c).unwrap();
    assert_eq!(g_full.len(), g_re.len());
    for (name, g) in &g_full {
        assert_eq!(g.as_f32().unwrap(), g_re[name].as_f32().unwrap(), "{name} differs with recomputation");
    }
}

/// A GRPO batch repeats each prompt (and its image tensor) G times. The vision tower encodes a
/// shared image once; the logits must equal those of a batch whose copies are separate tensors
/// (encoded one by one), and so must every gradient, the tower's included: the copies' feature
/// gradients are summed before the tower's backward instead of after. Mixed in: a prompt with a
/// different image and a text-only prompt.
#[test]
fn shared_images_are_encoded_once_with_the_same_logits_and_gradients() {
    let cfg = tiny_config(true, 64);
    let m = Qwen25Vl::from_weights(cfg.clone(), tiny_weights(&cfg, 6), Arc::new(CpuBackend)).unwrap();
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let base = prompts();
    let other = PromptInput { pixel_values: Some(Tensor::from_f32(&[24, 1176], rand_vec(&mut r, 24 * 1176)).unwrap()), ..base[0].clone() };
    let with = |p: &PromptInput, extra: &[u32]| {
        let mut p = p.clone();
        p.input_ids.extend_from_slice(extra);
        p
    };
    // Clones share the image's storage (what the GRPO trainer builds) ...
    let shared = vec![with(&base[0], &[9]), with(&base[1], &[4]), with(&base[0], &[7, 8]), with(&other, &[5]), with(&base[0], &[10, 11, 12])];
    // ... and deep copies do not.
    let deep: Vec<PromptInput> = shared
        .iter()
        .map(|p| PromptInput { pixel_values: p.pixel_values.as_ref().map(|px| Tensor::from_f32(px.shape(), px.as_f32().unwrap().to_vec()).unwrap()), ..p.clone() })
        .collect();
    let (fs, fd) = (m.forward_train(&shared).unwrap(), m.forward_train(&deep).unwrap());
    // The same features scattered into the same rows: bitwise equal.
    assert_eq!(fs.logits.as_f32().unwrap(), fd.logits.as_f32().unwrap());
    // 2 distinct images × 24 patches vs 4 copies: the shared tape saved less for the tower.
    assert!(fs.tape.saved_bytes() < fd.tape.saved_bytes());
    let c = Tensor::from_f32(fs.logits.shape(), rand_vec(&mut r, fs.logits.numel())).unwrap();
    let (gs, gd) = (m.backward(&fs.tape, &c).unwrap(), m.backward(&fd.tape, &c).unwrap());
    assert_eq!(gs.len(), gd.len());
    for (name, g) in &gd {
        let (a, b) = (gs[name].as_f32().unwrap(), g.as_f32().unwrap());
        // Only the order of f32 sums over the copies differs: 1e-5 of the gradient's scale.
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 1e-5 * scale, "{name}: max |Δ| {err} at scale {scale}");
    }
    assert!(gs.keys().any(|k| k.starts_with("visual.")), "the tower gets gradients");
}

/// A frozen vision encoder: backward stops after the merger (frozen tower) or before the encoder
/// (tower and merger frozen). What it does return is exactly what the full backward returns.
#[test]
fn backward_skips_the_frozen_vision_encoder_and_leaves_the_rest_unchanged() {
    use onevision_model::VisionGrads;
    let cfg = tiny_config(true, 64);
    let m = Qwen25Vl::from_weights(cfg.clone(), tiny_weights(&cfg, 8), Arc::new(CpuBackend)).unwrap();
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    let f = m.forward_train(&prompts()).unwrap();
    let c = Tensor::from_f32(f.logits.shape(), rand_vec(&mut r, f.logits.numel())).unwrap();
    let all = m.backward(&f.tape, &c).unwrap();
    let tower = |k: &str| k.starts_with("visual.blocks.") || k.starts_with("visual.patch_embed.");
    assert!(all.keys().any(|k| tower(k)) && all.keys().any(|k| k.starts_with("visual.merger.")));
    for (mode, kept) in [(VisionGrads::MergerOnly, &(|k: &str| !tower(k)) as &dyn Fn(&str) -> bool), (VisionGrads::None, &|k: &str| !k.starts_with("visual."))] {
        let g = m.backward_with(&f.tape, &c, mode).unwrap();
        let want: Vec<&String> = all.keys().filter(|k| kept(k)).collect();
        assert_eq!(g.keys().collect::<Vec<_>>(), want, "{mode:?}");
        for (k, v) in &g {
            assert_eq!(v.as_f32().unwrap(), all[k].as_f32().unwrap(), "{mode:?}: {k}");
        }
    }
}
