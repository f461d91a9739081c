//! Tiny aliasing-free rasterisers. Synthetic images use exact palette colours (no anti-aliasing)
//! so the ground truth can be re-derived from pixels and the pictures stay high-contrast for a
//! tiny vision tower.

use image::{Rgb, RgbImage};

/// A drawing surface over an RGB image. Out-of-bounds pixels are clipped, never a panic.
pub struct Canvas {
    pub img: RgbImage,
}

impl Canvas {
    pub fn new(width: u32, height: u32, background: [u8; 3]) -> Self {
        Self {
            img: RgbImage::from_pixel(width, height, Rgb(background)),
        }
    }

    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as u32) < self.img.width() && (y as u32) < self.img.height() {
            self.img.put_pixel(x as u32, y as u32, Rgb(c));
        }
    }

    /// Fill every pixel whose centre satisfies `inside`, scanning only the given bounding box.
    fn fill_where(&mut self, bbox: (f32, f32, f32, f32), c: [u8; 3], inside: impl Fn(f32, f32) -> bool) {
        let (x0, y0, x1, y1) = bbox;
        for y in (y0.floor() as i64 - 1)..=(y1.ceil() as i64 + 1) {
            for x in (x0.floor() as i64 - 1)..=(x1.ceil() as i64 + 1) {
                if inside(x as f32 + 0.5, y as f32 + 0.5) {
                    self.put(x, y, c);
                }
            }
        }
    }

    pub fn fill_circle(&mut self, cx: f32, cy: f32, r: f32, c: [u8; 3]) {
        self.fill_where((cx - r, cy - r, cx + r, cy + r), c, |x, y| {
            (x - cx).powi(2) + (y - cy).powi(2) <= r * r
        });
    }

    /// Ring between radii `r - width` and `r`.
    pub fn ring(&mut self, cx: f32, cy: f32, r: f32, width: f32, c: [u8; 3]) {
        let inner = (r - width).max(0.0);
        self.fill_where((cx - r, cy - r, cx + r, cy + r), c, |x, y| {
            let d2 = (x - cx).powi(2) + (y - cy).powi(2);
            d2 <= r * r && d2 >= inner * inner
        });
    }

    pub fn fill_rect(&mut self, x0: f32, y0: f32, x1: f32, y1: f32, c: [u8; 3]) {
        self.fill_where((x0, y0, x1, y1), c, |x, y| x >= x0 && x < x1 && y >= y0 && y < y1);
    }

    pub fn fill_triangle(&mut self, p: [(f32, f32); 3], c: [u8; 3]) {
        let xs = p.map(|q| q.0);
        let ys = p.map(|q| q.1);
        let bbox = (
            xs.iter().cloned().fold(f32::INFINITY, f32::min),
            ys.iter().cloned().fold(f32::INFINITY, f32::min),
            xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max),
            ys.iter().cloned().fold(f32::NEG_INFINITY, f32::max),
        );
        let edge = |a: (f32, f32), b: (f32, f32), x: f32, y: f32| (b.0 - a.0) * (y - a.1) - (b.1 - a.1) * (x - a.0);
        self.fill_where(bbox, c, |x, y| {
            let e0 = edge(p[0], p[1], x, y);
            let e1 = edge(p[1], p[2], x, y);
            let e2 = edge(p[2], p[0], x, y);
            // Either winding order.
            (e0 >= 0.0 && e1 >= 0.0 && e2 >= 0.0) || (e0 <= 0.0 && e1 <= 0.0 && e2 <= 0.0)
        });
    }

    /// A segment of the given thickness (pixels within width/2 of the segment).
    pub fn line(&mut self, a: (f32, f32), b: (f32, f32), width: f32, c: [u8; 3]) {
        let h = width / 2.0;
        let bbox = (a.0.min(b.0) - h, a.1.min(b.1) - h, a.0.max(b.0) + h, a.1.max(b.1) + h);
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let len2 = (dx * dx + dy * dy).max(1e-12);
        self.fill_where(bbox, c, |x, y| {
            let t = (((x - a.0) * dx + (y - a.1) * dy) / len2).clamp(0.0, 1.0);
            let (px, py) = (a.0 + t * dx, a.1 + t * dy);
            (x - px).powi(2) + (y - py).powi(2) <= h * h
        });
    }

    /// Draw `text` with the 3×5 bitmap font scaled by `scale`, top-left at (x, y). Characters
    /// without a glyph are drawn as blanks.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, c: [u8; 3]) {
        for (i, ch) in text.chars().enumerate() {
            let Some(rows) = glyph(ch) else { continue };
            let ox = x + i as i64 * 4 * scale;
            for (ry, row) in rows.iter().enumerate() {
                for rx in 0..3 {
                    if row & (0b100 >> rx) != 0 {
                        for sy in 0..scale {
                            for sx in 0..scale {
                                self.put(ox + rx * scale + sx, y + ry as i64 * scale + sy, c);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Width in pixels of `text` drawn by [`Canvas::text`].
pub fn text_width(text: &str, scale: i64) -> i64 {
    let n = text.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (4 * n - 1) * scale
    }
}

/// 3×5 glyphs, one row per byte, bit 2 = leftmost column.
fn glyph(ch: char) -> Option<[u8; 5]> {
    Some(match ch {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        'A' => [0b010, 0b101, 0b111, 0b101, 0b101],
        'B' => [0b110, 0b101, 0b110, 0b101, 0b110],
        'C' => [0b011, 0b100, 0b100, 0b100, 0b011],
        'D' => [0b110, 0b101, 0b101, 0b101, 0b110],
        'E' => [0b111, 0b100, 0b110, 0b100, 0b111],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circle_area_close_to_pi_r2() {
        let mut c = Canvas::new(64, 64, [255; 3]);
        c.fill_circle(32.0, 32.0, 20.0, [0, 0, 0]);
        let n = c.img.pixels().filter(|p| p.0 == [0, 0, 0]).count() as f32;
        let expect = std::f32::consts::PI * 400.0;
        assert!((n - expect).abs() / expect < 0.02, "{n} vs {expect}");
    }

    #[test]
    fn drawing_off_canvas_is_clipped() {
        let mut c = Canvas::new(8, 8, [255; 3]);
        c.fill_rect(-10.0, -10.0, 100.0, 2.0, [1, 2, 3]);
        c.text(6, 6, "88", 3, [0; 3]);
        assert_eq!(c.img.get_pixel(7, 1).0, [1, 2, 3]);
        assert_eq!(c.img.get_pixel(0, 2).0, [255; 3]);
    }

    #[test]
    fn triangle_half_of_its_box() {
        let mut c = Canvas::new(64, 64, [255; 3]);
        c.fill_triangle([(32.0, 2.0), (2.0, 62.0), (62.0, 62.0)], [0; 3]);
        let n = c.img.pixels().filter(|p| p.0 == [0; 3]).count() as f32;
        assert!((n - 1800.0).abs() < 60.0, "{n}");
    }
}
