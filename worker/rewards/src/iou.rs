//! IoU reward for grounding answers `[x1, y1, x2, y2]`.

use crate::extract::answer_tag;
use crate::{Reward, RewardError, RewardRequest};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;

/// Axis-aligned box `[x1, y1, x2, y2]`.
pub type BBox = [f64; 4];

/// How one box pair's IoU becomes a score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode", content = "threshold")]
pub enum IouMode {
    /// 1 if IoU > threshold else 0 (R1-Onevision/VLM-R1 use 0.5).
    Threshold(f64),
    /// The IoU itself.
    Continuous,
}

impl Default for IouMode {
    fn default() -> Self {
        IouMode::Threshold(0.5)
    }
}

static BOX: LazyLock<Regex> = LazyLock::new(|| {
    let n = r"\s*(-?\d+(?:\.\d+)?)\s*";
    Regex::new(&format!(r"\[{n},{n},{n},{n}\]")).expect("static regex")
});

/// Every `[x1, y1, x2, y2]` in `text`, in order.
pub fn parse_boxes(text: &str) -> Vec<BBox> {
    BOX.captures_iter(text)
        .filter_map(|c| {
            let mut b = [0.0; 4];
            for (k, v) in b.iter_mut().enumerate() {
                *v = c[k + 1].parse().ok()?;
            }
            Some(b)
        })
        .collect()
}

/// Intersection over union; 0 for degenerate boxes (x2 ≤ x1 or y2 ≤ y1) or an empty union.
pub fn iou(a: &BBox, b: &BBox) -> f64 {
    let area = |r: &BBox| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let (aa, ab) = (area(a), area(b));
    if aa <= 0.0 || ab <= 0.0 {
        return 0.0;
    }
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = aa + ab - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

fn pair_score(v: f64, mode: IouMode) -> f64 {
    match mode {
        IouMode::Threshold(t) => {
            if v > t {
                1.0
            } else {
                0.0
            }
        }
        IouMode::Continuous => v,
    }
}

/// Score of predicted boxes against ground-truth boxes: greedy one-to-one matching by highest IoU,
/// the sum of matched pair scores divided by `max(#pred, #gt)` — so missing and extra boxes both cost.
/// With one box on each side this is exactly the single-box reward.
pub fn boxes_score(pred: &[BBox], gt: &[BBox], mode: IouMode) -> f64 {
    if pred.is_empty() || gt.is_empty() {
        return 0.0;
    }
    let mut pairs: Vec<(f64, usize, usize)> = Vec::with_capacity(pred.len() * gt.len());
    for (i, p) in pred.iter().enumerate() {
        for (j, g) in gt.iter().enumerate() {
            pairs.push((iou(p, g), i, j));
        }
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut used_p, mut used_g) = (vec![false; pred.len()], vec![false; gt.len()]);
    let mut total = 0.0;
    for (v, i, j) in pairs {
        if !used_p[i] && !used_g[j] {
            used_p[i] = true;
            used_g[j] = true;
            total += pair_score(v, mode);
        }
    }
    total / pred.len().max(gt.len()) as f64
}

/// IoU reward of a completion: boxes inside `<answer>` if there is one, else anywhere in the text.
pub fn iou_score(completion: &str, gt: &str, mode: IouMode) -> f64 {
    let pred = parse_boxes(answer_tag(completion).unwrap_or(completion));
    boxes_score(&pred, &parse_boxes(gt), mode)
}

/// The `iou` reward. Needs `RewardRequest::answer` holding the ground-truth box(es).
#[derive(Debug, Clone, Default)]
pub struct IouReward {
    pub mode: IouMode,
}

impl Reward for IouReward {
    fn name(&self) -> &str {
        "iou"
    }
    fn score_batch(&self, batch: &[RewardRequest]) -> Result<Vec<f64>, RewardError> {
        batch
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let gt = r.answer.as_deref().ok_or(RewardError::MissingAnswer {
                    reward: "iou",
                    index: i,
                })?;
                if parse_boxes(gt).is_empty() {
                    return Err(RewardError::BadGroundTruth {
                        reward: "iou",
                        index: i,
                        msg: format!("no [x1,y1,x2,y2] box in ground truth {gt:?}"),
                    });
                }
                Ok(iou_score(&r.completion, gt, self.mode))
            })
            .collect()
    }
}
