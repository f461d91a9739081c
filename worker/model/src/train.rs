//! Full-model forward with saved activations and its backward: gradients of every official
//! parameter for a given ∂loss/∂logits (the training crate supplies the loss).
//! Activations are kept per layer (or, with [`Qwen25Vl::set_recompute`], only each layer's input,
//! the layer being re-run during backward); backward recomputes attention probabilities.
use crate::backend::{AttnMask, AttnSpec, Backend};
use crate::error::{ModelError, Result};
use crate::model::{host_f32, PromptInput, Qwen25Vl};
use crate::rope::{mrope_tables, rope_index, vision_rope_tables, RopeIndexIds};
use crate::tensor::Tensor;
use crate::vision::{window_layout, WindowLayout};
use std::collections::BTreeMap;

struct VisionBlockActs {
    x_in: Tensor,
    h1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    x_mid: Tensor,
    h2: Tensor,
    g: Tensor,
    u: Tensor,
    act: Tensor,
}

struct VisionTape {
    layout: WindowLayout,
    px: Tensor,
    cos: Tensor,
    sin: Tensor,
    blocks: Vec<Saved<VisionBlockActs>>,
    x_final: Tensor,
    merged_in: Tensor,
    pre_gelu: Tensor,
    post_gelu: Tensor,
}

/// Saved activations of one text decoder layer (see [`Qwen25Vl::text_layer_forward`]).
pub struct TextLayerActs {
    x_in: Tensor,
    h1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    x_mid: Tensor,
    h2: Tensor,
    g: Tensor,
    u: Tensor,
    act: Tensor,
}

/// A layer's saved activations, or only its input when they are recomputed in backward.
enum Saved<A> {
    Full(A),
    Input(Tensor),
}

impl<A> Saved<A> {
    fn keep(acts: A, x_in: impl FnOnce(A) -> Tensor, recompute: bool) -> Self {
        if recompute {
            Saved::Input(x_in(acts))
        } else {
            Saved::Full(acts)
        }
    }
}

/// Everything `backward` needs from the forward.
pub struct Tape {
    ids: Vec<u32>,
    image_rows: Vec<usize>,
    vision: Option<VisionTape>,
    /// When prompts share an image (a GRPO group's G samples): for each image row of the batch,
    /// its row in the features of the distinct images the vision tower encoded.
    image_src: Option<Vec<usize>>,
    cos: Tensor,
    sin: Tensor,
    spec: AttnSpec,
    layers: Vec<Saved<TextLayerActs>>,
    x_final: Tensor,
    hn: Tensor,
    b: usize,
    t: usize,
}

/// How far [`Qwen25Vl::backward_with`] goes into the vision encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisionGrads {
    /// Merger, ViT blocks and patch embedding.
    All,
    /// The merger only (a frozen tower).
    MergerOnly,
    /// None of the encoder (tower and merger frozen).
    None,
}

/// Image feature rows of a prompt: its patches over the spatial merge unit.
fn feature_rows(p: &PromptInput, merge_unit: usize) -> usize {
    p.image_grid_thw.iter().map(|g| g[0] * g[1] * g[2]).sum::<usize>() / merge_unit.max(1)
}

impl Tape {
    /// Bytes of activations held for backward (what recomputation saves on).
    pub fn saved_bytes(&self) -> usize {
        fn t(x: &Tensor) -> usize {
            x.numel() * x.dtype().size_in_bytes()
        }
        fn text(s: &Saved<TextLayerActs>) -> usize {
            match s {
                Saved::Input(x) => t(x),
                Saved::Full(a) => [&a.x_in, &a.h1, &a.q, &a.k, &a.v, &a.a, &a.x_mid, &a.h2, &a.g, &a.u, &a.act].iter().map(|x| t(x)).sum(),
            }
        }
        fn vision(s: &Saved<VisionBlockActs>) -> usize {
            match s {
                Saved::Input(x) => t(x),
                Saved::Full(a) => [&a.x_in, &a.h1, &a.q, &a.k, &a.v, &a.a, &a.x_mid, &a.h2, &a.g, &a.u, &a.act].iter().map(|x| t(x)).sum(),
            }
        }
        self.layers.iter().map(text).sum::<usize>() + self.vision.as_ref().map_or(0, |v| v.blocks.iter().map(vision).sum())
    }
}

