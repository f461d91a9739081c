//! Model-level behaviour on a tiny random Qwen2.5-VL: KV-cache decoding, batching with
//! padding, sampling log-probs, stopping, and the bad-input errors.
mod common;
use common::*;
use onevision_model::generate::token_logprob;
use onevision_model::{generate, CpuBackend, ModelError, PromptInput, Qwen25Vl, SamplingParams, Tensor};
use rand::SeedableRng;
use std::sync::Arc;

fn model(tie: bool, max_pos: usize) -> Qwen25Vl {
    let cfg = tiny_config(tie, max_pos);
    let w = tiny_weights(&cfg, 11);
    Qwen25Vl::from_weights(cfg, w, Arc::new(CpuBackend)).unwrap()
}

/// One image of grid 1×4×6 (24 patches → 6 tokens) with vision_start/end around it.
fn image_prompt(seed: u64) -> PromptInput {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut ids = vec![3, 41];
    ids.extend([40; 6]);
    ids.extend([42, 5, 6, 7]);
    PromptInput { input_ids: ids, pixel_values: Some(Tensor::from_f32(&[24, 1176], rand_vec(&mut r, 24 * 1176)).unwrap()), image_grid_thw: vec![[1, 4, 6]] }
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let n = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    n / b.iter().map(|y| y.abs()).fold(1e-30f32, f32::max)
}

/// Incremental decoding must reproduce the full-sequence prefill: same graph, different
/// summation blocking, so f32 rounding only (< 1e-5 of the logit scale).
#[test]
fn kv_cache_decode_matches_full_prefill() {
    for tie in [true, false] {
        let m = model(tie, 64);
        let p = image_prompt(1);
        let cont = [9u32, 17, 23];
        let mut full = p.clone();
        full.input_ids.extend(cont);
        let want = m.forward_logits(&full).unwrap();
        let v = m.config.text.vocab_size;
        let (pre, mut cache) = m.prefill(std::slice::from_ref(&p), cont.len(), false).unwrap();
        let l = p.input_ids.len();
        let wv = want.as_f32().unwrap();
        assert!(rel(pre.logits.as_f32().unwrap(), &wv[(l - 1) * v..l * v]) < 1e-5);
        for (pos, (i, &tok)) in (pre.positions[0].next_position()..).zip(cont.iter().enumerate()) {
            let got = m.decode_step(&[tok], &[pos], &mut cache).unwrap();
            let row = &wv[(l + i) * v..(l + i + 1) * v];
            let e = rel(got.as_f32().unwrap(), row);
            assert!(e < 1e-5, "tie={tie} step {i}: {e}");
        }
    }
}

/// Prompts of different lengths, with and without images, batched with left padding give each
/// prompt's own last-position logits.
#[test]
fn batched_prefill_matches_individual() {
    let m = model(false, 64);
    let prompts = vec![image_prompt(2), PromptInput { input_ids: vec![4, 8, 15], ..Default::default() }, image_prompt(3)];
    let (pre, _) = m.prefill(&prompts, 0, false).unwrap();
    assert_eq!(pre.pad, vec![0, 9, 0]);
    let v = m.config.text.vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        let (one, _) = m.prefill(std::slice::from_ref(p), 0, false).unwrap();
        let e = rel(&pre.logits.as_f32().unwrap()[i * v..(i + 1) * v], one.logits.as_f32().unwrap());
        assert!(e < 1e-5, "prompt {i}: {e}");
    }
}

