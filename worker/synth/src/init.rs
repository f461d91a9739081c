//! `onevision model init`: a small random Qwen2.5-VL checkpoint in the official Hugging Face
//! layout (config.json, generation_config.json, model.safetensors, tokenizer files,
//! preprocessor_config.json, chat_template.json), loadable by transformers.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use safetensors::tensor::{Dtype, TensorView};
use serde::Serialize;

use crate::error::{io_err, Error, Result};
use crate::tokenizer::{self, SPECIAL_TOKENS};

pub const IMAGE_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const IMAGE_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
const PATCH: usize = 14;
const TEMPORAL_PATCH: usize = 2;
const MERGE: usize = 2;
const IN_CHANS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightDtype {
    F32,
    Bf16,
}

/// Shape and initialisation of the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct InitOptions {
    pub out: PathBuf,
    /// Text files or sharegpt JSONL the tokenizer is trained on.
    pub tokenizer_corpus: Vec<PathBuf>,
    /// Target tokenizer vocabulary (BPE merges stop earlier on a small corpus).
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub vision_hidden_size: usize,
    pub vision_depth: usize,
    pub vision_num_heads: usize,
    pub vision_intermediate_size: usize,
    /// Vision window side in pixels (multiple of patch × merge = 28).
    pub window_size: usize,
    /// Vision blocks with full attention; `None` = the last block.
    pub fullatt_block_indexes: Option<Vec<usize>>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub dtype: WeightDtype,
    pub initializer_range: f64,
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub seed: u64,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            out: PathBuf::from("models/tiny"),
            tokenizer_corpus: Vec::new(),
            vocab_size: 1024,
            hidden_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 384,
            vision_hidden_size: 64,
            vision_depth: 2,
            vision_num_heads: 2,
            vision_intermediate_size: 128,
            window_size: 112,
            fullatt_block_indexes: None,
            max_position_embeddings: 4096,
            tie_word_embeddings: true,
            dtype: WeightDtype::F32,
            initializer_range: 0.02,
            min_pixels: 56 * 56,
            max_pixels: 224 * 224,
            seed: 0,
        }
    }
}

/// Command-line arguments of `onevision model init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Output directory (created) for the HF-layout checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    /// Tokenizer training text: sharegpt JSONL (e.g. DIR/train.jsonl from `data synth`) or plain
    /// text files. Repeatable.
    #[arg(long = "tokenizer-corpus", required = true)]
    pub tokenizer_corpus: Vec<PathBuf>,
    #[arg(long, default_value_t = 1024)]
    pub vocab_size: usize,
    #[arg(long, default_value_t = 128)]
    pub hidden_size: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Attention heads (head_dim = hidden_size / heads, a multiple of 8).
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 384)]
    pub intermediate_size: usize,
    #[arg(long, default_value_t = 64)]
    pub vision_hidden_size: usize,
    #[arg(long, default_value_t = 2)]
    pub vision_depth: usize,
    #[arg(long, default_value_t = 2)]
    pub vision_heads: usize,
    #[arg(long, default_value_t = 128)]
    pub vision_intermediate_size: usize,
    #[arg(long, default_value_t = 112)]
    pub window_size: usize,
    /// Full-attention vision blocks, comma separated (default: the last block).
    #[arg(long, value_delimiter = ',')]
    pub fullatt_block_indexes: Option<Vec<usize>>,
    #[arg(long, default_value_t = 4096)]
    pub max_position_embeddings: usize,
    /// Write a separate lm_head.weight instead of tying it to the embeddings.
    #[arg(long)]
    pub untied: bool,
    #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,
    #[arg(long, default_value_t = 0.02)]
    pub initializer_range: f64,
    #[arg(long, default_value_t = 56 * 56)]
    pub min_pixels: usize,
    #[arg(long, default_value_t = 224 * 224)]
    pub max_pixels: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl InitArgs {
    pub fn to_options(&self) -> InitOptions {
        InitOptions {
            out: self.out.clone(),
            tokenizer_corpus: self.tokenizer_corpus.clone(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            intermediate_size: self.intermediate_size,
            vision_hidden_size: self.vision_hidden_size,
            vision_depth: self.vision_depth,
            vision_num_heads: self.vision_heads,
            vision_intermediate_size: self.vision_intermediate_size,
            window_size: self.window_size,
            fullatt_block_indexes: self.fullatt_block_indexes.clone(),
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: !self.untied,
            dtype: self.dtype,
            initializer_range: self.initializer_range,
            min_pixels: self.min_pixels,
            max_pixels: self.max_pixels,
            seed: self.seed,
        }
    }
}

/// Parse and run `onevision model init`.
pub fn run_init(args: &InitArgs) -> Result<InitReport> {
    init_model(&args.to_options())
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InitReport {
    pub out: PathBuf,
    /// Ids the tokenizer actually uses (model vocabulary + added tokens).
    pub tokenizer_vocab: usize,
    /// `vocab_size` in config.json: tokenizer_vocab rounded up to a multiple of 64.
    pub model_vocab: usize,
    pub parameters: usize,
    pub tensors: usize,
}

impl std::fmt::Display for InitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wrote {} ({} parameters in {} tensors, tokenizer {} ids, embedding rows {})",
            self.out.display(),
            self.parameters,
            self.tensors,
            self.tokenizer_vocab,
            self.model_vocab
        )
    }
}