pub struct TrainForward {
    /// [B, T, V] logits of the left-padded batch (`pad[b]` leading rows are padding).
    pub logits: Tensor,
    pub pad: Vec<usize>,
    pub tape: Tape,
}

fn acc(be: &dyn Backend, grads: &mut BTreeMap<String, Tensor>, name: String, g: Tensor) -> Result<()> {
    match grads.get_mut(&name) {
        Some(t) => be.add_assign(t, &g),
        None => {
            grads.insert(name, g);
            Ok(())
        }
    }
}

impl Qwen25Vl {
    fn vision_forward_tape(&self, px: &Tensor, grids: &[[usize; 3]]) -> Result<(Tensor, VisionTape)> {
        let be = self.backend();
        let vc = &self.config.vision;
        let m = vc.spatial_merge_size;
        let n: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if grids.iter().any(|g| g[0] == 0 || g[1] % m != 0 || g[2] % m != 0) || px.shape() != [n, vc.patch_dim()] {
            return Err(ModelError::Invalid(format!("pixel_values {:?} do not match grids {grids:?} (patch dim {})", px.shape(), vc.patch_dim())));
        }
        let layout = window_layout(grids, m, vc.window_merged());
        let hd = vc.head_dim();
        let (cos, sin) = vision_rope_tables(grids, hd, m);
        let cos = be.gather_rows(&be.to_device(&Tensor::from_f32(&[n, hd], cos)?)?, &layout.patch_index)?;
        let sin = be.gather_rows(&be.to_device(&Tensor::from_f32(&[n, hd], sin)?)?, &layout.patch_index)?;
        let px = be.to_device(&host_f32(be, px)?)?;
        let mut x = be.gather_rows(&be.linear(&px, &self.patch_matrix()?, None)?, &layout.patch_index)?;
        let hs = vc.hidden_size;
        let mut blocks = Vec::with_capacity(vc.depth);
        for i in 0..self.vision.blocks.len() {
            let (x_out, acts) = self.vision_block_forward(i, x, &layout, &cos, &sin)?;
            blocks.push(Saved::keep(acts, |a| a.x_in, self.recompute));
            x = x_out;
        }
        let unit = vc.merge_unit();
        let merged_in = be.rms_norm(&x, &self.vision.ln_q, 1e-6)?.reshape(&[n / unit, hs * unit])?;
        let pre_gelu = be.linear(&merged_in, &self.vision.mlp0_w, Some(&self.vision.mlp0_b))?;
        let post_gelu = be.gelu(&pre_gelu)?;
        let out = be.gather_rows(&be.linear(&post_gelu, &self.vision.mlp2_w, Some(&self.vision.mlp2_b))?, &layout.inverse)?;
        Ok((out, VisionTape { layout, px, cos, sin, blocks, x_final: x, merged_in, pre_gelu, post_gelu }))
    }

    /// One vision block on `x` (window-ordered patch rows): its output and saved activations.
    fn vision_block_forward(&self, i: usize, x: Tensor, layout: &WindowLayout, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, VisionBlockActs)> {
        let be = self.backend();
        let vc = &self.config.vision;
        let (hs, nh, hd) = (vc.hidden_size, vc.num_heads, vc.head_dim());
        let n = x.dim(0);
        let b = &self.vision.blocks[i];
        let spec = self.vision_spec(layout, i, n);
        let h1 = be.rms_norm(&x, &b.norm1, 1e-6)?;
        let parts = be.split_last(&be.linear(&h1, &b.qkv_w, Some(&b.qkv_b))?, &[hs, hs, hs])?;
        let q = be.rope(&parts[0].reshape(&[n, nh, hd])?, cos, sin)?.reshape(&[1, n, nh, hd])?;
        let k = be.rope(&parts[1].reshape(&[n, nh, hd])?, cos, sin)?.reshape(&[1, n, nh, hd])?;
        let v = parts[2].reshape(&[1, n, nh, hd])?;
        let a = be.attention(&q, &k, &v, &spec)?.reshape(&[n, hs])?;
        let x_mid = be.add(&x, &be.linear(&a, &b.proj_w, Some(&b.proj_b))?)?;
        let h2 = be.rms_norm(&x_mid, &b.norm2, 1e-6)?;
        let g = be.linear(&h2, &b.gate_w, Some(&b.gate_b))?;
        let u = be.linear(&h2, &b.up_w, Some(&b.up_b))?;
        let act = be.swiglu(&g, &u)?;
        let x_out = be.add(&x_mid, &be.linear(&act, &b.down_w, Some(&b.down_b))?)?;
        Ok((x_out, VisionBlockActs { x_in: x, h1, q, k, v, a, x_mid, h2, g, u, act }))
    }

