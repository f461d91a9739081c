//! Optimizer state around a model: fp32 master weights, AdamW, learning-rate schedule, gradient
//! clipping, freezing; atomic save/resume through `onevision_train::CheckpointManager`; export of
//! the trained model in the official Hugging Face layout.

use std::path::{Path, PathBuf};

use onevision_model::{Qwen25Vl, Tensor};
use onevision_train::checkpoint;
use onevision_train::{
    clip_grad_norm, AdamW, AdamWConfig, CheckpointError, CheckpointManager, DataPosition, Schedule, TensorMap,
    TrainingState,
};
use serde::Serialize;

use super::step::Freeze;
use super::{Result, TrainingError};

#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub adamw: AdamWConfig,
    pub schedule: Schedule,
    /// Global L2 gradient-norm clip (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    pub freeze: Freeze,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ApplyStats {
    /// Optimizer steps completed after this one.
    pub step: u64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// Where a resumed run picks up.
#[derive(Debug)]
pub struct Resumed {
    pub dir: PathBuf,
    pub data_position: DataPosition,
    pub rng: Vec<u8>,
    pub metadata: serde_json::Value,
    /// Newer checkpoints refused (truncated, corrupted), newest first, with why.
    pub skipped: Vec<(PathBuf, CheckpointError)>,
}

/// A model under training. The model's own weights are refreshed from the fp32 master copy after
/// every step, so the forward always sees what the optimizer holds.
pub struct Trainer {
    pub model: Qwen25Vl,
    master: TensorMap,
    opt: AdamW,
    schedule: Schedule,
    step: u64,
    cfg: TrainerConfig,
}

fn to_master(model: &Qwen25Vl) -> Result<TensorMap> {
    let be = model.backend();
    let mut m = TensorMap::new();
    for (name, t) in model.named_weights() {
        let h = be.to_host(t)?;
        m.insert(name, onevision_train::Tensor { shape: h.shape().to_vec(), data: h.to_f32_vec()? });
    }
    Ok(m)
}

impl Trainer {
    pub fn new(model: Qwen25Vl, cfg: TrainerConfig) -> Result<Self> {
        let master = to_master(&model)?;
        let opt = AdamW::new(cfg.adamw.clone())?;
        Ok(Self { model, master, opt, schedule: cfg.schedule, step: 0, cfg })
    }

    /// Optimizer steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }

    /// Learning rate the next [`apply`](Self::apply) uses.
    pub fn lr(&self) -> f64 {
        self.schedule.lr(self.step)
    }

    /// The fp32 master weights (official names).
    pub fn master(&self) -> &TensorMap {
        &self.master
    }

    /// One optimizer step with `grads` (summed over micro-batches, already divided by the global
    /// denominator): drop frozen parameters, clip, AdamW at the scheduled learning rate, then copy
    /// the updated master weights into the model.
    pub fn apply(&mut self, mut grads: TensorMap) -> Result<ApplyStats> {
        grads.retain(|n, _| !self.cfg.freeze.is_frozen(n));
        let grad_norm = match self.cfg.max_grad_norm {
            Some(m) => clip_grad_norm(&mut grads, m)?,
            // Still report the norm (a cheap health signal); clipping to +∞ changes nothing.
            None => clip_grad_norm(&mut grads, f64::INFINITY)?,
        };
        let lr = self.schedule.lr(self.step);
        self.opt.step(&mut self.master, &grads, lr)?;
        for name in grads.keys() {
            let p = &self.master[name];
            self.model.set_weight(name, &Tensor::from_f32(&p.shape, p.data.clone())?)?;
        }
        self.step += 1;
        Ok(ApplyStats { step: self.step, lr, grad_norm })
    }

    /// The full state for a checkpoint.
    pub fn training_state(&self, data_position: DataPosition, rng: Vec<u8>, metadata: serde_json::Value) -> TrainingState {
        TrainingState {
            step: self.step,
            weights: self.master.clone(),
            optimizer: self.opt.state.clone(),
            schedule: Some(self.schedule),
            data_position,
            rng,
            metadata,
        }
    }

    /// Save atomically (`ckpt-<step>` under the manager's root; older ones pruned).
    pub fn save(&self, mgr: &CheckpointManager, data_position: DataPosition, rng: Vec<u8>, metadata: serde_json::Value) -> Result<PathBuf> {
        Ok(mgr.save(&self.training_state(data_position, rng, metadata))?)
    }

