//! Task families: each draws a random formal scene, then derives the question, the exact answer
//! and a step-by-step reasoning trace from that scene (never from pixels).

use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::scene::{
    hand_angles, Bar, Color, Scene, Shape, ShapeKind, TRIANGLE_BOTTOM, TRIANGLE_LEFT, TRIANGLE_PAD,
};

/// Highest difficulty grade. 1 = a handful of answer classes, big high-contrast objects
/// (learnable by a tiny model in minutes); 3 = more objects, more classes, arithmetic.
pub const MAX_DIFFICULTY: u8 = 3;

/// Minimum side of chart-like images (bar charts, clocks, geometry), which need room for
/// labels and hands.
pub const CHART_MIN_SIZE: u32 = 112;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Colour of a shape.
    Color,
    /// Kind of a shape (circle, square, triangle).
    Shape,
    /// Number of shapes (optionally of one colour and kind).
    Count,
    /// Relative position (left/right/above/below) and extremes.
    Position,
    /// Bar charts from small tables: tallest bar, values, differences, totals.
    Bar,
    /// Analogue clock faces: hour, or H:MM.
    Clock,
    /// Right triangles with labelled legs: hypotenuse, area, perimeter.
    Geometry,
}

impl Family {
    pub const ALL: [Family; 7] = [
        Family::Color,
        Family::Shape,
        Family::Count,
        Family::Position,
        Family::Bar,
        Family::Clock,
        Family::Geometry,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::Color => "color",
            Family::Shape => "shape",
            Family::Count => "count",
            Family::Position => "position",
            Family::Bar => "bar",
            Family::Clock => "clock",
            Family::Geometry => "geometry",
        }
    }

    pub fn from_name(s: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == s)
    }
}

/// One generated task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub family: Family,
    pub difficulty: u8,
    pub scene: Scene,
    pub question: String,
    pub answer: String,
    /// Step-by-step reasoning written from the scene, without the think tags.
    pub reasoning: String,
}

impl Task {
    /// The SFT target: `<think>…</think><answer>…</answer>`.
    pub fn completion(&self) -> String {
        format!("<think>{}</think><answer>{}</answer>", self.reasoning, self.answer)
    }
}

/// Draw one task. `size` is the side of shape images (chart families use at least
/// [`CHART_MIN_SIZE`]). Returns `None` when a random draw was rejected (e.g. shapes could not
/// be placed apart); the caller simply draws again.
pub fn generate<R: Rng>(family: Family, difficulty: u8, size: u32, rng: &mut R) -> Option<Task> {
    let d = difficulty.clamp(1, MAX_DIFFICULTY);
    let (scene, question, answer, reasoning) = match family {
        Family::Color => color_task(d, size, rng)?,
        Family::Shape => shape_task(d, size, rng)?,
        Family::Count => count_task(d, size, rng)?,
        Family::Position => position_task(d, size, rng)?,
        Family::Bar => bar_task(d, size.max(CHART_MIN_SIZE), rng)?,
        Family::Clock => clock_task(d, size.max(CHART_MIN_SIZE), rng)?,
        Family::Geometry => geometry_task(d, size.max(CHART_MIN_SIZE), rng)?,
    };
    Some(Task {
        family,
        difficulty: d,
        scene,
        question,
        answer,
        reasoning,
    })
}

type Parts = (Scene, String, String, String);

fn options(words: impl IntoIterator<Item = &'static str>) -> String {
    format!("Options: {}.", words.into_iter().collect::<Vec<_>>().join(", "))
}

fn color_options(palette: &[Color]) -> String {
    options(palette.iter().map(|c| c.name()))
}

fn shape_options() -> String {
    options(ShapeKind::ALL.iter().map(|k| k.name()))
}

/// Coarse location in thirds of the image, for readable traces.
fn location(s: &Shape, w: u32, h: u32) -> &'static str {
    let col = (s.x * 3 / w).min(2);
    let row = (s.y * 3 / h).min(2);
    [
        ["top left", "top", "top right"],
        ["left", "centre", "right"],
        ["bottom left", "bottom", "bottom right"],
    ][row as usize][col as usize]
}

