//! `onevision report DIR`: turns a run's `metrics.jsonl` (one JSON object per optimizer step, as
//! written by [`StepMetrics::to_json`](crate::telemetry::StepMetrics::to_json)) into PNG plots —
//! loss, reward, accuracy, KL, throughput, step time — and a small `index.html` showing them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args as ClapArgs;
use plotters::prelude::*;
use serde_json::Value;

/// The plots' font, bundled so the report renders the same everywhere (no system fonts needed).
/// DejaVu Sans Mono, Bitstream Vera license: `worker/assets/fonts/LICENSE-DejaVu.txt`.
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Run directory holding metrics.jsonl.
    pub dir: PathBuf,
    /// Where to write the PNGs and index.html (default: DIR).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Width of each plot in pixels.
    #[arg(long, default_value_t = 800, value_parser = clap::value_parser!(u32).range(200..=8000))]
    pub width: u32,
    /// Height of each plot in pixels.
    #[arg(long, default_value_t = 450, value_parser = clap::value_parser!(u32).range(150..=8000))]
    pub height: u32,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let out = args.out.clone().unwrap_or_else(|| args.dir.clone());
    let report = generate(&args.dir.join(METRICS_FILE), &out, (args.width, args.height))?;
    println!("{} steps, {} plots: {}", report.steps, report.plots.len(), report.index.display());
    Ok(())
}

/// The file `onevision report` reads in the run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Everything `onevision report` can fail with; each message names the file (and line) to fix.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read {path}: {source} (is it a run directory with metrics.jsonl?)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {detail}")]
    Line { path: PathBuf, line: usize, detail: String },
    #[error("{path} has no steps yet (no non-empty lines)")]
    Empty { path: PathBuf },
    #[error("cannot write {path}: {detail}")]
    Write { path: PathBuf, detail: String },
    #[error("the bundled plot font is unreadable: {0}")]
    Font(String),
}

/// One optimizer step: its number and every numeric field of the line.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub values: BTreeMap<String, f64>,
}

/// Reads `metrics.jsonl`: one JSON object per non-empty line with an integer `step` and numeric
/// (or null) values; non-numeric values of other fields are ignored so later writers can add
/// text fields. A line that breaks this is an error naming the line.
pub fn read_metrics(path: &Path) -> Result<Vec<StepRecord>, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read { path: path.into(), source })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |detail: String| ReportError::Line { path: path.into(), line: i + 1, detail };
        let value: Value = serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(bad("expected a JSON object with a `step` field".into()));
        };
        let step = map
            .get("step")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("`step` is missing or not a non-negative integer".into()))?;
        let mut values = BTreeMap::new();
        for (k, v) in &map {
            match v {
                Value::Number(n) => {
                    if let Some(x) = n.as_f64().filter(|x| x.is_finite()) {
                        values.insert(k.clone(), x);
                    }
                }
                Value::Null => {} // NaN/inf are written as null by serde_json: no point
                _ if plotted(k) => return Err(bad(format!("`{k}` must be a number, found {v}"))),
                _ => {}
            }
        }
        out.push(StepRecord { step, values });
    }
    if out.is_empty() {
        return Err(ReportError::Empty { path: path.into() });
    }
    Ok(out)
}

/// Whether field `k` feeds a plot (and so must be numeric).
fn plotted(k: &str) -> bool {
    PLOTS.iter().any(|p| p.fields.iter().any(|f| f.matches(k)))
}

