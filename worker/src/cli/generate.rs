//! `onevision generate`: one chat turn through the checkpoint's own template, then greedy or
//! sampled decoding on the CPU backend. The JSON output is the contract tests and tools rely on.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args as ClapArgs, ValueEnum};
use onevision_model::{generate, CpuBackend, DType, PromptInput, Qwen25Vl, SamplingParams, Tensor};
use onevision_preprocess::{load_image, Message, Processor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Hugging Face checkpoint directory (config.json, safetensors, tokenizer files).
    #[arg(long)]
    pub model: PathBuf,
    /// Images, placed before the text in a single user turn (repeat for several).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables top-k filtering.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Write the first decoding step's full logits as a float32 .npy file.
    #[arg(long)]
    pub dump_first_logits: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let processor = Processor::from_dir(&args.model)
        .with_context(|| format!("loading tokenizer and processor from {}", args.model.display()))?;
    let images = args
        .images
        .iter()
        .map(|p| load_image(p).with_context(|| format!("reading image {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let messages = [Message::user_with_images(images.len(), args.prompt.clone())];
    let enc = processor.encode_chat(&messages, &images)?;

    let backend = Arc::new(CpuBackend::new());
    let model = Qwen25Vl::load(&args.model, backend, DType::F32)
        .with_context(|| format!("loading model weights from {}", args.model.display()))?;
    let pixel_values = if enc.image_grid_thw.is_empty() {
        None
    } else {
        Some(Tensor::from_f32(&[enc.num_patches(), enc.patch_dim], enc.pixel_values.clone())?)
    };
    let prompt = PromptInput { input_ids: enc.input_ids.clone(), pixel_values, image_grid_thw: enc.image_grid_thw.clone() };
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        eos_token_ids: None,
        keep_first_logits: args.dump_first_logits.is_some(),
    };
    params.validate()?;
    let out = generate(&model, std::slice::from_ref(&prompt), &params)?
        .pop()
        .context("generation returned no sequence")?;
    if let Some(path) = &args.dump_first_logits {
        let logits = out.first_logits.as_deref().context("no decoding step ran (max_new_tokens = 0?)")?;
        onevision_model::npy::write_f32(path, &[logits.len()], logits)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let text = processor.decode(&out.token_ids, true)?;
    match args.format {
        Format::Text => println!("{text}"),
        Format::Json => println!(
            "{}",
            serde_json::json!({"prompt_token_ids": enc.input_ids, "token_ids": out.token_ids, "text": text})
        ),
    }
    Ok(())
}
