//! Host-side rotary tables and Qwen2.5-VL position ids (`get_rope_index`).
//!
//! All three RoPE flavours (text M-RoPE, vision 2D, plain) reduce to per-row cos/sin tables of
//! head_dim values consumed by `Backend::rope`; the tables are computed here in f32 the way
//! transformers does (f32 inv_freq, f32 angle products) so positions round identically.
use crate::error::{ModelError, Result};

/// inv_freq[j] = 1 / base^(2j/dim), j < dim/2, evaluated in f32 like torch.
pub fn inv_freq(dim: usize, base: f64) -> Vec<f32> {
    (0..dim / 2).map(|j| 1.0f32 / (base as f32).powf((2 * j) as f32 / dim as f32)).collect()
}

/// Append cos/sin rows for angle vector `ang` (half of head_dim) duplicated into both halves.
fn push_row(ang: &[f32], cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
    for _ in 0..2 {
        cos.extend(ang.iter().map(|a| a.cos()));
        sin.extend(ang.iter().map(|a| a.sin()));
    }
}

/// Text M-RoPE tables [n, head_dim] for positions (T, H, W) per token. Frequency j uses the
/// axis whose section contains j (`mrope_section` e.g. [16, 24, 24], summing to head_dim/2).
pub fn mrope_tables(positions: &[[i64; 3]], head_dim: usize, theta: f64, mrope_section: &[usize]) -> Result<(Vec<f32>, Vec<f32>)> {
    let inv = inv_freq(head_dim, theta);
    if mrope_section.iter().sum::<usize>() != inv.len() {
        return Err(ModelError::Invalid(format!("mrope_section {mrope_section:?} must sum to head_dim/2 = {}", inv.len())));
    }
    let axis: Vec<usize> = mrope_section.iter().enumerate().flat_map(|(i, &n)| std::iter::repeat_n(i % 3, n)).collect();
    let mut cos = Vec::with_capacity(positions.len() * head_dim);
    let mut sin = Vec::with_capacity(positions.len() * head_dim);
    let mut ang = vec![0f32; inv.len()];
    for p in positions {
        for j in 0..inv.len() {
            ang[j] = inv[j] * p[axis[j]] as f32;
        }
        push_row(&ang, &mut cos, &mut sin);
    }
    Ok((cos, sin))
}

/// Vision 2D RoPE tables [Σ t·h·w, head_dim] in the processor's patch order
/// (t, block_row, block_col, r_in, c_in): angles = [row·inv_freq, col·inv_freq],
/// inv_freq over head_dim/2 with base 10000.
pub fn vision_rope_tables(grids: &[[usize; 3]], head_dim: usize, merge: usize) -> (Vec<f32>, Vec<f32>) {
    let inv = inv_freq(head_dim / 2, 10000.0);
    let q = inv.len();
    let n: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
    let mut cos = Vec::with_capacity(n * head_dim);
    let mut sin = Vec::with_capacity(n * head_dim);
    let mut ang = vec![0f32; 2 * q];
    for &[t, h, w] in grids {
        for _ in 0..t {
            for br in 0..h / merge {
                for bc in 0..w / merge {
                    for ri in 0..merge {
                        for ci in 0..merge {
                            let (row, col) = ((br * merge + ri) as f32, (bc * merge + ci) as f32);
                            for j in 0..q {
                                ang[j] = row * inv[j];
                                ang[q + j] = col * inv[j];
                            }
                            push_row(&ang, &mut cos, &mut sin);
                        }
                    }
                }
            }
        }
    }
    (cos, sin)
}

/// Token ids that drive `rope_index`.
#[derive(Clone, Copy, Debug)]
pub struct RopeIndexIds {
    pub image_token_id: u32,
    pub vision_start_token_id: u32,
    pub spatial_merge_size: usize,
}

/// M-RoPE positions of one (unpadded) sequence and its `rope_delta`.
#[derive(Clone, Debug, PartialEq)]
pub struct MropePositions {
    /// (T, H, W) per token.
    pub positions: Vec<[i64; 3]>,
    /// max position + 1 − len: decode-time token at cache slot p gets p + rope_delta on all axes.
    pub rope_delta: i64,
}

impl MropePositions {
    pub fn next_position(&self) -> i64 {
        self.positions.len() as i64 + self.rope_delta
    }
}

