//! Qwen2.5-VL: vision encoder, M-RoPE text decoder with KV cache, batched prefill and decode.
use crate::backend::{AttnMask, AttnSpec, Backend};
use crate::config::Qwen25VlConfig;
use crate::error::{ModelError, Result};
use crate::loader::Checkpoint;
use crate::rope::{mrope_tables, rope_index, vision_rope_tables, MropePositions, RopeIndexIds};
use crate::tensor::{DType, Tensor};
use crate::vision::window_layout;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct VisionBlock {
    pub norm1: Tensor,
    pub norm2: Tensor,
    pub qkv_w: Tensor,
    pub qkv_b: Tensor,
    pub proj_w: Tensor,
    pub proj_b: Tensor,
    pub gate_w: Tensor,
    pub gate_b: Tensor,
    pub up_w: Tensor,
    pub up_b: Tensor,
    pub down_w: Tensor,
    pub down_b: Tensor,
}

#[derive(Clone, Debug)]
pub struct VisionWeights {
    /// Conv3d kernel [hidden, C, Tp, P, P] (used as a linear weight [hidden, C·Tp·P·P]).
    pub patch_w: Tensor,
    pub blocks: Vec<VisionBlock>,
    pub ln_q: Tensor,
    pub mlp0_w: Tensor,
    pub mlp0_b: Tensor,
    pub mlp2_w: Tensor,
    pub mlp2_b: Tensor,
}

#[derive(Clone, Debug)]
pub struct TextLayer {
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    pub q_w: Tensor,
    pub q_b: Tensor,
    pub k_w: Tensor,
    pub k_b: Tensor,
    pub v_w: Tensor,
    pub v_b: Tensor,
    pub o_w: Tensor,
    pub gate_w: Tensor,
    pub up_w: Tensor,
    pub down_w: Tensor,
}

#[derive(Clone, Debug)]
pub struct TextWeights {
    pub embed: Tensor,
    pub layers: Vec<TextLayer>,
    pub norm: Tensor,
    /// `None` when tied to `embed`.
    pub lm_head: Option<Tensor>,
}

/// One prompt: token ids with image pads already expanded, and its images' patches.
#[derive(Clone, Debug, Default)]
pub struct PromptInput {
    pub input_ids: Vec<u32>,
    /// [Σ t·h·w, C·Tp·P·P] host or device tensor; `None` for text-only prompts.
    pub pixel_values: Option<Tensor>,
    pub image_grid_thw: Vec<[usize; 3]>,
}

/// Per-layer K/V of shape [B, capacity, Hkv, D]; slots `0..len` are filled.
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub len: usize,
    pub capacity: usize,
    pub batch: usize,
    /// Left padding per sequence: keys before it are masked.
    pub key_start: Vec<usize>,
}

/// Result of a batched prefill.
pub struct Prefill {
    /// Logits [B, T, V] for every position when requested, else [B, V] for the last position.
    pub logits: Tensor,
    /// M-RoPE positions per sequence (unpadded).
    pub positions: Vec<MropePositions>,
    /// Left padding per sequence.
    pub pad: Vec<usize>,
}

pub struct Qwen25Vl {
    pub config: Qwen25VlConfig,
    pub vision: VisionWeights,
    pub text: TextWeights,
    backend: Arc<dyn Backend>,
    /// Activation recomputation in training: keep only each layer's input and recompute its
    /// activations during backward (see [`Qwen25Vl::set_recompute`]).
    pub(crate) recompute: bool,
}

/// Host F32 copy of pixel values that may live on the host (any dtype) or on the device.
pub(crate) fn host_f32(be: &dyn Backend, t: &Tensor) -> Result<Tensor> {
    match t.device() {
        crate::tensor::Device::Cpu => t.to_dtype(DType::F32),
        _ => be.to_host(&be.cast(t, DType::F32)?),
    }
}

fn take(map: &mut BTreeMap<String, Tensor>, name: &str, backend: &dyn Backend) -> Result<Tensor> {
    let t = map.remove(name).ok_or_else(|| ModelError::MissingTensor { name: name.into(), dir: "<weights map>".into(), expected: vec![] })?;
    backend.to_device(&t)
}

