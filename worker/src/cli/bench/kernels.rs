//! `bench attention` and `bench elementwise`: single Backend ops on Qwen2.5-VL shapes, the
//! counterparts of benches/torch_attention.py and benches/torch_elementwise.py (same bench names,
//! shape objects and FLOP/byte formulas).

use clap::Args as ClapArgs;
use onevision_model::{AttnMask, AttnSpec, DType};
use serde_json::json;

use super::harness::{attn_flops, copy_gbps, emit, segment_attn_flops, BenchDevice, BenchError, Common, ModelArgs, Work, VISION_HEADS, VISION_HEAD_DIM};

#[derive(Debug, ClapArgs)]
pub struct AttentionArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text sequence length (causal, GQA).
    #[arg(long, default_value_t = 4096)]
    pub seq: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Vision patches in one image (0 skips the vision cases).
    #[arg(long, default_value_t = 4096)]
    pub vision_patches: usize,
    /// Vision window in patches (8×8 patches = 112 px in Qwen2.5-VL).
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    #[arg(long, default_value_t = VISION_HEADS)]
    pub vision_heads: usize,
    #[arg(long, default_value_t = VISION_HEAD_DIM)]
    pub vision_head_dim: usize,
    /// Batch sizes of the decode-attention case (one query per sequence over a KV cache of --seq).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 64])]
    pub decode_batches: Vec<usize>,
    /// Only these cases: text, vision-window, vision-full, decode (default all).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// Times attention fwd and fwd+bwd (our backward recomputes the forward, as the trait specifies).
#[allow(clippy::too_many_arguments)]
fn attention_case(dev: &BenchDevice, name: &str, b: usize, t: usize, hq: usize, hkv: usize, d: usize, spec: &AttnSpec, flops: (f64, f64)) -> anyhow::Result<()> {
    let be = dev.backend.as_ref();
    let q = dev.random(&[b, t, hq, d], dev.act, 1.0, 1)?;
    let k = dev.random(&[b, t, hkv, d], dev.act, 1.0, 2)?;
    let v = dev.random(&[b, t, hkv, d], dev.act, 1.0, 3)?;
    let dout = dev.random(&[b, t, hq, d], dev.act, 1.0, 4)?;
    let causal = matches!(spec.mask, AttnMask::Causal { .. });
    let shape = json!({"batch": b, "heads": hq, "kv_heads": hkv, "seq_q": t, "seq_k": t, "head_dim": d, "causal": causal});
    let s = dev.time(|| {
        be.attention(&q, &k, &v, spec)?;
        Ok(())
    })?;
    emit(dev, &format!("attention_fwd/{name}"), shape.clone(), s, Some(Work::Flops(flops.0)), json!({}));
    let s = dev.time(|| {
        be.attention(&q, &k, &v, spec)?;
        be.attention_backward(&dout, &q, &k, &v, spec)?;
        Ok(())
    })?;
    emit(dev, &format!("attention_fwd_bwd/{name}"), shape, s, Some(Work::Flops(flops.1)), json!({}));
    Ok(())
}

pub fn attention(a: AttentionArgs) -> anyhow::Result<()> {
    let (m, label) = a.model.resolve()?;
    if a.seq == 0 || a.batch == 0 || a.window == 0 {
        return Err(BenchError::Shape("--seq, --batch and --window must be positive".into()).into());
    }
    let dev = BenchDevice::open(&a.common)?;
    let want = |c: &str| a.only.is_empty() || a.only.iter().any(|o| o == c);
    let scale = |d: usize| 1.0 / (d as f32).sqrt();

    if want("text") {
        let (b, t) = (a.batch, a.seq);
        let spec = AttnSpec { scale: scale(m.head_dim), mask: AttnMask::Causal { q_offset: 0, key_start: vec![] }, kv_len: t };
        let f = |bwd| attn_flops(b, m.heads, t, t, m.head_dim, true, bwd);
        attention_case(&dev, &format!("text-{label}"), b, t, m.heads, m.kv_heads, m.head_dim, &spec, (f(false), f(true)))?;
    }
    let n = a.vision_patches;
    let (vh, vd) = (a.vision_heads, a.vision_head_dim);
    for (case, cu) in [
        ("vision-window", (0..n).step_by(a.window).chain([n]).collect::<Vec<_>>()),
        ("vision-full", vec![0, n]),
    ] {
        if n == 0 || !want(case) {
            continue;
        }
        let name = if case == "vision-window" { format!("vision-window{}", a.window) } else { case.to_string() };
        let spec = AttnSpec { scale: scale(vd), mask: AttnMask::Segments(cu.clone()), kv_len: n };
        let flops = (segment_attn_flops(vh, vd, &cu, false), segment_attn_flops(vh, vd, &cu, true));
        attention_case(&dev, &name, 1, n, vh, vh, vd, &spec, flops)?;
    }
    if want("decode") {
        let be = dev.backend.as_ref();
        let (s, d) = (a.seq, m.head_dim);
        for &b in &a.decode_batches {
            let q = dev.random(&[b, 1, m.heads, d], dev.act, 1.0, 5)?;
            let k = dev.random(&[b, s, m.kv_heads, d], dev.act, 1.0, 6)?;
            let v = dev.random(&[b, s, m.kv_heads, d], dev.act, 1.0, 7)?;
            // The new token sits in the last cache slot and sees the whole cache.
            let spec = AttnSpec { scale: scale(d), mask: AttnMask::Causal { q_offset: s - 1, key_start: vec![] }, kv_len: s };
            let secs = dev.time(|| {
                be.attention(&q, &k, &v, &spec)?;
                Ok(())
            })?;
            let kv_bytes = 2 * b * s * m.kv_heads * d * dev.act.size_in_bytes();
            let shape = json!({"batch": b, "cache": s, "heads": m.heads, "kv_heads": m.kv_heads});
            emit(&dev, "decode_attention", shape, secs, Some(Work::Bytes(kv_bytes as f64)), json!({}));
        }
    }
    Ok(())
}

