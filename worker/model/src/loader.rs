//! Hugging Face checkpoint directories: `model.safetensors` or shards listed in
//! `model.safetensors.index.json`; F32/BF16/F16; memory-mapped; both naming schemes
//! (official `visual.*`/`model.*` and transformers ≥ 4.52 `model.visual.*`/`model.language_model.*`).
use crate::config::Qwen25VlConfig;
use crate::error::{ModelError, Result};
use crate::tensor::{DType, HostData, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Official name for a tensor stored under either naming scheme.
pub fn canonical_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else if let Some(rest) = name.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else {
        name.to_string()
    }
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// An opened (memory-mapped) checkpoint. Tensors are read and converted on demand.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// canonical name → (shard, info).
    tensors: HashMap<String, (usize, TensorInfo)>,
}

fn io_err(p: &Path, e: std::io::Error) -> ModelError {
    ModelError::Io { path: p.display().to_string(), source: e }
}

impl Checkpoint {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| io_err(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Config { path: index.display().to_string(), msg: format!("not valid JSON: {e}") })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Config {
                path: index.display().to_string(),
                msg: "missing `weight_map` object".into(),
            })?;
            let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::Io {
                path: dir.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no model.safetensors or model.safetensors.index.json in this directory"),
            });
        };
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for path in files {
            let f = File::open(&path).map_err(|e| io_err(&path, e))?;
            // SAFETY: the file is opened read-only; checkpoints are not modified while loaded.
            let mmap = unsafe { Mmap::map(&f) }.map_err(|e| io_err(&path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| ModelError::Safetensors { file: path.display().to_string(), msg: e.to_string() })?;
            for (name, info) in meta.tensors() {
                tensors.insert(canonical_name(&name), (shards.len(), info.clone()));
            }
            shards.push(Shard { path, mmap, data_start: 8 + n });
        }
        Ok(Checkpoint { dir, shards, tensors })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Canonical names of all stored tensors.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(_, i)| i.shape.as_slice())
    }

    /// Read tensor `name` (canonical), check its shape, convert to `dtype`.
    pub fn load(&self, name: &str, expected: &[usize], dtype: DType) -> Result<Tensor> {
        let dir = self.dir.display().to_string();
        let (si, info) = self.tensors.get(name).ok_or_else(|| ModelError::MissingTensor { name: name.into(), dir: dir.clone(), expected: expected.to_vec() })?;
        if info.shape != expected {
            return Err(ModelError::TensorShape { name: name.into(), dir, expected: expected.to_vec(), found: info.shape.clone() });
        }
        let sh = &self.shards[*si];
        let (a, b) = info.data_offsets;
        let bytes = sh.mmap.get(sh.data_start + a..sh.data_start + b).ok_or_else(|| ModelError::Safetensors {
            file: sh.path.display().to_string(),
            msg: format!("tensor `{name}` data range {a}..{b} lies outside the file"),
        })?;
        let n: usize = expected.iter().product();
        let elem = match info.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => {
                return Err(ModelError::UnsupportedDType { name: name.into(), file: sh.path.display().to_string(), dtype: other.to_string() });
            }
        };
        if bytes.len() != n * elem {
            return Err(ModelError::Safetensors { file: sh.path.display().to_string(), msg: format!("tensor `{name}` holds {} bytes, expected {}", bytes.len(), n * elem) });
        }
        // The mmap gives no alignment guarantee: copy through an aligned buffer when needed.
        fn cast<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
            match bytemuck::try_cast_slice(bytes) {
                Ok(s) => Cow::Borrowed(s),
                Err(_) => Cow::Owned(bytes.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect()),
            }
        }
        match (info.dtype, dtype) {
            (Dtype::F32, DType::F32) => Tensor::from_f32(expected, cast::<f32>(bytes).into_owned()),
            (Dtype::F32, DType::BF16) => Tensor::from_bf16(expected, cast::<f32>(bytes).iter().map(|&x| bf16::from_f32(x)).collect()),
            (Dtype::BF16, DType::BF16) => Tensor::from_bf16(expected, cast::<bf16>(bytes).into_owned()),
            (Dtype::BF16, DType::F32) => Tensor::from_f32(expected, cast::<bf16>(bytes).iter().map(|x| x.to_f32()).collect()),
            (Dtype::F16, d) => Tensor::from_f16(expected, &cast::<f16>(bytes), d),
            _ => unreachable!("unsupported dtypes returned above"),
        }
    }

    /// Load every tensor the config requires (official names), in `dtype`.
    pub fn load_all(&self, cfg: &Qwen25VlConfig, dtype: DType) -> Result<BTreeMap<String, Tensor>> {
        cfg.expected_tensors().into_iter().map(|(n, s)| Ok((n.clone(), self.load(&n, &s, dtype)?))).collect()
    }
}

struct HostView<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl safetensors::View for HostView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Write host tensors to one safetensors file under the given (official) names.
pub fn save_safetensors(path: impl AsRef<Path>, tensors: &[(String, &Tensor)]) -> Result<()> {
    let path = path.as_ref();
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (dtype, data): (Dtype, Cow<[u8]>) = match t.host()? {
            HostData::F32(v) => (Dtype::F32, Cow::Borrowed(bytemuck::cast_slice(v))),
            HostData::BF16(v) => (Dtype::BF16, Cow::Borrowed(bytemuck::cast_slice(v))),
        };
        views.push((name.clone(), HostView { dtype, shape: t.shape().to_vec(), data }));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| ModelError::Safetensors { file: path.display().to_string(), msg: e.to_string() })
}
