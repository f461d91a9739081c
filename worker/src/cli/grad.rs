//! `onevision grad`: the loss over every row of a JSONL file as one batch and the gradient of
//! every parameter, written under the checkpoint's official tensor names in f32. The last stdout
//! line is `{"loss": ..., "tokens": ...}`. Tests and tools compare this against PyTorch autograd.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args as ClapArgs, ValueEnum};
use onevision_data::{Dataset, ReadOptions};
use onevision_model::{CpuBackend, DType, Qwen25Vl, Tensor};
use onevision_train::{group_advantages, GrpoConfig};

use crate::training::{grpo_step, logprobs_of, sft_step, Encoder, StepOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Objective {
    Sft,
    Grpo,
}

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[arg(long, value_enum)]
    pub objective: Objective,
    /// Hugging Face checkpoint directory (config.json, safetensors, tokenizer files).
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL rows. SFT: `{"messages": [user, assistant], "images": [...]}`. GRPO: `{"group",
    /// "messages": [user turn], "images", "completion", "reward"}`. Relative image paths are
    /// resolved against the file's directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Output safetensors file of f32 gradients.
    #[arg(long)]
    pub out: PathBuf,
    /// Reference model for the GRPO KL term (same tokenizer).
    #[arg(long)]
    pub ref_model: Option<PathBuf>,
    /// KL coefficient β. Default: 0.04 with --ref-model, 0 without.
    #[arg(long)]
    pub beta: Option<f64>,
    /// Clip range ε (ratio clipped to [1−ε, 1+ε]).
    #[arg(long, default_value_t = 0.2)]
    pub clip_eps: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let enc = Encoder::from_dir(&args.model)
        .with_context(|| format!("loading tokenizer and processor from {}", args.model.display()))?;
    let backend = Arc::new(CpuBackend::new());
    let model = Qwen25Vl::load(&args.model, backend.clone(), DType::F32)
        .with_context(|| format!("loading model weights from {}", args.model.display()))?;
    let data = Dataset::open(&args.data, &ReadOptions::default())?;
    if data.is_empty() {
        bail!("{}: no rows", args.data.display());
    }
    let samples = (0..data.len()).map(|i| data.get(i)).collect::<Result<Vec<_>, _>>()?;
    let opts = StepOptions::default();
    let out = match args.objective {
        Objective::Sft => {
            if args.ref_model.is_some() || args.beta.is_some() {
                bail!("--ref-model and --beta apply to --objective grpo only");
            }
            let batch = samples
                .iter()
                .enumerate()
                .map(|(i, s)| enc.encode_sft(s).with_context(|| format!("{}: row {}", args.data.display(), i + 1)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            sft_step(&model, &batch, &opts)?
        }
        Objective::Grpo => {
            let beta = args.beta.unwrap_or(if args.ref_model.is_some() { 0.04 } else { 0.0 });
            if beta > 0.0 && args.ref_model.is_none() {
                bail!("--beta {beta} > 0 needs --ref-model (the KL term compares against it); pass one or --beta 0");
            }
            let rows = samples
                .iter()
                .enumerate()
                .map(|(i, s)| enc.encode_grpo_row(s).with_context(|| format!("{}: row {}", args.data.display(), i + 1)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            // Groups keyed by their string, numbered in order of first appearance.
            let mut ids: BTreeMap<&str, usize> = BTreeMap::new();
            let group: Vec<usize> = rows.iter().map(|r| { let n = ids.len(); *ids.entry(r.group.as_str()).or_insert(n) }).collect();
            let rewards: Vec<f64> = rows.iter().map(|r| r.reward).collect();
            let cfg = GrpoConfig { eps_low: args.clip_eps, eps_high: args.clip_eps, beta, ..GrpoConfig::default() };
            let adv = group_advantages(&rewards, &group, cfg.scale_rewards, false)?;
            let mut batch: Vec<_> = rows.into_iter().map(|r| r.sample).collect();
            for (s, a) in batch.iter_mut().zip(&adv.advantages) {
                s.advantage = *a;
            }
            if beta > 0.0 {
                let dir = args.ref_model.as_ref().expect("checked above");
                let reference = Qwen25Vl::load(dir, backend.clone(), DType::F32)
                    .with_context(|| format!("loading reference model from {}", dir.display()))?;
                if reference.config.text.vocab_size != model.config.text.vocab_size {
                    bail!("reference model {} has vocab {} but the policy {}", dir.display(), reference.config.text.vocab_size, model.config.text.vocab_size);
                }
                let ref_logps = logprobs_of(&reference, &batch, 1.0)?;
                for (s, r) in batch.iter_mut().zip(ref_logps) {
                    s.ref_logp = Some(r);
                }
            }
            grpo_step(&model, &batch, &cfg, &opts)?
        }
    };
    let tensors = out
        .grads
        .iter()
        .map(|(n, g)| Ok((n.clone(), Tensor::from_f32(&g.shape, g.data.clone())?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    onevision_model::save_safetensors(&args.out, &refs).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{}", serde_json::json!({"loss": out.loss, "tokens": out.tokens}));
    Ok(())
}
