//! Continuous batching (`BatchDecoder`): groups of different prompt lengths, with and without
//! images, joining a running batch and leaving it when done, must give each group what it gets
//! decoded alone, and log-probs a teacher-forced forward reproduces.
mod common;
use common::*;
use onevision_model::generate::{token_logprob, BatchDecoder, GroupJob};
use onevision_model::{generate_group, CpuBackend, Generation, PromptInput, Qwen25Vl, SamplingParams, Tensor};
use rand::SeedableRng;
use std::sync::Arc;

fn model() -> Qwen25Vl {
    let cfg = tiny_config(false, 96);
    let w = tiny_weights(&cfg, 5);
    Qwen25Vl::from_weights(cfg, w, Arc::new(CpuBackend)).unwrap()
}

/// One image of grid 1×4×6 (6 tokens) between vision start/end, then `tail` text ids.
fn image_prompt(seed: u64, tail: &[u32]) -> PromptInput {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut ids = vec![3, 41];
    ids.extend([40; 6]);
    ids.push(42);
    ids.extend(tail);
    PromptInput { input_ids: ids, pixel_values: Some(Tensor::from_f32(&[24, 1176], rand_vec(&mut r, 24 * 1176)).unwrap()), image_grid_thw: vec![[1, 4, 6]] }
}

fn text_prompt(ids: &[u32]) -> PromptInput {
    PromptInput { input_ids: ids.to_vec(), ..Default::default() }
}

/// Runs the groups through one decoder: group `i` joins after `join_at[i]` steps (so groups
/// join a batch that is mid-way through other groups, and leave it at different times).
fn run_staggered(m: &Qwen25Vl, prompts: &[PromptInput], n: &[usize], params: &[SamplingParams], join_at: &[usize]) -> Vec<Vec<Generation>> {
    let mut dec = BatchDecoder::new(m);
    let mut out: Vec<Option<Vec<Generation>>> = vec![None; prompts.len()];
    let mut step = 0;
    loop {
        let jobs: Vec<GroupJob<'_>> = (0..prompts.len())
            .filter(|&i| join_at[i] == step)
            .map(|i| GroupJob { tag: i as u64, prompt: &prompts[i], n: n[i], params: &params[i], first_stream: 0 })
            .collect();
        for f in dec.add_groups(&jobs).unwrap() {
            out[f.tag as usize] = Some(f.generations);
        }
        if dec.is_idle() && join_at.iter().all(|&j| j <= step) {
            break;
        }
        for f in dec.step().unwrap() {
            out[f.tag as usize] = Some(f.generations);
        }
        step += 1;
    }
    out.into_iter().map(|g| g.expect("every group finished")).collect()
}

fn prompts() -> Vec<PromptInput> {
    vec![
        image_prompt(1, &[5, 6, 7]),
        text_prompt(&[4, 8, 15, 16]),
        image_prompt(2, &[9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]),
        text_prompt(&[30, 31]),
    ]
}

/// Greedy: every group, decoded in a shared batch it joined mid-way, equals the group decoded
/// alone (`generate_group`), tokens exactly and log-probs to f32 rounding.
#[test]
fn staggered_groups_equal_groups_decoded_alone_greedy() {
    let m = model();
    let ps = prompts();
    // Different budgets and eos ids make rows leave at different steps (and trigger compaction).
    let params: Vec<SamplingParams> = (0..4)
        .map(|i| SamplingParams { max_new_tokens: 6 + 3 * i, eos_token_ids: Some(vec![]), ..Default::default() })
        .collect();
    let n = [2, 3, 1, 2];
    let got = run_staggered(&m, &ps, &n, &params, &[0, 0, 2, 5]);
    for i in 0..4 {
        let want = generate_group(&m, &ps[i], n[i], &params[i]).unwrap();
        assert_eq!(got[i].len(), n[i]);
        for (g, w) in got[i].iter().zip(&want) {
            assert_eq!(g.token_ids, w.token_ids, "group {i}");
            assert_eq!(g.token_ids.len(), params[i].max_new_tokens);
            // Same math, batched products of different row counts: f32 rounding only.
            for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
                assert!((a - b).abs() < 1e-5, "group {i}: {a} vs {b}");
            }
        }
    }
}

