//! Atomic training checkpoints.
//!
//! A checkpoint is a directory `ckpt-<step, 10 digits>` under a root:
//!   weights.safetensors    model weights (f32 master copy)
//!   optimizer.safetensors  AdamW moments, tensors `m/<param>` and `v/<param>`
//!   state.json             step, per-parameter optimizer steps, schedule, data position, RNG, metadata
//!   manifest.json          SHA-256 and size of each file above; written last
//! Saving writes everything into a `.tmp-*` directory, fsyncs each file and the directory, renames it
//! into place and fsyncs the root, so a crash leaves either the old set or the new one, plus at most a
//! temp directory that readers ignore and the next save deletes. Single writer per root (rank 0).

use crate::optim::ParamState;
use crate::schedule::Schedule;
use crate::tensor::{Tensor, TensorMap};
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

const WEIGHTS: &str = "weights.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
const MANIFEST: &str = "manifest.json";
const PREFIX: &str = "ckpt-";
const TMP_PREFIX: &str = ".tmp-";
const FORMAT: &str = "onevision-training-checkpoint";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir}: no manifest.json — the checkpoint is incomplete (crashed while saving?)")]
    MissingManifest { dir: PathBuf },
    #[error("{path}: bad manifest: {msg}")]
    Manifest { path: PathBuf, msg: String },
    #[error("{file}: listed in the manifest but missing")]
    MissingFile { file: PathBuf },
    #[error("{file}: size {actual} bytes, manifest says {expected} — truncated or overwritten")]
    Size {
        file: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error(
        "{file}: SHA-256 mismatch, manifest {expected}, file {actual} — the file is corrupted"
    )]
    Checksum {
        file: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{file}: {msg}")]
    Safetensors { file: PathBuf, msg: String },
    #[error("{file}: bad training state: {msg}")]
    State { file: PathBuf, msg: String },
    #[error("invalid checkpoint request: {0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the data loader is: epoch and index of the next sample (in its own shuffled order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub index: u64,
}

/// Everything needed to resume training exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingState {
    /// Optimizer steps completed.
    pub step: u64,
    pub weights: TensorMap,
    pub optimizer: BTreeMap<String, ParamState>,
    pub schedule: Option<Schedule>,
    pub data_position: DataPosition,
    /// Opaque RNG state (e.g. ChaCha seed + word position), restored verbatim.
    pub rng: Vec<u8>,
    pub metadata: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: String,
    step: u64,
    optimizer_steps: BTreeMap<String, u64>,
    schedule: Option<Schedule>,
    data_position: DataPosition,
    rng: Vec<u8>,
    metadata: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub step: u64,
    pub files: BTreeMap<String, FileEntry>,
}

/// Borrowed f32 tensor for safetensors; bytes are produced one tensor at a time while writing.
struct F32View<'a>(&'a Tensor);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn write_tensors(path: &Path, tensors: &[(String, &Tensor)]) -> Result<(), CheckpointError> {
    let views = tensors.iter().map(|(n, t)| (n.clone(), F32View(t)));
    safetensors::tensor::serialize_to_file(views, None, path).map_err(|e| {
        CheckpointError::Safetensors {
            file: path.to_path_buf(),
            msg: e.to_string(),
        }
    })?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn dir_name(step: u64) -> String {
    format!("{PREFIX}{step:010}")
}

fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX)
        .filter(|s| s.len() == 10)
        .and_then(|s| s.parse().ok())
}

/// Read and checksum every file of the manifest; returns the manifest and the verified bytes.
fn read_verified(dir: &Path) -> Result<(Manifest, BTreeMap<String, Vec<u8>>), CheckpointError> {
    let mpath = dir.join(MANIFEST);
    let text = match fs::read(&mpath) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::MissingManifest {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io(&mpath)(e)),
    };
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| CheckpointError::Manifest {
            path: mpath.clone(),
            msg: e.to_string(),
        })?;
    if manifest.format != FORMAT {
        return Err(CheckpointError::Manifest {
            path: mpath,
            msg: format!("unknown format {:?}", manifest.format),
        });
    }
    for required in [WEIGHTS, OPTIMIZER, STATE] {
        if !manifest.files.contains_key(required) {
            return Err(CheckpointError::Manifest {
                path: mpath,
                msg: format!("does not list {required}"),
            });
        }
    }
    let mut contents = BTreeMap::new();
    for (name, entry) in &manifest.files {
        if name.contains('/') || name.contains("..") {
            return Err(CheckpointError::Manifest {
                path: mpath,
                msg: format!("bad file name {name:?}"),
            });
        }
        let file = dir.join(name);
        let bytes = match fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::MissingFile { file })
            }
            Err(e) => return Err(io(&file)(e)),
        };
        if bytes.len() as u64 != entry.bytes {
            return Err(CheckpointError::Size {
                file,
                expected: entry.bytes,
                actual: bytes.len() as u64,
            });
        }
        let actual = sha256_hex(&bytes);
        if actual != entry.sha256 {
            return Err(CheckpointError::Checksum {
                file,
                expected: entry.sha256.clone(),
                actual,
            });
        }
        contents.insert(name.clone(), bytes);
    }
    Ok((manifest, contents))
}