    /// One text decoder layer on `x` [b·t, hidden]: its output and saved activations. `cos`/`sin`
    /// are the M-RoPE tables [b·t, head_dim] and `spec` the causal spec that
    /// [`forward_train`](Self::forward_train) builds; public so a single layer can be benchmarked.
    #[allow(clippy::too_many_arguments)]
    pub fn text_layer_forward(&self, li: usize, x: Tensor, cos: &Tensor, sin: &Tensor, spec: &AttnSpec, b: usize, t: usize) -> Result<(Tensor, TextLayerActs)> {
        let be = self.backend();
        let tc = &self.config.text;
        let (hq, hkv, hd) = (tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim);
        let eps = tc.rms_norm_eps as f32;
        let l = &self.text.layers[li];
        let h1 = be.rms_norm(&x, &l.input_norm, eps)?;
        let q = be.rope(&be.linear(&h1, &l.q_w, Some(&l.q_b))?.reshape(&[b * t, hq, hd])?, cos, sin)?.reshape(&[b, t, hq, hd])?;
        let k = be.rope(&be.linear(&h1, &l.k_w, Some(&l.k_b))?.reshape(&[b * t, hkv, hd])?, cos, sin)?.reshape(&[b, t, hkv, hd])?;
        let v = be.linear(&h1, &l.v_w, Some(&l.v_b))?.reshape(&[b, t, hkv, hd])?;
        let a = be.attention(&q, &k, &v, spec)?.reshape(&[b * t, hq * hd])?;
        let x_mid = be.add(&x, &be.linear(&a, &l.o_w, None)?)?;
        let h2 = be.rms_norm(&x_mid, &l.post_norm, eps)?;
        let g = be.linear(&h2, &l.gate_w, None)?;
        let u = be.linear(&h2, &l.up_w, None)?;
        let act = be.swiglu(&g, &u)?;
        let x_out = be.add(&x_mid, &be.linear(&act, &l.down_w, None)?)?;
        Ok((x_out, TextLayerActs { x_in: x, h1, q, k, v, a, x_mid, h2, g, u, act }))
    }

    /// Activation recomputation for training: with `on`, [`forward_train`](Self::forward_train)
    /// keeps only each text layer's and vision block's input and [`backward`](Self::backward)
    /// re-runs the layer to get its activations back — one extra forward for about
    /// 1/11 of the activation memory. Gradients are identical either way.
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    pub fn recompute(&self) -> bool {
        self.recompute
    }

    fn vision_spec(&self, layout: &WindowLayout, block: usize, n: usize) -> AttnSpec {
        let vc = &self.config.vision;
        let cu = if vc.fullatt_block_indexes.contains(&block) { &layout.cu_seqlens } else { &layout.cu_window_seqlens };
        AttnSpec { scale: 1.0 / (vc.head_dim() as f32).sqrt(), mask: AttnMask::Segments(cu.clone()), kv_len: n }
    }

