//! Vision-encoder geometry: window partition (with padding), segment boundaries and the
//! permutations transformers applies (`get_window_index`).

/// Window layout for a batch of images (merged-token units unless noted).
#[derive(Clone, Debug, PartialEq)]
pub struct WindowLayout {
    /// Merged tokens in window order: `window_index[i]` is the original merged-token index.
    pub window_index: Vec<usize>,
    /// Inverse permutation: `inverse[window_index[i]] = i`.
    pub inverse: Vec<usize>,
    /// Window segment boundaries in patch rows (after permutation), duplicates removed.
    pub cu_window_seqlens: Vec<usize>,
    /// Full-attention segments in patch rows: one per frame of each image.
    pub cu_seqlens: Vec<usize>,
    /// Patch-row permutation: merge units keep their `unit` patches together.
    pub patch_index: Vec<usize>,
}

/// transformers' `get_window_index` + `cu_seqlens`. `window` is the window side in merged
/// tokens; the merged grid is padded at the bottom/right by `window − (l mod window)` (a full
/// extra row/column of empty windows when divisible) and empty windows are dropped.
pub fn window_layout(grids: &[[usize; 3]], merge: usize, window: usize) -> WindowLayout {
    let unit = merge * merge;
    let mut window_index = Vec::new();
    let mut cu_window = vec![0usize];
    let mut cu_seqlens = vec![0usize];
    let mut base = 0usize;
    for &[t, h, w] in grids {
        let (lh, lw) = (h / merge, w / merge);
        let (ph, pw) = (lh + window - lh % window, lw + window - lw % window);
        for ti in 0..t {
            for wr in 0..ph / window {
                for wc in 0..pw / window {
                    let mut n = 0;
                    for r in wr * window..((wr + 1) * window).min(lh) {
                        for c in wc * window..((wc + 1) * window).min(lw) {
                            window_index.push(base + (ti * lh + r) * lw + c);
                            n += 1;
                        }
                    }
                    let last = *cu_window.last().unwrap_or(&0);
                    if n > 0 {
                        cu_window.push(last + n * unit);
                    }
                }
            }
            let last = *cu_seqlens.last().unwrap_or(&0);
            cu_seqlens.push(last + h * w);
        }
        base += t * lh * lw;
    }
    let mut inverse = vec![0usize; window_index.len()];
    for (i, &w) in window_index.iter().enumerate() {
        inverse[w] = i;
    }
    let patch_index = window_index.iter().flat_map(|&w| (0..unit).map(move |u| w * unit + u)).collect();
    WindowLayout { window_index, inverse, cu_window_seqlens: cu_window, cu_seqlens, patch_index }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_partition_pads_and_orders() {
        // grid 1x6x10 → merged 3x5; window 2 → padded 4x6 → 2x3 windows, all non-empty.
        let l = window_layout(&[[1, 6, 10]], 2, 2);
        // window (0,0): rows 0-1, cols 0-1 → 0,1,5,6 ; (0,1): 2,3,7,8 ; (0,2): 4,9 ;
        // (1,0): 10,11 ; (1,1): 12,13 ; (1,2): 14
        assert_eq!(l.window_index, vec![0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]);
        assert_eq!(l.cu_window_seqlens, vec![0, 16, 32, 40, 48, 56, 60]);
        assert_eq!(l.cu_seqlens, vec![0, 60]);
        assert_eq!(&l.patch_index[..8], &[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(&l.patch_index[8..12], &[20, 21, 22, 23]);
        for (i, &w) in l.window_index.iter().enumerate() {
            assert_eq!(l.inverse[w], i);
        }
    }

    #[test]
    fn divisible_side_gets_empty_windows_dropped_and_images_offset() {
        // merged 2x2 with window 2: padded to 4x4, 3 of the 4 windows are empty.
        let l = window_layout(&[[1, 4, 4], [2, 4, 4]], 2, 2);
        assert_eq!(l.window_index, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(l.cu_window_seqlens, vec![0, 16, 32, 48]);
        assert_eq!(l.cu_seqlens, vec![0, 16, 32, 48]);
    }
}