/// Sampling: reproducible per (seed, stream) wherever the group runs, and the returned
/// log-probs equal log_softmax of a teacher-forced forward over prompt + completion.
#[test]
fn staggered_sampled_groups_reproduce_and_match_teacher_forcing() {
    let m = model();
    let ps = prompts();
    let params: Vec<SamplingParams> = (0..4)
        .map(|i| SamplingParams {
            max_new_tokens: 8,
            temperature: if i == 1 { 0.7 } else { 1.0 },
            top_k: if i == 3 { 5 } else { 0 },
            seed: 100 + i as u64,
            eos_token_ids: Some(vec![7]),
            ..Default::default()
        })
        .collect();
    let n = [3, 2, 2, 2];
    let got = run_staggered(&m, &ps, &n, &params, &[0, 1, 1, 4]);
    let v = m.config.text.vocab_size;
    let mut checked = 0;
    for i in 0..4 {
        let alone = generate_group(&m, &ps[i], n[i], &params[i]).unwrap();
        for (g, w) in got[i].iter().zip(&alone) {
            assert_eq!(g.token_ids, w.token_ids, "group {i}: sampling must not depend on the batch");
            assert_eq!(g.finished, g.token_ids.last() == Some(&7));
        }
        assert!(got[i].iter().any(|g| g.token_ids != got[i][0].token_ids) || n[i] == 1, "group {i}: streams must differ");
        // Teacher forcing: one full-sequence prefill over prompt + completion. Rows that
        // sampled an image-pad id (40) would be invalid prompts: skip them.
        for g in got[i].iter().filter(|g| !g.token_ids.contains(&40)) {
            let mut full = ps[i].clone();
            full.input_ids.extend(&g.token_ids);
            let logits = m.forward_logits(&full).unwrap();
            let l = ps[i].input_ids.len();
            for (k, (&t, &lp)) in g.token_ids.iter().zip(&g.logprobs).enumerate() {
                let row = &logits.as_f32().unwrap()[(l - 1 + k) * v..(l + k) * v];
                // Prefill vs KV-cache decode differ in summation order only: the logits agree
                // to ~1e-6 relative, so log-probs of O(1-10) magnitude agree well within 1e-4.
                assert!((token_logprob(row, t) - lp).abs() < 1e-4, "group {i} step {k}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 40, "only {checked} tokens checked");
}

/// A group without room to generate, or with no samples, comes back at once; an invalid
/// group leaves the running batch untouched.
#[test]
fn empty_groups_finish_at_once_and_errors_leave_the_batch_intact() {
    let m = model();
    let ps = prompts();
    let p = SamplingParams { max_new_tokens: 4, eos_token_ids: Some(vec![]), ..Default::default() };
    let mut dec = BatchDecoder::new(&m);
    assert!(dec.add_groups(&[GroupJob { tag: 0, prompt: &ps[1], n: 2, params: &p, first_stream: 0 }]).unwrap().is_empty());
    dec.step().unwrap();
    let done = dec.add_groups(&[GroupJob { tag: 1, prompt: &ps[3], n: 0, params: &p, first_stream: 0 }]).unwrap();
    assert_eq!((done.len(), done[0].tag, done[0].generations.len()), (1, 1, 0));
    let bad = PromptInput { input_ids: vec![1, 999], ..Default::default() };
    assert!(dec.add_groups(&[GroupJob { tag: 2, prompt: &bad, n: 2, params: &p, first_stream: 0 }]).is_err());
    let bad_params = SamplingParams { top_p: 0.0, ..p.clone() };
    assert!(dec.add_groups(&[GroupJob { tag: 3, prompt: &ps[3], n: 2, params: &bad_params, first_stream: 0 }]).is_err());
    assert_eq!(dec.live_rows(), 2);
    let mut finished = vec![];
    while !dec.is_idle() {
        finished.extend(dec.step().unwrap());
    }
    assert_eq!(finished.len(), 1);
    let want = generate_group(&m, &ps[1], 2, &p).unwrap();
    assert_eq!(finished[0].generations.iter().map(|g| &g.token_ids).collect::<Vec<_>>(), want.iter().map(|g| &g.token_ids).collect::<Vec<_>>());
}
