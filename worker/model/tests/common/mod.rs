//! Shared helpers: a tiny random Qwen2.5-VL (config text + seeded weights).
#![allow(dead_code)]
use onevision_model::{Qwen25VlConfig, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

pub fn tiny_config_json(tie: bool, max_pos: usize) -> String {
    format!(
        r#"{{"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 2, "vocab_size": 50, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
  "max_position_embeddings": {max_pos}, "tie_word_embeddings": {tie}, "eos_token_id": 2,
  "image_token_id": 40, "vision_start_token_id": 41, "vision_end_token_id": 42, "video_token_id": 43,
  "rope_scaling": {{"type": "mrope", "mrope_section": [1, 1, 2]}},
  "vision_config": {{"depth": 2, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2, "in_chans": 3,
    "out_hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "window_size": 56, "fullatt_block_indexes": [1]}}}}"#
    )
}

pub fn tiny_config(tie: bool, max_pos: usize) -> Qwen25VlConfig {
    Qwen25VlConfig::from_json_str(&tiny_config_json(tie, max_pos), None, "tiny").unwrap()
}

/// Seeded weights: norms near 1, everything else uniform in ±0.3 (large enough that every
/// op changes the output visibly).
pub fn tiny_weights(cfg: &Qwen25VlConfig, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    cfg.expected_tensors()
        .into_iter()
        .map(|(n, s)| {
            let numel: usize = s.iter().product();
            let norm = n.contains("norm") || n.contains("ln_q");
            let v = (0..numel).map(|_| if norm { 1.0 + rng.random_range(-0.2..0.2) } else { rng.random_range(-0.3f32..0.3) }).collect();
            (n, Tensor::from_f32(&s, v).unwrap())
        })
        .collect()
}

pub fn rand_vec(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}
