//! The log-probs the sampler records for a GRPO completion must be the ones the trainer
//! recomputes for the same tokens (image prompt, KV-cached decoding vs one full forward):
//! otherwise the policy gradient is taken on a different distribution than the one sampled.

mod runtime_common;

use std::sync::Arc;

use onevision::runtime::grpo::strip_vision_tokens;
use onevision::training::{logprobs_of, Encoder, GrpoSample};
use onevision_data::{Dataset, ReadOptions};
use onevision_model::{generate_group, CpuBackend, DType, Qwen25Vl, SamplingParams};
use runtime_common::Fixture;

#[test]
fn trainer_log_probs_of_sampled_image_completions_equal_the_samplers() {
    let fx = Fixture::new(4, 1);
    let enc = Encoder::from_dir(fx.model()).unwrap();
    let model = Qwen25Vl::load(fx.model(), Arc::new(CpuBackend::new()), DType::F32).unwrap();
    let data = Dataset::open(fx.train(), &ReadOptions::default()).unwrap();
    let mut batch = Vec::new();
    let mut sampled = Vec::new();
    for i in 0..data.len() {
        let prompt = enc.encode_prompt(&data.get(i).unwrap()).unwrap();
        assert!(prompt.pixel_values.is_some(), "the fixture's prompts carry an image");
        let params = SamplingParams { max_new_tokens: 20, temperature: 1.0, seed: 11 + i as u64, ..Default::default() };
        for mut g in generate_group(&model, &prompt, 4, &params).unwrap() {
            // What the GRPO loop trains on: the completion cut before any vision token id.
            strip_vision_tokens(&model, &mut g);
            let mut input = prompt.clone();
            let prompt_len = input.input_ids.len();
            input.input_ids.extend_from_slice(&g.token_ids);
            batch.push(GrpoSample { input, prompt_len, old_logp: None, ref_logp: None, advantage: 1.0 });
            sampled.push(g.logprobs);
        }
    }
    assert!(sampled.iter().map(Vec::len).sum::<usize>() >= 100, "too few sampled tokens to compare");
    let recomputed = logprobs_of(&model, &batch, 1.0).unwrap();
    for (i, (a, b)) in recomputed.iter().zip(&sampled).enumerate() {
        assert_eq!(a.len(), b.len(), "sample {i}");
        for (t, (x, y)) in a.iter().zip(b).enumerate() {
            // f32 forward passes that differ only in summation order (cached decode vs one
            // padded batch): 1e-3 nats is far above that and far below a real mismatch.
            assert!((x - y).abs() < 1e-3, "sample {i} token {t}: trainer {x} vs sampler {y}");
        }
    }
}