/// How a tensor is initialised (as transformers' `_init_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    Normal,
    Ones,
    Zeros,
}

/// mrope_section for a head_dim, in Qwen's 16:24:24 proportion (sums to head_dim / 2).
pub fn mrope_section(head_dim: usize) -> [usize; 3] {
    let t = head_dim / 8;
    let rest = head_dim / 2 - t;
    [t, rest / 2, rest - rest / 2]
}

fn validate(o: &InitOptions) -> Result<Vec<usize>> {
    let bad = |m: String| Err(Error::InvalidOption(m));
    let pos = [
        ("hidden-size", o.hidden_size),
        ("layers", o.num_hidden_layers),
        ("heads", o.num_attention_heads),
        ("kv-heads", o.num_key_value_heads),
        ("intermediate-size", o.intermediate_size),
        ("vision-hidden-size", o.vision_hidden_size),
        ("vision-depth", o.vision_depth),
        ("vision-heads", o.vision_num_heads),
        ("vision-intermediate-size", o.vision_intermediate_size),
        ("max-position-embeddings", o.max_position_embeddings),
    ];
    for (name, v) in pos {
        if v == 0 {
            return bad(format!("--{name} must be positive"));
        }
    }
    if !o.hidden_size.is_multiple_of(o.num_attention_heads) || !(o.hidden_size / o.num_attention_heads).is_multiple_of(8) {
        return bad(format!(
            "--hidden-size {} / --heads {} must give a head_dim that is a multiple of 8 (M-RoPE splits it 1:1.5:1.5 per half)",
            o.hidden_size, o.num_attention_heads
        ));
    }
    if !o.num_attention_heads.is_multiple_of(o.num_key_value_heads) {
        return bad(format!(
            "--heads {} must be a multiple of --kv-heads {}",
            o.num_attention_heads, o.num_key_value_heads
        ));
    }
    if !o.vision_hidden_size.is_multiple_of(o.vision_num_heads) || !(o.vision_hidden_size / o.vision_num_heads).is_multiple_of(4) {
        return bad(format!(
            "--vision-hidden-size {} / --vision-heads {} must give a head_dim that is a multiple of 4 (2-D rotary)",
            o.vision_hidden_size, o.vision_num_heads
        ));
    }
    if o.window_size == 0 || !o.window_size.is_multiple_of(PATCH * MERGE) {
        return bad(format!("--window-size must be a positive multiple of 28, got {}", o.window_size));
    }
    let full = o.fullatt_block_indexes.clone().unwrap_or_else(|| vec![o.vision_depth - 1]);
    if let Some(&i) = full.iter().find(|&&i| i >= o.vision_depth) {
        return bad(format!(
            "--fullatt-block-indexes: block {i} does not exist with --vision-depth {}",
            o.vision_depth
        ));
    }
    let unit = PATCH * MERGE;
    if o.min_pixels < unit * unit || o.min_pixels > o.max_pixels {
        return bad(format!(
            "--min-pixels ({}) must be ≥ 784 (one 28×28 merge unit) and ≤ --max-pixels ({})",
            o.min_pixels, o.max_pixels
        ));
    }
    if !(o.initializer_range.is_finite() && o.initializer_range > 0.0) {
        return bad("--initializer-range must be a positive number".into());
    }
    Ok(full)
}

