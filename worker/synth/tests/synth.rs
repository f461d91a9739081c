//! Dataset synthesis: determinism, split hygiene, row format, and answers re-derived from the
//! rendered pixels (not from the generator's own logic).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use onevision_synth::synth::{parse_difficulty, parse_families, SynthOptions, INSTRUCTION};
use onevision_synth::{synth, Family};
use serde_json::Value;

fn opts(dir: &Path, families: &str, difficulty: &str, train: usize, heldout: usize, seed: u64) -> SynthOptions {
    SynthOptions {
        out: dir.to_path_buf(),
        train,
        heldout,
        seed,
        families: parse_families(families).unwrap(),
        difficulty: parse_difficulty(difficulty).unwrap(),
        image_size: 56,
    }
}

fn read_rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSONL row in {}: {e}", path.display())))
        .collect()
}

fn all_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

const ALL: &str = "color,shape,count,position,bar,clock,geometry";

#[test]
fn same_seed_gives_identical_bytes_and_other_seeds_differ() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    synth(&opts(a.path(), ALL, "1-3", 40, 30, 5)).unwrap();
    synth(&opts(b.path(), ALL, "1-3", 40, 30, 5)).unwrap();
    synth(&opts(c.path(), ALL, "1-3", 40, 30, 6)).unwrap();
    let (fa, fb, fc) = (all_files(a.path()), all_files(b.path()), all_files(c.path()));
    assert_eq!(fa.len(), 40 + 30 + 3, "train.jsonl, heldout.jsonl, dataset_info.json and one PNG per row");
    assert!(fa == fb, "same seed must give byte-identical output");
    assert_ne!(fa["train.jsonl"], fc["train.jsonl"]);
    assert_ne!(fa["heldout.jsonl"], fc["heldout.jsonl"]);
}

#[test]
fn heldout_split_is_independent_of_train_size() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    synth(&opts(a.path(), ALL, "1-3", 10, 25, 9)).unwrap();
    synth(&opts(b.path(), ALL, "1-3", 50, 25, 9)).unwrap();
    assert_eq!(
        std::fs::read(a.path().join("heldout.jsonl")).unwrap(),
        std::fs::read(b.path().join("heldout.jsonl")).unwrap()
    );
}

/// The quickstart-sized configuration: 200+ held-out questions with a small task space, and
/// no held-out (image, question) pair anywhere in train.
#[test]
fn quickstart_splits_do_not_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let report = synth(&opts(dir.path(), "color,count", "1", 600, 200, 0)).unwrap();
    assert_eq!(report.heldout.rows, 200);
    assert_eq!(report.train.rows, 600);
    let key = |r: &Value| {
        let img = std::fs::read(dir.path().join(r["images"][0].as_str().unwrap())).unwrap();
        (img, r["messages"][0]["content"].as_str().unwrap().to_string())
    };
    let heldout: HashSet<_> = read_rows(&dir.path().join("heldout.jsonl")).iter().map(key).collect();
    assert_eq!(heldout.len(), 200, "held-out rows must be distinct");
    let train = read_rows(&dir.path().join("train.jsonl"));
    let leaked = train.iter().filter(|r| heldout.contains(&key(r))).count();
    assert_eq!(leaked, 0);
    // Few answer classes at grade 1: colours (3) and counts 1..=3.
    let classes: HashSet<&str> = train.iter().map(|r| r["answer"].as_str().unwrap()).collect();
    assert_eq!(classes.len(), 6, "{classes:?}");
    assert!(report.heldout.majority_baseline < 0.35, "{}", report.heldout.majority_baseline);
}