/// transformers' `get_rope_index` for images (video frames use the same path with t>1 and
/// second_per_grid_t = 0, as for images). `grids` are this sequence's images, in order.
/// Text gets consecutive positions on all axes; an image starting at s gets T = s,
/// H = s + row, W = s + col over its merged grid; text resumes at max + 1.
pub fn rope_index(ids: &[u32], grids: &[[usize; 3]], cfg: &RopeIndexIds) -> Result<MropePositions> {
    let m = cfg.spatial_merge_size.max(1);
    let n_img_tokens = ids.iter().filter(|&&t| t == cfg.image_token_id).count();
    let expected: usize = grids.iter().map(|g| g[0] * (g[1] / m) * (g[2] / m)).sum();
    let mismatch = || ModelError::ImageTokens { tokens: n_img_tokens, features: expected, grids: grids.to_vec() };
    if n_img_tokens != expected {
        return Err(mismatch());
    }
    // Images are announced by vision_start followed by an image token (as transformers counts them).
    let n_images = ids.windows(2).filter(|w| w[0] == cfg.vision_start_token_id && w[1] == cfg.image_token_id).count();
    if n_images != grids.len() {
        return Err(ModelError::Invalid(format!(
            "prompt announces {n_images} images (vision_start followed by an image token) but {} image grids were given",
            grids.len()
        )));
    }
    let mut pos: Vec<[i64; 3]> = Vec::with_capacity(ids.len());
    let mut next: i64 = 0;
    let mut st = 0usize;
    for g in grids {
        let ed = st + ids[st..].iter().position(|&t| t == cfg.image_token_id).ok_or_else(mismatch)?;
        for i in 0..(ed - st) {
            let p = next + i as i64;
            pos.push([p, p, p]);
        }
        let s = next + (ed - st) as i64;
        let (lt, lh, lw) = (g[0], g[1] / m, g[2] / m);
        let count = lt * lh * lw;
        if ed + count > ids.len() || ids[ed..ed + count].iter().any(|&t| t != cfg.image_token_id) {
            return Err(mismatch());
        }
        let mut mx = s;
        for _t in 0..lt {
            for r in 0..lh {
                for c in 0..lw {
                    pos.push([s, s + r as i64, s + c as i64]);
                    mx = mx.max(s + r.max(c) as i64);
                }
            }
        }
        next = mx + 1;
        st = ed + count;
    }
    for i in 0..ids.len() - st {
        let p = next + i as i64;
        pos.push([p, p, p]);
    }
    let max = pos.iter().map(|p| p[0].max(p[1]).max(p[2])).max().unwrap_or(-1);
    let rope_delta = max + 1 - ids.len() as i64;
    Ok(MropePositions { positions: pos, rope_delta })
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: RopeIndexIds = RopeIndexIds { image_token_id: 9, vision_start_token_id: 8, spatial_merge_size: 2 };

    #[test]
    fn text_only_is_arange() {
        let r = rope_index(&[1, 2, 3, 4], &[], &IDS).unwrap();
        assert_eq!(r.positions, vec![[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]]);
        assert_eq!(r.rope_delta, 0);
    }

    #[test]
    fn one_image_hand_computed() {
        // [text, vision_start], image (grid 1x4x6 → merged 1x2x3 = 6 tokens), 2 text tokens
        let ids = [1, 8, 9, 9, 9, 9, 9, 9, 7, 5];
        let r = rope_index(&ids, &[[1, 4, 6]], &IDS).unwrap();
        let want: Vec<[i64; 3]> = vec![
            [0, 0, 0], [1, 1, 1],
            [2, 2, 2], [2, 2, 3], [2, 2, 4], [2, 3, 2], [2, 3, 3], [2, 3, 4],
            [5, 5, 5], [6, 6, 6],
        ];
        assert_eq!(r.positions, want);
        assert_eq!(r.rope_delta, 7 - 10);
        assert_eq!(r.next_position(), 7);
    }

    #[test]
    fn two_images_back_to_back() {
        let ids = [8, 9, 9, 9, 9, 8, 9, 9, 9, 9, 3];
        let r = rope_index(&ids, &[[1, 4, 4], [1, 4, 4]], &IDS).unwrap();
        assert_eq!(&r.positions[..5], &[[0, 0, 0], [1, 1, 1], [1, 1, 2], [1, 2, 1], [1, 2, 2]]);
        assert_eq!(&r.positions[5..], &[[3, 3, 3], [4, 4, 4], [4, 4, 5], [4, 5, 4], [4, 5, 5], [6, 6, 6]]);
        assert_eq!(r.rope_delta, 7 - 11);
    }

    #[test]
    fn token_count_mismatch_is_error() {
        let ids = [8, 9, 9, 9, 3];
        let e = rope_index(&ids, &[[1, 4, 4]], &IDS).unwrap_err();
        assert!(matches!(e, ModelError::ImageTokens { tokens: 3, features: 4, .. }), "{e}");
    }

    #[test]
    fn mrope_sections_pick_axes() {
        // head_dim 8 → 4 freqs; sections [1,1,2]: freq0 uses T, freq1 H, freq2-3 W.
        let (cos, _sin) = mrope_tables(&[[1, 2, 3]], 8, 10000.0, &[1, 1, 2]).unwrap();
        let inv = inv_freq(8, 10000.0);
        let want = [inv[0] * 1.0, inv[1] * 2.0, inv[2] * 3.0, inv[3] * 3.0];
        for j in 0..4 {
            assert!((cos[j] - want[j].cos()).abs() < 1e-7);
            assert!((cos[j + 4] - want[j].cos()).abs() < 1e-7);
        }
    }

    #[test]
    fn vision_table_order_follows_merge_units() {
        // grid 1x2x4: merge units (0,0),(0,1); the 2nd patch of unit 1 is (row 0, col 3).
        let (cos, _) = vision_rope_tables(&[[1, 2, 4]], 8, 2);
        let inv = inv_freq(4, 10000.0);
        let row = 5; // unit 1: (0,2),(0,3),(1,2),(1,3) → index 5 is (0,3)
        assert!((cos[row * 8] - (0.0f32 * inv[0]).cos()).abs() < 1e-7);
        assert!((cos[row * 8 + 2] - (3.0f32 * inv[0]).cos()).abs() < 1e-7);
        assert!((cos[row * 8 + 3] - (3.0f32 * inv[1]).cos()).abs() < 1e-7);
    }
}
