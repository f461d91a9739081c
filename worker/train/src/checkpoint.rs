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
//!
//! ZeRO-1 (sharded optimizer state): instead of `optimizer.safetensors`, every rank writes its own
//! `optimizer-rank-RRRRR-of-NNNNN.safetensors` (tensors `m`, `v`: the rank's contiguous shard of
//! the flattened moments; header metadata `pieces`: which parameter elements they are, with their
//! step counts) into the same temp directory ([`CheckpointManager::begin_sharded`],
//! [`CheckpointManager::write_shard`]); rank 0 then writes weights and state, a manifest covering
//! every shard, and renames ([`CheckpointManager::commit_sharded`]), so the whole gang's
//! checkpoint appears atomically or not at all. [`load`] reassembles the full moments from the
//! shards, so a sharded checkpoint resumes under any world size, with or without ZeRO-1.

use crate::optim::{ParamState, ShardPiece};
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

/// One rank's ZeRO-1 optimizer state (see the module docs), borrowed from the optimizer.
#[derive(Debug, Clone, Copy)]
pub struct OptimizerShard<'a> {
    pub rank: usize,
    pub world_size: usize,
    pub pieces: &'a [ShardPiece],
    pub m: &'a [f32],
    pub v: &'a [f32],
}

fn shard_file(rank: usize, world_size: usize) -> String {
    format!("optimizer-rank-{rank:05}-of-{world_size:05}.safetensors")
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: String,
    step: u64,
    /// Ranks whose optimizer shards replace `optimizer.safetensors` (ZeRO-1); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    optimizer_shards: Option<usize>,
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
    for required in [WEIGHTS, STATE] {
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
    let optimizer = match sf.optimizer_shards {
        Some(world_size) => assemble_shards(dir, &files, &weights, world_size)?,
        None => {
            let bytes = files.get(OPTIMIZER).ok_or_else(|| CheckpointError::Manifest {
                path: dir.join(MANIFEST),
                msg: format!("does not list {OPTIMIZER}"),
            })?;
            unsharded_optimizer(&dir.join(OPTIMIZER), bytes, sf.optimizer_steps)?
        }
    };
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

fn unsharded_optimizer(
    opt_path: &Path,
    bytes: &[u8],
    optimizer_steps: BTreeMap<String, u64>,
) -> Result<BTreeMap<String, ParamState>, CheckpointError> {
    let mut moments = parse_tensors(opt_path, bytes)?;
    let mut optimizer = BTreeMap::new();
    for (name, step) in optimizer_steps {
        let missing = |k: &str| CheckpointError::Safetensors {
            file: opt_path.to_path_buf(),
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
    Ok(optimizer)
}

/// The full per-parameter moments from the `world_size` shard files of a ZeRO-1 checkpoint.
/// Every element of a parameter with state must be covered exactly once, with one step count.
fn assemble_shards(
    dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    weights: &TensorMap,
    world_size: usize,
) -> Result<BTreeMap<String, ParamState>, CheckpointError> {
    if world_size == 0 {
        return Err(CheckpointError::State { file: dir.join(STATE), msg: "optimizer_shards is 0".into() });
    }
    let mut optimizer: BTreeMap<String, ParamState> = BTreeMap::new();
    let mut covered: BTreeMap<String, usize> = BTreeMap::new();
    for rank in 0..world_size {
        let name = shard_file(rank, world_size);
        let file = dir.join(&name);
        let bad = |msg: String| CheckpointError::Safetensors { file: file.clone(), msg };
        let bytes = files.get(&name).ok_or_else(|| CheckpointError::Manifest {
            path: dir.join(MANIFEST),
            msg: format!("does not list {name}, the optimizer shard of rank {rank} of {world_size}"),
        })?;
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let pieces_json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("pieces"))
            .ok_or_else(|| bad("no `pieces` metadata".into()))?;
        let pieces: Vec<ShardPiece> =
            serde_json::from_str(pieces_json).map_err(|e| bad(format!("bad `pieces` metadata: {e}")))?;
        let tensors = parse_tensors(&file, bytes)?;
        let (m, v) = match (tensors.get("m"), tensors.get("v")) {
            (Some(m), Some(v)) if m.data.len() == v.data.len() => (m, v),
            _ => return Err(bad("needs tensors `m` and `v` of equal length".into())),
        };
        for p in pieces {
            let w = weights
                .get(&p.name)
                .ok_or_else(|| bad(format!("shard of `{}`, which the checkpoint has no weight for", p.name)))?;
            let ordered = p.param.start <= p.param.end && p.local.start <= p.local.end;
            if !ordered || p.param.end > w.data.len() || p.local.end > m.data.len() || p.param.len() != p.local.len() {
                return Err(bad(format!("piece of `{}` out of range", p.name)));
            }
            let st = optimizer.entry(p.name.clone()).or_insert_with(|| ParamState {
                step: p.step,
                m: Tensor::zeros(&w.shape),
                v: Tensor::zeros(&w.shape),
            });
            if st.step != p.step {
                return Err(bad(format!("`{}` has step {} here and {} in another shard", p.name, p.step, st.step)));
            }
            st.m.data[p.param.clone()].copy_from_slice(&m.data[p.local.clone()]);
            st.v.data[p.param.clone()].copy_from_slice(&v.data[p.local.clone()]);
            *covered.entry(p.name).or_default() += p.param.len();
        }
    }
    for (name, n) in &covered {
        let want = weights[name].data.len();
        if *n != want {
            return Err(CheckpointError::State {
                file: dir.join(STATE),
                msg: format!("the {world_size} optimizer shards cover {n} of the {want} elements of `{name}`"),
            });
        }
    }
    Ok(optimizer)
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
        let tmp = self.begin(state.step)?;
        self.write_moments(&tmp, state)?;
        self.commit(&tmp, state, None)
    }

    /// Temp directory a checkpoint of `step` is assembled in; a fixed name, so every rank of a
    /// ZeRO-1 gang finds it.
    fn staging(&self, step: u64) -> PathBuf {
        self.root.join(format!("{TMP_PREFIX}{}", dir_name(step)))
    }

    /// ZeRO-1 save, phase 1 (rank 0 only, before any rank writes its shard): removes leftovers
    /// of interrupted saves and creates the temp directory of `step`.
    pub fn begin_sharded(&self, step: u64) -> Result<PathBuf, CheckpointError> {
        self.begin(step)
    }

    fn begin(&self, step: u64) -> Result<PathBuf, CheckpointError> {
        self.clean_temp()?;
        let tmp = self.staging(step);
        fs::create_dir(&tmp).map_err(io(&tmp))?;
        Ok(tmp)
    }

    /// ZeRO-1 save, phase 2 (every rank, after phase 1): this rank's optimizer shard into the
    /// temp directory of `step`, fsynced.
    pub fn write_shard(&self, step: u64, shard: &OptimizerShard<'_>) -> Result<(), CheckpointError> {
        if shard.rank >= shard.world_size || shard.m.len() != shard.v.len() {
            return Err(CheckpointError::Invalid(format!(
                "optimizer shard of rank {} of {} with {} / {} moments",
                shard.rank,
                shard.world_size,
                shard.m.len(),
                shard.v.len()
            )));
        }
        let tmp = self.staging(step);
        if !tmp.is_dir() {
            return Err(CheckpointError::Invalid(format!(
                "{} does not exist: rank 0 must begin the sharded save first",
                tmp.display()
            )));
        }
        let path = tmp.join(shard_file(shard.rank, shard.world_size));
        let pieces = serde_json::to_string(shard.pieces).map_err(|e| CheckpointError::Invalid(e.to_string()))?;
        let meta = std::collections::HashMap::from([("pieces".to_string(), pieces)]);
        let m = Tensor { shape: vec![shard.m.len()], data: shard.m.to_vec() };
        let v = Tensor { shape: vec![shard.v.len()], data: shard.v.to_vec() };
        let views = [("m".to_string(), F32View(&m)), ("v".to_string(), F32View(&v))];
        safetensors::tensor::serialize_to_file(views, Some(meta), &path).map_err(|e| {
            CheckpointError::Safetensors { file: path.clone(), msg: e.to_string() }
        })?;
        File::open(&path).and_then(|f| f.sync_all()).map_err(io(&path))
    }

    /// ZeRO-1 save, phase 3 (rank 0, after every rank finished phase 2): weights and state of
    /// `state` (whose `optimizer` must be empty: the moments are in the shards), a manifest over
    /// every file including the `world_size` shards, then the atomic rename and pruning.
    pub fn commit_sharded(&self, state: &TrainingState, world_size: usize) -> Result<PathBuf, CheckpointError> {
        if !state.optimizer.is_empty() || world_size == 0 {
            return Err(CheckpointError::Invalid(
                "a sharded checkpoint takes its moments from the shard files only".into(),
            ));
        }
        let tmp = self.staging(state.step);
        for rank in 0..world_size {
            let f = tmp.join(shard_file(rank, world_size));
            if !f.is_file() {
                return Err(CheckpointError::MissingFile { file: f });
            }
        }
        self.commit(&tmp, state, Some(world_size))
    }

    /// Weights, state and manifest into `tmp` (which already holds the moments), then rename.
    fn commit(&self, tmp: &Path, state: &TrainingState, shards: Option<usize>) -> Result<PathBuf, CheckpointError> {
        self.write_files(tmp, state, shards)?;
        sync_dir(tmp)?;
        let dst = self.root.join(dir_name(state.step));
        if dst.exists() {
            // rename() cannot replace a non-empty directory: move the old one aside first.
            let old = self
                .root
                .join(format!("{TMP_PREFIX}replaced-{}", dir_name(state.step)));
            fs::rename(&dst, &old).map_err(io(&dst))?;
            fs::rename(tmp, &dst).map_err(io(tmp))?;
            sync_dir(&self.root)?;
            fs::remove_dir_all(&old).map_err(io(&old))?;
        } else {
            fs::rename(tmp, &dst).map_err(io(tmp))?;
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

    /// `optimizer.safetensors` (unsharded moments).
    fn write_moments(&self, dir: &Path, state: &TrainingState) -> Result<(), CheckpointError> {
        for (name, st) in &state.optimizer {
            if st.m.shape != st.v.shape {
                return Err(CheckpointError::Invalid(format!(
                    "optimizer moments of `{name}` have different shapes"
                )));
            }
        }
        let moments: Vec<(String, &Tensor)> = state
            .optimizer
            .iter()
            .flat_map(|(n, s)| [(format!("m/{n}"), &s.m), (format!("v/{n}"), &s.v)])
            .collect();
        write_tensors(&dir.join(OPTIMIZER), &moments)
    }

    fn write_files(&self, dir: &Path, state: &TrainingState, shards: Option<usize>) -> Result<(), CheckpointError> {
        let weights: Vec<(String, &Tensor)> =
            state.weights.iter().map(|(n, t)| (n.clone(), t)).collect();
        write_tensors(&dir.join(WEIGHTS), &weights)?;
        let sf = StateFile {
            format: FORMAT.into(),
            step: state.step,
            optimizer_shards: shards,
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
        let moment_files: Vec<String> = match shards {
            Some(n) => (0..n).map(|r| shard_file(r, n)).collect(),
            None => vec![OPTIMIZER.to_string()],
        };
        let mut files = BTreeMap::new();
        for name in [WEIGHTS, STATE].into_iter().chain(moment_files.iter().map(String::as_str)) {
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
