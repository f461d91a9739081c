//! Accuracy reward: multiple-choice letters, numbers with tolerance, normalised strings.

use crate::extract::{extract_answer, unwrap_ground_truth};
use crate::{Reward, RewardError, RewardRequest};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;

/// Numeric tolerance: `|a − b| ≤ abs_tol + rel_tol · max(|a|, |b|)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AccuracyConfig {
    pub rel_tol: f64,
    pub abs_tol: f64,
}

impl Default for AccuracyConfig {
    fn default() -> Self {
        // 1e-4 relative accepts answers written to 4+ significant digits; tight enough that 0.33 ≠ 1/3.
        Self {
            rel_tol: 1e-4,
            abs_tol: 1e-9,
        }
    }
}

static CHOICE_PREFIX: &str =
    r"(?i:(?:the\s+)?(?:final\s+)?(?:correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*)";
// Ground truth: only a letter, optionally "Answer: C", "(C)", "C.".
static GT_CHOICE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(r"\A{CHOICE_PREFIX}?\(?([A-Z])\)?\s*[.:)]?\s*\z")).expect("static regex")
});
// Prediction: the letter may be followed by the option's text ("C. 45°", "(C) 45"), but a bare
// letter followed by a space is only a choice after an explicit prefix ("A right angle" is not A).
static PRED_CHOICE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r"\A(?:{CHOICE_PREFIX}\(?([A-Z])\)?(?:[\s.:)]|\z)|\(([A-Z])\)|([A-Z])(?:[.:)]|\z))"
    ))
    .expect("static regex")
});

/// Strip LaTeX/markdown wrappers that carry no meaning for grading.
fn clean(s: &str) -> String {
    static TEXT_CMD: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
            .expect("static regex")
    });
    static DEGREE: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree").expect("static regex"));
    let mut t = s.trim().to_string();
    // Markdown bold and math delimiters.
    for (from, to) in [
        ("**", ""),
        ("\\left", ""),
        ("\\right", ""),
        ("\\displaystyle", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\ ", " "),
        ("~", " "),
        ("\\%", "%"),
        ("−", "-"),
        ("\\(", ""),
        ("\\)", ""),
        ("\\[", ""),
        ("\\]", ""),
        ("$", ""),
    ] {
        t = t.replace(from, to);
    }
    // Nested \text{\textbf{x}}: repeat until stable.
    loop {
        let next = TEXT_CMD.replace_all(&t, " $1 ").into_owned();
        if next == t {
            break;
        }
        t = next;
    }
    t = DEGREE.replace_all(&t, "").into_owned();
    t.trim().to_string()
}

/// Option letter of a ground truth like "C", "(C)", "C.", "Answer: C".
pub fn parse_choice_gt(gt: &str) -> Option<char> {
    let c = clean(gt);
    GT_CHOICE
        .captures(&c)
        .and_then(|m| m.get(1))
        .and_then(|m| m.as_str().chars().next())
}

/// Option letter a prediction commits to ("C", "(C) 45", "C. 45", "The answer is C").
pub fn parse_choice_pred(pred: &str) -> Option<char> {
    let c = clean(pred);
    let m = PRED_CHOICE.captures(&c)?;
    (1..=3)
        .find_map(|i| m.get(i))
        .and_then(|m| m.as_str().chars().next())
}

fn parse_plain(num: &str) -> Option<f64> {
    static PLAIN: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(
            r"\A[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\z",
        )
        .expect("static regex")
    });
    let n = num.trim();
    if !PLAIN.is_match(n) {
        return None;
    }
    n.replace(',', "")
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
}

