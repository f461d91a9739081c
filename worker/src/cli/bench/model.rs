//! `bench layer`, `bench sft-step` and `bench decode`: the model's own code paths on an in-memory
//! Qwen2.5-VL with random weights (text shapes of 3B/7B, fewer layers on request, a minimal vision
//! tower that these benchmarks never run).

use std::collections::BTreeMap;

use clap::Args as ClapArgs;
use onevision_model::flops::{decoder_layers_flops, lm_head_flops};
use onevision_model::rope::mrope_tables;
use onevision_model::{AttnMask, AttnSpec, PromptInput, Qwen25Vl, Qwen25VlConfig, Tensor};
use onevision_synth::init::{config_json, tensor_specs, Init, InitOptions};
use onevision_train::{AdamWConfig, Schedule, ScheduleKind, Warmup};
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::harness::{emit, median, random_host, BenchDevice, BenchError, Common, ModelArgs, TextDims, Work};
use crate::training::{sft_step, Freeze, SftExample, StepOptions, Trainer, TrainerConfig};

/// A random Qwen2.5-VL with the text dimensions `m`, `layers` decoder layers and `vocab` rows, its
/// weights in the device's weight dtype on the device. Normal-init tensors are uniform with the
/// std of transformers' init (0.02); norms are ones and biases zeros, as a fresh model has.
pub fn random_model(dev: &BenchDevice, m: &TextDims, layers: usize, vocab: usize) -> anyhow::Result<Qwen25Vl> {
    if m.hidden != m.heads * m.head_dim || !m.head_dim.is_multiple_of(8) {
        return Err(BenchError::Shape(format!(
            "hidden {} must equal heads {} × head_dim {} (a multiple of 8) for a whole model",
            m.hidden, m.heads, m.head_dim
        ))
        .into());
    }
    let o = InitOptions {
        vocab_size: vocab,
        hidden_size: m.hidden,
        num_hidden_layers: layers,
        num_attention_heads: m.heads,
        num_key_value_heads: m.kv_heads,
        intermediate_size: m.inter,
        vision_hidden_size: 16,
        vision_depth: 1,
        vision_num_heads: 1,
        vision_intermediate_size: 16,
        max_position_embeddings: 128_000,
        tie_word_embeddings: m.tied,
        ..Default::default()
    };
    let cfg = config_json(&o, vocab, &[0]).to_string();
    let config = Qwen25VlConfig::from_json_str(&cfg, None, "<bench model>")?;
    let uniform = 0.02 * 3f32.sqrt();
    let mut w = BTreeMap::new();
    for (i, (name, shape, init)) in tensor_specs(&o, vocab).into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let t = match init {
            Init::Normal => random_host(&shape, uniform, i as u64)?,
            Init::Ones => Tensor::from_f32(&shape, vec![1.0; n])?,
            Init::Zeros => Tensor::from_f32(&shape, vec![0.0; n])?,
        };
        w.insert(name, if t.dtype() == dev.weights { t } else { t.to_dtype(dev.weights)? });
    }
    Ok(Qwen25Vl::from_weights(config, w, dev.backend.clone())?)
}