fn describe(s: &Shape, w: u32, h: u32, pixels: Pixels) -> String {
    let at = format!("a {} {} at the {}", s.color.name(), s.kind.name(), location(s, w, h));
    match pixels {
        Pixels::Omit => at,
        Pixels::State => format!("{at} (centre x={}, y={})", s.x, s.y),
    }
}

/// Whether a trace states the shapes' pixel centres. Only traces that reason with them (position
/// comparisons, naming the matching shapes of a count) do: elsewhere they are ~8 high-entropy
/// tokens per shape that the answer does not depend on, which made SFT weaker and GRPO's policy
/// gradient noisier on the quickstart (docs/runtime.md, "A new machine, and traces without pixel
/// coordinates").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pixels {
    Omit,
    State,
}

fn describe_all(shapes: &[Shape], w: u32, h: u32, pixels: Pixels) -> String {
    let items: Vec<String> = shapes.iter().map(|s| describe(s, w, h, pixels)).collect();
    let n = shapes.len();
    format!(
        "The image shows {} shape{}: {}.",
        n,
        if n == 1 { "" } else { "s" },
        items.join("; ")
    )
}

/// Place `specs.len()` shapes with half-sizes in `sizes` so that their bounding boxes are at
/// least `gap` pixels apart and inside the image with a 1-pixel border.
fn place<R: Rng>(
    rng: &mut R,
    specs: &[(ShapeKind, Color)],
    w: u32,
    h: u32,
    sizes: (u32, u32),
    gap: u32,
) -> Option<Vec<Shape>> {
    let (lo, hi) = (sizes.0.max(2), sizes.1.max(sizes.0.max(2)));
    'attempt: for _ in 0..100 {
        let mut out: Vec<Shape> = Vec::with_capacity(specs.len());
        for &(kind, color) in specs {
            let size = rng.random_range(lo..=hi);
            if 2 * size + 3 > w.min(h) {
                return None;
            }
            let x = rng.random_range(size + 1..=w - size - 2);
            let y = rng.random_range(size + 1..=h - size - 2);
            let clash = out.iter().any(|o| {
                x.abs_diff(o.x) <= size + o.size + gap && y.abs_diff(o.y) <= size + o.size + gap
            });
            if clash {
                continue 'attempt;
            }
            out.push(Shape { kind, color, x, y, size });
        }
        return Some(out);
    }
    None
}

fn shapes_scene(w: u32, shapes: Vec<Shape>) -> Scene {
    Scene::Shapes {
        width: w,
        height: w,
        shapes,
    }
}

fn distinct<T: Copy, R: Rng>(rng: &mut R, from: &[T], n: usize) -> Vec<T> {
    from.choose_multiple(rng, n).copied().collect()
}

fn color_task<R: Rng>(d: u8, w: u32, rng: &mut R) -> Option<Parts> {
    match d {
        1 | 2 => {
            let palette: &[Color] = if d == 1 { &Color::BASIC } else { &Color::ALL };
            let kind = *ShapeKind::ALL.choose(rng)?;
            let color = *palette.choose(rng)?;
            let sizes = if d == 1 { (w / 5, w / 4) } else { (w / 8, w / 4) };
            let shapes = place(rng, &[(kind, color)], w, w, sizes, 2)?;
            let s = shapes[0];
            let q = format!("What colour is the shape? {}", color_options(palette));
            let r = format!(
                "{} Its fill colour is {}, which is one of the options.",
                describe_all(&shapes, w, w, Pixels::Omit),
                s.color.name()
            );
            Some((shapes_scene(w, shapes), q, color.name().into(), r))
        }
        _ => {
            let n = rng.random_range(2..=3);
            let kinds = distinct(rng, &ShapeKind::ALL, n);
            let colors = distinct(rng, &Color::ALL, n);
            let specs: Vec<_> = kinds.iter().copied().zip(colors.iter().copied()).collect();
            let shapes = place(rng, &specs, w, w, (w / 10, w / 6), 2)?;
            let target = *shapes.choose(rng)?;
            let q = format!(
                "What colour is the {}? {}",
                target.kind.name(),
                color_options(&Color::ALL)
            );
            let r = format!(
                "{} Only one shape is a {}, and it is {}.",
                describe_all(&shapes, w, w, Pixels::Omit),
                target.kind.name(),
                target.color.name()
            );
            Some((shapes_scene(w, shapes), q, target.color.name().into(), r))
        }
    }
}

