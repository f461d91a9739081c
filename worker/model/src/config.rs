//! Qwen2.5-VL configuration: the official flat `config.json`, the nested
//! (`text_config` / `rope_parameters`) layout of newer transformers, generation_config.json eos
//! ids, and the full expected tensor list derived from the config alone.
use crate::error::{ModelError, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Frequency sections for (T, H, W), summing to head_dim/2.
    pub mrope_section: Vec<usize>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub hidden_act: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    /// In pixels.
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    pub out_hidden_size: usize,
    pub tokens_per_second: f64,
    pub hidden_act: String,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// Values per flattened patch: channels · temporal · patch².
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
    /// Window side in merged tokens.
    pub fn window_merged(&self) -> usize {
        self.window_size / self.spatial_merge_size / self.patch_size
    }
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Qwen25VlConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: Option<u32>,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// Stop ids: generation_config.json's `eos_token_id` when present, else config.json's.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

/// Looks keys up in the text section first (nested layout), then the top level (flat layout).
struct Src<'a> {
    path: &'a str,
    top: &'a Value,
    text: Option<&'a Value>,
}

impl<'a> Src<'a> {
    fn err(&self, msg: String) -> ModelError {
        ModelError::Config { path: self.path.to_string(), msg }
    }
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.text.and_then(|t| t.get(key)).filter(|v| !v.is_null()).or_else(|| self.top.get(key).filter(|v| !v.is_null()))
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.err(format!("missing required key `{key}`")))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| as_usize(v).ok_or_else(|| self.err(format!("`{key}` must be a non-negative integer, got {v}")))).transpose()
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(format!("`{key}` must be a number, got {v}"))),
        }
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().map(|x| x as usize).or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as usize))
}

/// An id or a list of ids.
fn ids(v: &Value) -> Option<Vec<u32>> {
    match v {
        Value::Array(a) => a.iter().map(|x| x.as_u64().map(|x| x as u32)).collect(),
        other => other.as_u64().map(|x| vec![x as u32]),
    }
}

impl Qwen25VlConfig {
    /// Parse config.json text. `generation_config` (the text of generation_config.json) overrides
    /// the eos ids when given.
    pub fn from_json_str(config: &str, generation_config: Option<&str>, path: &str) -> Result<Self> {
        let top: Value = serde_json::from_str(config).map_err(|e| ModelError::Config { path: path.into(), msg: format!("not valid JSON: {e}") })?;
        if !top.is_object() {
            return Err(ModelError::Config { path: path.into(), msg: "top level must be a JSON object".into() });
        }
        let src = Src { path, top: &top, text: top.get("text_config").filter(|v| v.is_object()) };
        let hidden_size = src.usize("hidden_size")?;
        let num_attention_heads = src.usize("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 && src.get("head_dim").is_none() {
            return Err(src.err(format!("hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}")));
        }
        let head_dim = src.opt_usize("head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        // rope: flat `rope_scaling` {type: mrope, mrope_section} or nested `rope_parameters`.
        let rope = src.get("rope_parameters").or_else(|| src.get("rope_scaling"));
        let mrope_section: Vec<usize> = rope
            .and_then(|r| r.get("mrope_section"))
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(as_usize).collect::<Option<Vec<_>>>())
            .ok_or_else(|| src.err("missing `rope_scaling.mrope_section` (or `rope_parameters.mrope_section`): Qwen2.5-VL needs M-RoPE sections".into()))?;
        let rope_theta = match rope.and_then(|r| r.get("rope_theta")).and_then(|v| v.as_f64()) {
            Some(t) => t,
            None => src.f64_or("rope_theta", 1_000_000.0)?,
        };
        if mrope_section.iter().sum::<usize>() * 2 != head_dim {
            return Err(src.err(format!("mrope_section {mrope_section:?} must sum to head_dim/2 = {}", head_dim / 2)));
        }
        let num_key_value_heads = src.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(src.err(format!("num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}")));
        }
        let tie = src.get("tie_word_embeddings").map(|v| v.as_bool().ok_or_else(|| src.err(format!("`tie_word_embeddings` must be a bool, got {v}")))).transpose()?;
        let text = TextConfig {
            vocab_size: src.usize("vocab_size")?,
            hidden_size,
            intermediate_size: src.usize("intermediate_size")?,
            num_hidden_layers: src.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: src.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            mrope_section,
            max_position_embeddings: src.opt_usize("max_position_embeddings")?.unwrap_or(128000),
            // transformers' PretrainedConfig default is tied.
            tie_word_embeddings: tie.unwrap_or(true),
            hidden_act: src.get("hidden_act").and_then(|v| v.as_str()).unwrap_or("silu").to_string(),
        };
        if text.hidden_act != "silu" {
            return Err(src.err(format!("text hidden_act `{}` is not supported (Qwen2.5-VL uses silu)", text.hidden_act)));
        }