/// Random text token ids clear of the special tokens (which the synthetic tokenizer puts first).
fn random_ids(model: &Qwen25Vl, n: usize, seed: u64) -> Vec<u32> {
    let c = &model.config;
    let lo = [c.image_token_id, c.vision_start_token_id].into_iter().chain(c.video_token_id).chain(c.vision_end_token_id).max().unwrap_or(0) + 1;
    let hi = (c.text.vocab_size as u32).max(lo + 1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// The optimizer setup both `bench cpu` and `bench sft-step` time: AdamW, constant LR, clip at 1.
pub fn bench_trainer(model: Qwen25Vl) -> anyhow::Result<Trainer> {
    let schedule = Schedule::new(ScheduleKind::Constant, 1e-5, 1_000_000, Warmup::Steps(0))?;
    let cfg = TrainerConfig { adamw: AdamWConfig::default(), schedule, max_grad_norm: Some(1.0), freeze: Freeze::default() };
    Ok(Trainer::new(model, cfg)?)
}

#[derive(Debug, ClapArgs)]
pub struct LayerArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tokens of the one causal sequence.
    #[arg(long, default_value_t = 8192)]
    pub tokens: usize,
}

/// One decoder layer forward + backward through the model's own layer code
/// (`Qwen25Vl::text_layer_forward` / `text_layer_backward`), with M-RoPE applied.
pub fn layer(a: LayerArgs) -> anyhow::Result<()> {
    let (m, label) = a.model.resolve()?;
    if a.tokens == 0 {
        return Err(BenchError::Shape("--tokens must be positive".into()).into());
    }
    let dev = BenchDevice::open(&a.common)?;
    // The vocabulary is irrelevant to one layer: keep the embedding small.
    let model = random_model(&dev, &m, 1, 256)?;
    let be = dev.backend.as_ref();
    let t = a.tokens;
    let tc = &model.config.text;
    let pos: Vec<[i64; 3]> = (0..t as i64).map(|i| [i; 3]).collect();
    let (cos, sin) = mrope_tables(&pos, tc.head_dim, tc.rope_theta, &tc.mrope_section)?;
    let cos = be.to_device(&Tensor::from_f32(&[t, tc.head_dim], cos)?)?;
    let sin = be.to_device(&Tensor::from_f32(&[t, tc.head_dim], sin)?)?;
    let spec = AttnSpec { scale: 1.0 / (tc.head_dim as f32).sqrt(), mask: AttnMask::Causal { q_offset: 0, key_start: vec![] }, kv_len: t };
    let x = dev.random(&[t, m.hidden], dev.act, 1.0, 11)?;
    let dy = dev.random(&[t, m.hidden], dev.act, 1.0, 12)?;
    let s = dev.time(|| {
        let (_, acts) = model.text_layer_forward(0, x.clone(), &cos, &sin, &spec, 1, t)?;
        let mut grads = BTreeMap::new();
        model.text_layer_backward(0, &acts, &dy, &cos, &sin, &spec, 1, t, &mut grads)?;
        Ok(())
    })?;
    emit(&dev, &format!("decoder_layer_fwd_bwd/{label}"), json!({"tokens": t}), s, Some(Work::Flops(decoder_layers_flops(&m, 1, &[t]))),
         json!({"note": "includes the M-RoPE rotation, which torch_layer.py leaves out"}));
    Ok(())
}

#[derive(Debug, ClapArgs)]
pub struct SftStepArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Decoder layers (the 3B model has 36; fewer fit one GPU's memory with the optimizer state).
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 4096)]
    pub seq: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
}

/// The product's SFT step (`training::sft_step` + `Trainer::apply`: forward, cross-entropy,
/// backward, clip, AdamW on fp32 master weights), text-only, every token labelled. `ms` is the
/// whole step; the phases are timed separately (forward alone, forward + loss + backward, the
/// optimizer alone), each its own median, so they need not add up exactly.
pub fn sft_step_bench(a: SftStepArgs) -> anyhow::Result<()> {
    let (m, label) = a.model.resolve()?;
    if a.layers == 0 || a.seq < 2 || a.batch == 0 {
        return Err(BenchError::Shape("--layers and --batch must be positive and --seq at least 2".into()).into());
    }
    let dev = BenchDevice::open(&a.common)?;
    let model = random_model(&dev, &m, a.layers, m.vocab)?;
    let params: usize = model.named_weights().iter().filter(|(n, _)| !n.starts_with("visual.")).map(|(_, t)| t.numel()).sum();
    let batch: Vec<SftExample> = (0..a.batch)
        .map(|i| {
            let ids = random_ids(&model, a.seq, 100 + i as u64);
            let labels = ids.iter().map(|&t| t as i64).collect();
            SftExample { input: PromptInput { input_ids: ids, ..Default::default() }, labels }
        })
        .collect();
    let prompts: Vec<PromptInput> = batch.iter().map(|e| e.input.clone()).collect();
    let mut trainer = bench_trainer(model)?;
    let opts = StepOptions::default();
    let forward = dev.time(|| {
        trainer.model.forward_train(&prompts)?;
        Ok(())
    })?;
    let step = dev.time(|| {
        let out = sft_step(&trainer.model, &batch, &opts)?;
        trainer.apply(out.grads)?;
        Ok(())
    })?;
    let fwd_loss_bwd = dev.time(|| {
        sft_step(&trainer.model, &batch, &opts)?;
        Ok(())
    })?;
    let grads = sft_step(&trainer.model, &batch, &opts)?.grads;
    let optimizer = dev.time(|| {
        trainer.apply(grads.clone())?;
        Ok(())
    })?;
    let tokens = a.batch * a.seq;
    emit(&dev, &format!("sft_step/{label}"), json!({"batch": a.batch, "seq": a.seq, "layers": a.layers}), step,
         Some(Work::Flops(decoder_layers_flops(&m, a.layers, &vec![a.seq; a.batch]) + lm_head_flops(&m, a.batch * a.seq))),
         json!({"tokens_per_s": tokens as f64 / step, "text_params": params, "forward_ms": forward * 1e3,
                "fwd_loss_bwd_ms": fwd_loss_bwd * 1e3, "optimizer_ms": optimizer * 1e3}));
    Ok(())
}

