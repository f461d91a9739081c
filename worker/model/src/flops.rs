//! Model FLOPs of a training step: the one count behind the trainer's MFU metric
//! (`onevision_trainer_mfu_ratio`) and `onevision bench layer|sft-step`.
//!
//! Convention: "model FLOPs" of PaLM (Chowdhery et al. 2022, appendix B) and Megatron-LM
//! (Narayanan et al. 2021, §5.1) without activation recomputation:
//! * a matmul with an `m×k` weight applied to `n` rows costs `2·n·m·k` forward and twice that
//!   backward (input and weight gradients), so a trained weight costs `6` FLOPs per weight per
//!   row: `6·N·T` for `N` matmul weights over `T` tokens;
//! * attention (scores `QKᵀ` and `P·V`) costs `4·s²·heads·head_dim` forward per layer for a
//!   sequence of `s` tokens, `×3` with the backward. PaLM counts the full `s×s` square
//!   (`12·L·H·Q·T` per token); causal text attention computes only the lower triangle, so it is
//!   halved here (as Megatron's `num_floating_point_operations` and FlashAttention count it);
//!   the vision tower's attention is bidirectional within windows (or whole images in its
//!   full-attention blocks) and counted in full over those segments.
//! * Counted: every matmul weight of the text layers, the LM head (`6·T·hidden·vocab`, tied or
//!   not), the vision patch embedding, blocks and merger. Not counted (all O(T·hidden), under a
//!   percent at real sizes): biases, norms, activations, rotary, softmax, the embedding lookup
//!   and the loss. Padding tokens are not counted: the count is of useful work.
//! * Frozen vision parts run forward only (`2·N`); a frozen merger under a trained tower still
//!   back-propagates to its input (`4·N`).

use crate::config::{Qwen25VlConfig, TextConfig, VisionConfig};
use crate::model::PromptInput;
use crate::vision::window_layout;

/// Text-model dimensions (what the FLOP count needs of a [`TextConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextDims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub vocab: usize,
    /// Decoder layers of the full model.
    pub layers: usize,
    pub tied: bool,
}

impl From<&TextConfig> for TextDims {
    fn from(t: &TextConfig) -> Self {
        TextDims {
            hidden: t.hidden_size,
            heads: t.num_attention_heads,
            kv_heads: t.num_key_value_heads,
            head_dim: t.head_dim,
            inter: t.intermediate_size,
            vocab: t.vocab_size,
            layers: t.num_hidden_layers,
            tied: t.tie_word_embeddings,
        }
    }
}

impl TextDims {
    /// Matmul weights of one decoder layer: q, k, v, o projections and the SwiGLU MLP.
    pub fn layer_matmul_params(&self) -> f64 {
        let (h, q, kv, i) = (self.hidden as f64, (self.heads * self.head_dim) as f64, (self.kv_heads * self.head_dim) as f64, self.inter as f64);
        h * q + 2.0 * h * kv + q * h + 3.0 * h * i
    }
}

/// Σ s² over the given lengths, in f64 (long sequences overflow nothing).
fn sum_sq(lens: impl IntoIterator<Item = usize>) -> f64 {
    lens.into_iter().map(|s| (s as f64) * (s as f64)).sum()
}

/// Forward + backward FLOPs of `layers` decoder layers over sequences of `seq_lens` tokens:
/// `6·N_layer·T + 6·heads·head_dim·Σ s²` per layer (causal attention, see the module docs).
pub fn decoder_layers_flops(d: &TextDims, layers: usize, seq_lens: &[usize]) -> f64 {
    let tokens: usize = seq_lens.iter().sum();
    let linear = 6.0 * d.layer_matmul_params() * tokens as f64;
    let attn = 3.0 * 4.0 * (d.heads * d.head_dim) as f64 * sum_sq(seq_lens.iter().copied()) * 0.5;
    layers as f64 * (linear + attn)
}

/// Forward + backward FLOPs of the LM head over `tokens` positions: `6·T·hidden·vocab`.
pub fn lm_head_flops(d: &TextDims, tokens: usize) -> f64 {
    6.0 * tokens as f64 * (d.hidden * d.vocab) as f64
}

/// The whole text model (all layers and the LM head) over sequences of `seq_lens` tokens.
pub fn text_train_flops(d: &TextDims, seq_lens: &[usize]) -> f64 {
    decoder_layers_flops(d, d.layers, seq_lens) + lm_head_flops(d, seq_lens.iter().sum())
}

/// Which vision parts receive gradients (the text model always does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisionTrainable {
    /// Patch embedding and ViT blocks.
    pub tower: bool,
    /// The patch merger.
    pub merger: bool,
}

