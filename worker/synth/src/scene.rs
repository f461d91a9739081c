//! Formal scene descriptions (what the paper's cross-modal formalization would extract from an
//! image) and their rendering. Tasks are generated as scenes first, so questions, answers and
//! reasoning traces are derived from exact facts, and the picture is drawn from the same facts.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::raster::{text_width, Canvas};

pub const BACKGROUND: [u8; 3] = [255, 255, 255];
pub const INK: [u8; 3] = [0, 0, 0];
pub const GRID: [u8; 3] = [200, 200, 200];

/// Saturated palette colours, far apart in RGB so a colour can be recognised from one pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Color {
    pub const ALL: [Color; 6] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
        Color::Orange,
    ];
    /// The three primaries: the easiest colour classes.
    pub const BASIC: [Color; 3] = [Color::Red, Color::Green, Color::Blue];

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 30, 30],
            Color::Green => [30, 160, 50],
            Color::Blue => [30, 70, 220],
            Color::Yellow => [240, 200, 0],
            Color::Purple => [140, 50, 190],
            Color::Orange => [250, 120, 0],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
        }
    }

    pub fn from_rgb(rgb: [u8; 3]) -> Option<Color> {
        Color::ALL.into_iter().find(|c| c.rgb() == rgb)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
}

impl ShapeKind {
    pub const ALL: [ShapeKind; 3] = [ShapeKind::Circle, ShapeKind::Square, ShapeKind::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
        }
    }
    pub fn plural(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circles",
            ShapeKind::Square => "squares",
            ShapeKind::Triangle => "triangles",
        }
    }
}

/// One filled shape. `x`, `y` is the centre of its bounding box in pixels and `size` half its
/// side: radius of a circle, half-side of a square, half-base (and half-height) of an upright
/// isosceles triangle. The centre pixel is always inside the shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shape {
    pub kind: ShapeKind,
    pub color: Color,
    pub x: u32,
    pub y: u32,
    pub size: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Bar {
    pub label: String,
    pub value: u32,
    pub color: Color,
}

/// A formal description. Serialised as the task's `scene` field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Scene {
    /// Filled shapes on a white background; shapes never touch (≥ 2 px apart).
    Shapes { width: u32, height: u32, shapes: Vec<Shape> },
    /// A bar chart of a small table. With `grid`, a grey line marks every unit up to `y_max`;
    /// with `labels`, each bar's label is written under it.
    BarChart {
        width: u32,
        height: u32,
        bars: Vec<Bar>,
        y_max: u32,
        grid: bool,
        labels: bool,
    },
    /// An analogue clock face centred at (`cx`, `cy`) with 12 ticks, a short thick hour hand
    /// and a long thin minute hand.
    Clock {
        width: u32,
        height: u32,
        cx: u32,
        cy: u32,
        radius: u32,
        hour: u32,
        minute: u32,
    },
    /// A right triangle with horizontal leg `a` (bottom) and vertical leg `b` (left), both
    /// written next to their sides; the right angle is marked and sits at pixel (`x0`, `y0`);
    /// one unit of length is `unit` pixels.
    RightTriangle {
        width: u32,
        height: u32,
        a: u32,
        b: u32,
        x0: u32,
        y0: u32,
        unit: u32,
    },
}

impl Scene {
    pub fn size(&self) -> (u32, u32) {
        match *self {
            Scene::Shapes { width, height, .. }
            | Scene::BarChart { width, height, .. }
            | Scene::Clock { width, height, .. }
            | Scene::RightTriangle { width, height, .. } => (width, height),
        }
    }

    pub fn render(&self) -> RgbImage {
        let (w, h) = self.size();
        let mut c = Canvas::new(w, h, BACKGROUND);
        match self {
            Scene::Shapes { shapes, .. } => {
                for s in shapes {
                    draw_shape(&mut c, s);
                }
            }
            Scene::BarChart {
                bars,
                y_max,
                grid,
                labels,
                ..
            } => draw_bars(&mut c, bars, *y_max, *grid, *labels),
            Scene::Clock {
                cx,
                cy,
                radius,
                hour,
                minute,
                ..
            } => draw_clock(&mut c, *cx as f32, *cy as f32, *radius as f32, *hour, *minute),
            Scene::RightTriangle {
                a, b, x0, y0, unit, ..
            } => draw_right_triangle(&mut c, *a, *b, *x0 as f32, *y0 as f32, *unit as f32),
        }
        c.img
    }
}

fn draw_shape(c: &mut Canvas, s: &Shape) {
    let (x, y, r) = (s.x as f32 + 0.5, s.y as f32 + 0.5, s.size as f32);
    let rgb = s.color.rgb();
    match s.kind {
        ShapeKind::Circle => c.fill_circle(x, y, r + 0.5, rgb),
        ShapeKind::Square => c.fill_rect(x - r, y - r, x + r, y + r, rgb),
        ShapeKind::Triangle => c.fill_triangle([(x, y - r), (x - r, y + r), (x + r, y + r)], rgb),
    }
}