/// The numeric values a string may denote, or `None` when it is not a number.
/// Units, thousands separators and `x =` prefixes are ignored; `\frac{a}{b}`, `a/b`, `a × 10^{k}` are
/// evaluated; a percentage denotes both `p` and `p/100` ("50%" matches "50" and "0.5").
pub fn numeric_values(s: &str) -> Option<Vec<f64>> {
    static ASSIGN: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"\A[A-Za-z][A-Za-z0-9_]*(?:\([A-Za-z]\))?\s*=\s*").expect("static regex")
    });
    static FRAC: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"\A([-+]?)\s*\\frac\s*(?:\{([^{}]+)\}|(\d))\s*(?:\{([^{}]+)\}|(\d))\z")
            .expect("static regex")
    });
    static SLASH: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"\A([-+]?[\d.,]+)\s*/\s*([\d.,]+)\z").expect("static regex"));
    static SCI: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(
            r"\A([-+]?[\d.,]+)\s*(?:\\times|\\cdot|×|\*|x)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?\z",
        )
        .expect("static regex")
    });
    // number, optional %, optional unit made of letters (e.g. "3 cm", "5 m/s", "12 kg·m^2").
    static WITH_UNIT: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"\A([-+]?[\d.,]*\d[\d.,]*(?:[eE][-+]?\d+)?)\s*(%)?\s*(?:[A-Za-zµΩ][A-Za-zµΩ0-9/^·.\s\-{}²³]*)?\z")
            .expect("static regex")
    });
    let mut t = clean(s);
    // "x = 3" or "a = b = 3": the right-most side is the value.
    if let Some(pos) = t.rfind('=') {
        if ASSIGN.is_match(&t) {
            t = t[pos + 1..].trim().to_string();
        }
    }
    let t = t.trim().trim_end_matches('.').trim();
    if let Some(c) = FRAC.captures(t) {
        let neg = c.get(1).is_some_and(|m| m.as_str() == "-");
        let num = c
            .get(2)
            .or(c.get(3))
            .and_then(|m| numeric_scalar(m.as_str()))?;
        let den = c
            .get(4)
            .or(c.get(5))
            .and_then(|m| numeric_scalar(m.as_str()))?;
        return ratio(if neg { -num } else { num }, den);
    }
    if let Some(c) = SLASH.captures(t) {
        return ratio(parse_plain(&c[1])?, parse_plain(&c[2])?);
    }
    if let Some(c) = SCI.captures(t) {
        let m = parse_plain(&c[1])?;
        let e: i32 = c[2].parse().ok()?;
        return Some(vec![m * 10f64.powi(e)]).filter(|v| v[0].is_finite());
    }
    let c = WITH_UNIT.captures(t)?;
    let v = parse_plain(&c[1])?;
    if c.get(2).is_some() {
        Some(vec![v, v / 100.0])
    } else {
        Some(vec![v])
    }
}

fn numeric_scalar(s: &str) -> Option<f64> {
    numeric_values(s).and_then(|v| (v.len() == 1).then(|| v[0]))
}

fn ratio(n: f64, d: f64) -> Option<Vec<f64>> {
    (d != 0.0).then(|| vec![n / d]).filter(|v| v[0].is_finite())
}

/// Normalised form for string comparison: LaTeX wrappers gone, lower case, no whitespace, no
/// trailing period or surrounding quotes.
pub fn normalize_str(s: &str) -> String {
    let c = clean(s).to_lowercase();
    let c = c
        .trim()
        .trim_end_matches('.')
        .trim_matches(|ch| ch == '"' || ch == '\'');
    c.chars().filter(|ch| !ch.is_whitespace()).collect()
}

fn close(a: f64, b: f64, cfg: &AccuracyConfig) -> bool {
    (a - b).abs() <= cfg.abs_tol + cfg.rel_tol * a.abs().max(b.abs())
}

/// Whether the extracted answer `pred` matches ground truth `gt`.
pub fn answers_match(pred: &str, gt: &str, cfg: &AccuracyConfig) -> bool {
    let gt = unwrap_ground_truth(gt);
    if let Some(letter) = parse_choice_gt(gt) {
        return parse_choice_pred(pred) == Some(letter);
    }
    if let Some(gv) = numeric_values(gt) {
        if let Some(pv) = numeric_values(pred) {
            if pv.iter().any(|p| gv.iter().any(|g| close(*p, *g, cfg))) {
                return true;
            }
        }
    }
    let (p, g) = (normalize_str(pred), normalize_str(gt));
    !g.is_empty() && p == g
}

/// 1.0 when the completion's answer matches `gt`; 0.0 when it differs or states no answer.
pub fn accuracy_score(completion: &str, gt: &str, cfg: &AccuracyConfig) -> f64 {
    match extract_answer(completion) {
        Some(pred) if answers_match(pred, gt, cfg) => 1.0,
        _ => 0.0,
    }
}

/// The `accuracy` reward. Needs `RewardRequest::answer`.
#[derive(Debug, Clone, Default)]
pub struct AccuracyReward {
    pub config: AccuracyConfig,
}

impl Reward for AccuracyReward {
    fn name(&self) -> &str {
        "accuracy"
    }
    fn score_batch(&self, batch: &[RewardRequest]) -> Result<Vec<f64>, RewardError> {
        batch
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let gt = r.answer.as_deref().ok_or(RewardError::MissingAnswer {
                    reward: "accuracy",
                    index: i,
                })?;
                Ok(accuracy_score(&r.completion, gt, &self.config))
            })
            .collect()
    }
}