/// Forward + backward FLOPs of the vision tower and merger over images of patch grids `grids`
/// (`[t, h, w]` in patches, as `image_grid_thw`).
pub fn vision_train_flops(v: &VisionConfig, grids: &[[usize; 3]], trainable: VisionTrainable) -> f64 {
    if grids.is_empty() {
        return 0.0;
    }
    let patches: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
    let (c, i) = (v.hidden_size as f64, v.intermediate_size as f64);
    // Multiplier per forward FLOP: 3 trained (fwd + dX + dW), 2 when only dX flows, 1 frozen.
    let tower = if trainable.tower { 3.0 } else { 1.0 };
    let merger = match (trainable.merger, trainable.tower) {
        (true, _) => 3.0,
        (false, true) => 2.0,
        (false, false) => 1.0,
    };
    let block_params = 3.0 * c * c + c * c + 3.0 * c * i;
    let linear = 2.0 * patches as f64 * (v.patch_dim() as f64 * c + v.depth as f64 * block_params);
    // max(1): a window narrower than a merged token is a config the model rejects anyway.
    let layout = window_layout(grids, v.spatial_merge_size.max(1), v.window_merged().max(1));
    let seg = |cu: &[usize]| sum_sq(cu.windows(2).map(|w| w[1] - w[0]));
    let (full, windowed) = (seg(&layout.cu_seqlens), seg(&layout.cu_window_seqlens));
    let attn: f64 = (0..v.depth)
        .map(|b| 4.0 * c * if v.fullatt_block_indexes.contains(&b) { full } else { windowed })
        .sum();
    let mh = c * v.merge_unit() as f64;
    let merged = (patches / v.merge_unit().max(1)) as f64;
    let merge = 2.0 * merged * (mh * mh + mh * v.out_hidden_size as f64);
    tower * (linear + attn) + merger * merge
}

/// Model FLOPs of one forward + backward over `prompts` (token ids, image tokens included, and
/// their images), as the training step computes them.
pub fn train_step_flops<'a>(cfg: &Qwen25VlConfig, prompts: impl IntoIterator<Item = &'a PromptInput>, trainable: VisionTrainable) -> f64 {
    let (mut lens, mut grids) = (Vec::new(), Vec::new());
    for p in prompts {
        lens.push(p.input_ids.len());
        grids.extend_from_slice(&p.image_grid_thw);
    }
    text_train_flops(&TextDims::from(&cfg.text), &lens) + vision_train_flops(&cfg.vision, &grids, trainable)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: TextDims = TextDims { hidden: 8, heads: 2, kv_heads: 1, head_dim: 4, inter: 16, vocab: 10, layers: 2, tied: true };

    fn tiny_vision() -> VisionConfig {
        VisionConfig {
            depth: 2,
            hidden_size: 4,
            intermediate_size: 8,
            num_heads: 1,
            in_channels: 3,
            patch_size: 2,
            temporal_patch_size: 1,
            spatial_merge_size: 2,
            window_size: 4, // 1 merged token per window side: windows of 4 patches
            fullatt_block_indexes: vec![1],
            out_hidden_size: 8,
            tokens_per_second: 2.0,
            hidden_act: "silu".into(),
        }
    }

    #[test]
    fn text_count_matches_a_hand_computation() {
        // Per layer: q 8·8 + k 8·4 + v 8·4 + o 8·8 + MLP 3·8·16 = 64+32+32+64+384 = 576 weights.
        assert_eq!(TINY.layer_matmul_params(), 576.0);
        // Sequences of 3 and 5 tokens: T = 8, Σ s² = 9 + 25 = 34.
        // Linear 6·576·8 = 27648; attention 12·(2·4)·34/2 = 1632; two layers: 2·29280 = 58560.
        // LM head 6·8·8·10 = 3840.
        assert_eq!(decoder_layers_flops(&TINY, 2, &[3, 5]), 58560.0);
        assert_eq!(text_train_flops(&TINY, &[3, 5]), 58560.0 + 3840.0);
    }

    #[test]
    fn causal_attention_is_half_of_palms_full_square() {
        // PaLM appendix B: 6N + 12·L·H·Q·T per token, i.e. 12·L·(heads·head_dim)·s² per sequence
        // for the full square; the causal count here is half of that attention term.
        let s = 4096;
        let palm_attn = 12.0 * (TINY.heads * TINY.head_dim) as f64 * (s * s) as f64;
        let linear = 6.0 * TINY.layer_matmul_params() * s as f64;
        assert_eq!(decoder_layers_flops(&TINY, 1, &[s]), linear + palm_attn / 2.0);
    }

    #[test]
    fn vision_count_matches_a_hand_computation() {
        let v = tiny_vision();
        // One 1×4×4 patch grid: 16 patches, merged 2×2 grid → 4 merged tokens; windows of one
        // merged token (4 patches), so 4 windows of 4 patches; full attention: one frame of 16.
        // Patch embed 16·(12·4) = 768 weights·rows → 2·768 = 1536 forward.
        // Block weights: qkv 3·16 + proj 16 + MLP 3·4·8 = 48+16+96 = 160 → 2·16·160·2 blocks = 10240.
        // Attention: windowed block 4·4·(4·16) = 1024, full block 4·4·256 = 4096.
        // Merger (mh = 16): 2·4·(16·16 + 16·8) = 3072.
        let trained = VisionTrainable { tower: true, merger: true };
        let fwd_tower = 1536.0 + 10240.0 + 1024.0 + 4096.0;
        assert_eq!(vision_train_flops(&v, &[[1, 4, 4]], trained), 3.0 * (fwd_tower + 3072.0));
        let frozen = VisionTrainable { tower: false, merger: false };
        assert_eq!(vision_train_flops(&v, &[[1, 4, 4]], frozen), fwd_tower + 3072.0);
        let merger_frozen = VisionTrainable { tower: true, merger: false };
        assert_eq!(vision_train_flops(&v, &[[1, 4, 4]], merger_frozen), 3.0 * fwd_tower + 2.0 * 3072.0);
        assert_eq!(vision_train_flops(&v, &[], trained), 0.0);
    }
}