#[test]
fn rows_are_sharegpt_with_one_image_and_consistent_answers() {
    let dir = tempfile::tempdir().unwrap();
    synth(&opts(dir.path(), ALL, "1-3", 70, 35, 3)).unwrap();
    let info: Value = serde_json::from_slice(&std::fs::read(dir.path().join("dataset_info.json")).unwrap()).unwrap();
    assert_eq!(info["onevision_synth_train"]["formatting"], "sharegpt");
    let re = regex_lite(r"<think>", r"</think><answer>", r"</answer>");
    let mut ids = HashSet::new();
    for file in ["train.jsonl", "heldout.jsonl"] {
        for r in read_rows(&dir.path().join(file)) {
            assert!(ids.insert(r["id"].as_str().unwrap().to_string()), "duplicate id");
            let msgs = r["messages"].as_array().unwrap();
            assert_eq!(msgs.len(), 2);
            assert_eq!(msgs[0]["role"], "user");
            assert_eq!(msgs[1]["role"], "assistant");
            let user = msgs[0]["content"].as_str().unwrap();
            let images = r["images"].as_array().unwrap();
            assert_eq!(user.matches("<image>").count(), images.len());
            assert!(user.starts_with("<image>") && user.ends_with(INSTRUCTION), "{user}");
            let img = image::open(dir.path().join(images[0].as_str().unwrap())).unwrap();
            assert_eq!(img.width() % 28, 0);
            assert_eq!(img.height() % 28, 0);
            let answer = r["answer"].as_str().unwrap();
            assert!(!answer.is_empty() && answer.len() <= 8, "short answer: {answer}");
            let (think, ans) = re(msgs[1]["content"].as_str().unwrap()).expect("think/answer format");
            assert_eq!(ans, answer);
            assert!(think.len() > 20);
            let d = r["difficulty"].as_u64().unwrap();
            assert!((1..=3).contains(&d));
            assert!(r["scene"]["type"].is_string());
        }
    }
}

/// Traces state pixel centres only where the reasoning uses them: position comparisons and the
/// matching shapes of a grade-3 count. Colour, kind and grade-1/2 count traces name coarse
/// locations; each shape of the scene is still described.
#[test]
fn traces_state_pixel_centres_only_where_the_reasoning_uses_them() {
    let dir = tempfile::tempdir().unwrap();
    synth(&opts(dir.path(), "color,shape,count,position", "1-3", 160, 0, 11)).unwrap();
    let mut seen = BTreeMap::<(String, u64), usize>::new();
    for r in read_rows(&dir.path().join("train.jsonl")) {
        let family = r["family"].as_str().unwrap().to_string();
        let d = r["difficulty"].as_u64().unwrap();
        let trace = r["messages"][1]["content"].as_str().unwrap();
        let n_shapes = r["scene"]["shapes"].as_array().unwrap().len();
        let uses_pixels = family == "position" || (family == "count" && d == 3);
        let states_pixels = trace.contains("x=");
        assert_eq!(states_pixels, uses_pixels, "{family} grade {d}: {trace}");
        // Every shape is described either way: one "a <colour> <kind> at the <place>" each.
        assert_eq!(trace.matches(" at the ").count(), n_shapes, "{trace}");
        *seen.entry((family, d)).or_default() += 1;
    }
    assert!(seen.len() >= 10, "too few (family, grade) pairs drawn: {seen:?}");
}

/// Minimal `^<think>(.*)</think><answer>(.*)</answer>$` matcher (no regex dependency).
fn regex_lite(a: &'static str, b: &'static str, c: &'static str) -> impl Fn(&str) -> Option<(String, String)> {
    move |s: &str| {
        let rest = s.strip_prefix(a)?;
        let (think, rest) = rest.split_once(b)?;
        let ans = rest.strip_suffix(c)?;
        (!think.contains('<') && !ans.contains('<')).then(|| (think.to_string(), ans.to_string()))
    }
}

// ---------- pixel-level re-derivation of answers ----------

fn colour_name(p: [u8; 3]) -> Option<&'static str> {
    let [r, g, b] = p.map(|x| x as i32);
    Some(match () {
        _ if r > 180 && g < 80 && b < 80 => "red",
        _ if g > 130 && r < 80 && b < 100 => "green",
        _ if b > 180 && r < 80 && g < 110 => "blue",
        _ if r > 200 && g > 170 && b < 60 => "yellow",
        _ if (100..180).contains(&r) && g < 90 && b > 150 => "purple",
        _ if r > 220 && (90..150).contains(&g) && b < 50 => "orange",
        _ => return None,
    })
}

#[derive(Debug)]
struct Blob {
    colour: &'static str,
    kind: &'static str,
    cx: f64,
    cy: f64,
}

