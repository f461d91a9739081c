//! `onevision bench …`: throughput measurements printed as one JSON object per line, in the same
//! shape as benches/*.py print for PyTorch, so the two sides can be joined in docs/performance.md.
//!
//! - `bench cpu --model DIR`: CPU prefill, decode, vision encoder and one SFT training step
//!   (forward + backward + AdamW) on an HF checkpoint, plus the process's peak RSS.
//! - `bench attention|elementwise|layer|sft-step|decode --device cpu|cuda[:N]`: Backend ops, one
//!   decoder layer, the SFT step and decoding on Qwen2.5-VL shapes, the counterparts of
//!   benches/torch_*.py (modules under bench/; docs/cuda.md lists the commands).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

mod harness;
mod kernels;
mod model;

pub use harness::{BenchError, DeviceSpec};

use anyhow::Context;
use clap::{Args as ClapArgs, Subcommand};
use onevision_model::{CpuBackend, DType, PromptInput, Qwen25Vl, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::training::{sft_step, SftExample, StepOptions};
use harness::median;

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// CPU model throughput: prefill, decode, vision, SFT training step (one JSON line each).
    Cpu(CpuArgs),
    /// Attention fwd and fwd+bwd TFLOP/s (text hd128 causal GQA, vision hd80 windows) and decode
    /// attention GB/s; pairs with benches/torch_attention.py.
    Attention(kernels::AttentionArgs),
    /// RMSNorm(+residual), RoPE and SwiGLU GB/s against the measured device copy bandwidth; pairs
    /// with benches/torch_elementwise.py.
    Elementwise(kernels::ElementwiseArgs),
    /// One decoder layer forward + backward, TFLOP/s and MFU; pairs with benches/torch_layer.py.
    Layer(model::LayerArgs),
    /// A full SFT step (forward, loss, backward, AdamW) on 3B/7B text shapes with fewer layers:
    /// tokens/s and MFU.
    SftStep(model::SftStepArgs),
    /// Decoding tokens/s with the KV cache against the memory-bandwidth bound of the weights.
    Decode(model::DecodeArgs),
}

#[derive(Debug, ClapArgs)]
pub struct CpuArgs {
    /// Hugging Face checkpoint directory (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt length for prefill (random token ids, text only).
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Tokens decoded one at a time after the prefill, with the KV cache.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Vision input: an image of `patches × patches` 14-px patches (0 skips the vision bench).
    #[arg(long, default_value_t = 32)]
    pub vision_patches: usize,
    /// Sequence length of the SFT training step (0 skips it).
    #[arg(long, default_value_t = 512)]
    pub train_len: usize,
    /// Timed repetitions (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Only run these parts (prefill, decode, vision, train); default all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Cpu(a) => cpu(a),
        BenchCommand::Attention(a) => kernels::attention(a),
        BenchCommand::Elementwise(a) => kernels::elementwise(a),
        BenchCommand::Layer(a) => model::layer(a),
        BenchCommand::SftStep(a) => model::sft_step_bench(a),
        BenchCommand::Decode(a) => model::decode(a),
    }
}

/// Times `f` `iters` times after one warm-up on the CPU; returns the median seconds.
fn time<F: FnMut() -> anyhow::Result<()>>(iters: usize, f: F) -> anyhow::Result<f64> {
    harness::time(1, iters, f, || Ok(()))
}

/// Peak resident set size of this process (Linux VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn emit(bench: &str, shape: serde_json::Value, secs: f64, tokens: usize, unit: &str) {
    println!(
        "{}",
        json!({"bench": bench, "impl": "onevision-cpu", "shape": shape, "ms": secs * 1e3,
               unit: tokens as f64 / secs, "threads": rayon::current_num_threads(),
               "peak_rss_mb": peak_rss_bytes().map(|b| b as f64 / 1048576.0)})
    );
}

fn cpu(a: CpuArgs) -> anyhow::Result<()> {
    let want = |p: &str| a.only.is_empty() || a.only.iter().any(|o| o == p);
    let backend = Arc::new(CpuBackend::new());
    let model = Qwen25Vl::load(&a.model, backend, DType::F32)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let vocab = model.config.text.vocab_size as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    // Ordinary text ids: stay clear of the special tokens at the top of the vocabulary.
    let top = vocab.saturating_sub(64).max(4);
    let ids = |rng: &mut rand_chacha::ChaCha8Rng, n: usize| (0..n).map(|_| rng.random_range(3..top)).collect::<Vec<u32>>();

    if want("prefill") || want("decode") {
        let prompt = PromptInput { input_ids: ids(&mut rng, a.prompt_len), ..Default::default() };
        if want("prefill") {
            let s = time(a.iters, || {
                model.prefill(std::slice::from_ref(&prompt), 0, false)?;
                Ok(())
            })?;
            emit("prefill", json!({"batch": 1, "prompt": a.prompt_len}), s, a.prompt_len, "tokens_per_s");
        }
        if want("decode") && a.new_tokens > 0 {
            let next = ids(&mut rng, a.new_tokens);
            // Only the token-by-token loop is timed (the prefill before it is not).
            let mut times = Vec::new();
            for rep in 0..=a.iters.max(1) {
                let (pre, mut cache) = model.prefill(std::slice::from_ref(&prompt), a.new_tokens, false)?;
                let start = pre.positions[0].next_position();
                let t0 = Instant::now();
                for (i, tok) in next.iter().enumerate() {
                    model.decode_step(&[*tok], &[start + i as i64], &mut cache)?;
                }
                if rep > 0 {
                    times.push(t0.elapsed().as_secs_f64()); // rep 0 is the warm-up
                }
            }
            emit("decode", json!({"batch": 1, "context": a.prompt_len, "new_tokens": a.new_tokens}), median(times), a.new_tokens, "tokens_per_s");
        }
    }

    if want("vision") && a.vision_patches > 0 {
        let vc = &model.config.vision;
        let p = a.vision_patches - a.vision_patches % vc.spatial_merge_size;
        let n = p * p;
        let dim = vc.patch_dim();
        let px = Tensor::from_f32(&[n, dim], (0..n * dim).map(|_| rng.random_range(-1.0f32..1.0)).collect())?;
        let s = time(a.iters, || {
            model.vision_forward(&px, &[[1, p, p]])?;
            Ok(())
        })?;
        emit("vision", json!({"patches": n, "grid": [1, p, p]}), s, n, "patches_per_s");
    }

    if want("train") && a.train_len > 0 {
        let input = ids(&mut rng, a.train_len);
        let labels: Vec<i64> = input.iter().map(|&t| t as i64).collect();
        let batch = vec![SftExample { input: PromptInput { input_ids: input, ..Default::default() }, labels }];
        let mut trainer = model::bench_trainer(model)?;
        let s = time(a.iters, || {
            let out = sft_step(&trainer.model, &batch, &StepOptions::default())?;
            trainer.apply(out.grads)?;
            Ok(())
        })?;
        emit("sft_step", json!({"batch": 1, "seq": a.train_len, "optimizer": "adamw"}), s, a.train_len, "tokens_per_s");
    }
    Ok(())
}