    /// Training forward over a left-padded batch (no KV cache), saving activations.
    pub fn forward_train(&self, prompts: &[PromptInput]) -> Result<TrainForward> {
        let be = self.backend();
        let tc = &self.config.text;
        if prompts.is_empty() || prompts.iter().any(|p| p.input_ids.is_empty()) {
            return Err(ModelError::Invalid("forward_train needs at least one non-empty sequence".into()));
        }
        let t = prompts.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
        if t > tc.max_position_embeddings {
            return Err(ModelError::ContextOverflow { prompt: t, context: tc.max_position_embeddings });
        }
        let b = prompts.len();
        let rid = RopeIndexIds {
            image_token_id: self.config.image_token_id,
            vision_start_token_id: self.config.vision_start_token_id,
            spatial_merge_size: self.config.vision.spatial_merge_size,
        };
        let pad: Vec<usize> = prompts.iter().map(|p| t - p.input_ids.len()).collect();
        let mut pos = Vec::with_capacity(b * t);
        let mut ids = Vec::with_capacity(b * t);
        let mut image_rows = Vec::new();
        for (bi, p) in prompts.iter().enumerate() {
            let mp = rope_index(&p.input_ids, &p.image_grid_thw, &rid)?;
            pos.extend(std::iter::repeat_n([1i64; 3], pad[bi]));
            pos.extend_from_slice(&mp.positions);
            ids.extend(std::iter::repeat_n(0u32, pad[bi]));
            for (i, &id) in p.input_ids.iter().enumerate() {
                ids.push(id);
                if id == self.config.image_token_id {
                    image_rows.push(bi * t + pad[bi] + i);
                }
            }
        }
        let mut x = be.embedding(&self.text.embed, &ids)?;
        let grids: Vec<[usize; 3]> = prompts.iter().flat_map(|p| p.image_grid_thw.iter().copied()).collect();
        let mut image_src = None;
        let vision = if grids.is_empty() {
            None
        } else {
            // A GRPO batch holds each prompt's images G times (clones of one tensor): the tower
            // encodes each distinct image once, its features go to every copy, and backward adds
            // the copies' gradients before the tower's backward (which is linear in them), so
            // the result is the same as encoding every copy, G times cheaper.
            let merge = self.config.vision.merge_unit();
            let mut distinct: Vec<&PromptInput> = Vec::new();
            let mut first_row = Vec::new();
            let mut src = Vec::with_capacity(image_rows.len());
            for p in prompts {
                match &p.pixel_values {
                    Some(px) => {
                        let u = match distinct.iter().position(|d| d.image_grid_thw == p.image_grid_thw && d.pixel_values.as_ref().is_some_and(|q| q.same_as(px))) {
                            Some(u) => u,
                            None => {
                                let rows = first_row.last().copied().unwrap_or(0) + distinct.last().map_or(0, |d| feature_rows(d, merge));
                                distinct.push(p);
                                first_row.push(rows);
                                distinct.len() - 1
                            }
                        };
                        src.extend(first_row[u]..first_row[u] + feature_rows(p, merge));
                    }
                    None if !p.image_grid_thw.is_empty() => return Err(ModelError::Invalid(format!("prompt has image grids {:?} but no pixel_values", p.image_grid_thw))),
                    None => {}
                }
            }
            let mut rows = Vec::new();
            let mut width = self.config.vision.patch_dim();
            for p in &distinct {
                if let Some(px) = &p.pixel_values {
                    width = px.last_dim();
                    rows.extend(host_f32(be, px)?.as_f32()?.iter().copied());
                }
            }
            let grids: Vec<[usize; 3]> = distinct.iter().flat_map(|p| p.image_grid_thw.iter().copied()).collect();
            let px = Tensor::from_f32(&[rows.len() / width.max(1), width], rows)?;
            let (mut feats, tape) = self.vision_forward_tape(&px, &grids)?;
            if src.len() != feats.dim(0) {
                feats = be.gather_rows(&feats, &src)?;
                image_src = Some(src);
            }
            if feats.dim(0) != image_rows.len() {
                return Err(ModelError::ImageTokens { tokens: image_rows.len(), features: feats.dim(0), grids });
            }
            x = be.scatter_rows(&x, &image_rows, &feats)?;
            Some(tape)
        };
        let hd = tc.head_dim;
        let (cos, sin) = mrope_tables(&pos, hd, tc.rope_theta, &tc.mrope_section)?;
        let cos = be.to_device(&Tensor::from_f32(&[b * t, hd], cos)?)?;
        let sin = be.to_device(&Tensor::from_f32(&[b * t, hd], sin)?)?;
        let spec = AttnSpec { scale: 1.0 / (hd as f32).sqrt(), mask: AttnMask::Causal { q_offset: 0, key_start: pad.clone() }, kv_len: t };
        let eps = tc.rms_norm_eps as f32;
        let mut layers = Vec::with_capacity(tc.num_hidden_layers);
        for li in 0..self.text.layers.len() {
            let (x_out, acts) = self.text_layer_forward(li, x, &cos, &sin, &spec, b, t)?;
            layers.push(Saved::keep(acts, |a| a.x_in, self.recompute));
            x = x_out;
        }
        let hn = be.rms_norm(&x, &self.text.norm, eps)?;
        let logits = self.logits(&hn)?.reshape(&[b, t, tc.vocab_size])?;
        Ok(TrainForward { logits, pad, tape: Tape { ids, image_rows, vision, image_src, cos, sin, spec, layers, x_final: x, hn, b, t } })
    }