        // Vision: keys omitted in re-saved configs take transformers' class defaults.
        let empty = Value::Object(Default::default());
        let vc = top.get("vision_config").unwrap_or(&empty);
        let vsrc = Src { path, top: vc, text: None };
        let vget = |k: &str, d: usize| -> Result<usize> { Ok(vsrc.opt_usize(k)?.unwrap_or(d)) };
        let vision = VisionConfig {
            depth: vget("depth", 32)?,
            hidden_size: vget("hidden_size", 3584)?,
            intermediate_size: vget("intermediate_size", 3420)?,
            num_heads: vget("num_heads", 16)?,
            in_channels: match vsrc.opt_usize("in_channels")? {
                Some(c) => c,
                None => vget("in_chans", 3)?,
            },
            patch_size: vget("patch_size", 14)?,
            temporal_patch_size: vget("temporal_patch_size", 2)?,
            spatial_merge_size: vget("spatial_merge_size", 2)?,
            window_size: vget("window_size", 112)?,
            fullatt_block_indexes: match vc.get("fullatt_block_indexes") {
                None | Some(Value::Null) => vec![7, 15, 23, 31],
                Some(v) => v
                    .as_array()
                    .and_then(|a| a.iter().map(as_usize).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| src.err(format!("`vision_config.fullatt_block_indexes` must be a list of integers, got {v}")))?,
            },
            out_hidden_size: vget("out_hidden_size", 3584)?,
            tokens_per_second: vsrc.f64_or("tokens_per_second", 4.0)?,
            hidden_act: vc.get("hidden_act").and_then(|v| v.as_str()).unwrap_or("silu").to_string(),
        };
        if vision.num_heads == 0 || !vision.hidden_size.is_multiple_of(vision.num_heads) || !vision.head_dim().is_multiple_of(4) {
            return Err(src.err(format!("vision hidden_size {} / num_heads {} must give a head_dim divisible by 4", vision.hidden_size, vision.num_heads)));
        }
        if vision.out_hidden_size != text.hidden_size {
            return Err(src.err(format!("vision out_hidden_size {} differs from text hidden_size {}", vision.out_hidden_size, text.hidden_size)));
        }
        if vision.spatial_merge_size == 0 || vision.patch_size == 0 || vision.window_merged() == 0 {
            return Err(src.err(format!(
                "vision window_size {} must cover at least one merge unit of {}x{} patches of {} px",
                vision.window_size, vision.spatial_merge_size, vision.spatial_merge_size, vision.patch_size
            )));
        }
        if vision.hidden_act != "silu" {
            return Err(src.err(format!("vision hidden_act `{}` is not supported (Qwen2.5-VL uses silu)", vision.hidden_act)));
        }