/// The returned log-probs equal a teacher-forced recomputation over prompt + generated tokens
/// (what the GRPO policy forward does); sampling is reproducible from the seed.
#[test]
fn sampled_logprobs_match_teacher_forcing_and_seed_reproduces() {
    let m = model(true, 64);
    let p = image_prompt(4);
    let params = SamplingParams { max_new_tokens: 6, temperature: 1.3, top_p: 0.9, top_k: 20, repetition_penalty: 1.1, seed: 42, eos_token_ids: Some(vec![]), ..Default::default() };
    let a = generate(&m, std::slice::from_ref(&p), &params).unwrap();
    let b = generate(&m, std::slice::from_ref(&p), &params).unwrap();
    assert_eq!(a, b);
    assert_eq!(a[0].token_ids.len(), 6);
    assert!(!a[0].finished);
    let mut full = p.clone();
    full.input_ids.extend(&a[0].token_ids);
    let logits = m.forward_logits(&full).unwrap();
    let v = m.config.text.vocab_size;
    let l = p.input_ids.len();
    for (i, (&t, &lp)) in a[0].token_ids.iter().zip(&a[0].logprobs).enumerate() {
        let row = &logits.as_f32().unwrap()[(l - 1 + i) * v..(l + i) * v];
        assert!((token_logprob(row, t) - lp).abs() < 1e-4, "step {i}");
    }
    let other = generate(&m, std::slice::from_ref(&p), &SamplingParams { seed: 43, ..params.clone() }).unwrap();
    let more = generate(&m, std::slice::from_ref(&p), &SamplingParams { seed: 44, ..params }).unwrap();
    assert!(other[0].token_ids != a[0].token_ids || more[0].token_ids != a[0].token_ids, "different seeds should differ");
}

#[test]
fn stops_on_eos_and_keeps_it() {
    let m = model(true, 64);
    let p = PromptInput { input_ids: vec![1, 2, 3, 4], ..Default::default() };
    let g = generate(&m, std::slice::from_ref(&p), &SamplingParams { max_new_tokens: 5, eos_token_ids: Some(vec![]), keep_first_logits: true, ..Default::default() }).unwrap();
    let first = g[0].token_ids[0];
    assert_eq!(g[0].first_logits.as_ref().unwrap().len(), m.config.text.vocab_size);
    let g = generate(&m, std::slice::from_ref(&p), &SamplingParams { max_new_tokens: 5, eos_token_ids: Some(vec![first]), ..Default::default() }).unwrap();
    assert_eq!(g[0].token_ids, vec![first]);
    assert!(g[0].finished);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let m = model(true, 16);
    // Image-token count mismatch: 5 pads for a 6-token image.
    let mut p = image_prompt(5);
    p.input_ids.remove(3);
    let e = m.prefill(std::slice::from_ref(&p), 0, false).err().unwrap();
    assert!(matches!(e, ModelError::ImageTokens { tokens: 5, features: 6, .. }), "{e}");
    // Prompt beyond the context (max_position_embeddings 16).
    let long = PromptInput { input_ids: vec![1; 17], ..Default::default() };
    let e = m.prefill(std::slice::from_ref(&long), 0, false).err().unwrap();
    assert!(matches!(e, ModelError::ContextOverflow { prompt: 17, context: 16 }), "{e}");
    // Generation stops at the context end instead of overflowing it.
    let near = PromptInput { input_ids: vec![1; 14], ..Default::default() };
    let g = generate(&m, std::slice::from_ref(&near), &SamplingParams { max_new_tokens: 10, eos_token_ids: Some(vec![]), ..Default::default() }).unwrap();
    assert_eq!(g[0].token_ids.len(), 2);
    // Token outside the vocabulary, grids without pixels, pixels of the wrong width.
    let e = m.prefill(&[PromptInput { input_ids: vec![1, 999], ..Default::default() }], 0, false).err().unwrap();
    assert!(e.to_string().contains("999"), "{e}");
    let mut p = image_prompt(6);
    p.pixel_values = None;
    assert!(matches!(m.prefill(std::slice::from_ref(&p), 0, false), Err(ModelError::Invalid(_))));
    let mut p = image_prompt(6);
    p.pixel_values = Some(Tensor::zeros(&[24, 100]));
    assert!(m.prefill(std::slice::from_ref(&p), 0, false).is_err());
    assert!(m.prefill(&[], 0, false).is_err());
    assert!(generate(&m, std::slice::from_ref(&near), &SamplingParams { top_p: 0.0, ..Default::default() }).is_err());
}