    /// Gradients (official names, F32) of every parameter given ∂loss/∂logits [B, T, V].
    /// A tied head's gradient is accumulated into `model.embed_tokens.weight`.
    pub fn backward(&self, tape: &Tape, dlogits: &Tensor) -> Result<BTreeMap<String, Tensor>> {
        self.backward_with(tape, dlogits, VisionGrads::All)
    }

    /// [`backward`](Self::backward) that stops early in the vision encoder when its gradients
    /// would be thrown away (a frozen tower, the recipe's default): no backward through the ViT
    /// blocks, or none through the encoder at all. The other gradients are the same.
    pub fn backward_with(&self, tape: &Tape, dlogits: &Tensor, vision: VisionGrads) -> Result<BTreeMap<String, Tensor>> {
        let be = self.backend();
        let tc = &self.config.text;
        let (b, t) = (tape.b, tape.t);
        if dlogits.numel() != b * t * tc.vocab_size {
            return Err(ModelError::Invalid(format!("dlogits {:?} for logits [{b}, {t}, {}]", dlogits.shape(), tc.vocab_size)));
        }
        let mut grads = BTreeMap::new();
        let dlogits = dlogits.reshape(&[b * t, tc.vocab_size])?;
        let eps = tc.rms_norm_eps as f32;
        let head = be.linear_backward(&dlogits, &tape.hn, self.head(), false)?;
        let head_name = if tc.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        acc(be, &mut grads, head_name.into(), head.dw)?;
        let (mut dx, dn) = be.rms_norm_backward(&head.dx, &tape.x_final, &self.text.norm, eps)?;
        acc(be, &mut grads, "model.norm.weight".into(), dn)?;
        for (li, saved) in tape.layers.iter().enumerate().rev() {
            let recomputed;
            let s = match saved {
                Saved::Full(a) => a,
                Saved::Input(x_in) => {
                    recomputed = self.text_layer_forward(li, x_in.clone(), &tape.cos, &tape.sin, &tape.spec, b, t)?.1;
                    &recomputed
                }
            };
            dx = self.text_layer_backward(li, s, &dx, &tape.cos, &tape.sin, &tape.spec, b, t, &mut grads)?;
        }
        // Embedding input: image rows go to the vision encoder, the rest to the table.
        let (d_embed_in, d_feats) = if tape.image_rows.is_empty() { (dx, None) } else {
            let (a, f) = be.scatter_rows_backward(&dx, &tape.image_rows)?;
            (a, Some(f))
        };
        let de = be.embedding_backward(&d_embed_in, &tape.ids, tc.vocab_size)?;
        acc(be, &mut grads, "model.embed_tokens.weight".into(), de)?;
        if let (Some(vt), Some(df), false) = (&tape.vision, d_feats, vision == VisionGrads::None) {
            let df = match &tape.image_src {
                // Every copy's feature gradient onto its distinct image's rows.
                Some(src) => be.gather_rows_backward(&df, src, vt.px.dim(0) / self.config.vision.merge_unit())?,
                None => df,
            };
            self.vision_backward(vt, &df, vision == VisionGrads::All, &mut grads)?;
        }
        Ok(grads)
    }