fn shape_task<R: Rng>(d: u8, w: u32, rng: &mut R) -> Option<Parts> {
    match d {
        1 => {
            let kind = *ShapeKind::ALL.choose(rng)?;
            let color = *Color::BASIC.choose(rng)?;
            let shapes = place(rng, &[(kind, color)], w, w, (w / 5, w / 4), 2)?;
            let q = format!("What shape is shown? {}", shape_options());
            let r = format!(
                "{} It is a {}.",
                describe_all(&shapes, w, w, Pixels::Omit),
                kind.name()
            );
            Some((shapes_scene(w, shapes), q, kind.name().into(), r))
        }
        2 => {
            let n = rng.random_range(2..=3);
            let colors = distinct(rng, &Color::ALL, n);
            let specs: Vec<_> = colors
                .iter()
                .map(|&c| Some((*ShapeKind::ALL.choose(rng)?, c)))
                .collect::<Option<_>>()?;
            let shapes = place(rng, &specs, w, w, (w / 10, w / 6), 2)?;
            let target = *shapes.choose(rng)?;
            let q = format!(
                "What shape is the {} object? {}",
                target.color.name(),
                shape_options()
            );
            let r = format!(
                "{} The {} object is a {}.",
                describe_all(&shapes, w, w, Pixels::Omit),
                target.color.name(),
                target.kind.name()
            );
            Some((shapes_scene(w, shapes), q, target.kind.name().into(), r))
        }
        _ => {
            let n = rng.random_range(3..=6);
            let specs: Vec<_> = (0..n)
                .map(|_| Some((*ShapeKind::ALL.choose(rng)?, *Color::ALL.choose(rng)?)))
                .collect::<Option<_>>()?;
            let counts = ShapeKind::ALL.map(|k| specs.iter().filter(|s| s.0 == k).count());
            let max = *counts.iter().max()?;
            if counts.iter().filter(|&&c| c == max).count() != 1 {
                return None; // the most frequent kind must be unique
            }
            let winner = ShapeKind::ALL[counts.iter().position(|&c| c == max)?];
            let shapes = place(rng, &specs, w, w, (w / 14, w / 9), 2)?;
            let tally: Vec<String> = ShapeKind::ALL
                .iter()
                .zip(counts)
                .map(|(k, c)| format!("{} {}", c, if c == 1 { k.name() } else { k.plural() }))
                .collect();
            let q = format!("Which shape appears most often? {}", shape_options());
            let r = format!(
                "{} Tally: {}. The most frequent is the {}.",
                describe_all(&shapes, w, w, Pixels::Omit),
                tally.join(", "),
                winner.name()
            );
            Some((shapes_scene(w, shapes), q, winner.name().into(), r))
        }
    }
}