/// named_weights follows expected_tensors; set_weight changes exactly that parameter;
/// save_weights + load round-trips.
#[test]
fn named_weights_set_weight_and_save_roundtrip() {
    let mut m = model(false, 64);
    let names: Vec<(String, Vec<usize>)> = m.named_weights().into_iter().map(|(n, t)| (n, t.shape().to_vec())).collect();
    assert_eq!(names, m.config.expected_tensors());
    let p = PromptInput { input_ids: vec![1, 2, 3], ..Default::default() };
    let before = m.forward_logits(&p).unwrap();
    for (name, shape) in m.config.expected_tensors() {
        let t = m.named_weights().into_iter().find(|(n, _)| *n == name).unwrap().1.clone();
        m.set_weight(&name, &t).unwrap();
        assert!(m.set_weight(&name, &Tensor::zeros(&[shape.iter().product::<usize>() + 1])).is_err());
    }
    assert_eq!(m.forward_logits(&p).unwrap().as_f32().unwrap(), before.as_f32().unwrap());
    m.set_weight("model.norm.weight", &Tensor::zeros(&[32])).unwrap();
    // A zero final norm makes every logit exactly 0.
    assert!(m.forward_logits(&p).unwrap().as_f32().unwrap().iter().all(|&x| x == 0.0));
    assert!(m.set_weight("model.layers.9.mlp.up_proj.weight", &Tensor::zeros(&[48, 32])).is_err());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), tiny_config_json(false, 64)).unwrap();
    m.save_weights(dir.path().join("model.safetensors")).unwrap();
    let back = Qwen25Vl::load(dir.path(), Arc::new(CpuBackend), onevision_model::DType::F32).unwrap();
    for ((n1, a), (n2, b)) in m.named_weights().iter().zip(back.named_weights().iter()) {
        assert_eq!(n1, n2);
        assert_eq!(a.as_f32().unwrap(), b.as_f32().unwrap(), "{n1}");
    }
}

/// A GRPO group shares one prefill: greedy samples equal single-prompt greedy, sampled ones
/// are distinct draws whose log-probs match a teacher-forced recomputation.
#[test]
fn generate_group_replicates_the_prompt_cache() {
    use onevision_model::generate_group;
    let m = model(false, 64);
    let p = image_prompt(8);
    let greedy = SamplingParams { max_new_tokens: 5, eos_token_ids: Some(vec![]), ..Default::default() };
    let single = generate(&m, std::slice::from_ref(&p), &greedy).unwrap();
    let group = generate_group(&m, &p, 3, &greedy).unwrap();
    assert_eq!(group.len(), 3);
    for g in &group {
        assert_eq!(g.token_ids, single[0].token_ids);
    }
    let sampled = SamplingParams { max_new_tokens: 5, temperature: 1.5, seed: 9, eos_token_ids: Some(vec![]), ..Default::default() };
    let group = generate_group(&m, &p, 4, &sampled).unwrap();
    assert!(group.iter().any(|g| g.token_ids != group[0].token_ids), "streams must differ");
    let v = m.config.text.vocab_size;
    let l = p.input_ids.len();
    let mut checked = 0;
    // A sampled image-pad id (40) would make the teacher-forced prompt invalid: skip such rows.
    for g in group.iter().filter(|g| !g.token_ids.contains(&40)) {
        checked += 1;
        let mut full = p.clone();
        full.input_ids.extend(&g.token_ids);
        let logits = m.forward_logits(&full).unwrap();
        for (i, (&t, &lp)) in g.token_ids.iter().zip(&g.logprobs).enumerate() {
            let row = &logits.as_f32().unwrap()[(l - 1 + i) * v..(l + i) * v];
            assert!((token_logprob(row, t) - lp).abs() < 1e-4);
        }
    }
    assert!(checked >= 2, "only {checked} samples checked");
}