    /// Restore weights, optimizer moments, schedule and step from a verified state.
    pub fn restore(&mut self, state: TrainingState) -> Result<()> {
        let expected = to_master(&self.model)?;
        for (name, t) in &expected {
            match state.weights.get(name) {
                Some(w) if w.shape == t.shape => {}
                Some(w) => {
                    return Err(TrainingError::Invalid(format!(
                        "checkpoint weight `{name}` has shape {:?}, the model {:?}: a different model?",
                        w.shape, t.shape
                    )))
                }
                None => return Err(TrainingError::Invalid(format!("checkpoint lacks weight `{name}`: a different model?"))),
            }
        }
        for (name, w) in &state.weights {
            self.model.set_weight(name, &Tensor::from_f32(&w.shape, w.data.clone())?)?;
        }
        self.master = state.weights;
        self.opt.state = state.optimizer;
        if let Some(s) = state.schedule {
            self.schedule = s;
        }
        self.step = state.step;
        Ok(())
    }

    /// Load one checkpoint directory, refusing it (with the reason) if its manifest, sizes or
    /// checksums do not verify.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<(DataPosition, Vec<u8>, serde_json::Value)> {
        let state = checkpoint::load(dir)?;
        let out = (state.data_position, state.rng.clone(), state.metadata.clone());
        self.restore(state)?;
        Ok(out)
    }

    /// Resume from the newest checkpoint that verifies; newer broken ones are skipped and
    /// reported. `None` when there is nothing to resume from.
    pub fn resume_latest(&mut self, mgr: &CheckpointManager) -> Result<Option<Resumed>> {
        let latest = mgr.latest_valid()?;
        let Some((dir, state)) = latest.found else {
            if let Some((dir, e)) = latest.skipped.first() {
                return Err(TrainingError::Invalid(format!(
                    "no valid checkpoint under {}: newest {} refused: {e}",
                    mgr.root().display(),
                    dir.display()
                )));
            }
            return Ok(None);
        };
        let (data_position, rng, metadata) = (state.data_position, state.rng.clone(), state.metadata.clone());
        self.restore(state)?;
        Ok(Some(Resumed { dir, data_position, rng, metadata, skipped: latest.skipped }))
    }

    /// Export the current weights in the official HF layout; see [`export_hf`].
    pub fn export_hf(&self, source_dir: &Path, out_dir: &Path) -> Result<()> {
        export_hf(&self.model, source_dir, out_dir)
    }
}

/// Files besides the weights that make a checkpoint directory loadable by transformers and by our
/// loader/processor, copied from the source checkpoint when present.
const HF_SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
];

/// Write `model`'s weights as `out_dir/model.safetensors` (official names, f32; a tied model has
/// no `lm_head.weight`) and copy config, tokenizer, chat template, generation and preprocessor
/// configs from `source_dir`. The config's `torch_dtype` is set to float32 to match the weights.
pub fn export_hf(model: &Qwen25Vl, source_dir: &Path, out_dir: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainingError::Io { path, source }
    };
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    if !source_dir.join("config.json").exists() {
        return Err(TrainingError::Invalid(format!("{}: no config.json to export with the weights", source_dir.display())));
    }
    for f in HF_SIDE_FILES {
        let src = source_dir.join(f);
        if src.exists() {
            let dst = out_dir.join(f);
            if *f == "config.json" {
                let text = std::fs::read_to_string(&src).map_err(io(&src))?;
                let mut cfg: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| TrainingError::Invalid(format!("{}: {e}", src.display())))?;
                if let Some(o) = cfg.as_object_mut() {
                    o.insert("torch_dtype".into(), "float32".into());
                    if let Some(tc) = o.get_mut("text_config").and_then(|t| t.as_object_mut()) {
                        tc.insert("torch_dtype".into(), "float32".into());
                    }
                }
                let pretty = serde_json::to_string_pretty(&cfg).map_err(|e| TrainingError::Invalid(e.to_string()))?;
                std::fs::write(&dst, pretty).map_err(io(&dst))?;
            } else {
                std::fs::copy(&src, &dst).map_err(io(&dst))?;
            }
        }
    }
    model.save_weights(out_dir.join("model.safetensors"))?;
    Ok(())
}
