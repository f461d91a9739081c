//! Format reward: the completion follows the think-then-answer layout.

use crate::{Reward, RewardError, RewardRequest};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;

// Released R1-Onevision / VLM-R1 code: re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", DOTALL).
// Surrounding whitespace is tolerated because detokenised completions often carry a trailing newline.
static TAG_STYLE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?s)\A\s*<think>.*?</think>\s*<answer>.*?</answer>\s*\z").expect("static regex")
});
// EasyR1 math style: reasoning in <think>, then a \boxed{} answer somewhere after </think>.
static THINK_THEN_REST: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?s)\A\s*<think>.*?</think>(.*)\z").expect("static regex"));

/// Which answer layouts count as well formatted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FormatStyle {
    /// `<think>…</think>` then `<answer>…</answer>`.
    AnswerTag,
    /// `<think>…</think>` then text containing a complete `\boxed{…}`.
    Boxed,
    /// Either of the above (default).
    #[default]
    Either,
}

/// 1.0 when `text` is well formatted under `style`, else 0.0.
pub fn format_score(text: &str, style: FormatStyle) -> f64 {
    let tag = || TAG_STYLE.is_match(text);
    let boxed = || {
        THINK_THEN_REST
            .captures(text)
            .and_then(|c| c.get(1))
            .is_some_and(|rest| {
                // A second <think> after the first block is malformed.
                !rest.as_str().contains("<think>")
                    && crate::extract::last_boxed(rest.as_str()).is_some()
            })
    };
    let ok = match style {
        FormatStyle::AnswerTag => tag(),
        FormatStyle::Boxed => boxed(),
        FormatStyle::Either => tag() || boxed(),
    };
    if ok {
        1.0
    } else {
        0.0
    }
}

/// The `format` reward.
#[derive(Debug, Clone, Default)]
pub struct FormatReward {
    pub style: FormatStyle,
}

impl Reward for FormatReward {
    fn name(&self) -> &str {
        "format"
    }
    fn score_batch(&self, batch: &[RewardRequest]) -> Result<Vec<f64>, RewardError> {
        Ok(batch
            .iter()
            .map(|r| format_score(&r.completion, self.style))
            .collect())
    }
}