impl Qwen25Vl {
    /// Load an HF checkpoint directory. Weights are stored in `dtype` (F32 for exact parity;
    /// BF16 halves memory, `linear` upcasts per call).
    pub fn load(dir: impl AsRef<Path>, backend: Arc<dyn Backend>, dtype: DType) -> Result<Self> {
        let config = Qwen25VlConfig::from_dir(dir.as_ref())?;
        let ckpt = Checkpoint::open(dir.as_ref())?;
        let weights = ckpt.load_all(&config, dtype)?;
        Self::from_weights(config, weights, backend)
    }

    /// Build from official-name tensors (shapes as `Qwen25VlConfig::expected_tensors`).
    pub fn from_weights(config: Qwen25VlConfig, mut w: BTreeMap<String, Tensor>, backend: Arc<dyn Backend>) -> Result<Self> {
        for (name, shape) in config.expected_tensors() {
            match w.get(&name) {
                None => return Err(ModelError::MissingTensor { name, dir: "<weights map>".into(), expected: shape }),
                Some(t) if t.shape() != shape.as_slice() => {
                    return Err(ModelError::TensorShape { name, dir: "<weights map>".into(), expected: shape, found: t.shape().to_vec() })
                }
                _ => {}
            }
        }
        let be = backend.as_ref();
        let vc = &config.vision;
        let patch_w = take(&mut w, "visual.patch_embed.proj.weight", be)?;
        let mut blocks = Vec::with_capacity(vc.depth);
        for i in 0..vc.depth {
            let p = format!("visual.blocks.{i}");
            let mut g = |s: &str| take(&mut w, &format!("{p}.{s}"), be);
            blocks.push(VisionBlock {
                norm1: g("norm1.weight")?,
                norm2: g("norm2.weight")?,
                qkv_w: g("attn.qkv.weight")?,
                qkv_b: g("attn.qkv.bias")?,
                proj_w: g("attn.proj.weight")?,
                proj_b: g("attn.proj.bias")?,
                gate_w: g("mlp.gate_proj.weight")?,
                gate_b: g("mlp.gate_proj.bias")?,
                up_w: g("mlp.up_proj.weight")?,
                up_b: g("mlp.up_proj.bias")?,
                down_w: g("mlp.down_proj.weight")?,
                down_b: g("mlp.down_proj.bias")?,
            });
        }
        let vision = VisionWeights {
            patch_w,
            blocks,
            ln_q: take(&mut w, "visual.merger.ln_q.weight", be)?,
            mlp0_w: take(&mut w, "visual.merger.mlp.0.weight", be)?,
            mlp0_b: take(&mut w, "visual.merger.mlp.0.bias", be)?,
            mlp2_w: take(&mut w, "visual.merger.mlp.2.weight", be)?,
            mlp2_b: take(&mut w, "visual.merger.mlp.2.bias", be)?,
        };
        let tc = &config.text;
        let mut layers = Vec::with_capacity(tc.num_hidden_layers);
        for i in 0..tc.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut g = |s: &str| take(&mut w, &format!("{p}.{s}"), be);
            layers.push(TextLayer {
                input_norm: g("input_layernorm.weight")?,
                post_norm: g("post_attention_layernorm.weight")?,
                q_w: g("self_attn.q_proj.weight")?,
                q_b: g("self_attn.q_proj.bias")?,
                k_w: g("self_attn.k_proj.weight")?,
                k_b: g("self_attn.k_proj.bias")?,
                v_w: g("self_attn.v_proj.weight")?,
                v_b: g("self_attn.v_proj.bias")?,
                o_w: g("self_attn.o_proj.weight")?,
                gate_w: g("mlp.gate_proj.weight")?,
                up_w: g("mlp.up_proj.weight")?,
                down_w: g("mlp.down_proj.weight")?,
            });
        }
        let text = TextWeights {
            embed: take(&mut w, "model.embed_tokens.weight", be)?,
            layers,
            norm: take(&mut w, "model.norm.weight", be)?,
            lm_head: if tc.tie_word_embeddings { None } else { Some(take(&mut w, "lm_head.weight", be)?) },
        };
        Ok(Qwen25Vl { config, vision, text, backend, recompute: false })
    }

    /// The patch-embedding Conv3d kernel viewed as a linear weight [hidden, C·Tp·P·P].
    pub fn patch_matrix(&self) -> Result<Tensor> {
        let vc = &self.config.vision;
        self.vision.patch_w.reshape(&[vc.hidden_size, vc.patch_dim()])
    }

    /// Every parameter under its official name (same order and shapes as
    /// `Qwen25VlConfig::expected_tensors`), for saving and for optimizers.
    pub fn named_weights(&self) -> Vec<(String, &Tensor)> {
        let mut out: Vec<(String, &Tensor)> = Vec::new();
        let v = &self.vision;
        out.push(("visual.patch_embed.proj.weight".into(), &v.patch_w));
        for (i, b) in v.blocks.iter().enumerate() {
            let p = format!("visual.blocks.{i}");
            for (n, t) in [
                ("norm1.weight", &b.norm1), ("norm2.weight", &b.norm2),
                ("attn.qkv.weight", &b.qkv_w), ("attn.qkv.bias", &b.qkv_b),
                ("attn.proj.weight", &b.proj_w), ("attn.proj.bias", &b.proj_b),
                ("mlp.gate_proj.weight", &b.gate_w), ("mlp.gate_proj.bias", &b.gate_b),
                ("mlp.up_proj.weight", &b.up_w), ("mlp.up_proj.bias", &b.up_b),
                ("mlp.down_proj.weight", &b.down_w), ("mlp.down_proj.bias", &b.down_b),
            ] {
                out.push((format!("{p}.{n}"), t));
            }
        }
        for (n, t) in [("ln_q.weight", &v.ln_q), ("mlp.0.weight", &v.mlp0_w), ("mlp.0.bias", &v.mlp0_b), ("mlp.2.weight", &v.mlp2_w), ("mlp.2.bias", &v.mlp2_b)] {
            out.push((format!("visual.merger.{n}"), t));
        }
        out.push(("model.embed_tokens.weight".into(), &self.text.embed));
        for (i, l) in self.text.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (n, t) in [
                ("input_layernorm.weight", &l.input_norm), ("post_attention_layernorm.weight", &l.post_norm),
                ("self_attn.q_proj.weight", &l.q_w), ("self_attn.q_proj.bias", &l.q_b),
                ("self_attn.k_proj.weight", &l.k_w), ("self_attn.k_proj.bias", &l.k_b),
                ("self_attn.v_proj.weight", &l.v_w), ("self_attn.v_proj.bias", &l.v_b),
                ("self_attn.o_proj.weight", &l.o_w),
                ("mlp.gate_proj.weight", &l.gate_w), ("mlp.up_proj.weight", &l.up_w), ("mlp.down_proj.weight", &l.down_w),
            ] {
                out.push((format!("{p}.{n}"), t));
            }
        }
        out.push(("model.norm.weight".into(), &self.text.norm));
        if let Some(h) = &self.text.lm_head {
            out.push(("lm_head.weight".into(), h));
        }
        out
    }

    /// Replace parameter `name` (official name) with `value` of the same shape, e.g. after an
    /// optimizer step. The value is moved to this model's backend.
    pub fn set_weight(&mut self, name: &str, value: &Tensor) -> Result<()> {
        let expected = self.config.expected_tensors().into_iter().find(|(n, _)| n == name).map(|(_, s)| s);
        let expected = expected.ok_or_else(|| ModelError::Invalid(format!("`{name}` is not a parameter of this model")))?;
        if value.shape() != expected.as_slice() {
            return Err(ModelError::TensorShape { name: name.into(), dir: "<set_weight>".into(), expected, found: value.shape().to_vec() });
        }
        let value = self.backend.to_device(value)?;
        let slot: &mut Tensor = if name == "visual.patch_embed.proj.weight" {
            &mut self.vision.patch_w
        } else if name == "model.embed_tokens.weight" {
            &mut self.text.embed
        } else if name == "model.norm.weight" {
            &mut self.text.norm
        } else if name == "lm_head.weight" {
            self.text.lm_head.as_mut().ok_or_else(|| ModelError::Invalid("tied model has no lm_head".into()))?
        } else if let Some(rest) = name.strip_prefix("visual.merger.") {
            let v = &mut self.vision;
            match rest {
                "ln_q.weight" => &mut v.ln_q,
                "mlp.0.weight" => &mut v.mlp0_w,
                "mlp.0.bias" => &mut v.mlp0_b,
                "mlp.2.weight" => &mut v.mlp2_w,
                _ => &mut v.mlp2_b,
            }
        } else if let Some(rest) = name.strip_prefix("visual.blocks.") {
            let (i, n) = rest.split_once('.').ok_or_else(|| ModelError::Invalid(format!("bad name `{name}`")))?;
            let b = &mut self.vision.blocks[i.parse::<usize>().map_err(|_| ModelError::Invalid(format!("bad name `{name}`")))?];
            match n {
                "norm1.weight" => &mut b.norm1,
                "norm2.weight" => &mut b.norm2,
                "attn.qkv.weight" => &mut b.qkv_w,
                "attn.qkv.bias" => &mut b.qkv_b,
                "attn.proj.weight" => &mut b.proj_w,
                "attn.proj.bias" => &mut b.proj_b,
                "mlp.gate_proj.weight" => &mut b.gate_w,
                "mlp.gate_proj.bias" => &mut b.gate_b,
                "mlp.up_proj.weight" => &mut b.up_w,
                "mlp.up_proj.bias" => &mut b.up_b,
                "mlp.down_proj.weight" => &mut b.down_w,
                _ => &mut b.down_b,
            }
        } else {
            let rest = name.strip_prefix("model.layers.").ok_or_else(|| ModelError::Invalid(format!("bad name `{name}`")))?;
            let (i, n) = rest.split_once('.').ok_or_else(|| ModelError::Invalid(format!("bad name `{name}`")))?;
            let l = &mut self.text.layers[i.parse::<usize>().map_err(|_| ModelError::Invalid(format!("bad name `{name}`")))?];
            match n {
                "input_layernorm.weight" => &mut l.input_norm,
                "post_attention_layernorm.weight" => &mut l.post_norm,
                "self_attn.q_proj.weight" => &mut l.q_w,
                "self_attn.q_proj.bias" => &mut l.q_b,
                "self_attn.k_proj.weight" => &mut l.k_w,
                "self_attn.k_proj.bias" => &mut l.k_b,
                "self_attn.v_proj.weight" => &mut l.v_w,
                "self_attn.v_proj.bias" => &mut l.v_b,
                "self_attn.o_proj.weight" => &mut l.o_w,
                "mlp.gate_proj.weight" => &mut l.gate_w,
                "mlp.up_proj.weight" => &mut l.up_w,
                _ => &mut l.down_w,
            }
        };
        *slot = value;
        Ok(())
    }

    /// Write all parameters (host copies, official names) to one safetensors file that
    /// transformers' `from_pretrained` reads; copy config/tokenizer files alongside.
    pub fn save_weights(&self, path: impl AsRef<Path>) -> Result<()> {
        let host = self.named_weights().into_iter().map(|(n, t)| Ok((n, self.backend.to_host(t)?))).collect::<Result<Vec<_>>>()?;
        let refs: Vec<(String, &Tensor)> = host.iter().map(|(n, t)| (n.clone(), t)).collect();
        crate::loader::save_safetensors(path, &refs)
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The output head (lm_head, or the embedding when tied).
    pub fn head(&self) -> &Tensor {
        self.text.lm_head.as_ref().unwrap_or(&self.text.embed)
    }

    fn rope_ids(&self) -> RopeIndexIds {
        RopeIndexIds {
            image_token_id: self.config.image_token_id,
            vision_start_token_id: self.config.vision_start_token_id,
            spatial_merge_size: self.config.vision.spatial_merge_size,
        }
    }

    /// Vision encoder: patches [N, patch_dim] (processor order) → merged features
    /// [N/unit, out_hidden] in the original (raster) order.
    pub fn vision_forward(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let be = self.backend();
        let vc = &self.config.vision;
        let m = vc.spatial_merge_size;
        let n: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if grids.iter().any(|g| g[0] == 0 || g[1] % m != 0 || g[2] % m != 0) {
            return Err(ModelError::Invalid(format!("image grids {grids:?} must have t ≥ 1 and h, w divisible by spatial_merge_size {m}")));
        }
        if pixel_values.shape() != [n, vc.patch_dim()] {
            return Err(ModelError::Invalid(format!(
                "pixel_values {:?} do not match grids {grids:?}: expected [{n}, {}]",
                pixel_values.shape(),
                vc.patch_dim()
            )));
        }
        let layout = window_layout(grids, m, vc.window_merged());
        let (cos, sin) = vision_rope_tables(grids, vc.head_dim(), m);
        let hd = vc.head_dim();
        let cos = be.gather_rows(&be.to_device(&Tensor::from_f32(&[n, hd], cos)?)?, &layout.patch_index)?;
        let sin = be.gather_rows(&be.to_device(&Tensor::from_f32(&[n, hd], sin)?)?, &layout.patch_index)?;
        let px = be.to_device(&host_f32(be, pixel_values)?)?;
        let x = be.linear(&px, &self.patch_matrix()?, None)?;
        let mut x = be.gather_rows(&x, &layout.patch_index)?;
        let (hs, nh) = (vc.hidden_size, vc.num_heads);
        let eps = 1e-6f32;
        for (i, b) in self.vision.blocks.iter().enumerate() {
            let cu = if vc.fullatt_block_indexes.contains(&i) { &layout.cu_seqlens } else { &layout.cu_window_seqlens };
            let spec = AttnSpec { scale: 1.0 / (hd as f32).sqrt(), mask: AttnMask::Segments(cu.clone()), kv_len: n };
            let h = be.rms_norm(&x, &b.norm1, eps)?;
            let qkv = be.linear(&h, &b.qkv_w, Some(&b.qkv_b))?;
            let parts = be.split_last(&qkv, &[hs, hs, hs])?;
            let q = be.rope(&parts[0].reshape(&[n, nh, hd])?, &cos, &sin)?.reshape(&[1, n, nh, hd])?;
            let k = be.rope(&parts[1].reshape(&[n, nh, hd])?, &cos, &sin)?.reshape(&[1, n, nh, hd])?;
            let v = parts[2].reshape(&[1, n, nh, hd])?;
            let a = be.attention(&q, &k, &v, &spec)?.reshape(&[n, hs])?;
            x = be.add(&x, &be.linear(&a, &b.proj_w, Some(&b.proj_b))?)?;
            let h = be.rms_norm(&x, &b.norm2, eps)?;
            let g = be.linear(&h, &b.gate_w, Some(&b.gate_b))?;
            let u = be.linear(&h, &b.up_w, Some(&b.up_b))?;
            x = be.add(&x, &be.linear(&be.swiglu(&g, &u)?, &b.down_w, Some(&b.down_b))?)?;
        }
        let unit = vc.merge_unit();
        let h = be.rms_norm(&x, &self.vision.ln_q, eps)?.reshape(&[n / unit, hs * unit])?;
        let h = be.gelu(&be.linear(&h, &self.vision.mlp0_w, Some(&self.vision.mlp0_b))?)?;
        let h = be.linear(&h, &self.vision.mlp2_w, Some(&self.vision.mlp2_b))?;
        be.gather_rows(&h, &layout.inverse)
    }

    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let tc = &self.config.text;
        let shape = [batch, capacity, tc.num_key_value_heads, tc.head_dim];
        let be = self.backend();
        let mut k = Vec::with_capacity(tc.num_hidden_layers);
        let mut v = Vec::with_capacity(tc.num_hidden_layers);
        for _ in 0..tc.num_hidden_layers {
            k.push(be.zeros(&shape)?);
            v.push(be.zeros(&shape)?);
        }
        Ok(KvCache { k, v, len: 0, capacity, batch, key_start: vec![0; batch] })
    }

    /// Decoder over `embeds` [B, T, H] at M-RoPE `positions` (B·T rows), appending to `cache`.
    /// Returns final-normed hidden states [B, T, H].
    pub fn text_forward(&self, embeds: &Tensor, positions: &[[i64; 3]], cache: &mut KvCache) -> Result<Tensor> {
        let be = self.backend();
        let tc = &self.config.text;
        if embeds.rank() != 3 || embeds.dim(0) != cache.batch || embeds.dim(2) != tc.hidden_size {
            return Err(ModelError::Invalid(format!("embeds {:?} must be [batch {}, T, {}]", embeds.shape(), cache.batch, tc.hidden_size)));
        }
        let (b, t) = (embeds.dim(0), embeds.dim(1));
        if positions.len() != b * t {
            return Err(ModelError::Invalid(format!("{} positions for {b}x{t} tokens", positions.len())));
        }
        if cache.len + t > cache.capacity {
            return Err(ModelError::Invalid(format!("KV cache of {} slots cannot take {t} more after {}", cache.capacity, cache.len)));
        }
        let (hq, hkv, hd) = (tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim);
        let (cos, sin) = mrope_tables(positions, hd, tc.rope_theta, &tc.mrope_section)?;
        let cos = be.to_device(&Tensor::from_f32(&[b * t, hd], cos)?)?;
        let sin = be.to_device(&Tensor::from_f32(&[b * t, hd], sin)?)?;
        let spec = AttnSpec {
            scale: 1.0 / (hd as f32).sqrt(),
            mask: AttnMask::Causal { q_offset: cache.len, key_start: cache.key_start.clone() },
            kv_len: cache.len + t,
        };
        let eps = tc.rms_norm_eps as f32;
        let mut x = embeds.reshape(&[b * t, tc.hidden_size])?;
        for (li, l) in self.text.layers.iter().enumerate() {
            let h = be.rms_norm(&x, &l.input_norm, eps)?;
            let q = be.linear(&h, &l.q_w, Some(&l.q_b))?.reshape(&[b * t, hq, hd])?;
            let k = be.linear(&h, &l.k_w, Some(&l.k_b))?.reshape(&[b * t, hkv, hd])?;
            let v = be.linear(&h, &l.v_w, Some(&l.v_b))?.reshape(&[b, t, hkv, hd])?;
            let q = be.rope(&q, &cos, &sin)?.reshape(&[b, t, hq, hd])?;
            let k = be.rope(&k, &cos, &sin)?.reshape(&[b, t, hkv, hd])?;
            be.write_rows(&mut cache.k[li], cache.len, &k)?;
            be.write_rows(&mut cache.v[li], cache.len, &v)?;
            let a = be.attention(&q, &cache.k[li], &cache.v[li], &spec)?.reshape(&[b * t, hq * hd])?;
            x = be.add(&x, &be.linear(&a, &l.o_w, None)?)?;
            let h = be.rms_norm(&x, &l.post_norm, eps)?;
            let g = be.linear(&h, &l.gate_w, None)?;
            let u = be.linear(&h, &l.up_w, None)?;
            x = be.add(&x, &be.linear(&be.swiglu(&g, &u)?, &l.down_w, None)?)?;
        }
        cache.len += t;
        be.rms_norm(&x, &self.text.norm, eps)?.reshape(&[b, t, tc.hidden_size])
    }

    /// logits = hidden · headᵀ over the last dim.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.backend().linear(hidden, self.head(), None)
    }

    /// Token embeddings [B·T, H] for left-padded `prompts` with image features scattered in.
    fn embed_prompts(&self, prompts: &[PromptInput], t: usize, pad: &[usize]) -> Result<Tensor> {
        let be = self.backend();
        let mut ids = Vec::with_capacity(prompts.len() * t);
        let mut image_rows = Vec::new();
        for (bi, p) in prompts.iter().enumerate() {
            ids.extend(std::iter::repeat_n(0u32, pad[bi]));
            for (i, &id) in p.input_ids.iter().enumerate() {
                ids.push(id);
                if id == self.config.image_token_id {
                    image_rows.push(bi * t + pad[bi] + i);
                }
            }
        }
        let mut e = be.embedding(&self.text.embed, &ids)?;
        let grids: Vec<[usize; 3]> = prompts.iter().flat_map(|p| p.image_grid_thw.iter().copied()).collect();
        if !grids.is_empty() {
            let mut rows = Vec::new();
            let mut width = 0;
            for p in prompts {
                if let Some(px) = &p.pixel_values {
                    width = px.last_dim();
                    rows.extend(host_f32(be, px)?.as_f32()?.iter().copied());
                } else if !p.image_grid_thw.is_empty() {
                    return Err(ModelError::Invalid(format!("prompt has image grids {:?} but no pixel_values", p.image_grid_thw)));
                }
            }
            let n = rows.len().checked_div(width).unwrap_or(0);
            let px = be.to_device(&Tensor::from_f32(&[n, width], rows)?)?;
            let feats = self.vision_forward(&px, &grids)?;
            if feats.dim(0) != image_rows.len() {
                let features = feats.dim(0);
                return Err(ModelError::ImageTokens { tokens: image_rows.len(), features, grids });
            }
            e = be.scatter_rows(&e, &image_rows, &feats)?;
        }
        Ok(e)
    }

    /// Batched prefill of prompts of different lengths (left padding + key mask) into a new
    /// cache with room for `extra` more tokens. `all_logits`: logits for every position.
    pub fn prefill(&self, prompts: &[PromptInput], extra: usize, all_logits: bool) -> Result<(Prefill, KvCache)> {
        if prompts.is_empty() {
            return Err(ModelError::Invalid("no prompts".into()));
        }
        let tc = &self.config.text;
        let t = prompts.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
        if let Some(p) = prompts.iter().find(|p| p.input_ids.is_empty()) {
            return Err(ModelError::Invalid(format!("empty prompt (image grids {:?})", p.image_grid_thw)));
        }
        if t > tc.max_position_embeddings {
            return Err(ModelError::ContextOverflow { prompt: t, context: tc.max_position_embeddings });
        }
        let ids = self.rope_ids();
        let positions = prompts.iter().map(|p| rope_index(&p.input_ids, &p.image_grid_thw, &ids)).collect::<Result<Vec<_>>>()?;
        let pad: Vec<usize> = prompts.iter().map(|p| t - p.input_ids.len()).collect();
        let mut pos = Vec::with_capacity(prompts.len() * t);
        for (bi, mp) in positions.iter().enumerate() {
            // Padded slots are masked out; their position only needs to be finite (transformers uses 1).
            pos.extend(std::iter::repeat_n([1i64; 3], pad[bi]));
            pos.extend_from_slice(&mp.positions);
        }
        let e = self.embed_prompts(prompts, t, &pad)?;
        let b = prompts.len();
        let mut cache = self.new_cache(b, t + extra)?;
        cache.key_start = pad.clone();
        let h = self.text_forward(&e.reshape(&[b, t, tc.hidden_size])?, &pos, &mut cache)?;
        let be = self.backend();
        let logits = if all_logits {
            self.logits(&h)?
        } else {
            let last: Vec<usize> = (0..b).map(|i| i * t + t - 1).collect();
            self.logits(&be.gather_rows(&h.reshape(&[b * t, tc.hidden_size])?, &last)?)?
        };
        Ok((Prefill { logits, positions, pad }, cache))
    }

    /// One decoding step: `tokens[b]` at M-RoPE position `positions[b]` (all three axes;
    /// = cache slot + rope_delta). Returns logits [B, V].
    pub fn decode_step(&self, tokens: &[u32], positions: &[i64], cache: &mut KvCache) -> Result<Tensor> {
        let tc = &self.config.text;
        if tokens.len() != cache.batch || positions.len() != cache.batch {
            return Err(ModelError::Invalid(format!("{} tokens / {} positions for a batch of {}", tokens.len(), positions.len(), cache.batch)));
        }
        if cache.len + 1 > tc.max_position_embeddings {
            return Err(ModelError::ContextOverflow { prompt: cache.len + 1, context: tc.max_position_embeddings });
        }
        let e = self.backend().embedding(&self.text.embed, tokens)?;
        let pos: Vec<[i64; 3]> = positions.iter().map(|&p| [p; 3]).collect();
        let h = self.text_forward(&e.reshape(&[cache.batch, 1, tc.hidden_size])?, &pos, cache)?;
        self.logits(&h.reshape(&[cache.batch, tc.hidden_size])?)
    }

    /// Prefill logits [L, V] of one prompt at every position (parity tests, SFT evaluation).
    pub fn forward_logits(&self, prompt: &PromptInput) -> Result<Tensor> {
        let (p, _) = self.prefill(std::slice::from_ref(prompt), 0, true)?;
        let l = prompt.input_ids.len();
        p.logits.reshape(&[l, self.config.text.vocab_size])
    }
}
