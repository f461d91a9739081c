//! Pulling the final answer out of a completion: the `<answer>` tag or the last `\boxed{…}`.

use regex::Regex;
use std::sync::LazyLock;

static ANSWER_TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?s)<answer>(.*?)</answer>").expect("static regex"));

/// Content of the last `<answer>…</answer>` tag, if any.
pub fn answer_tag(text: &str) -> Option<&str> {
    ANSWER_TAG
        .captures_iter(text)
        .last()
        .and_then(|c| c.get(1))
        .map(|m| m.as_str())
}

/// Content of the last *complete* `\boxed{…}` (or `\fbox{…}`), with nested braces.
/// Escaped braces `\{`/`\}` do not count. A truncated last box (unbalanced) is skipped in favour
/// of an earlier complete one, because a completion cut at max length often ends mid-box.
pub fn last_boxed(text: &str) -> Option<&str> {
    let mut starts: Vec<(usize, usize)> = Vec::new();
    for kw in [r"\boxed", r"\fbox"] {
        starts.extend(text.match_indices(kw).map(|(i, k)| (i, i + k.len())));
    }
    starts.sort_unstable();
    for &(_, after) in starts.iter().rev() {
        if let Some(inner) = braced_at(text, after) {
            return Some(inner);
        }
    }
    None
}

/// If `text[pos..]` starts (after optional spaces) with `{`, the content up to its matching `}`.
fn braced_at(text: &str, pos: usize) -> Option<&str> {
    let rest = &text[pos..];
    let trimmed = rest.trim_start_matches([' ', '\t']);
    let open = pos + (rest.len() - trimmed.len());
    let bytes = text.as_bytes();
    if bytes.get(open) != Some(&b'{') {
        return None;
    }
    let mut depth = 0usize;
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if matches!(bytes.get(i + 1), Some(b'{') | Some(b'}')) => {
                i += 2;
                continue;
            }
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    // Braces are ASCII, so these are char boundaries.
                    return Some(&text[open + 1..i]);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The answer a grader should look at: the last `<answer>` tag's content (and the box inside it if it
/// has one), otherwise the last `\boxed{}`. `None` when the completion states no answer.
pub fn extract_answer(text: &str) -> Option<&str> {
    if let Some(tag) = answer_tag(text) {
        return Some(last_boxed(tag).unwrap_or(tag).trim());
    }
    last_boxed(text).map(str::trim)
}

/// Ground truths arrive in many shapes ("<answer>C</answer>", "\boxed{3}", "3"): unwrap if wrapped.
pub fn unwrap_ground_truth(gt: &str) -> &str {
    extract_answer(gt).unwrap_or(gt).trim()
}