/// Every tensor of the checkpoint with its shape, in the official names (reference §2).
pub fn tensor_specs(o: &InitOptions, vocab: usize) -> Vec<(String, Vec<usize>, Init)> {
    use Init::*;
    let mut v: Vec<(String, Vec<usize>, Init)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, init: Init| v.push((name, shape, init));
    let vh = o.vision_hidden_size;
    let vi = o.vision_intermediate_size;
    add("visual.patch_embed.proj.weight".into(), vec![vh, IN_CHANS, TEMPORAL_PATCH, PATCH, PATCH], Normal);
    for b in 0..o.vision_depth {
        let p = format!("visual.blocks.{b}");
        add(format!("{p}.norm1.weight"), vec![vh], Ones);
        add(format!("{p}.norm2.weight"), vec![vh], Ones);
        add(format!("{p}.attn.qkv.weight"), vec![3 * vh, vh], Normal);
        add(format!("{p}.attn.qkv.bias"), vec![3 * vh], Zeros);
        add(format!("{p}.attn.proj.weight"), vec![vh, vh], Normal);
        add(format!("{p}.attn.proj.bias"), vec![vh], Zeros);
        for (name, out, inp) in [("gate_proj", vi, vh), ("up_proj", vi, vh), ("down_proj", vh, vi)] {
            add(format!("{p}.mlp.{name}.weight"), vec![out, inp], Normal);
            add(format!("{p}.mlp.{name}.bias"), vec![out], Zeros);
        }
    }
    let merged = vh * MERGE * MERGE;
    let h = o.hidden_size;
    add("visual.merger.ln_q.weight".into(), vec![vh], Ones);
    add("visual.merger.mlp.0.weight".into(), vec![merged, merged], Normal);
    add("visual.merger.mlp.0.bias".into(), vec![merged], Zeros);
    add("visual.merger.mlp.2.weight".into(), vec![h, merged], Normal);
    add("visual.merger.mlp.2.bias".into(), vec![h], Zeros);

    let hd = h / o.num_attention_heads;
    let q = o.num_attention_heads * hd;
    let kv = o.num_key_value_heads * hd;
    let i = o.intermediate_size;
    add("model.embed_tokens.weight".into(), vec![vocab, h], Normal);
    for l in 0..o.num_hidden_layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![h], Ones);
        add(format!("{p}.post_attention_layernorm.weight"), vec![h], Ones);
        add(format!("{p}.self_attn.q_proj.weight"), vec![q, h], Normal);
        add(format!("{p}.self_attn.q_proj.bias"), vec![q], Zeros);
        add(format!("{p}.self_attn.k_proj.weight"), vec![kv, h], Normal);
        add(format!("{p}.self_attn.k_proj.bias"), vec![kv], Zeros);
        add(format!("{p}.self_attn.v_proj.weight"), vec![kv, h], Normal);
        add(format!("{p}.self_attn.v_proj.bias"), vec![kv], Zeros);
        add(format!("{p}.self_attn.o_proj.weight"), vec![h, q], Normal);
        add(format!("{p}.mlp.gate_proj.weight"), vec![i, h], Normal);
        add(format!("{p}.mlp.up_proj.weight"), vec![i, h], Normal);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, i], Normal);
    }
    add("model.norm.weight".into(), vec![h], Ones);
    if !o.tie_word_embeddings {
        add("lm_head.weight".into(), vec![vocab, h], Normal);
    }
    v
}

/// config.json of a checkpoint with these options (also used by `onevision bench` to build in-memory models).
pub fn config_json(o: &InitOptions, vocab: usize, full: &[usize]) -> serde_json::Value {
    let id = |t: &str| SPECIAL_TOKENS.iter().position(|s| *s == t).unwrap_or(0);
    let head_dim = o.hidden_size / o.num_attention_heads;
    serde_json::json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": id("<|endoftext|>"),
        "eos_token_id": id("<|im_end|>"),
        "vision_start_token_id": id("<|vision_start|>"),
        "vision_end_token_id": id("<|vision_end|>"),
        "vision_token_id": id("<|vision_pad|>"),
        "image_token_id": id("<|image_pad|>"),
        "video_token_id": id("<|video_pad|>"),
        "hidden_act": "silu",
        "hidden_size": o.hidden_size,
        "initializer_range": o.initializer_range,
        "intermediate_size": o.intermediate_size,
        "max_position_embeddings": o.max_position_embeddings,
        "max_window_layers": o.num_hidden_layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": o.num_attention_heads,
        "num_hidden_layers": o.num_hidden_layers,
        "num_key_value_heads": o.num_key_value_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": o.max_position_embeddings,
        "tie_word_embeddings": o.tie_word_embeddings,
        "torch_dtype": match o.dtype { WeightDtype::F32 => "float32", WeightDtype::Bf16 => "bfloat16" },
        "transformers_version": "4.49.0",
        "use_cache": true,
        "use_sliding_window": false,
        "vision_config": {
            "depth": o.vision_depth,
            "hidden_act": "silu",
            "hidden_size": o.vision_hidden_size,
            "intermediate_size": o.vision_intermediate_size,
            "num_heads": o.vision_num_heads,
            "in_chans": IN_CHANS,
            "out_hidden_size": o.hidden_size,
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "spatial_patch_size": PATCH,
            "window_size": o.window_size,
            "fullatt_block_indexes": full,
            "tokens_per_second": 2,
            "temporal_patch_size": TEMPORAL_PATCH,
            "initializer_range": o.initializer_range
        },
        "rope_scaling": {"type": "mrope", "mrope_section": mrope_section(head_dim)},
        "vocab_size": vocab
    })
}