/// Plot geometry of a bar chart, shared by the renderer and the reasoning traces.
pub struct BarLayout {
    pub left: u32,
    pub baseline: u32,
    pub unit_px: u32,
    pub slot: u32,
    pub bar_width: u32,
}

pub fn bar_layout(width: u32, height: u32, n: usize, y_max: u32, labels: bool) -> BarLayout {
    let bottom_margin = if labels { 10 } else { 3 };
    let baseline = height.saturating_sub(bottom_margin);
    let unit_px = (baseline.saturating_sub(4) / y_max.max(1)).max(1);
    let left = 4;
    let slot = (width.saturating_sub(2 * left) / n.max(1) as u32).max(1);
    let bar_width = (slot * 2 / 3).max(1);
    BarLayout {
        left,
        baseline,
        unit_px,
        slot,
        bar_width,
    }
}

fn draw_bars(c: &mut Canvas, bars: &[Bar], y_max: u32, grid: bool, labels: bool) {
    let (w, h) = (c.img.width(), c.img.height());
    let l = bar_layout(w, h, bars.len(), y_max, labels);
    let base = l.baseline as f32;
    if grid {
        for v in 1..=y_max {
            let y = base - (v * l.unit_px) as f32;
            c.fill_rect(l.left as f32, y, (w - l.left) as f32, y + 1.0, GRID);
        }
    }
    for (i, bar) in bars.iter().enumerate() {
        let x0 = (l.left + i as u32 * l.slot + (l.slot - l.bar_width) / 2) as f32;
        let top = base - (bar.value * l.unit_px) as f32;
        c.fill_rect(x0, top, x0 + l.bar_width as f32, base, bar.color.rgb());
        if labels {
            let tx = x0 as i64 + (l.bar_width as i64 - text_width(&bar.label, 1)) / 2;
            c.text(tx, l.baseline as i64 + 3, &bar.label, 1, INK);
        }
    }
    // Axis drawn last so it is never hidden by a bar.
    c.fill_rect(l.left as f32 - 1.0, base, (w - l.left) as f32, base + 1.0, INK);
}

/// Angle in radians, clockwise from 12 o'clock, of the hour and minute hands.
pub fn hand_angles(hour: u32, minute: u32) -> (f32, f32) {
    let tau = std::f32::consts::TAU;
    let m = minute as f32 / 60.0;
    (((hour % 12) as f32 + m) / 12.0 * tau, m * tau)
}

fn draw_clock(c: &mut Canvas, cx: f32, cy: f32, r: f32, hour: u32, minute: u32) {
    let at = |angle: f32, d: f32| (cx + d * angle.sin(), cy - d * angle.cos());
    let unit = (r / 25.0).max(1.0);
    c.ring(cx, cy, r, 1.5 * unit, INK);
    for k in 0..12 {
        let a = k as f32 / 12.0 * std::f32::consts::TAU;
        // 12, 3, 6 and 9 get long ticks so the face can be read without numbers.
        let inner = if k % 3 == 0 { 0.72 } else { 0.84 };
        c.line(at(a, inner * r), at(a, 0.95 * r), if k == 0 { 2.5 * unit } else { 1.2 * unit }, INK);
    }
    let (ha, ma) = hand_angles(hour, minute);
    c.line((cx, cy), at(ma, 0.8 * r), 1.2 * unit, INK);
    c.line((cx, cy), at(ha, 0.5 * r), 3.0 * unit, INK);
    c.fill_circle(cx, cy, 2.0 * unit, INK);
}

/// Margins around a right triangle: room for the left and bottom labels.
pub const TRIANGLE_LEFT: u32 = 19;
pub const TRIANGLE_BOTTOM: u32 = 14;
pub const TRIANGLE_PAD: u32 = 6;

fn draw_right_triangle(c: &mut Canvas, a: u32, b: u32, x0: f32, y0: f32, s: f32) {
    let p_right = (x0, y0);
    let p_a = (x0 + a as f32 * s, y0);
    let p_b = (x0, y0 - b as f32 * s);
    c.fill_triangle([p_right, p_a, p_b], [210, 225, 250]);
    for (p, q) in [(p_right, p_a), (p_a, p_b), (p_b, p_right)] {
        c.line(p, q, 2.0, INK);
    }
    // Right-angle marker.
    c.line((x0 + 6.0, y0), (x0 + 6.0, y0 - 6.0), 1.0, INK);
    c.line((x0, y0 - 6.0), (x0 + 6.0, y0 - 6.0), 1.0, INK);
    let la = a.to_string();
    let lb = b.to_string();
    let ax = (x0 + a as f32 * s / 2.0) as i64 - text_width(&la, 2) / 2;
    c.text(ax, y0 as i64 + 3, &la, 2, INK);
    let by = (y0 - b as f32 * s / 2.0) as i64 - 5;
    c.text(x0 as i64 - 3 - text_width(&lb, 2), by, &lb, 2, INK);
}
