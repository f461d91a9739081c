//! `onevision data synth`: write train and held-out splits of synthetic verifiable tasks as
//! LLaMA-Factory sharegpt JSONL with PNG images.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::{io_err, Error, Result};
use crate::scene::Scene;
use crate::tasks::{generate, Family, Task, MAX_DIFFICULTY};

/// The R1-Onevision evaluation instruction appended to every question.
pub const INSTRUCTION: &str = "First output the thinking process in <think> </think> tags and then output the final answer in <answer> </answer> tags.";

pub const TRAIN_FILE: &str = "train.jsonl";
pub const HELDOUT_FILE: &str = "heldout.jsonl";
pub const IMAGES_DIR: &str = "images";

/// What to synthesise. `Default` is a small mixed dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    pub out: PathBuf,
    pub train: usize,
    pub heldout: usize,
    pub seed: u64,
    /// Families with relative weights (> 0).
    pub families: Vec<(Family, f64)>,
    /// Inclusive difficulty range, within 1..=MAX_DIFFICULTY.
    pub difficulty: (u8, u8),
    /// Side of shape images in pixels, a multiple of 28 (chart families use at least 112).
    pub image_size: u32,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            out: PathBuf::from("data/synth"),
            train: 2000,
            heldout: 200,
            seed: 0,
            families: Family::ALL.iter().map(|&f| (f, 1.0)).collect(),
            difficulty: (1, MAX_DIFFICULTY),
            image_size: 56,
        }
    }
}

/// Command-line arguments of `onevision data synth`.
#[derive(Debug, Clone, clap::Args)]
pub struct SynthArgs {
    /// Output directory (created): train.jsonl, heldout.jsonl, images/, dataset_info.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of training tasks.
    #[arg(long, default_value_t = 2000)]
    pub train: usize,
    /// Number of held-out tasks (never overlapping the training tasks).
    #[arg(long, default_value_t = 200)]
    pub heldout: usize,
    /// Random seed: the same seed and options give byte-identical output.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Task families with optional weights, e.g. `color,count` or `color:3,count:1`.
    /// Families: color, shape, count, position, bar, clock, geometry.
    #[arg(long, default_value = "color,shape,count,position,bar,clock,geometry")]
    pub families: String,
    /// Difficulty grade or inclusive range, e.g. `1` or `1-3`.
    #[arg(long, default_value = "1-3")]
    pub difficulty: String,
    /// Side of shape images in pixels (multiple of 28; charts, clocks and geometry use ≥ 112).
    #[arg(long, default_value_t = 56)]
    pub image_size: u32,
}

impl SynthArgs {
    pub fn to_options(&self) -> Result<SynthOptions> {
        Ok(SynthOptions {
            out: self.out.clone(),
            train: self.train,
            heldout: self.heldout,
            seed: self.seed,
            families: parse_families(&self.families)?,
            difficulty: parse_difficulty(&self.difficulty)?,
            image_size: self.image_size,
        })
    }
}

/// Parse and run `onevision data synth`.
pub fn run_synth(args: &SynthArgs) -> Result<SynthReport> {
    synth(&args.to_options()?)
}

/// Parse `name[:weight],...`.
pub fn parse_families(s: &str) -> Result<Vec<(Family, f64)>> {
    let mut out: Vec<(Family, f64)> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (name, weight) = match item.split_once(':') {
            Some((n, w)) => {
                let w: f64 = w.trim().parse().map_err(|_| {
                    Error::InvalidOption(format!("--families: weight `{w}` of `{n}` is not a number"))
                })?;
                (n.trim(), w)
            }
            None => (item, 1.0),
        };
        let fam = Family::from_name(name).ok_or_else(|| {
            Error::InvalidOption(format!(
                "--families: unknown family `{name}`; known: {}",
                Family::ALL.map(|f| f.name()).join(", ")
            ))
        })?;
        if !(weight.is_finite() && weight > 0.0) {
            return Err(Error::InvalidOption(format!(
                "--families: weight of `{name}` must be a positive number, got {weight}"
            )));
        }
        if out.iter().any(|(f, _)| *f == fam) {
            return Err(Error::InvalidOption(format!("--families: `{name}` listed twice")));
        }
        out.push((fam, weight));
    }
    if out.is_empty() {
        return Err(Error::InvalidOption("--families: give at least one family".into()));
    }
    Ok(out)
}