/// Which fields a plot draws.
#[derive(Clone, Copy)]
enum Field {
    /// Exactly this key.
    Key(&'static str, &'static str),
    /// Every key with this prefix; the legend is the rest of the key.
    Prefix(&'static str),
}

impl Field {
    fn matches(&self, k: &str) -> bool {
        match *self {
            Field::Key(key, _) => k == key,
            Field::Prefix(p) => k.strip_prefix(p).is_some_and(|rest| !rest.is_empty()),
        }
    }
}

struct PlotSpec {
    file: &'static str,
    title: &'static str,
    y_label: &'static str,
    fields: &'static [Field],
}

const PLOTS: &[PlotSpec] = &[
    PlotSpec { file: "loss.png", title: "Training loss", y_label: "loss", fields: &[Field::Key("loss", "loss")] },
    PlotSpec {
        file: "reward.png",
        title: "Reward (mean per reward function)",
        y_label: "reward",
        fields: &[Field::Prefix("reward/"), Field::Key("reward", "reward")],
    },
    PlotSpec {
        file: "accuracy.png",
        title: "Accuracy",
        y_label: "fraction correct",
        // The trainer's `eval_accuracy` / `eval_accuracy_sampled` (runtime/trainer.rs), on evaluation steps.
        fields: &[
            Field::Key("accuracy", "train"),
            Field::Key("eval_accuracy", "held-out, greedy"),
            Field::Key("eval_accuracy_sampled", "held-out, sampled"),
        ],
    },
    PlotSpec { file: "kl.png", title: "KL divergence to the reference", y_label: "KL", fields: &[Field::Key("kl", "kl")] },
    PlotSpec {
        file: "throughput.png",
        title: "Throughput",
        y_label: "tokens / s",
        fields: &[Field::Key("tokens_per_second", "tokens/s")],
    },
    PlotSpec {
        file: "step_time.png",
        title: "Step time by phase",
        y_label: "seconds",
        fields: &[Field::Prefix("time/")],
    },
];

/// What `generate` wrote.
#[derive(Debug)]
pub struct Report {
    pub steps: usize,
    /// PNG files written, in page order.
    pub plots: Vec<PathBuf>,
    pub index: PathBuf,
}

/// Reads `metrics` and writes one PNG of `size` pixels per plot that has data, plus
/// `index.html`, into `out_dir` (created if missing).
pub fn generate(metrics: &Path, out_dir: &Path, size: (u32, u32)) -> Result<Report, ReportError> {
    let records = read_metrics(metrics)?;
    std::fs::create_dir_all(out_dir)
        .map_err(|e| ReportError::Write { path: out_dir.into(), detail: e.to_string() })?;
    register_font()?;
    let mut plots = Vec::new();
    let mut written = Vec::new();
    for spec in PLOTS {
        let series = collect(&records, spec.fields);
        if series.iter().all(|(_, pts)| pts.is_empty()) {
            continue; // e.g. no reward in an SFT run
        }
        let path = out_dir.join(spec.file);
        draw(&path, spec, &series, size)?;
        plots.push(path);
        written.push(spec);
    }
    let index = out_dir.join("index.html");
    let html = index_html(metrics, &records, &written, size);
    std::fs::write(&index, html).map_err(|e| ReportError::Write { path: index.clone(), detail: e.to_string() })?;
    Ok(Report { steps: records.len(), plots, index })
}

fn register_font() -> Result<(), ReportError> {
    for family in ["sans-serif", "monospace"] {
        plotters::style::register_font(family, FontStyle::Normal, FONT)
            .map_err(|_| ReportError::Font("DejaVuSansMono.ttf".into()))?;
    }
    Ok(())
}

type Series = Vec<(String, Vec<(f64, f64)>)>;

/// (legend, points by step) for every field of a plot, in field order; keys matching a prefix in
/// key order. A `Key` field is left out when a `Prefix` field already drew series (the combined
/// `reward` duplicates `reward/total`).
fn collect(records: &[StepRecord], fields: &[Field]) -> Series {
    let mut out: Series = Vec::new();
    for f in fields {
        match *f {
            Field::Key(key, legend) => {
                if fields.iter().any(|g| matches!(g, Field::Prefix(_))) && !out.is_empty() {
                    continue;
                }
                let pts = records.iter().filter_map(|r| r.values.get(key).map(|v| (r.step as f64, *v))).collect();
                out.push((legend.to_string(), pts));
            }
            Field::Prefix(p) => {
                let mut keys: Vec<&String> = records.iter().flat_map(|r| r.values.keys()).filter(|k| f.matches(k)).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let pts = records.iter().filter_map(|r| r.values.get(k).map(|v| (r.step as f64, *v))).collect();
                    out.push((k[p.len()..].to_string(), pts));
                }
            }
        }
    }
    out.retain(|(_, pts)| !pts.is_empty());
    out
}

/// Axis range covering `values`, padded so a flat line is not drawn on the frame.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { lo.abs().max(1.0) * 0.1 };
    (lo - pad, hi + pad)
}

fn draw(path: &Path, spec: &PlotSpec, series: &Series, size: (u32, u32)) -> Result<(), ReportError> {
    let err = |e: &dyn std::fmt::Display| ReportError::Write { path: path.into(), detail: e.to_string() };
    let (x0, x1) = range(series.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x)));
    let (y0, y1) = range(series.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y)));
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(spec.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(spec.y_label)
        .label_style(("sans-serif", 12))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (legend, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let style = ShapeStyle { color, filled: false, stroke_width: 2 };
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), style))
            .map_err(|e| err(&e))?
            .label(legend.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], style));
        if pts.len() == 1 {
            // A single step draws no line segment: mark the point.
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(|e| err(&e))?;
        }
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 12))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn index_html(metrics: &Path, records: &[StepRecord], plots: &[&PlotSpec], (w, h): (u32, u32)) -> String {
    let mut s = String::new();
    let source = escape(&metrics.display().to_string());
    let first = records.first().map(|r| r.step).unwrap_or(0);
    let last = records.last();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>onevision report</title>\n\
         <style>body{{font-family:sans-serif;margin:2em}}img{{border:1px solid #ddd;margin:0 1em 1em 0}}\
         td,th{{padding:0.2em 1em;text-align:left}}</style>\n</head>\n<body>\n<h1>onevision report</h1>\n\
         <p>{} steps ({first} to {}) from <code>{source}</code></p>\n",
        records.len(),
        last.map(|r| r.step).unwrap_or(0),
    );
    if let Some(r) = last {
        s.push_str("<h2>Last step</h2>\n<table>\n");
        for (k, v) in &r.values {
            let _ = writeln!(s, "<tr><th>{}</th><td>{v}</td></tr>", escape(k));
        }
        s.push_str("</table>\n");
    }
    s.push_str("<h2>Plots</h2>\n");
    for p in plots {
        let _ = writeln!(s, "<figure><img src=\"{}\" width=\"{w}\" height=\"{h}\" alt=\"{}\"></figure>", p.file, escape(p.title));
    }
    s.push_str("</body>\n</html>\n");
    s
}