fn count_task<R: Rng>(d: u8, w: u32, rng: &mut R) -> Option<Parts> {
    match d {
        1 | 2 => {
            let (n, specs): (usize, Vec<(ShapeKind, Color)>) = if d == 1 {
                let n = rng.random_range(1..=3);
                let kind = *ShapeKind::ALL.choose(rng)?;
                let color = *Color::BASIC.choose(rng)?;
                (n, vec![(kind, color); n])
            } else {
                let n = rng.random_range(1..=6);
                let specs = (0..n)
                    .map(|_| Some((*ShapeKind::ALL.choose(rng)?, *Color::ALL.choose(rng)?)))
                    .collect::<Option<_>>()?;
                (n, specs)
            };
            let sizes = if d == 1 { (w / 10, w / 7) } else { (w / 14, w / 9) };
            let shapes = place(rng, &specs, w, w, sizes, 2)?;
            let q = "How many shapes are in the image?".to_string();
            let r = format!(
                "{} Counting them one by one: {}. There {} {}.",
                describe_all(&shapes, w, w, Pixels::Omit),
                (1..=n).map(|i| i.to_string()).collect::<Vec<_>>().join(", "),
                if n == 1 { "is" } else { "are" },
                n
            );
            Some((shapes_scene(w, shapes), q, n.to_string(), r))
        }
        _ => {
            let n = rng.random_range(2..=7);
            let specs: Vec<_> = (0..n)
                .map(|_| Some((*ShapeKind::ALL.choose(rng)?, *Color::BASIC.choose(rng)?)))
                .collect::<Option<_>>()?;
            let (tk, tc) = *specs.choose(rng)?;
            // Half the time ask about a combination that may be absent, so 0 is a real answer.
            let (tk, tc) = if rng.random_bool(0.5) {
                (*ShapeKind::ALL.choose(rng)?, *Color::BASIC.choose(rng)?)
            } else {
                (tk, tc)
            };
            let shapes = place(rng, &specs, w, w, (w / 14, w / 9), 2)?;
            let matching: Vec<&Shape> = shapes.iter().filter(|s| s.kind == tk && s.color == tc).collect();
            let k = matching.len();
            let q = format!("How many {} {} are in the image?", tc.name(), tk.plural());
            let r = format!(
                "{} The {} {} among them: {}. That makes {}.",
                describe_all(&shapes, w, w, Pixels::State),
                tc.name(),
                tk.plural(),
                if k == 0 {
                    "none".to_string()
                } else {
                    matching.iter().map(|s| format!("the one at x={}, y={}", s.x, s.y)).collect::<Vec<_>>().join("; ")
                },
                k
            );
            Some((shapes_scene(w, shapes), q, k.to_string(), r))
        }
    }
}

fn position_task<R: Rng>(d: u8, w: u32, rng: &mut R) -> Option<Parts> {
    match d {
        1 | 2 => {
            let palette: &[Color] = if d == 1 { &Color::BASIC } else { &Color::ALL };
            let colors = distinct(rng, palette, 2);
            let specs: Vec<_> = colors
                .iter()
                .map(|&c| Some((*ShapeKind::ALL.choose(rng)?, c)))
                .collect::<Option<_>>()?;
            let sizes = if d == 1 { (w / 9, w / 6) } else { (w / 10, w / 7) };
            let shapes = place(rng, &specs, w, w, sizes, 2)?;
            let (a, b) = (shapes[0], shapes[1]);
            let dx = a.x as i64 - b.x as i64;
            let dy = a.y as i64 - b.y as i64;
            // Keep the relation unambiguous: one axis must clearly dominate.
            let horizontal = dx.abs() >= 2 * dy.abs() && dx.abs() >= (w / 4) as i64;
            let vertical = dy.abs() >= 2 * dx.abs() && dy.abs() >= (w / 4) as i64;
            let relation = if horizontal {
                if dx < 0 { "left" } else { "right" }
            } else if vertical && d == 2 {
                if dy < 0 { "above" } else { "below" }
            } else {
                return None;
            };
            let (q, name_a, name_b) = if d == 1 {
                (
                    format!(
                        "Is the {} shape to the left or to the right of the {} shape? {}",
                        a.color.name(),
                        b.color.name(),
                        options(["left", "right"])
                    ),
                    format!("{} shape", a.color.name()),
                    format!("{} shape", b.color.name()),
                )
            } else {
                (
                    format!(
                        "Where is the {} {} relative to the {} {}? {}",
                        a.color.name(),
                        a.kind.name(),
                        b.color.name(),
                        b.kind.name(),
                        options(["left", "right", "above", "below"])
                    ),
                    format!("{} {}", a.color.name(), a.kind.name()),
                    format!("{} {}", b.color.name(), b.kind.name()),
                )
            };
            let why = if horizontal {
                format!(
                    "The horizontal distance {} is much larger than the vertical distance {}, so compare x: {} {} {}",
                    dx.abs(),
                    dy.abs(),
                    a.x,
                    if dx < 0 { "is less than" } else { "is greater than" },
                    b.x
                )
            } else {
                format!(
                    "The vertical distance {} is much larger than the horizontal distance {}, so compare y (which grows downwards): {} {} {}",
                    dy.abs(),
                    dx.abs(),
                    a.y,
                    if dy < 0 { "is less than" } else { "is greater than" },
                    b.y
                )
            };
            let phrase = match relation {
                "left" => "to the left of",
                "right" => "to the right of",
                "above" => "above",
                _ => "below",
            };
            let r = format!(
                "{} {}. So the {} is {} the {}.",
                describe_all(&shapes, w, w, Pixels::State),
                why,
                name_a,
                phrase,
                name_b
            );
            Some((shapes_scene(w, shapes), q, relation.into(), r))
        }
        _ => {
            let n = rng.random_range(3..=4);
            let colors = distinct(rng, &Color::ALL, n);
            let specs: Vec<_> = colors
                .iter()
                .map(|&c| Some((*ShapeKind::ALL.choose(rng)?, c)))
                .collect::<Option<_>>()?;
            let shapes = place(rng, &specs, w, w, (w / 12, w / 8), 2)?;
            let &(word, key) = EXTREMES.choose(rng)?;
            let mut order: Vec<&Shape> = shapes.iter().collect();
            order.sort_by_key(|s| std::cmp::Reverse(key(s)));
            if key(order[0]) - key(order[1]) < 4 {
                return None; // extreme must be visibly unique
            }
            let coord = if word == "leftmost" || word == "rightmost" { "x" } else { "y" };
            let q = format!("What colour is the {} shape? {}", word, color_options(&Color::ALL));
            let r = format!(
                "{} Comparing the {} coordinates, the {} shape is the {} {} ({}={}).",
                describe_all(&shapes, w, w, Pixels::State),
                coord,
                word,
                order[0].color.name(),
                order[0].kind.name(),
                coord,
                if coord == "x" { order[0].x } else { order[0].y }
            );
            let answer = order[0].color.name().to_string();
            Some((shapes_scene(w, shapes), q, answer, r))
        }
    }
}