/// Parse `N` or `LO-HI`.
pub fn parse_difficulty(s: &str) -> Result<(u8, u8)> {
    let bad = || {
        Error::InvalidOption(format!(
            "--difficulty: expected a grade 1..={MAX_DIFFICULTY} or a range like 1-{MAX_DIFFICULTY}, got `{s}`"
        ))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse::<u8>().map_err(|_| bad())?, b.trim().parse::<u8>().map_err(|_| bad())?),
        None => {
            let d = s.trim().parse::<u8>().map_err(|_| bad())?;
            (d, d)
        }
    };
    if lo < 1 || hi > MAX_DIFFICULTY || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// Counts for one split.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SplitReport {
    pub file: PathBuf,
    pub rows: usize,
    pub by_family: BTreeMap<String, usize>,
    pub by_difficulty: BTreeMap<u8, usize>,
    pub by_answer: BTreeMap<String, usize>,
    /// Accuracy of always answering the most common answer: the floor a trained model must beat.
    pub majority_baseline: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SynthReport {
    pub out: PathBuf,
    pub train: SplitReport,
    pub heldout: SplitReport,
}

impl std::fmt::Display for SynthReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, s) in [("train", &self.train), ("held-out", &self.heldout)] {
            writeln!(
                f,
                "{name}: {} rows in {} ({} answer classes, majority baseline {:.1}%)",
                s.rows,
                s.file.display(),
                s.by_answer.len(),
                100.0 * s.majority_baseline
            )?;
        }
        Ok(())
    }
}

/// One JSONL row (LLaMA-Factory sharegpt plus the fields verifiable rewards need).
#[derive(Serialize)]
struct Row<'a> {
    messages: [Message; 2],
    images: [String; 1],
    answer: &'a str,
    id: &'a str,
    difficulty: u8,
    family: &'static str,
    scene: &'a Scene,
}

#[derive(Serialize)]
struct Message {
    role: &'static str,
    content: String,
}

/// The user turn for a task: image placeholder, question, instruction.
pub fn prompt(question: &str) -> String {
    format!("<image>{question}\n{INSTRUCTION}")
}

fn validate(opts: &SynthOptions) -> Result<()> {
    if opts.image_size < 56 || !opts.image_size.is_multiple_of(28) || opts.image_size > 1008 {
        return Err(Error::InvalidOption(format!(
            "--image-size must be a multiple of 28 between 56 and 1008 (no resize is then needed), got {}",
            opts.image_size
        )));
    }
    let (lo, hi) = opts.difficulty;
    if lo < 1 || hi > MAX_DIFFICULTY || lo > hi {
        return Err(Error::InvalidOption(format!(
            "difficulty range must lie within 1..={MAX_DIFFICULTY}, got {lo}-{hi}"
        )));
    }
    if opts.families.is_empty() || opts.families.iter().any(|(_, w)| !(w.is_finite() && *w > 0.0)) {
        return Err(Error::InvalidOption("families need at least one entry, all weights > 0".into()));
    }
    if opts.heldout == 0 && opts.train == 0 {
        return Err(Error::InvalidOption("nothing to do: --train and --heldout are both 0".into()));
    }
    Ok(())
}

/// Identity of a task for de-duplication: the formal scene fixes the image, plus the question.
fn task_key(t: &Task) -> Result<String> {
    Ok(format!("{}\u{1f}{}", serde_json::to_string(&t.scene)?, t.question))
}

