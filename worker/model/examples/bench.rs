//! CPU prefill/decode throughput on a small random Qwen2.5-VL (text 512 × 8 layers,
//! vision 256 × 4). Usage: cargo run --release -p onevision-model --example bench -- [PROMPT] [NEW] [THREADS]
use onevision_model::{CpuBackend, PromptInput, Qwen25Vl, Qwen25VlConfig, Tensor};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Instant;

const CONFIG: &str = r#"{"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
  "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000, "rms_norm_eps": 1e-6,
  "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": true,
  "eos_token_id": 2, "image_token_id": 31990, "vision_start_token_id": 31991, "vision_end_token_id": 31992,
  "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
  "vision_config": {"depth": 4, "hidden_size": 256, "intermediate_size": 688, "num_heads": 4, "in_chans": 3,
    "out_hidden_size": 512, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "window_size": 112, "fullatt_block_indexes": [3]}}"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let prompt_len = args.first().copied().unwrap_or(512);
    let new_tokens = args.get(1).copied().unwrap_or(64);
    if let Some(&t) = args.get(2) {
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global()?;
    }
    let cfg = Qwen25VlConfig::from_json_str(CONFIG, None, "bench")?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let weights = cfg
        .expected_tensors()
        .into_iter()
        .map(|(n, s)| {
            let numel: usize = s.iter().product();
            let v = (0..numel).map(|_| if n.contains("norm") || n.contains("ln_q") { 1.0 } else { rng.random_range(-0.05f32..0.05) }).collect();
            Ok((n, Tensor::from_f32(&s, v)?))
        })
        .collect::<Result<_, onevision_model::ModelError>>()?;
    let model = Qwen25Vl::from_weights(cfg, weights, Arc::new(CpuBackend))?;
    let ids: Vec<u32> = (0..prompt_len).map(|_| rng.random_range(3..31000)).collect();
    let prompt = PromptInput { input_ids: ids, ..Default::default() };
    // Warm-up (thread pool, page faults).
    model.prefill(std::slice::from_ref(&prompt), 0, false)?;
    let t0 = Instant::now();
    let (pre, mut cache) = model.prefill(std::slice::from_ref(&prompt), new_tokens, false)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for (pos, i) in (pre.positions[0].next_position()..).zip(0..new_tokens) {
        model.decode_step(&[(i as u32 * 7 + 5) % 31000], &[pos], &mut cache)?;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    // Vision: one 448×448 image → 32×32 patches = 1024 patches, 256 tokens.
    let grid = [1usize, 32, 32];
    let px = Tensor::from_f32(&[1024, 1176], (0..1024 * 1176).map(|_| rng.random_range(-1.0f32..1.0)).collect())?;
    model.vision_forward(&px, &[grid])?;
    let t2 = Instant::now();
    model.vision_forward(&px, &[grid])?;
    let vision_s = t2.elapsed().as_secs_f64();
    println!(
        "threads {} | prefill {prompt_len} tok: {:.1} ms, {:.0} tok/s | decode {new_tokens} tok: {:.2} ms/tok, {:.1} tok/s | vision 1024 patches: {:.1} ms, {:.0} patches/s",
        rayon::current_num_threads(),
        prefill_s * 1e3,
        prompt_len as f64 / prefill_s,
        decode_s * 1e3 / new_tokens as f64,
        new_tokens as f64 / decode_s,
        vision_s * 1e3,
        1024.0 / vision_s
    );
    Ok(())
}