/// 4-connected components of non-white pixels, classified by colour and fill ratio.
fn blobs(img: &image::RgbImage) -> Vec<Blob> {
    let (w, h) = img.dimensions();
    let mut seen = vec![false; (w * h) as usize];
    let mut out = Vec::new();
    for y0 in 0..h {
        for x0 in 0..w {
            let p0 = img.get_pixel(x0, y0).0;
            if p0 == [255, 255, 255] || seen[(y0 * w + x0) as usize] {
                continue;
            }
            let mut stack = vec![(x0, y0)];
            seen[(y0 * w + x0) as usize] = true;
            let (mut n, mut minx, mut maxx, mut miny, mut maxy) = (0u32, x0, x0, y0, y0);
            while let Some((x, y)) = stack.pop() {
                assert_eq!(img.get_pixel(x, y).0, p0, "a shape must be a single flat colour");
                n += 1;
                minx = minx.min(x);
                maxx = maxx.max(x);
                miny = miny.min(y);
                maxy = maxy.max(y);
                let nbrs = [(x.wrapping_sub(1), y), (x + 1, y), (x, y.wrapping_sub(1)), (x, y + 1)];
                for (nx, ny) in nbrs {
                    if nx < w && ny < h && !seen[(ny * w + nx) as usize] && img.get_pixel(nx, ny).0 != [255, 255, 255] {
                        seen[(ny * w + nx) as usize] = true;
                        stack.push((nx, ny));
                    }
                }
            }
            let fill = n as f64 / ((maxx - minx + 1) * (maxy - miny + 1)) as f64;
            let kind = if fill > 0.92 {
                "square"
            } else if fill > 0.65 {
                "circle"
            } else {
                "triangle"
            };
            out.push(Blob {
                colour: colour_name(p0).expect("palette colour"),
                kind,
                cx: (minx + maxx) as f64 / 2.0,
                cy: (miny + maxy) as f64 / 2.0,
            });
        }
    }
    out
}

fn words_after<'a>(q: &'a str, prefix: &str) -> Vec<&'a str> {
    q.split_once(prefix).map(|(_, r)| r.split(|c: char| !c.is_alphanumeric()).filter(|s| !s.is_empty()).collect()).unwrap_or_default()
}

fn singular(s: &str) -> &str {
    s.strip_suffix('s').unwrap_or(s)
}

fn derive_shape_answer(family: &str, d: u64, q: &str, bl: &[Blob]) -> String {
    let find = |colour: &str, kind: Option<&str>| {
        bl.iter()
            .find(|b| b.colour == colour && kind.is_none_or(|k| b.kind == k))
            .unwrap_or_else(|| panic!("no {colour} {kind:?} in {bl:?}"))
    };
    match (family, d) {
        ("color", 1 | 2) | ("shape", 1) => {
            assert_eq!(bl.len(), 1);
            if family == "color" { bl[0].colour.into() } else { bl[0].kind.into() }
        }
        ("color", _) => {
            let kind = words_after(q, "What colour is the ")[0];
            let m: Vec<_> = bl.iter().filter(|b| b.kind == kind).collect();
            assert_eq!(m.len(), 1);
            m[0].colour.into()
        }
        ("shape", 2) => find(words_after(q, "What shape is the ")[0], None).kind.into(),
        ("shape", _) => {
            let mut c: BTreeMap<&str, usize> = BTreeMap::new();
            for b in bl {
                *c.entry(b.kind).or_default() += 1;
            }
            c.into_iter().max_by_key(|(_, n)| *n).unwrap().0.into()
        }
        ("count", 1 | 2) => bl.len().to_string(),
        ("count", _) => {
            let w = words_after(q, "How many ");
            bl.iter().filter(|b| b.colour == w[0] && b.kind == singular(w[1])).count().to_string()
        }
        ("position", 1 | 2) => {
            let (a, b) = if d == 1 {
                let w = words_after(q, "Is the ");
                (find(w[0], None), find(w[11], None))
            } else {
                let w = words_after(q, "Where is the ");
                (find(w[0], Some(w[1])), find(w[5], Some(w[6])))
            };
            let (dx, dy) = (a.cx - b.cx, a.cy - b.cy);
            if dx.abs() > dy.abs() {
                if dx < 0.0 { "left" } else { "right" }
            } else if dy < 0.0 {
                "above"
            } else {
                "below"
            }
            .into()
        }
        ("position", _) => {
            let word = words_after(q, "What colour is the ")[0];
            let key = |b: &&Blob| match word {
                "leftmost" => -b.cx,
                "rightmost" => b.cx,
                "topmost" => -b.cy,
                _ => b.cy,
            };
            bl.iter().max_by(|a, b| key(a).total_cmp(&key(b))).unwrap().colour.into()
        }
        _ => unreachable!("{family}"),
    }
}