        let id = |k: &str| -> Result<Option<u32>> { Ok(src.opt_usize(k)?.map(|x| x as u32)) };
        let image_token_id = id("image_token_id")?.ok_or_else(|| src.err("missing `image_token_id`".into()))?;
        let vision_start_token_id = id("vision_start_token_id")?.ok_or_else(|| src.err("missing `vision_start_token_id`".into()))?;
        let mut eos_token_ids = src.get("eos_token_id").and_then(ids).unwrap_or_default();
        let mut pad_token_id = id("pad_token_id")?;
        let mut bos_token_id = id("bos_token_id")?;
        if let Some(g) = generation_config {
            let gv: Value = serde_json::from_str(g).map_err(|e| ModelError::Config { path: format!("{path} (generation_config.json)"), msg: format!("not valid JSON: {e}") })?;
            if let Some(e) = gv.get("eos_token_id").and_then(ids) {
                eos_token_ids = e;
            }
            if let Some(p) = gv.get("pad_token_id").and_then(as_usize) {
                pad_token_id = Some(p as u32);
            }
            if let Some(b) = gv.get("bos_token_id").and_then(as_usize) {
                bos_token_id = Some(b as u32);
            }
        }
        Ok(Qwen25VlConfig {
            text,
            vision,
            image_token_id,
            video_token_id: id("video_token_id")?,
            vision_start_token_id,
            vision_end_token_id: id("vision_end_token_id")?,
            bos_token_id,
            eos_token_ids,
            pad_token_id,
        })
    }

    /// Read `dir/config.json` and, if present, `dir/generation_config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let p = dir.join("config.json");
        let cfg = std::fs::read_to_string(&p).map_err(|e| ModelError::Io { path: p.display().to_string(), source: e })?;
        let gp = dir.join("generation_config.json");
        let gen = match std::fs::read_to_string(&gp) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ModelError::Io { path: gp.display().to_string(), source: e }),
        };
        Self::from_json_str(&cfg, gen.as_deref(), &p.display().to_string())
    }

    /// Every tensor the checkpoint must hold, with official (flat-layout) names and shapes.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let v = &self.vision;
        let t = &self.text;
        let mut out = Vec::new();
        let mut push = |n: String, s: Vec<usize>| out.push((n, s));
        push("visual.patch_embed.proj.weight".into(), vec![v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size]);
        for i in 0..v.depth {
            let p = format!("visual.blocks.{i}");
            push(format!("{p}.norm1.weight"), vec![v.hidden_size]);
            push(format!("{p}.norm2.weight"), vec![v.hidden_size]);
            push(format!("{p}.attn.qkv.weight"), vec![3 * v.hidden_size, v.hidden_size]);
            push(format!("{p}.attn.qkv.bias"), vec![3 * v.hidden_size]);
            push(format!("{p}.attn.proj.weight"), vec![v.hidden_size, v.hidden_size]);
            push(format!("{p}.attn.proj.bias"), vec![v.hidden_size]);
            for (n, o, i_) in [("gate_proj", v.intermediate_size, v.hidden_size), ("up_proj", v.intermediate_size, v.hidden_size), ("down_proj", v.hidden_size, v.intermediate_size)] {
                push(format!("{p}.mlp.{n}.weight"), vec![o, i_]);
                push(format!("{p}.mlp.{n}.bias"), vec![o]);
            }
        }
        let mh = v.hidden_size * v.merge_unit();
        push("visual.merger.ln_q.weight".into(), vec![v.hidden_size]);
        push("visual.merger.mlp.0.weight".into(), vec![mh, mh]);
        push("visual.merger.mlp.0.bias".into(), vec![mh]);
        push("visual.merger.mlp.2.weight".into(), vec![v.out_hidden_size, mh]);
        push("visual.merger.mlp.2.bias".into(), vec![v.out_hidden_size]);
        push("model.embed_tokens.weight".into(), vec![t.vocab_size, t.hidden_size]);
        let (qd, kvd) = (t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim);
        for i in 0..t.num_hidden_layers {
            let p = format!("model.layers.{i}");
            push(format!("{p}.input_layernorm.weight"), vec![t.hidden_size]);
            push(format!("{p}.post_attention_layernorm.weight"), vec![t.hidden_size]);
            push(format!("{p}.self_attn.q_proj.weight"), vec![qd, t.hidden_size]);
            push(format!("{p}.self_attn.q_proj.bias"), vec![qd]);
            push(format!("{p}.self_attn.k_proj.weight"), vec![kvd, t.hidden_size]);
            push(format!("{p}.self_attn.k_proj.bias"), vec![kvd]);
            push(format!("{p}.self_attn.v_proj.weight"), vec![kvd, t.hidden_size]);
            push(format!("{p}.self_attn.v_proj.bias"), vec![kvd]);
            push(format!("{p}.self_attn.o_proj.weight"), vec![t.hidden_size, qd]);
            push(format!("{p}.mlp.gate_proj.weight"), vec![t.intermediate_size, t.hidden_size]);
            push(format!("{p}.mlp.up_proj.weight"), vec![t.intermediate_size, t.hidden_size]);
            push(format!("{p}.mlp.down_proj.weight"), vec![t.hidden_size, t.intermediate_size]);
        }
        push("model.norm.weight".into(), vec![t.hidden_size]);
        if !t.tie_word_embeddings {
            push("lm_head.weight".into(), vec![t.vocab_size, t.hidden_size]);
        }
        out
    }
}
