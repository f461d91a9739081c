//! Dataset readers: LLaMA-Factory sharegpt, R1-Onevision rows (JSON/JSONL/parquet), GRPO prompts,
//! R1-Onevision-Bench TSV;
//! deterministic shuffling, sharding, resumable positions and length-bucketed batching.
//!
//! Every format becomes a [`Sample`]. Bad rows either fail the load with the file and row number or,
//! with [`OnBadRow::Skip`], are skipped and counted in the [`LoadReport`] — always at open time, so an
//! epoch never stops on a malformed row. JSONL files are validated once and then read lazily (only
//! byte offsets stay in memory), so datasets with embedded images need not fit in RAM.

pub mod bench;
pub mod dataset;
pub mod rows;
pub mod sampler;

pub use bench::read_bench_tsv;
pub use dataset::Dataset;
pub use rows::{parse_row, RowFormat};
pub use sampler::{
    cu_seqlens, epoch_batches, epoch_order, BatchCursor, Batching, Position, ShardConfig,
};

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One chat turn. `role` is `system`, `user` or `assistant` (sharegpt `human`/`gpt` are mapped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Where an image comes from: a file, or encoded bytes (PNG/JPEG/… as stored in the dataset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageSource {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

/// A training or evaluation sample. Images correspond, in order, to the `<image>` placeholders in
/// the messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub id: String,
    pub messages: Vec<Message>,
    pub images: Vec<ImageSource>,
    /// Ground truth for rewards/evaluation (GRPO prompts, benchmark rows).
    pub answer: Option<String>,
    /// Other fields of the row (benchmark level/category, …).
    pub meta: serde_json::Value,
}

/// The image placeholder of LLaMA-Factory and R1-Onevision data.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// The R1-Onevision evaluation instruction.
pub const R1_EVAL_PROMPT: &str =
    "First output the thinking process in <think> </think> tags and then output the final answer in <answer> </answer> tags.";

impl Sample {
    /// Characters of all message contents: a cheap length proxy for bucketing before tokenisation.
    pub fn text_chars(&self) -> usize {
        self.messages
            .iter()
            .map(|m| m.content.chars().count())
            .sum()
    }
    /// The prompt for generation (GRPO rollouts): the messages before the last assistant turn.
    /// Images stay attached, since the prompt keeps every user turn.
    pub fn prompt_messages(&self) -> &[Message] {
        let end = self
            .messages
            .iter()
            .rposition(|m| m.role == "assistant")
            .unwrap_or(self.messages.len());
        &self.messages[..end]
    }

    pub fn placeholder_count(&self) -> usize {
        self.messages
            .iter()
            .map(|m| m.content.matches(IMAGE_PLACEHOLDER).count())
            .sum()
    }
}

/// What to do with a malformed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRow {
    /// Fail the load with the file and row number (default: bad data should be noticed).
    #[default]
    Fail,
    /// Skip it, count it and keep the first errors in the report.
    Skip,
}

#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    pub on_bad_row: OnBadRow,
    /// Base for relative image paths; default: the data file's directory.
    pub image_root: Option<PathBuf>,
    /// Reject rows whose image files do not exist (at load time rather than mid-epoch).
    pub check_image_files: bool,
    pub format: RowFormat,
    /// Appended to the benchmark question (e.g. [`R1_EVAL_PROMPT`]).
    pub instruction: Option<String>,
}

/// Errors; each names the file and, for row errors, the 1-based row (the line in JSONL/TSV, the
/// array element in JSON).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: row {row}: {msg}")]
    Row {
        file: PathBuf,
        row: usize,
        msg: String,
    },
    #[error("{file}: {msg}")]
    File { file: PathBuf, msg: String },
    #[error("sample index {index} out of range (dataset has {len})")]
    Index { index: usize, len: usize },
    #[error("invalid sampler config: {0}")]
    Config(String),
}

/// What a load did: rows seen, loaded and skipped, and the first skipped rows' errors.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub rows: usize,
    pub loaded: usize,
    pub skipped: usize,
    /// Up to [`LoadReport::MAX_KEPT_ERRORS`] errors of skipped rows.
    pub errors: Vec<DataError>,
}

impl LoadReport {
    pub const MAX_KEPT_ERRORS: usize = 20;

    fn bad(&mut self, policy: OnBadRow, e: DataError) -> Result<(), DataError> {
        match policy {
            OnBadRow::Fail => Err(e),
            OnBadRow::Skip => {
                tracing::warn!(error = %e, "skipping bad row");
                self.skipped += 1;
                if self.errors.len() < Self::MAX_KEPT_ERRORS {
                    self.errors.push(e);
                }
                Ok(())
            }
        }
    }

    fn merge(&mut self, other: LoadReport) {
        self.rows += other.rows;
        self.loaded += other.loaded;
        self.skipped += other.skipped;
        for e in other.errors {
            if self.errors.len() < Self::MAX_KEPT_ERRORS {
                self.errors.push(e);
            }
        }
    }
}