/// Bars: (x centre, colour, height in px) left to right, and the grid spacing.
fn bars(img: &image::RgbImage) -> (Vec<(&'static str, u32)>, Option<u32>) {
    let (w, h) = img.dimensions();
    let mut cols: Vec<(u32, &'static str, u32)> = Vec::new();
    for x in 0..w {
        let mut best: Option<(&'static str, u32)> = None;
        for y in 0..h {
            if let Some(c) = colour_name(img.get_pixel(x, y).0) {
                let n = (0..h).filter(|&yy| colour_name(img.get_pixel(x, yy).0) == Some(c)).count() as u32;
                best = Some((c, n));
                break;
            }
        }
        if let Some((c, n)) = best {
            cols.push((x, c, n));
        }
    }
    let mut out: Vec<(&'static str, u32)> = Vec::new();
    let mut last_x = None;
    for (x, c, n) in cols {
        if last_x != Some(x.wrapping_sub(1)) || out.last().map(|l| l.0) != Some(c) {
            out.push((c, n));
        }
        last_x = Some(x);
    }
    // Grid rows: grey pixels in the first column of the plot.
    let grey: Vec<u32> = (0..h).filter(|&y| img.get_pixel(5, y).0 == [200, 200, 200]).collect();
    let spacing = grey.windows(2).map(|p| p[1] - p[0]).min();
    (out, spacing)
}

fn derive_bar_answer(d: u64, q: &str, img: &image::RgbImage) -> String {
    let (bs, spacing) = bars(img);
    assert!((3..=5).contains(&bs.len()), "{bs:?}");
    let max = bs.iter().map(|b| b.1).max().unwrap();
    if d == 1 {
        return bs.iter().find(|b| b.1 == max).unwrap().0.into();
    }
    let unit = spacing.expect("grid lines");
    let values: Vec<u32> = bs
        .iter()
        .map(|b| {
            assert_eq!(b.1 % unit, 0, "bar height is a whole number of grid units");
            b.1 / unit
        })
        .collect();
    let letters = ["A", "B", "C", "D", "E"];
    if q.starts_with("Which bar is the tallest") {
        letters[bs.iter().position(|b| b.1 == max).unwrap()].into()
    } else if let Some(l) = q.strip_suffix('?').and_then(|s| s.rsplit(' ').next()).filter(|_| q.contains("value of bar")) {
        values[letters.iter().position(|x| *x == l).unwrap()].to_string()
    } else if q.contains("difference") {
        (values.iter().max().unwrap() - values.iter().min().unwrap()).to_string()
    } else {
        values.iter().sum::<u32>().to_string()
    }
}

fn check_clock(answer: &str, scene: &Value, img: &image::RgbImage) {
    let (h, m) = match answer.split_once(':') {
        Some((h, m)) => (h.parse::<f64>().unwrap(), m.parse::<f64>().unwrap()),
        None => (answer.parse::<f64>().unwrap(), 0.0),
    };
    let (cx, cy) = (scene["cx"].as_f64().unwrap(), scene["cy"].as_f64().unwrap());
    let r = scene["radius"].as_f64().unwrap();
    let dark = |angle: f64, d: f64| {
        let (x, y) = (cx + d * r * angle.sin(), cy - d * r * angle.cos());
        let (x, y) = (x.floor() as u32, y.floor() as u32);
        // Accept a 1-pixel neighbourhood: hands are thin and the sample is rounded.
        (x.saturating_sub(1)..=x + 1).any(|xx| (y.saturating_sub(1)..=y + 1).any(|yy| img.get_pixel(xx, yy).0 == [0, 0, 0]))
    };
    let tau = std::f64::consts::TAU;
    let ma = m / 60.0 * tau;
    let ha = ((h % 12.0) + m / 60.0) / 12.0 * tau;
    assert!(dark(ma, 0.7), "minute hand missing for {answer}");
    assert!(dark(ha, 0.35), "hour hand missing for {answer}");
    // No hand a quarter turn away from both (the answer's hands are the only ones).
    for k in 0..12 {
        let a = k as f64 / 12.0 * tau;
        let far = |b: f64| ((a - b).rem_euclid(tau)).min((b - a).rem_euclid(tau)) > 0.8;
        if far(ma) && far(ha) {
            assert!(!dark(a, 0.6), "stray hand at {k} o'clock for {answer}");
        }
    }
}

fn check_geometry(answer: &str, q: &str, scene: &Value, img: &image::RgbImage) {
    let (a, b) = (scene["a"].as_f64().unwrap(), scene["b"].as_f64().unwrap());
    // The filled triangle's extent matches the legs' ratio.
    let fill = [210u8, 225, 250];
    let (mut minx, mut maxx, mut miny, mut maxy) = (u32::MAX, 0, u32::MAX, 0);
    for (x, y, p) in img.enumerate_pixels() {
        if p.0 == fill {
            minx = minx.min(x);
            maxx = maxx.max(x);
            miny = miny.min(y);
            maxy = maxy.max(y);
        }
    }
    let ratio = (maxx - minx) as f64 / (maxy - miny) as f64;
    assert!((ratio / (a / b) - 1.0).abs() < 0.2, "drawn ratio {ratio} vs legs {a}:{b}");
    let c = (a * a + b * b).sqrt();
    let want = if q.contains("area") {
        a * b / 2.0
    } else if q.contains("perimeter") {
        a + b + c
    } else {
        c
    };
    let got: f64 = if let Some((_, opts)) = q.split_once("Options: ") {
        let pos = opts.find(&format!("{answer}. ")).expect("answer letter among options");
        opts[pos + 3..].split(' ').next().unwrap().parse().unwrap()
    } else {
        answer.parse().unwrap()
    };
    assert!((got - want).abs() < 1e-9, "{q} → {answer}, expected {want}");
}

#[test]
fn answers_rederived_from_pixels_for_every_family_and_grade() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked: BTreeMap<(String, u64), usize> = BTreeMap::new();
    for (i, f) in Family::ALL.iter().enumerate() {
        for d in 1..=3 {
            let sub = dir.path().join(format!("{}-{d}", f.name()));
            synth(&opts(&sub, f.name(), &d.to_string(), 12, 12, 100 + i as u64)).unwrap();
            for file in ["train.jsonl", "heldout.jsonl"] {
                for r in read_rows(&sub.join(file)) {
                    let img = image::open(sub.join(r["images"][0].as_str().unwrap())).unwrap().to_rgb8();
                    let content = r["messages"][0]["content"].as_str().unwrap();
                    let q = content.trim_start_matches("<image>").lines().next().unwrap();
                    let answer = r["answer"].as_str().unwrap();
                    let family = r["family"].as_str().unwrap();
                    match family {
                        "bar" => assert_eq!(derive_bar_answer(d, q, &img), answer, "{q}"),
                        "clock" => check_clock(answer, &r["scene"], &img),
                        "geometry" => check_geometry(answer, q, &r["scene"], &img),
                        _ => assert_eq!(derive_shape_answer(family, d, q, &blobs(&img)), answer, "{q}"),
                    }
                    *checked.entry((family.to_string(), d)).or_default() += 1;
                }
            }
        }
    }
    assert_eq!(checked.len(), 21);
    assert!(checked.values().all(|&n| n == 24));
}

#[test]
fn bad_options_are_errors_not_panics() {
    assert!(parse_families("color,nosuch").unwrap_err().to_string().contains("nosuch"));
    assert!(parse_families("color:-1").is_err());
    assert!(parse_families("").is_err());
    assert!(parse_difficulty("0").is_err());
    assert!(parse_difficulty("2-1").is_err());
    assert!(parse_difficulty("1-4").is_err());
    assert_eq!(parse_difficulty("2").unwrap(), (2, 2));
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), "color", "1", 1, 1, 0);
    o.image_size = 60;
    assert!(synth(&o).unwrap_err().to_string().contains("multiple of 28"));
    // A task space far too small for the request is reported, not looped on forever.
    // Grade-1 bar charts: 6 colour orders × 60 value triples = 360 distinct tasks.
    let o = opts(dir.path(), "bar", "1", 0, 1000, 0);
    let e = synth(&o).unwrap_err().to_string();
    assert!(e.contains("task space is too small") && e.contains("only found 360"), "{e}");
}