/// Draw `n` distinct tasks not in `exclude`, adding their keys to `seen`.
fn draw_split(
    opts: &SynthOptions,
    split: &str,
    stream: u64,
    n: usize,
    exclude: &HashSet<String>,
) -> Result<(Vec<Task>, HashSet<String>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    // Independent streams per split: the held-out set does not change when --train changes.
    rng.set_stream(stream);
    let weights = WeightedIndex::new(opts.families.iter().map(|(_, w)| *w))
        .map_err(|e| Error::InvalidOption(format!("family weights: {e}")))?;
    let mut tasks = Vec::with_capacity(n);
    let mut seen = HashSet::with_capacity(n);
    // Rejections (shape placement, ambiguity) and duplicates are frequent in small task
    // spaces; this many misses in a row means the space is exhausted: report it.
    const MAX_MISSES: usize = 20_000;
    let mut misses = 0usize;
    while tasks.len() < n {
        if misses >= MAX_MISSES {
            return Err(Error::TaskSpaceExhausted {
                split: split.into(),
                wanted: n,
                found: tasks.len(),
            });
        }
        misses += 1;
        let family = opts.families[weights.sample(&mut rng)].0;
        let difficulty = rng.random_range(opts.difficulty.0..=opts.difficulty.1);
        let Some(task) = generate(family, difficulty, opts.image_size, &mut rng) else {
            continue;
        };
        let key = task_key(&task)?;
        if exclude.contains(&key) || seen.contains(&key) {
            continue;
        }
        seen.insert(key);
        tasks.push(task);
        misses = 0;
    }
    Ok((tasks, seen))
}

fn write_split(out: &Path, file: &str, prefix: &str, tasks: &[Task]) -> Result<SplitReport> {
    let path = out.join(file);
    let f = fs::File::create(&path).map_err(io_err(&path))?;
    let mut w = BufWriter::new(f);
    let mut report = SplitReport {
        file: path.clone(),
        rows: tasks.len(),
        ..Default::default()
    };
    for (i, t) in tasks.iter().enumerate() {
        let id = format!("{prefix}-{i:06}");
        let rel = format!("{IMAGES_DIR}/{id}.png");
        let img_path = out.join(&rel);
        t.scene
            .render()
            .save_with_format(&img_path, image::ImageFormat::Png)
            .map_err(|source| Error::Image {
                path: img_path.clone(),
                source,
            })?;
        let row = Row {
            messages: [
                Message {
                    role: "user",
                    content: prompt(&t.question),
                },
                Message {
                    role: "assistant",
                    content: t.completion(),
                },
            ],
            images: [rel],
            answer: &t.answer,
            id: &id,
            difficulty: t.difficulty,
            family: t.family.name(),
            scene: &t.scene,
        };
        serde_json::to_writer(&mut w, &row)?;
        w.write_all(b"\n").map_err(io_err(&path))?;
        *report.by_family.entry(t.family.name().into()).or_default() += 1;
        *report.by_difficulty.entry(t.difficulty).or_default() += 1;
        *report.by_answer.entry(t.answer.clone()).or_default() += 1;
    }
    w.flush().map_err(io_err(&path))?;
    let top = report.by_answer.values().copied().max().unwrap_or(0);
    report.majority_baseline = if tasks.is_empty() { 0.0 } else { top as f64 / tasks.len() as f64 };
    Ok(report)
}

/// LLaMA-Factory `dataset_info.json` describing both splits.
fn dataset_info() -> serde_json::Value {
    let entry = |file: &str| {
        serde_json::json!({
            "file_name": file,
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
        })
    };
    serde_json::json!({
        "onevision_synth_train": entry(TRAIN_FILE),
        "onevision_synth_heldout": entry(HELDOUT_FILE),
    })
}

/// Synthesise the dataset into `opts.out`.
pub fn synth(opts: &SynthOptions) -> Result<SynthReport> {
    validate(opts)?;
    let out = &opts.out;
    let images = out.join(IMAGES_DIR);
    fs::create_dir_all(&images).map_err(io_err(&images))?;
    // Held-out first, so the training draw can exclude every held-out task.
    let (heldout, heldout_keys) = draw_split(opts, "held-out", 1, opts.heldout, &HashSet::new())?;
    let (train, _) = draw_split(opts, "train", 2, opts.train, &heldout_keys)?;
    let heldout_report = write_split(out, HELDOUT_FILE, "heldout", &heldout)?;
    let train_report = write_split(out, TRAIN_FILE, "train", &train)?;
    let info = out.join("dataset_info.json");
    fs::write(&info, serde_json::to_vec_pretty(&dataset_info())?).map_err(io_err(&info))?;
    Ok(SynthReport {
        out: out.clone(),
        train: train_report,
        heldout: heldout_report,
    })
}
