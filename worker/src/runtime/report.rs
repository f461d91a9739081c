//! What rank 0 writes into the job's output directory: `metrics.jsonl` (one JSON object per
//! optimizer step) and `status.json` (the `status` the operator would publish for the job, plus
//! `"kind"` and `"evaluation": {"before": {...}, "after": {...}}`), always replaced atomically.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use onevision_operator::api::{JobPhase, JobStatus, Progress};
use onevision_operator::planner::{condition, reason};
use serde::{Deserialize, Serialize};

use super::{io_err, Result, RuntimeError};

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const STATUS_FILE: &str = "status.json";

/// Held-out accuracy with the accuracy reward on generated answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub accuracy: f64,
    pub n: usize,
    /// The same per category of question (the rows' `family` or `category` field: synthetic task
    /// families, benchmark subjects), when the evaluation set names them.
    #[serde(rename = "byCategory", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_category: BTreeMap<String, CategoryAccuracy>,
    /// With `eval.sampling`: the mean accuracy of the sampled answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled: Option<SampledAccuracy>,
}

/// Mean accuracy of `samples` sampled answers per question (pass@1 estimated from `samples`
/// draws), in total and per category; `accuracy` next to it is the greedy one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SampledAccuracy {
    pub accuracy: f64,
    pub samples: usize,
    pub temperature: f64,
    pub top_p: f64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_category: BTreeMap<String, f64>,
}

/// Accuracy on the questions of one category.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CategoryAccuracy {
    pub accuracy: f64,
    pub n: usize,
}

/// Evaluation at the start and at the end of the job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<EvalResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<EvalResult>,
}

/// The status file as written: the operator's job status with the extra fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusFile {
    pub kind: String,
    #[serde(flatten)]
    pub status: JobStatus,
    #[serde(default)]
    pub evaluation: Evaluation,
}

/// Replace `path` with `bytes` atomically (temp file + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Read a status file (None when absent).
pub fn read_status(path: &Path) -> Result<Option<StatusFile>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| RuntimeError::Config(format!("{}: not a status file: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RuntimeError::Io { path: path.to_path_buf(), source: e }),
    }
}

pub fn now() -> Time {
    Time(Timestamp::now())
}

/// Set (or replace) a condition in a status, as the operator's planner does.
pub fn set_condition(status: &mut JobStatus, type_: &str, ok: bool, reason: &str, message: &str) {
    let s = if ok { "True" } else { "False" };
    if let Some(c) = status.conditions.iter_mut().find(|c| c.type_ == type_) {
        if c.status != s {
            c.last_transition_time = now();
        }
        c.status = s.into();
        c.reason = reason.into();
        c.message = message.into();
        return;
    }
    status.conditions.push(Condition {
        type_: type_.into(),
        status: s.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: now(),
        observed_generation: None,
    });
}

/// Rank 0's writer of the job's metrics and status files.
pub struct Reporter {
    dir: PathBuf,
    metrics: File,
    pub status: StatusFile,
    /// In a cluster: the pod annotation the operator turns into `status.progress`.
    pod: Option<super::pod_progress::PodProgress>,
}

impl Reporter {
    /// Opens `dir/metrics.jsonl` for appending. When resuming from `resumed_step`, lines of steps
    /// after it (lost with the failed gang) are dropped, so the curve continues without
    /// duplicates; a fresh start (`None`) truncates the file.
    pub fn open(dir: &Path, kind: &str, model_path: &str, resumed_step: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(METRICS_FILE);
        let mut kept = Vec::new();
        if let Some(step) = resumed_step {
            if let Ok(f) = File::open(&path) {
                for line in BufReader::new(f).lines() {
                    let line = line.map_err(io_err(&path))?;
                    let s = serde_json::from_str::<serde_json::Value>(&line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
                    if matches!(s, Some(s) if s <= step) {
                        kept.push(line);
                    }
                }
            }
        }
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        write_atomic(&path, text.as_bytes())?;
        let metrics = OpenOptions::new().append(true).open(&path).map_err(io_err(&path))?;
        let old = read_status(&dir.join(STATUS_FILE)).ok().flatten();
        let mut status = StatusFile {
            kind: kind.to_string(),
            status: JobStatus::default(),
            evaluation: Evaluation::default(),
        };
        if let (Some(old), Some(_)) = (old, resumed_step) {
            // Resumed: keep the start time, restarts and the evaluation before training.
            status.status.start_time = old.status.start_time;
            status.status.restarts = old.status.restarts;
            status.evaluation.before = old.evaluation.before;
        }
        if status.status.start_time.is_none() {
            status.status.start_time = Some(now());
        }
        status.status.phase = Some(JobPhase::Running);
        status.status.model_path = Some(model_path.to_string());
        set_condition(&mut status.status, condition::CREATED, true, reason::CREATED, "trainer started");
        set_condition(&mut status.status, condition::RUNNING, true, reason::ALL_PODS_RUNNING, "all trainer ranks joined");
        let r = Reporter { dir: dir.to_path_buf(), metrics, status, pod: super::pod_progress::PodProgress::from_env() };
        r.write_status()?;
        Ok(r)
    }

    /// Appends one step's metrics line.
    pub fn step(&mut self, line: &serde_json::Value) -> Result<()> {
        let path = self.dir.join(METRICS_FILE);
        writeln!(self.metrics, "{line}").map_err(io_err(&path))?;
        self.metrics.flush().map_err(io_err(&path))
    }

    pub fn progress(&mut self, p: Progress) -> Result<()> {
        if let Some(t) = p.total_steps {
            self.status.status.step_progress = Some(format!("{}/{t}", p.step));
        }
        if let Some(pod) = self.pod.as_mut() {
            pod.publish(&p);
        }
        self.status.status.progress = Some(p);
        self.write_status()
    }

    pub fn write_status(&self) -> Result<()> {
        let text = serde_json::to_vec_pretty(&self.status)
            .map_err(|e| RuntimeError::Config(format!("status is not serializable: {e}")))?;
        write_atomic(&self.dir.join(STATUS_FILE), &text)
    }

    /// Final status: Succeeded with the completion time.
    pub fn succeeded(&mut self, message: &str) -> Result<()> {
        let st = &mut self.status.status;
        st.phase = Some(JobPhase::Succeeded);
        st.completion_time = Some(now());
        st.active = 0;
        set_condition(st, condition::RUNNING, false, reason::SUCCEEDED, message);
        set_condition(st, condition::SUCCEEDED, true, reason::SUCCEEDED, message);
        self.write_status()
    }
}
