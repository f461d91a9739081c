//! Reading the checkpoint's JSON files: special-token ids (config.json, generation_config.json,
//! tokenizer_config.json) and image settings (preprocessor_config.json).

use std::path::Path;

use serde_json::Value;

use crate::error::{PreprocessError, Result};

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| PreprocessError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|source| PreprocessError::Json { path: path.to_path_buf(), source })
}

/// Like [`read_json`] but `Ok(None)` when the file does not exist (optional files).
pub(crate) fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

fn config_err(path: &Path, message: impl Into<String>) -> PreprocessError {
    PreprocessError::Config { path: path.to_path_buf(), message: message.into() }
}

/// A non-negative integer id at `key`, or `None` when absent/null.
fn id_at(v: &Value, key: &str, path: &Path) -> Result<Option<u32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| config_err(path, format!("`{key}` must be a token id, got {x}"))),
    }
}

/// `eos_token_id` may be an int or a list of ints.
fn ids_at(v: &Value, key: &str, path: &Path) -> Result<Vec<u32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| config_err(path, format!("`{key}` entries must be token ids, got {x}")))
            })
            .collect(),
        Some(_) => Ok(id_at(v, key, path)?.into_iter().collect()),
    }
}

/// Token ids the processor and the model rely on. Read from the checkpoint, never hard-coded:
/// the test checkpoints deliberately use ids different from Qwen's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub image_token_id: u32,
    pub video_token_id: Option<u32>,
    pub vision_start_token_id: Option<u32>,
    pub vision_end_token_id: Option<u32>,
    /// Generation stops on any of these (generation_config.json, else config.json).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The string of `image_token_id` in the tokenizer (`<|image_pad|>` for Qwen).
    pub image_token: String,
}

impl SpecialTokens {
    /// `lookup` maps a token string to its id in the tokenizer (fallback when config.json
    /// lacks an id, as transformers' processor falls back to the tokenizer).
    pub(crate) fn load(
        dir: &Path,
        lookup: &dyn Fn(&str) -> Option<u32>,
        id_to_token: &dyn Fn(u32) -> Option<String>,
    ) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg = read_json(&cfg_path)?;
        // Newer transformers saves may nest text keys; the token ids stay at top level, but
        // look in text_config too for robustness.
        let text_cfg = cfg.get("text_config").cloned().unwrap_or(Value::Null);
        let get = |key: &str| -> Result<Option<u32>> {
            match id_at(&cfg, key, &cfg_path)? {
                Some(id) => Ok(Some(id)),
                None => id_at(&text_cfg, key, &cfg_path),
            }
        };
        let image_token_id = match get("image_token_id")? {
            Some(id) => id,
            None => lookup("<|image_pad|>").ok_or_else(|| {
                config_err(&cfg_path, "no `image_token_id` and the tokenizer has no <|image_pad|> token")
            })?,
        };
        let image_token = id_to_token(image_token_id)
            .ok_or(PreprocessError::UnknownToken { token: "image_token_id".into(), id: image_token_id })?;
        let video_token_id = get("video_token_id")?.or_else(|| lookup("<|video_pad|>"));
        let vision_start_token_id = get("vision_start_token_id")?.or_else(|| lookup("<|vision_start|>"));
        let vision_end_token_id = get("vision_end_token_id")?.or_else(|| lookup("<|vision_end|>"));

        let gen_path = dir.join("generation_config.json");
        let gen = read_json_opt(&gen_path)?;
        let mut eos_token_ids = match &gen {
            Some(g) => ids_at(g, "eos_token_id", &gen_path)?,
            None => Vec::new(),
        };
        if eos_token_ids.is_empty() {
            eos_token_ids = ids_at(&cfg, "eos_token_id", &cfg_path)?;
        }
        if eos_token_ids.is_empty() {
            eos_token_ids = ids_at(&text_cfg, "eos_token_id", &cfg_path)?;
        }
        let tok_cfg_path = dir.join("tokenizer_config.json");
        let tok_cfg = read_json_opt(&tok_cfg_path)?;
        if eos_token_ids.is_empty() {
            if let Some(id) = tok_cfg.as_ref().and_then(|t| token_str(t.get("eos_token"))).and_then(|s| lookup(&s)) {
                eos_token_ids.push(id);
            }
        }
        let mut pad_token_id = match &gen {
            Some(g) => id_at(g, "pad_token_id", &gen_path)?,
            None => None,
        };
        if pad_token_id.is_none() {
            pad_token_id = tok_cfg.as_ref().and_then(|t| token_str(t.get("pad_token"))).and_then(|s| lookup(&s));
        }
        Ok(Self {
            image_token_id,
            video_token_id,
            vision_start_token_id,
            vision_end_token_id,
            eos_token_ids,
            pad_token_id,
            image_token,
        })
    }
}