#[derive(Debug, ClapArgs)]
pub struct ElementwiseArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Token rows of each tensor.
    #[arg(long, default_value_t = 8192)]
    pub tokens: usize,
    /// Size of the device-to-device copy that measures the bandwidth reference, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub copy_mib: usize,
}

pub fn elementwise(a: ElementwiseArgs) -> anyhow::Result<()> {
    let (m, _) = a.model.resolve()?;
    if a.tokens == 0 || a.copy_mib == 0 {
        return Err(BenchError::Shape("--tokens and --copy-mib must be positive".into()).into());
    }
    let dev = BenchDevice::open(&a.common)?;
    let be = dev.backend.as_ref();
    let copy_bytes = a.copy_mib << 20;
    // Seconds measured once; the bandwidth derived from them exactly as `emit` derives `gbps`
    // (going back from GB/s to seconds would not round-trip to the bit).
    let copy_s = dev.copy_seconds(copy_bytes)?;
    let copy = copy_gbps(copy_bytes, copy_s);
    emit(&dev, "copy", json!({"bytes": copy_bytes}), copy_s, Some(Work::Bytes(2.0 * copy_bytes as f64)), json!({}));

    let (t, h, es) = (a.tokens, m.hidden, dev.act.size_in_bytes());
    // torch_elementwise.py uses {tokens, hidden} as the shape of every case; so do we, to join.
    let shape = json!({"tokens": t, "hidden": h});
    let report = |name: &str, s: f64, bytes: usize, note: &str| {
        let gbps = bytes as f64 / s / 1e9;
        emit(&dev, name, shape.clone(), s, Some(Work::Bytes(bytes as f64)),
             json!({"copy_gbps": copy, "frac_of_copy": gbps / copy, "note": note}));
    };

    let x = dev.random(&[t, h], dev.act, 1.0, 1)?;
    let res = dev.random(&[t, h], dev.act, 1.0, 2)?;
    let w = dev.random(&[h], dev.weights, 1.0, 3)?;
    let eps = 1e-6;
    // The byte count is the fused minimum (read x, res; write y, h), as in PyTorch. The Backend trait
    // has no fused residual + norm, so through it this is two ops (5 tensor passes): that is what
    // the model runs today. On CUDA the fused kernel is measured too and takes the joinable name.
    let unfused = dev.time(|| {
        let hsum = be.add(&x, &res)?;
        be.rms_norm(&hsum, &w, eps)?;
        Ok(())
    })?;
    #[cfg(feature = "cuda")]
    let fused = match &dev.cuda {
        Some(cb) => Some(dev.time(|| {
            cb.rms_norm_residual(&x, &res, &w, eps)?;
            Ok(())
        })?),
        None => None,
    };
    #[cfg(not(feature = "cuda"))]
    let fused: Option<f64> = None;
    if let Some(s) = fused {
        report("rmsnorm_residual", s, 4 * t * h * es, "CudaBackend::rms_norm_residual (fused kernel)");
    }
    let unfused_name = if fused.is_some() { "rmsnorm_residual_unfused" } else { "rmsnorm_residual" };
    report(unfused_name, unfused, 4 * t * h * es, "Backend::add + Backend::rms_norm (unfused)");
    let s = dev.time(|| {
        be.rms_norm(&x, &w, eps)?;
        Ok(())
    })?;
    report("rmsnorm", s, 2 * t * h * es, "Backend::rms_norm (read x, write y)");

    let q = dev.random(&[t, m.heads, m.head_dim], dev.act, 1.0, 4)?;
    let cos = dev.random(&[t, m.head_dim], DType::F32, 1.0, 5)?;
    let sin = dev.random(&[t, m.head_dim], DType::F32, 1.0, 6)?;
    let s = dev.time(|| {
        be.rope(&q, &cos, &sin)?;
        Ok(())
    })?;
    report("rope", s, 2 * q.numel() * es + 2 * t * m.head_dim * 4, "Backend::rope, f32 cos/sin tables");

    let gate = dev.random(&[t, m.inter], dev.act, 1.0, 7)?;
    let up = dev.random(&[t, m.inter], dev.act, 1.0, 8)?;
    let s = dev.time(|| {
        be.swiglu(&gate, &up)?;
        Ok(())
    })?;
    report("swiglu", s, 3 * gate.numel() * es, "Backend::swiglu");
    Ok(())
}