#[derive(Debug, ClapArgs)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Decoder layers (default: all of the model's).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Prompt tokens prefilled before decoding (not timed).
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// Tokens decoded one step at a time with the KV cache (timed).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Sequences decoded together.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8])]
    pub batch: Vec<usize>,
    /// Memory bandwidth for the bound in GB/s (default: the measured device copy bandwidth).
    #[arg(long)]
    pub hbm_gbps: Option<f64>,
    /// Size of the copy that measures the bandwidth, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub copy_mib: usize,
}

/// Decode tokens/s against the memory bound: every step reads each text weight once (the
/// embedding only as the tied head) plus the KV cache; bound = batch / (bytes / bandwidth).
pub fn decode(a: DecodeArgs) -> anyhow::Result<()> {
    let (m, label) = a.model.resolve()?;
    let layers = a.layers.unwrap_or(m.layers);
    if layers == 0 || a.context == 0 || a.new_tokens == 0 || a.batch.contains(&0) || a.copy_mib == 0 {
        return Err(BenchError::Shape("--layers, --context, --new-tokens, --batch and --copy-mib must be positive".into()).into());
    }
    let dev = BenchDevice::open(&a.common)?;
    let (bw, bw_source) = match a.hbm_gbps {
        Some(g) => (g, "--hbm-gbps"),
        None => (dev.copy_gbps(a.copy_mib << 20)?, "measured copy"),
    };
    let model = random_model(&dev, &m, layers, m.vocab)?;
    let weight_bytes: usize = model
        .named_weights()
        .iter()
        .filter(|(n, _)| !n.starts_with("visual.") && (m.tied || n != "model.embed_tokens.weight"))
        .map(|(_, t)| t.numel() * t.dtype().size_in_bytes())
        .sum();
    let (iters, warmup) = (dev.timing.1, dev.timing.0.max(1));
    for &b in &a.batch {
        let prompts: Vec<PromptInput> =
            (0..b).map(|i| PromptInput { input_ids: random_ids(&model, a.context, 200 + i as u64), ..Default::default() }).collect();
        let next = random_ids(&model, a.new_tokens * b, 300);
        let mut times = Vec::with_capacity(iters);
        let mut kv_elem = 0;
        for rep in 0..warmup + iters {
            let (pre, mut cache) = model.prefill(&prompts, a.new_tokens, false)?;
            kv_elem = cache.k.first().map_or(0, |k| k.dtype().size_in_bytes());
            let start: Vec<i64> = pre.positions.iter().map(|p| p.next_position()).collect();
            dev.sync()?;
            let t0 = std::time::Instant::now();
            for i in 0..a.new_tokens {
                let pos: Vec<i64> = start.iter().map(|s| s + i as i64).collect();
                model.decode_step(&next[i * b..(i + 1) * b], &pos, &mut cache)?;
            }
            dev.sync()?;
            if rep >= warmup {
                times.push(t0.elapsed().as_secs_f64() / a.new_tokens as f64);
            }
        }
        let step = median(times);
        // Keys and values of every layer, at the mean cache length over the decoded steps.
        let mean_len = a.context as f64 + (a.new_tokens as f64 - 1.0) / 2.0 + 1.0;
        let kv_bytes = 2.0 * (layers * b * m.kv_heads * m.head_dim * kv_elem) as f64 * mean_len;
        let bytes = weight_bytes as f64 + kv_bytes;
        let bound = b as f64 * bw * 1e9 / bytes;
        let tps = b as f64 / step;
        emit(&dev, &format!("decode/{label}"), json!({"batch": b, "context": a.context, "new_tokens": a.new_tokens, "layers": layers}),
             step, Some(Work::Bytes(bytes)),
             json!({"tokens_per_s": tps, "bound_tokens_per_s": bound, "frac_of_bound": tps / bound, "hbm_gbps": bw,
                    "hbm_source": bw_source, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes}));
    }
    Ok(())
}