    /// Backward of text layer `li` given ∂loss/∂output `dx` and its saved activations: adds the
    /// layer's parameter gradients (official names) to `grads` and returns ∂loss/∂input.
    #[allow(clippy::too_many_arguments)]
    pub fn text_layer_backward(
        &self, li: usize, s: &TextLayerActs, dx: &Tensor, cos: &Tensor, sin: &Tensor, spec: &AttnSpec, b: usize, t: usize,
        grads: &mut BTreeMap<String, Tensor>,
    ) -> Result<Tensor> {
        let be = self.backend();
        let tc = &self.config.text;
        let (hq, hkv, hd) = (tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim);
        let eps = tc.rms_norm_eps as f32;
        let l = &self.text.layers[li];
        let p = format!("model.layers.{li}");
        let down = be.linear_backward(dx, &s.act, &l.down_w, false)?;
        acc(be, grads, format!("{p}.mlp.down_proj.weight"), down.dw)?;
        let (dg, du) = be.swiglu_backward(&down.dx, &s.g, &s.u)?;
        let gate = be.linear_backward(&dg, &s.h2, &l.gate_w, false)?;
        let up = be.linear_backward(&du, &s.h2, &l.up_w, false)?;
        acc(be, grads, format!("{p}.mlp.gate_proj.weight"), gate.dw)?;
        acc(be, grads, format!("{p}.mlp.up_proj.weight"), up.dw)?;
        let (dxm, dpn) = be.rms_norm_backward(&be.add(&gate.dx, &up.dx)?, &s.x_mid, &l.post_norm, eps)?;
        acc(be, grads, format!("{p}.post_attention_layernorm.weight"), dpn)?;
        let dx_mid = be.add(dx, &dxm)?;
        let o = be.linear_backward(&dx_mid, &s.a, &l.o_w, false)?;
        acc(be, grads, format!("{p}.self_attn.o_proj.weight"), o.dw)?;
        let (dq, dk, dv) = be.attention_backward(&o.dx.reshape(&[b, t, hq, hd])?, &s.q, &s.k, &s.v, spec)?;
        let dq = be.rope_backward(&dq.reshape(&[b * t, hq, hd])?, cos, sin)?.reshape(&[b * t, hq * hd])?;
        let dk = be.rope_backward(&dk.reshape(&[b * t, hkv, hd])?, cos, sin)?.reshape(&[b * t, hkv * hd])?;
        let dv = dv.reshape(&[b * t, hkv * hd])?;
        let mut dh1: Option<Tensor> = None;
        for (name, d, w) in [("q_proj", &dq, &l.q_w), ("k_proj", &dk, &l.k_w), ("v_proj", &dv, &l.v_w)] {
            let g = be.linear_backward(d, &s.h1, w, true)?;
            acc(be, grads, format!("{p}.self_attn.{name}.weight"), g.dw)?;
            if let Some(db) = g.db {
                acc(be, grads, format!("{p}.self_attn.{name}.bias"), db)?;
            }
            dh1 = Some(match dh1 {
                None => g.dx,
                Some(h) => be.add(&h, &g.dx)?,
            });
        }
        let dh1 = dh1.ok_or_else(|| ModelError::Invalid("no attention projections".into()))?;
        let (dxi, din) = be.rms_norm_backward(&dh1, &s.x_in, &l.input_norm, eps)?;
        acc(be, grads, format!("{p}.input_layernorm.weight"), din)?;
        be.add(&dx_mid, &dxi)
    }

