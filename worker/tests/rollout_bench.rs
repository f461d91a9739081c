//! Rollout throughput benchmark (ignored by default; docs/performance.md "Rollout generation
//! (CPU)"): a small random Qwen2.5-VL is written to `$ROLLOUT_BENCH_DIR` (default
//! /tmp/rollout-bench), then a real `onevision rollout` process generates `$ROLLOUT_BENCH_GROUPS` prompt groups of
//! G samples through the `RolloutPool`, `$ROLLOUT_BENCH_BATCH_GROUPS` groups (default 4) per
//! decode batch (the worker's capacity is that many groups' sequences), and the weights are
//! synced to it. Prints tokens/s and the sync time; `worker/tests/rollout_bench_hf.py` runs
//! transformers `generate` on the same checkpoint with the same batches, and
//! `benches/rollout_vs_hf.py` interleaves the two.
//!
//! ```text
//! cargo test --release -p onevision-worker --test rollout_bench -- --ignored --nocapture
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use onevision::rollout::{tensors_from_f32, GroupRequest, PoolConfig, RolloutPool, Sampling, WorkerSource};
use onevision_model::Tensor;
use rand::{Rng, SeedableRng};

const G: u32 = 8;
const PROMPT: usize = 64;
const NEW_TOKENS: u32 = 128;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Prompt groups per measured run (`$ROLLOUT_BENCH_GROUPS`, default 8).
fn group_count() -> usize {
    env_usize("ROLLOUT_BENCH_GROUPS", 8).max(1)
}

/// HF-loadable config: text hidden 256, 4 layers, 8 heads / 2 kv heads, vocab 2048.
fn config_json() -> String {
    r#"{"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
  "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
  "num_key_value_heads": 2, "vocab_size": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
  "max_position_embeddings": 2048, "max_window_layers": 4, "sliding_window": 2048, "use_sliding_window": false,
  "tie_word_embeddings": true, "torch_dtype": "float32", "hidden_act": "silu", "attention_dropout": 0.0,
  "bos_token_id": 2040, "eos_token_id": 2041, "pad_token_id": 2042,
  "image_token_id": 2044, "vision_start_token_id": 2045, "vision_end_token_id": 2046, "video_token_id": 2047,
  "vision_token_id": 2043, "use_cache": true, "initializer_range": 0.02,
  "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
  "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "in_chans": 3,
    "out_hidden_size": 256, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
    "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 2,
    "hidden_act": "silu"}}"#
        .to_string()
}

fn weights(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let cfg = onevision_model::Qwen25VlConfig::from_json_str(&config_json(), None, "bench").unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    cfg.expected_tensors()
        .into_iter()
        .map(|(n, s)| {
            let numel: usize = s.iter().product();
            let norm = n.contains("norm") || n.contains("ln_q");
            let v = (0..numel).map(|_| if norm { 1.0 } else { rng.random_range(-0.05f32..0.05) }).collect();
            (n, s, v)
        })
        .collect()
}

fn write_model(dir: &Path, batch_groups: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json()).unwrap();
    let tensors: Vec<(String, Tensor)> =
        weights(1).into_iter().map(|(n, s, v)| (n, Tensor::from_f32(&s, v).unwrap())).collect();
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    onevision_model::save_safetensors(dir.join("model.safetensors"), &refs).unwrap();
    // The prompts both benchmarks use.
    let prompts: Vec<Vec<u32>> = (0..group_count())
        .map(|i| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
            (0..PROMPT).map(|_| rng.random_range(0u32..2040)).collect()
        })
        .collect();
    std::fs::write(
        dir.join("bench.json"),
        serde_json::json!({"prompts": prompts, "group_size": G, "max_new_tokens": NEW_TOKENS, "eos": 2041, "batch_groups": batch_groups}).to_string(),
    )
    .unwrap();
    dir.to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture (docs/performance.md)"]
async fn rollout_generation_throughput_and_weight_sync() {
    let dir = PathBuf::from(std::env::var("ROLLOUT_BENCH_DIR").unwrap_or_else(|_| "/tmp/rollout-bench".into()));
    let batch_groups = env_usize("ROLLOUT_BENCH_BATCH_GROUPS", 4).clamp(1, group_count());
    let model = write_model(&dir, batch_groups);
    let capacity = (batch_groups as u32 * G).to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_onevision"))
        .arg("rollout")
        .arg("--model")
        .arg(&model)
        .args(["--listen", "127.0.0.1:0", "--worker-id", "bench", "--capacity", &capacity])
        .env_remove("ONEVISION_JOB_SPEC")
        .env_remove("ONEVISION_COORDINATOR")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let l = lines.next().expect("worker exited").unwrap();
        if let Some(a) = l.split(" listening on ").nth(1) {
            break a.trim().to_string();
        }
    };
    let pool = RolloutPool::new(WorkerSource::Static(vec![addr]), PoolConfig::default());
    let bench: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json")).unwrap()).unwrap();
    let groups: Vec<GroupRequest> = bench["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, p)| GroupRequest {
            prompt_token_ids: p.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
            images: vec![],
            group_size: G,
            seed: i as u64,
        })
        .collect();
    let s = Sampling { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: NEW_TOKENS, stop_token_ids: vec![2041] };
    // Warm-up (connection, first-touch allocations).
    pool.generate(groups[..1].to_vec(), &Sampling { max_new_tokens: 4, ..s.clone() }).await.unwrap();
    let reps = env_usize("ROLLOUT_BENCH_REPS", 3);
    let mut best = f64::INFINITY;
    let mut tokens = 0usize;
    for _ in 0..reps {
        let t = Instant::now();
        let r = pool.generate(groups.clone(), &s).await.unwrap();
        let secs = t.elapsed().as_secs_f64();
        tokens = r.iter().flat_map(|g| &g.completions).map(|c| c.token_ids.len()).sum();
        best = best.min(secs);
        println!("rollout: {tokens} tokens in {secs:.3} s = {:.1} tokens/s", tokens as f64 / secs);
    }
    println!(
        "RESULT onevision rollout worker: groups={} G={G} batch={} sequences prompt={PROMPT} new={NEW_TOKENS}: {tokens} tokens, best {best:.3} s, {:.1} tokens/s",
        group_count(),
        batch_groups * G as usize,
        tokens as f64 / best
    );

    // Weight sync: the whole model, versions 1..=reps.
    let mut sync_best = f64::INFINITY;
    let mut bytes = 0;
    for v in 1..=reps as u64 {
        let stats = pool.sync_weights(v, tensors_from_f32(weights(10 + v))).await.unwrap();
        assert_eq!(stats.workers_updated, 1, "{stats:?}");
        bytes = stats.bytes;
        sync_best = sync_best.min(stats.seconds);
    }
    println!(
        "RESULT weight sync: {:.1} MB in {sync_best:.3} s = {:.0} MB/s (1 worker, loopback)",
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / sync_best
    );
    let _ = child.kill();
    let _ = child.wait();
}
