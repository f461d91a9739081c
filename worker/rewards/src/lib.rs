//! Rule-based GRPO rewards: format, accuracy, IoU, weighted sums, user plug-ins.
//!
//! Every reward implements [`Reward`], which scores a batch of [`RewardRequest`]s. Batches (not single
//! samples) let remote rewards — the external command here, a gRPC service later — amortise a
//! round trip. [`RewardRegistry`] maps names to rewards and [`WeightedReward`] sums them with the
//! weights of a GRPOJob's `rewards: [{name, weight}]`.

pub mod accuracy;
pub mod external;
pub mod extract;
pub mod format;
pub mod iou;

pub use accuracy::{accuracy_score, answers_match, AccuracyConfig, AccuracyReward};
pub use external::CommandReward;
pub use extract::{answer_tag, extract_answer, last_boxed};
pub use format::{format_score, FormatReward, FormatStyle};
pub use iou::{boxes_score, iou, iou_score, parse_boxes, BBox, IouMode, IouReward};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// One completion to score.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardRequest {
    /// The prompt (question) text, for rewards that need it.
    #[serde(default)]
    pub prompt: String,
    /// The generated completion (detokenised, without the end-of-turn token).
    pub completion: String,
    /// Ground truth, when the dataset has one.
    #[serde(default)]
    pub answer: Option<String>,
    /// Free-form per-sample metadata passed through to user rewards.
    #[serde(default)]
    pub meta: serde_json::Value,
}

/// Errors of reward computation; every variant says which reward/command and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("unknown reward `{name}` in the rewards list; known rewards: {known}")]
    Unknown { name: String, known: String },
    #[error("reward `{name}` has weight {weight}; weights must be finite")]
    BadWeight { name: String, weight: f64 },
    #[error("reward `{0}` is listed twice in the rewards list")]
    Duplicate(String),
    #[error("the rewards list is empty; give at least one {{name, weight}}")]
    Empty,
    #[error("reward `{reward}` needs a ground-truth answer but sample {index} has none")]
    MissingAnswer { reward: &'static str, index: usize },
    #[error("reward `{reward}`: sample {index} has an unusable ground truth: {msg}")]
    BadGroundTruth {
        reward: &'static str,
        index: usize,
        msg: String,
    },
    #[error("reward command `{cmd}` could not be run: {msg}")]
    Spawn { cmd: String, msg: String },
    #[error("reward command `{cmd}` timed out after {timeout:?} ({got} of {want} rewards received); raise the timeout or speed it up")]
    Timeout {
        cmd: String,
        timeout: Duration,
        got: usize,
        want: usize,
    },
    #[error("reward command `{cmd}` exited with {status}; stderr: {stderr}")]
    Exit {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("reward command `{cmd}`, output line {line}: {msg}")]
    Protocol {
        cmd: String,
        line: usize,
        msg: String,
    },
    #[error("reward `{name}` returned {got} scores for {want} samples")]
    Count {
        name: String,
        got: usize,
        want: usize,
    },
    #[error("reward `{name}` failed: {msg}")]
    Other { name: String, msg: String },
}

/// A reward function over batches. Implementations must return one finite score per request, in
/// order. `Send + Sync` so a trainer can score groups from several threads; a gRPC-backed reward can
/// implement this by blocking on its client.
pub trait Reward: Send + Sync {
    /// The name used in `rewards: [{name, weight}]`.
    fn name(&self) -> &str;
    /// Score every request of the batch.
    fn score_batch(&self, batch: &[RewardRequest]) -> Result<Vec<f64>, RewardError>;
}

/// One entry of a GRPOJob's `rewards` list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardSpec {
    pub name: String,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// Name → reward. [`RewardRegistry::builtin`] holds `accuracy`, `format` and `iou` with default settings;
/// users add theirs (e.g. a [`CommandReward`]) with [`RewardRegistry::register`].
#[derive(Clone, Default)]
pub struct RewardRegistry {
    rewards: BTreeMap<String, Arc<dyn Reward>>,
}

impl RewardRegistry {
    pub fn builtin() -> Self {
        let mut r = Self::default();
        r.register(Arc::new(AccuracyReward::default()));
        r.register(Arc::new(FormatReward::default()));
        r.register(Arc::new(IouReward::default()));
        r
    }

    /// Add or replace a reward under its own name.
    pub fn register(&mut self, reward: Arc<dyn Reward>) {
        self.rewards.insert(reward.name().to_string(), reward);
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Reward>> {
        self.rewards.get(name).cloned()
    }

    pub fn names(&self) -> Vec<&str> {
        self.rewards.keys().map(String::as_str).collect()
    }
}

/// Per-sample totals and the unweighted score of each component, for logging.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardScores {
    pub total: Vec<f64>,
    pub components: Vec<(String, Vec<f64>)>,
}

/// A weighted sum of named rewards.
#[derive(Clone)]
pub struct WeightedReward {
    parts: Vec<(Arc<dyn Reward>, f64)>,
}

impl WeightedReward {
    /// Resolve a `rewards: [{name, weight}]` list against `registry`.
    pub fn from_specs(
        specs: &[RewardSpec],
        registry: &RewardRegistry,
    ) -> Result<Self, RewardError> {
        if specs.is_empty() {
            return Err(RewardError::Empty);
        }
        let mut parts = Vec::with_capacity(specs.len());
        for (i, s) in specs.iter().enumerate() {
            if !s.weight.is_finite() {
                return Err(RewardError::BadWeight {
                    name: s.name.clone(),
                    weight: s.weight,
                });
            }
            if specs[..i].iter().any(|p| p.name == s.name) {
                return Err(RewardError::Duplicate(s.name.clone()));
            }
            let r = registry.get(&s.name).ok_or_else(|| RewardError::Unknown {
                name: s.name.clone(),
                known: registry.names().join(", "),
            })?;
            parts.push((r, s.weight));
        }
        Ok(Self { parts })
    }

    /// Score a batch with every component; `total[i] = Σ weight_k · score_k[i]`.
    pub fn score(&self, batch: &[RewardRequest]) -> Result<RewardScores, RewardError> {
        let mut total = vec![0.0; batch.len()];
        let mut components = Vec::with_capacity(self.parts.len());
        for (r, w) in &self.parts {
            let s = r.score_batch(batch)?;
            if s.len() != batch.len() {
                return Err(RewardError::Count {
                    name: r.name().to_string(),
                    got: s.len(),
                    want: batch.len(),
                });
            }
            if let Some(bad) = s.iter().find(|x| !x.is_finite()) {
                return Err(RewardError::Other {
                    name: r.name().to_string(),
                    msg: format!("non-finite score {bad}"),
                });
            }
            for (t, x) in total.iter_mut().zip(&s) {
                *t += w * x;
            }
            components.push((r.name().to_string(), s));
        }
        Ok(RewardScores { total, components })
    }
}

impl Reward for WeightedReward {
    fn name(&self) -> &str {
        "weighted"
    }
    fn score_batch(&self, batch: &[RewardRequest]) -> Result<Vec<f64>, RewardError> {
        Ok(self.score(batch)?.total)
    }
}