    /// `tower`: also the ViT blocks and the patch embedding (else only the merger).
    fn vision_backward(&self, vt: &VisionTape, d_out: &Tensor, tower: bool, grads: &mut BTreeMap<String, Tensor>) -> Result<()> {
        let be = self.backend();
        let vc = &self.config.vision;
        let (hs, nh, hd) = (vc.hidden_size, vc.num_heads, vc.head_dim());
        let n = vt.px.dim(0);
        let unit = vc.merge_unit();
        let vw = &self.vision;
        // Undo the inverse permutation: merged rows in window order.
        let d = be.gather_rows_backward(d_out, &vt.layout.inverse, n / unit)?;
        let m2 = be.linear_backward(&d, &vt.post_gelu, &vw.mlp2_w, true)?;
        acc(be, grads, "visual.merger.mlp.2.weight".into(), m2.dw)?;
        acc(be, grads, "visual.merger.mlp.2.bias".into(), m2.db.ok_or_else(|| ModelError::Invalid("bias grad".into()))?)?;
        let dpre = be.gelu_backward(&m2.dx, &vt.pre_gelu)?;
        let m0 = be.linear_backward(&dpre, &vt.merged_in, &vw.mlp0_w, true)?;
        acc(be, grads, "visual.merger.mlp.0.weight".into(), m0.dw)?;
        acc(be, grads, "visual.merger.mlp.0.bias".into(), m0.db.ok_or_else(|| ModelError::Invalid("bias grad".into()))?)?;
        let (mut dx, dln) = be.rms_norm_backward(&m0.dx.reshape(&[n, hs])?, &vt.x_final, &vw.ln_q, 1e-6)?;
        acc(be, grads, "visual.merger.ln_q.weight".into(), dln)?;
        if !tower {
            return Ok(());
        }
        let bias = |g: Option<Tensor>| g.ok_or_else(|| ModelError::Invalid("bias grad".into()));
        for (i, (bw, saved)) in vw.blocks.iter().zip(&vt.blocks).enumerate().rev() {
            let p = format!("visual.blocks.{i}");
            let recomputed;
            let s = match saved {
                Saved::Full(a) => a,
                Saved::Input(x_in) => {
                    recomputed = self.vision_block_forward(i, x_in.clone(), &vt.layout, &vt.cos, &vt.sin)?.1;
                    &recomputed
                }
            };
            let down = be.linear_backward(&dx, &s.act, &bw.down_w, true)?;
            acc(be, grads, format!("{p}.mlp.down_proj.weight"), down.dw)?;
            acc(be, grads, format!("{p}.mlp.down_proj.bias"), bias(down.db)?)?;
            let (dg, du) = be.swiglu_backward(&down.dx, &s.g, &s.u)?;
            let gate = be.linear_backward(&dg, &s.h2, &bw.gate_w, true)?;
            let up = be.linear_backward(&du, &s.h2, &bw.up_w, true)?;
            acc(be, grads, format!("{p}.mlp.gate_proj.weight"), gate.dw)?;
            acc(be, grads, format!("{p}.mlp.gate_proj.bias"), bias(gate.db)?)?;
            acc(be, grads, format!("{p}.mlp.up_proj.weight"), up.dw)?;
            acc(be, grads, format!("{p}.mlp.up_proj.bias"), bias(up.db)?)?;
            let (dxm, dn2) = be.rms_norm_backward(&be.add(&gate.dx, &up.dx)?, &s.x_mid, &bw.norm2, 1e-6)?;
            acc(be, grads, format!("{p}.norm2.weight"), dn2)?;
            let dx_mid = be.add(&dx, &dxm)?;
            let proj = be.linear_backward(&dx_mid, &s.a, &bw.proj_w, true)?;
            acc(be, grads, format!("{p}.attn.proj.weight"), proj.dw)?;
            acc(be, grads, format!("{p}.attn.proj.bias"), bias(proj.db)?)?;
            let spec = self.vision_spec(&vt.layout, i, n);
            let (dq, dk, dv) = be.attention_backward(&proj.dx.reshape(&[1, n, nh, hd])?, &s.q, &s.k, &s.v, &spec)?;
            let dq = be.rope_backward(&dq.reshape(&[n, nh, hd])?, &vt.cos, &vt.sin)?.reshape(&[n, hs])?;
            let dk = be.rope_backward(&dk.reshape(&[n, nh, hd])?, &vt.cos, &vt.sin)?.reshape(&[n, hs])?;
            let dqkv = be.concat_last(&[&dq, &dk, &dv.reshape(&[n, hs])?])?;
            let qkv = be.linear_backward(&dqkv, &s.h1, &bw.qkv_w, true)?;
            acc(be, grads, format!("{p}.attn.qkv.weight"), qkv.dw)?;
            acc(be, grads, format!("{p}.attn.qkv.bias"), bias(qkv.db)?)?;
            let (dxi, dn1) = be.rms_norm_backward(&qkv.dx, &s.x_in, &bw.norm1, 1e-6)?;
            acc(be, grads, format!("{p}.norm1.weight"), dn1)?;
            dx = be.add(&dx_mid, &dxi)?;
        }
        // Window permutation of patch rows: its gradient is the inverse gather.
        let d_patch = be.gather_rows_backward(&dx, &vt.layout.patch_index, n)?;
        let pe = be.linear_backward(&d_patch, &vt.px, &self.patch_matrix()?, false)?;
        let shape = [vc.hidden_size, vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size];
        acc(be, grads, "visual.patch_embed.proj.weight".into(), pe.dw.reshape(&shape)?)?;
        Ok(())
    }
}