fn parse_tensors(file: &Path, bytes: &[u8]) -> Result<TensorMap, CheckpointError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Safetensors {
        file: file.to_path_buf(),
        msg: e.to_string(),
    })?;
    let mut out = TensorMap::new();
    for (name, view) in st.iter() {
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::Safetensors {
                file: file.to_path_buf(),
                msg: format!("tensor `{name}` is {:?}, expected F32", view.dtype()),
            });
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(
            name.to_string(),
            Tensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// Verify checksums and load a checkpoint directory.
pub fn load(dir: &Path) -> Result<TrainingState, CheckpointError> {
    let (manifest, files) = read_verified(dir)?;
    let state_path = dir.join(STATE);
    let sf: StateFile =
        serde_json::from_slice(&files[STATE]).map_err(|e| CheckpointError::State {
            file: state_path.clone(),
            msg: e.to_string(),
        })?;
    if sf.step != manifest.step {
        return Err(CheckpointError::State {
            file: state_path,
            msg: format!(
                "step {} differs from the manifest's {}",
                sf.step, manifest.step
            ),
        });
    }
    let weights = parse_tensors(&dir.join(WEIGHTS), &files[WEIGHTS])?;
    let opt_path = dir.join(OPTIMIZER);
    let mut moments = parse_tensors(&opt_path, &files[OPTIMIZER])?;
    let mut optimizer = BTreeMap::new();
    for (name, step) in sf.optimizer_steps {
        let missing = |k: &str| CheckpointError::Safetensors {
            file: opt_path.clone(),
            msg: format!("missing tensor `{k}/{name}` for a parameter listed in state.json"),
        };
        let m = moments
            .remove(&format!("m/{name}"))
            .ok_or_else(|| missing("m"))?;
        let v = moments
            .remove(&format!("v/{name}"))
            .ok_or_else(|| missing("v"))?;
        optimizer.insert(name, ParamState { step, m, v });
    }
    Ok(TrainingState {
        step: sf.step,
        weights,
        optimizer,
        schedule: sf.schedule,
        data_position: sf.data_position,
        rng: sf.rng,
        metadata: sf.metadata,
    })
}

/// Check a checkpoint's files against its manifest without parsing tensors.
pub fn verify(dir: &Path) -> Result<Manifest, CheckpointError> {
    read_verified(dir).map(|(m, _)| m)
}

/// Saves, lists, prunes and finds checkpoints under one root directory.
#[derive(Debug, Clone)]
pub struct CheckpointManager {
    root: PathBuf,
    keep_last: usize,
}

impl CheckpointManager {
    /// `keep_last`: how many checkpoints to keep after each save (≥ 1).
    pub fn new(root: impl Into<PathBuf>, keep_last: usize) -> Result<Self, CheckpointError> {
        if keep_last == 0 {
            return Err(CheckpointError::Invalid(
                "keep_last must be at least 1".into(),
            ));
        }
        let root = root.into();
        fs::create_dir_all(&root).map_err(io(&root))?;
        Ok(Self { root, keep_last })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Final checkpoint directories, oldest first (temp directories are not listed).
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.root).map_err(io(&self.root))? {
            let e = e.map_err(io(&self.root))?;
            if let Some(step) = e.file_name().to_str().and_then(step_of) {
                if e.path().is_dir() {
                    out.push((step, e.path()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Remove temp directories left by interrupted saves; returns how many.
    pub fn clean_temp(&self) -> Result<usize, CheckpointError> {
        let mut n = 0;
        for e in fs::read_dir(&self.root).map_err(io(&self.root))? {
            let e = e.map_err(io(&self.root))?;
            if e.file_name()
                .to_str()
                .is_some_and(|s| s.starts_with(TMP_PREFIX))
            {
                let p = e.path();
                fs::remove_dir_all(&p).map_err(io(&p))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Write `state` atomically as `ckpt-<step>`, replacing one of the same step, then keep only the
    /// newest `keep_last`. Returns the checkpoint directory.
    pub fn save(&self, state: &TrainingState) -> Result<PathBuf, CheckpointError> {
        self.clean_temp()?;
        let tmp = self.root.join(format!(
            "{TMP_PREFIX}{}-{}",
            dir_name(state.step),
            std::process::id()
        ));
        fs::create_dir(&tmp).map_err(io(&tmp))?;
        self.write_files(&tmp, state)?;
        sync_dir(&tmp)?;
        let dst = self.root.join(dir_name(state.step));
        if dst.exists() {
            // rename() cannot replace a non-empty directory: move the old one aside first.
            let old = self
                .root
                .join(format!("{TMP_PREFIX}replaced-{}", dir_name(state.step)));
            fs::rename(&dst, &old).map_err(io(&dst))?;
            fs::rename(&tmp, &dst).map_err(io(&tmp))?;
            sync_dir(&self.root)?;
            fs::remove_dir_all(&old).map_err(io(&old))?;
        } else {
            fs::rename(&tmp, &dst).map_err(io(&tmp))?;
            sync_dir(&self.root)?;
        }
        let all = self.list()?;
        if all.len() > self.keep_last {
            for (_, p) in &all[..all.len() - self.keep_last] {
                fs::remove_dir_all(p).map_err(io(p))?;
            }
            sync_dir(&self.root)?;
        }
        Ok(dst)
    }

    fn write_files(&self, dir: &Path, state: &TrainingState) -> Result<(), CheckpointError> {
        for (name, st) in &state.optimizer {
            if st.m.shape != st.v.shape {
                return Err(CheckpointError::Invalid(format!(
                    "optimizer moments of `{name}` have different shapes"
                )));
            }
        }
        let weights: Vec<(String, &Tensor)> =
            state.weights.iter().map(|(n, t)| (n.clone(), t)).collect();
        write_tensors(&dir.join(WEIGHTS), &weights)?;
        let moments: Vec<(String, &Tensor)> = state
            .optimizer
            .iter()
            .flat_map(|(n, s)| [(format!("m/{n}"), &s.m), (format!("v/{n}"), &s.v)])
            .collect();
        write_tensors(&dir.join(OPTIMIZER), &moments)?;
        let sf = StateFile {
            format: FORMAT.into(),
            step: state.step,
            optimizer_steps: state
                .optimizer
                .iter()
                .map(|(n, s)| (n.clone(), s.step))
                .collect(),
            schedule: state.schedule,
            data_position: state.data_position,
            rng: state.rng.clone(),
            metadata: state.metadata.clone(),
        };
        let state_bytes = serde_json::to_vec_pretty(&sf).map_err(|e| CheckpointError::State {
            file: dir.join(STATE),
            msg: e.to_string(),
        })?;
        write_synced(&dir.join(STATE), &state_bytes)?;
        let mut files = BTreeMap::new();
        for name in [WEIGHTS, OPTIMIZER, STATE] {
            let p = dir.join(name);
            let bytes = fs::read(&p).map_err(io(&p))?;
            files.insert(
                name.to_string(),
                FileEntry {
                    sha256: sha256_hex(&bytes),
                    bytes: bytes.len() as u64,
                },
            );
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            step: state.step,
            files,
        };
        let mbytes =
            serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Manifest {
                path: dir.join(MANIFEST),
                msg: e.to_string(),
            })?;
        write_synced(&dir.join(MANIFEST), &mbytes)
    }

    /// The newest checkpoint that verifies and loads. Invalid newer ones are skipped with a warning
    /// (logged and returned in `skipped`) so a crash or corruption costs one interval, not the run.
    pub fn latest_valid(&self) -> Result<LatestValid, CheckpointError> {
        let mut skipped = Vec::new();
        for (_, dir) in self.list()?.into_iter().rev() {
            match load(&dir) {
                Ok(state) => {
                    return Ok(LatestValid {
                        found: Some((dir, state)),
                        skipped,
                    })
                }
                Err(e) => {
                    tracing::warn!(checkpoint = %dir.display(), error = %e, "skipping invalid checkpoint");
                    skipped.push((dir, e));
                }
            }
        }
        Ok(LatestValid {
            found: None,
            skipped,
        })
    }
}

/// Result of [`CheckpointManager::latest_valid`].
#[derive(Debug)]
pub struct LatestValid {
    /// The newest valid checkpoint and its state; `None` when there is none (start from scratch).
    pub found: Option<(PathBuf, TrainingState)>,
    /// Newer checkpoints that failed verification, newest first, with why.
    pub skipped: Vec<(PathBuf, CheckpointError)>,
}