/// tokenizer_config.json writes special tokens as a string or as an AddedToken object.
pub(crate) fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// Image preprocessing settings (preprocessor_config.json), defaults as transformers'
/// `Qwen2VLImageProcessor`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// Kept in f64: transformers multiplies in float64 and rounds to f32 afterwards.
    pub rescale_factor: f64,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
}

// The constants as the HF processor config spells them (OpenAI CLIP's), not f32's shortest form.
#[allow(clippy::excessive_precision)]
impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
        }
    }
}

impl ImageConfig {
    /// The resize factor: patch size times merge size (28 for Qwen2.5-VL).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Values per patch row: channels · temporal patch · patch² (1176 for Qwen2.5-VL).
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Reads preprocessor_config.json in `dir`; absent file → defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        match read_json_opt(&path)? {
            Some(v) => Self::from_json(&v, &path),
            None => Ok(Self::default()),
        }
    }

    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let mut c = Self::default();
        let uint = |key: &str| -> Result<Option<usize>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| config_err(path, format!("`{key}` must be a non-negative integer, got {x}"))),
            }
        };
        let boolean = |key: &str, default: bool| -> Result<bool> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(x) => Err(config_err(path, format!("`{key}` must be true or false, got {x}"))),
            }
        };
        let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x
                            .as_f64()
                            .ok_or_else(|| config_err(path, format!("`{key}` must hold numbers")))?
                            as f32;
                    }
                    Ok(out)
                }
                Some(x) => Err(config_err(path, format!("`{key}` must be a list of 3 numbers, got {x}"))),
            }
        };
        // `size` {shortest_edge, longest_edge} is the newer spelling; explicit min/max_pixels
        // override it, as in transformers.
        if let Some(size) = v.get("size").filter(|s| s.is_object()) {
            let sub = |key: &str| size.get(key).and_then(Value::as_u64).map(|n| n as usize);
            if let Some(n) = sub("shortest_edge") {
                c.min_pixels = n;
            }
            if let Some(n) = sub("longest_edge") {
                c.max_pixels = n;
            }
        }
        if let Some(n) = uint("min_pixels")? {
            c.min_pixels = n;
        }
        if let Some(n) = uint("max_pixels")? {
            c.max_pixels = n;
        }
        if let Some(n) = uint("patch_size")? {
            c.patch_size = n;
        }
        if let Some(n) = uint("temporal_patch_size")? {
            c.temporal_patch_size = n;
        }
        if let Some(n) = uint("merge_size")? {
            c.merge_size = n;
        }
        c.image_mean = triple("image_mean", c.image_mean)?;
        c.image_std = triple("image_std", c.image_std)?;
        if let Some(x) = v.get("rescale_factor").filter(|x| !x.is_null()) {
            c.rescale_factor =
                x.as_f64().ok_or_else(|| config_err(path, format!("`rescale_factor` must be a number, got {x}")))?;
        }
        c.do_resize = boolean("do_resize", c.do_resize)?;
        c.do_rescale = boolean("do_rescale", c.do_rescale)?;
        c.do_normalize = boolean("do_normalize", c.do_normalize)?;
        if c.patch_size == 0 || c.merge_size == 0 || c.temporal_patch_size == 0 {
            return Err(config_err(path, "patch_size, merge_size and temporal_patch_size must be positive"));
        }
        if c.min_pixels > c.max_pixels {
            return Err(config_err(path, format!("min_pixels {} exceeds max_pixels {}", c.min_pixels, c.max_pixels)));
        }
        if c.image_std.contains(&0.0) {
            return Err(config_err(path, "image_std must not contain 0"));
        }
        Ok(c)
    }
}