fn generation_config() -> serde_json::Value {
    let id = |t: &str| SPECIAL_TOKENS.iter().position(|s| *s == t).unwrap_or(0);
    serde_json::json!({
        "bos_token_id": id("<|endoftext|>"),
        "pad_token_id": id("<|endoftext|>"),
        "eos_token_id": [id("<|im_end|>"), id("<|endoftext|>")],
        "transformers_version": "4.49.0"
    })
}

fn preprocessor_config(o: &InitOptions) -> serde_json::Value {
    serde_json::json!({
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "max_pixels": o.max_pixels,
        "min_pixels": o.min_pixels,
        "merge_size": MERGE,
        "patch_size": PATCH,
        "processor_class": "Qwen2_5_VLProcessor",
        "resample": 3,
        "rescale_factor": 1.0 / 255.0,
        "size": {"longest_edge": o.max_pixels, "shortest_edge": o.min_pixels},
        "temporal_patch_size": TEMPORAL_PATCH
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(v)?;
    bytes.push(b'\n');
    fs::write(path, bytes).map_err(io_err(path))
}

/// Write the checkpoint into `opts.out`.
pub fn init_model(opts: &InitOptions) -> Result<InitReport> {
    let full = validate(opts)?;
    let texts = tokenizer::read_corpus(&opts.tokenizer_corpus)?;
    let out = &opts.out;
    fs::create_dir_all(out).map_err(io_err(out))?;
    let tokenizer_vocab = tokenizer::train_tokenizer(&texts, opts.vocab_size, out)?;
    // Room for later added tokens and aligned rows, as Qwen pads 151665 ids to 151936.
    let model_vocab = tokenizer_vocab.div_ceil(64) * 64;

    let specs = tensor_specs(opts, model_vocab);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let normal = Normal::new(0.0f32, opts.initializer_range as f32)
        .map_err(|e| Error::InvalidOption(format!("--initializer-range: {e}")))?;
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(specs.len());
    let mut parameters = 0;
    for (name, shape, init) in &specs {
        let n: usize = shape.iter().product();
        parameters += n;
        let values: Vec<f32> = match init {
            Init::Normal => (0..n).map(|_| normal.sample(&mut rng)).collect(),
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
        };
        let bytes: Vec<u8> = match opts.dtype {
            WeightDtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            WeightDtype::Bf16 => values.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        };
        buffers.push((name.clone(), shape.clone(), bytes));
    }
    let dtype = match opts.dtype {
        WeightDtype::F32 => Dtype::F32,
        WeightDtype::Bf16 => Dtype::BF16,
    };
    let views = buffers
        .iter()
        .map(|(name, shape, bytes)| Ok((name.as_str(), TensorView::new(dtype, shape.clone(), bytes)?)))
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &out.join("model.safetensors"))?;

    write_json(&out.join("config.json"), &config_json(opts, model_vocab, &full))?;
    write_json(&out.join("generation_config.json"), &generation_config())?;
    write_json(&out.join("tokenizer_config.json"), &tokenizer::tokenizer_config(opts.max_position_embeddings))?;
    write_json(
        &out.join("chat_template.json"),
        &serde_json::json!({"chat_template": tokenizer::CHAT_TEMPLATE}),
    )?;
    write_json(&out.join("preprocessor_config.json"), &preprocessor_config(opts))?;
    Ok(InitReport {
        out: out.clone(),
        tokenizer_vocab,
        model_vocab,
        parameters,
        tensors: specs.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mrope_section_sums_to_half_head_dim() {
        assert_eq!(mrope_section(128), [16, 24, 24]);
        assert_eq!(mrope_section(32), [4, 6, 6]);
        for hd in (8..=256).step_by(8) {
            assert_eq!(mrope_section(hd).iter().sum::<usize>(), hd / 2, "head_dim {hd}");
        }
    }

    #[test]
    fn bad_shapes_are_rejected_with_a_message() {
        let o = InitOptions {
            num_attention_heads: 3,
            ..Default::default()
        };
        let e = validate(&o).unwrap_err().to_string();
        assert!(e.contains("head_dim"), "{e}");
        let o = InitOptions {
            fullatt_block_indexes: Some(vec![5]),
            ..Default::default()
        };
        assert!(validate(&o).unwrap_err().to_string().contains("block 5"));
    }
}