/// Extreme-position questions: the word and a key that is largest for the extreme shape.
type ExtremeKey = fn(&Shape) -> i64;
const EXTREMES: [(&str, ExtremeKey); 4] = [
    ("leftmost", |s| -(s.x as i64)),
    ("rightmost", |s| s.x as i64),
    ("topmost", |s| -(s.y as i64)),
    ("bottommost", |s| s.y as i64),
];

const LETTERS: [&str; 5] = ["A", "B", "C", "D", "E"];

fn bar_task<R: Rng>(d: u8, w: u32, rng: &mut R) -> Option<Parts> {
    let (n, y_max, palette): (usize, u32, &[Color]) = match d {
        1 => (3, 5, &Color::BASIC),
        2 => (rng.random_range(3..=4), 6, &Color::ALL),
        _ => (rng.random_range(4..=5), 8, &Color::ALL),
    };
    let colors = distinct(rng, palette, n);
    let mut values: Vec<u32> = (0..n).map(|_| rng.random_range(1..=y_max)).collect();
    if d == 1 {
        // Distinct heights so "tallest" is obvious.
        let mut pool: Vec<u32> = (1..=y_max).collect();
        pool.shuffle(rng);
        values = pool[..n].to_vec();
    }
    let bars: Vec<Bar> = (0..n)
        .map(|i| Bar {
            label: LETTERS[i].to_string(),
            value: values[i],
            color: colors[i],
        })
        .collect();
    let max = *values.iter().max()?;
    let min = *values.iter().min()?;
    let unique_max = values.iter().filter(|&&v| v == max).count() == 1;
    let table = bars
        .iter()
        .map(|b| {
            if d == 1 {
                format!("{} bar = {}", b.color.name(), b.value)
            } else {
                format!("{} ({}) = {}", b.label, b.color.name(), b.value)
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let tallest = bars.iter().find(|b| b.value == max)?;
    let (q, a, r) = match (d, rng.random_range(0..2)) {
        (1, _) => {
            if !unique_max {
                return None;
            }
            (
                format!("What colour is the tallest bar? {}", color_options(palette)),
                tallest.color.name().to_string(),
                format!(
                    "The chart has {} bars with heights: {}. The largest value is {}, so the tallest bar is {}.",
                    n,
                    table,
                    max,
                    tallest.color.name()
                ),
            )
        }
        (2, 0) => {
            if !unique_max {
                return None;
            }
            (
                "Which bar is the tallest? Answer with its letter.".to_string(),
                tallest.label.clone(),
                format!(
                    "Reading the chart against the grid lines: {}. The largest value is {}, which belongs to bar {}.",
                    table, max, tallest.label
                ),
            )
        }
        (2, _) => {
            let b = bars.choose(rng)?;
            (
                format!("Each grey grid line marks one unit. What is the value of bar {}?", b.label),
                b.value.to_string(),
                format!(
                    "Reading the chart against the grid lines: {}. Bar {} reaches grid line {}, so its value is {}.",
                    table, b.label, b.value, b.value
                ),
            )
        }
        (_, 0) => (
            "Each grey grid line marks one unit. What is the difference between the tallest and the shortest bar?"
                .to_string(),
            (max - min).to_string(),
            format!(
                "Reading the chart against the grid lines: {}. The tallest is {} and the shortest is {}; {} - {} = {}.",
                table,
                max,
                min,
                max,
                min,
                max - min
            ),
        ),
        (_, _) => {
            let total: u32 = values.iter().sum();
            (
                "Each grey grid line marks one unit. What is the total of all the bars?".to_string(),
                total.to_string(),
                format!(
                    "Reading the chart against the grid lines: {}. Adding them: {} = {}.",
                    table,
                    values.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" + "),
                    total
                ),
            )
        }
    };
    let scene = Scene::BarChart {
        width: w,
        height: w,
        bars,
        y_max,
        grid: d >= 2,
        labels: d >= 2,
    };
    Some((scene, q, a, r))
}

fn clock_task<R: Rng>(d: u8, w: u32, rng: &mut R) -> Option<Parts> {
    let hour = rng.random_range(1..=12u32);
    let minute = match d {
        1 => 0,
        2 => 15 * rng.random_range(0..4u32),
        _ => 5 * rng.random_range(0..12u32),
    };
    // Face size and position vary so one reading has many distinct pictures.
    let max_r = w / 2 - 2;
    let radius = rng.random_range(max_r * 7 / 10..=max_r);
    let cx = rng.random_range(radius + 1..=w - radius - 1);
    let cy = rng.random_range(radius + 1..=w - radius - 1);
    let scene = Scene::Clock {
        width: w,
        height: w,
        cx,
        cy,
        radius,
        hour,
        minute,
    };
    let (ha, _) = hand_angles(hour, minute);
    let minute_mark = if minute == 0 { 12 } else { minute / 5 };
    let hour_pos = ha / std::f32::consts::TAU * 12.0;
    let r_minute = format!(
        "The long minute hand points at the {} mark, which means {} minutes.",
        minute_mark, minute
    );
    let r_hour = if minute == 0 {
        format!("The short hour hand points exactly at the {}.", hour)
    } else {
        format!(
            "The short hour hand is {:.0}% of the way from the {} to the {}, so the hour is {}.",
            (hour_pos - hour_pos.floor()) * 100.0,
            hour,
            hour % 12 + 1,
            hour
        )
    };
    let (q, a) = if d == 1 {
        ("What hour does the clock show?".to_string(), hour.to_string())
    } else {
        (
            "What time does the clock show? Answer in H:MM format.".to_string(),
            format!("{}:{:02}", hour, minute),
        )
    };
    let r = format!("{} {} The time is {}:{:02}.", r_minute, r_hour, hour, minute);
    Some((scene, q, a, r))
}

/// Pythagorean triples with leg ratio ≤ 3, so both legs stay visible in a small image.
const TRIPLES: [(u32, u32, u32); 6] = [(3, 4, 5), (6, 8, 10), (5, 12, 13), (9, 12, 15), (8, 15, 17), (12, 16, 20)];

fn geometry_task<R: Rng>(d: u8, w: u32, rng: &mut R) -> Option<Parts> {
    let &(p, q, c) = TRIPLES.choose(rng)?;
    let (a, b) = if rng.random_bool(0.5) { (p, q) } else { (q, p) };
    if p.max(q) > 3 * p.min(q) {
        return None;
    }
    // Scale and placement vary within the margins kept free for the labels.
    let room_x = w - TRIANGLE_LEFT - TRIANGLE_PAD;
    let room_y = w - TRIANGLE_BOTTOM - TRIANGLE_PAD;
    let max_unit = (room_x / a).min(room_y / b);
    if max_unit < 2 {
        return None;
    }
    let unit = rng.random_range((max_unit * 3 / 5).max(2)..=max_unit);
    let x0 = rng.random_range(TRIANGLE_LEFT..=w - TRIANGLE_PAD - a * unit);
    let y0 = rng.random_range(TRIANGLE_PAD + b * unit..=w - TRIANGLE_BOTTOM);
    let scene = Scene::RightTriangle {
        width: w,
        height: w,
        a,
        b,
        x0,
        y0,
        unit,
    };
    let pyth = format!(
        "The triangle has a right angle between the legs labelled {} (bottom) and {} (left). By Pythagoras the hypotenuse is sqrt({}^2 + {}^2) = sqrt({} + {}) = sqrt({}) = {}.",
        a,
        b,
        a,
        b,
        a * a,
        b * b,
        a * a + b * b,
        c
    );
    let (question, answer, reasoning) = match (d, rng.random_range(0..2)) {
        (1, _) => {
            let mut distractors: Vec<u32> = [a + b, c + 1, c - 1, c + 2, a.max(b) + 1]
                .into_iter()
                .filter(|&x| x != c)
                .collect();
            distractors.sort_unstable();
            distractors.dedup();
            distractors.shuffle(rng);
            let mut opts: Vec<u32> = distractors[..3].to_vec();
            opts.push(c);
            opts.shuffle(rng);
            let idx = opts.iter().position(|&x| x == c)?;
            let listed = opts
                .iter()
                .zip(LETTERS)
                .map(|(v, l)| format!("{}. {}", l, v))
                .collect::<Vec<_>>()
                .join(" ");
            (
                format!("What is the length of the hypotenuse of the right triangle? Options: {}", listed),
                LETTERS[idx].to_string(),
                format!("{} The value {} is option {}.", pyth, c, LETTERS[idx]),
            )
        }
        (2, _) => (
            "What is the length of the hypotenuse of the right triangle?".to_string(),
            c.to_string(),
            pyth,
        ),
        (_, 0) => (
            "What is the area of the right triangle?".to_string(),
            (a * b / 2).to_string(),
            format!(
                "The legs labelled {} and {} meet at the right angle, so the area is {} * {} / 2 = {}.",
                a,
                b,
                a,
                b,
                a * b / 2
            ),
        ),
        (_, _) => (
            "What is the perimeter of the right triangle?".to_string(),
            (a + b + c).to_string(),
            format!("{} The perimeter is {} + {} + {} = {}.", pyth, a, b, c, a + b + c),
        ),
    };
    Some((scene, question, answer, reasoning))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn every_family_and_grade_generates() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for f in Family::ALL {
            for d in 1..=MAX_DIFFICULTY {
                let ok = (0..200).filter_map(|_| generate(f, d, 56, &mut rng)).count();
                assert!(ok > 20, "{f:?} d{d}: only {ok}/200 draws accepted");
            }
        }
    }

    #[test]
    fn easy_grades_have_few_answer_classes() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (f, max_classes) in [(Family::Color, 3), (Family::Shape, 3), (Family::Count, 3), (Family::Position, 2)] {
            let answers: std::collections::BTreeSet<String> =
                (0..300).filter_map(|_| generate(f, 1, 56, &mut rng)).map(|t| t.answer).collect();
            assert_eq!(answers.len(), max_classes, "{f:?}: {answers:?}");
        }
    }
}
