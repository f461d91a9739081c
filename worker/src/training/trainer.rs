//! Optimizer state around a model: fp32 master weights, AdamW, learning-rate schedule, gradient
//! clipping, freezing; atomic save/resume through `onevision_train::CheckpointManager`; export of
//! the trained model in the official Hugging Face layout.
//!
//! ZeRO-1 ([`Trainer::new_zero1`]): each data-parallel rank keeps master weights and AdamW moments
//! for one contiguous shard of the flattened trainable parameters only. A step takes this rank's
//! shard of the reduce-scattered gradient, clips with the global norm (one all-reduce of the
//! shards' sums of squares), updates the shard and all-gathers the parameters into the model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use onevision_comms::Communicator;
use onevision_model::{Qwen25Vl, Tensor};
use onevision_train::checkpoint;
use onevision_train::{
    clip_coefficient, clip_grad_norm, scale_grads, AdamW, AdamWConfig, CheckpointError, CheckpointManager, DataPosition,
    FlatLayout, OptimError, OptimizerShard, Schedule, ShardedAdamW, TensorMap, TrainingState,
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

/// Gradients after the data-parallel reduction, as [`Trainer::apply_reduced`] takes them.
#[derive(Debug, Clone)]
pub enum ReducedGrads {
    /// Every rank holds the full summed gradients (plain data parallelism).
    Full(TensorMap),
    /// ZeRO-1: this rank's shard `layout().shard_range(rank, world)` of the flattened summed
    /// gradients.
    Shard(Vec<f32>),
}

impl ReducedGrads {
    /// The full gradients, `None` for a ZeRO-1 shard.
    pub fn full(&self) -> Option<&TensorMap> {
        match self {
            ReducedGrads::Full(g) => Some(g),
            ReducedGrads::Shard(_) => None,
        }
    }
}

/// Where the optimizer state lives.
enum Optim {
    /// Full fp32 master copy of every weight and full moments on every rank.
    Full { master: TensorMap, adamw: AdamW },
    /// ZeRO-1: master and moments of this rank's shard of `Trainer::layout` only.
    Zero1 { rank: usize, world: usize, opt: ShardedAdamW },
}

/// A model under training. The model's own weights are refreshed from the fp32 master copy after
/// every step, so the forward always sees what the optimizer holds.
pub struct Trainer {
    pub model: Qwen25Vl,
    opt: Optim,
    /// The trainable parameters flattened in name order (what the ranks reduce gradients over).
    layout: FlatLayout,
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

fn trainable_layout(master: &TensorMap, cfg: &TrainerConfig) -> FlatLayout {
    FlatLayout::new(master.iter().filter(|(n, _)| !cfg.freeze.is_frozen(n)).map(|(n, t)| (n.clone(), t.shape.clone())))
}

impl Trainer {
    pub fn new(model: Qwen25Vl, cfg: TrainerConfig) -> Result<Self> {
        let master = to_master(&model)?;
        let layout = trainable_layout(&master, &cfg);
        let adamw = AdamW::new(cfg.adamw.clone())?;
        Ok(Self { model, opt: Optim::Full { master, adamw }, layout, schedule: cfg.schedule, step: 0, cfg })
    }

    /// A ZeRO-1 trainer for rank `rank` of `world` data-parallel ranks: it keeps master weights
    /// and moments for its shard of [`layout`](Self::layout) only and steps with
    /// [`apply_reduced`](Self::apply_reduced) on a [`ReducedGrads::Shard`].
    pub fn new_zero1(model: Qwen25Vl, cfg: TrainerConfig, rank: usize, world: usize) -> Result<Self> {
        let master = to_master(&model)?;
        let layout = trainable_layout(&master, &cfg);
        let opt = ShardedAdamW::new(cfg.adamw.clone(), &layout, rank, world, &master, &BTreeMap::new())?;
        Ok(Self { model, opt: Optim::Zero1 { rank, world, opt }, layout, schedule: cfg.schedule, step: 0, cfg })
    }

    /// The trainable parameters, flattened in name order.
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// `(rank, world)` of a ZeRO-1 trainer, `None` when the optimizer state is not sharded.
    pub fn zero1(&self) -> Option<(usize, usize)> {
        match &self.opt {
            Optim::Full { .. } => None,
            Optim::Zero1 { rank, world, .. } => Some((*rank, *world)),
        }
    }

    /// Bytes of optimizer state this rank holds: the fp32 master weights and the AdamW moments
    /// (the moments of an unsharded AdamW appear with the first step).
    pub fn optimizer_state_bytes(&self) -> usize {
        match &self.opt {
            Optim::Full { master, adamw } => {
                master.values().map(|t| t.data.len() * 4).sum::<usize>() + adamw.state_bytes()
            }
            Optim::Zero1 { opt, .. } => opt.state_bytes(),
        }
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

    /// The fp32 master weights (official names); `None` for a ZeRO-1 trainer, which holds only
    /// its shard (the model's weights are the full parameters there).
    pub fn master(&self) -> Option<&TensorMap> {
        match &self.opt {
            Optim::Full { master, .. } => Some(master),
            Optim::Zero1 { .. } => None,
        }
    }

    /// One optimizer step with `grads` (summed over micro-batches, already divided by the global
    /// denominator): drop frozen parameters, clip, AdamW at the scheduled learning rate, then copy
    /// the updated master weights into the model.
    pub fn apply(&mut self, mut grads: TensorMap) -> Result<ApplyStats> {
        let Optim::Full { master, adamw } = &mut self.opt else {
            return Err(TrainingError::Invalid(
                "this trainer shards its optimizer state (ZeRO-1): reduce-scatter the gradients and call apply_reduced".into(),
            ));
        };
        grads.retain(|n, _| !self.cfg.freeze.is_frozen(n));
        let grad_norm = match self.cfg.max_grad_norm {
            Some(m) => clip_grad_norm(&mut grads, m)?,
            // Still report the norm (a cheap health signal); clipping to +∞ changes nothing.
            None => clip_grad_norm(&mut grads, f64::INFINITY)?,
        };
        let lr = self.schedule.lr(self.step);
        adamw.step(master, &grads, lr)?;
        for name in grads.keys() {
            let p = &master[name];
            self.model.set_weight(name, &Tensor::from_f32(&p.shape, p.data.clone())?)?;
        }
        self.step += 1;
        Ok(ApplyStats { step: self.step, lr, grad_norm })
    }

    /// One optimizer step with gradients reduced over the ranks: full gradients go to
    /// [`apply`](Self::apply); a ZeRO-1 shard is clipped with the global norm, updates this
    /// rank's shard, and the updated parameters are all-gathered into the model. Every rank of
    /// the gang must call this at the same step (it runs collectives).
    pub fn apply_reduced(&mut self, comm: &dyn Communicator, grads: ReducedGrads) -> Result<ApplyStats> {
        let mut shard = match grads {
            ReducedGrads::Full(g) => return self.apply(g),
            ReducedGrads::Shard(s) => s,
        };
        let Optim::Zero1 { rank, world, opt } = &mut self.opt else {
            return Err(TrainingError::Invalid("a ZeRO-1 gradient shard for a trainer without ZeRO-1".into()));
        };
        if (comm.rank(), comm.world_size()) != (*rank, *world) {
            return Err(TrainingError::Invalid(format!(
                "ZeRO-1 trainer of rank {rank}/{world} driven by a communicator of rank {}/{}",
                comm.rank(),
                comm.world_size()
            )));
        }
        // Global norm: the shards partition the gradient, so the squared norms add up. Summed in
        // f64 per shard, then across ranks in f32 (relative error ~1e-7 on the clip factor).
        let mut sq = [shard.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>() as f32];
        comm.all_reduce_sum_f32(&mut sq)?;
        let grad_norm = (sq[0] as f64).sqrt();
        if !grad_norm.is_finite() {
            // Every rank sees the same reduced sum, so all of them stop here together.
            let name = opt
                .pieces()
                .iter()
                .find(|p| shard[p.local.clone()].iter().any(|x| !x.is_finite()))
                .map_or_else(|| "a parameter in another rank's shard".to_string(), |p| p.name.clone());
            return Err(OptimError::NonFinite(name).into());
        }
        if let Some(m) = self.cfg.max_grad_norm {
            scale_grads(&mut shard, clip_coefficient(grad_norm, m));
        }
        let lr = self.schedule.lr(self.step);
        opt.step(&shard, lr)?;
        let mut mine = opt.master().to_vec();
        mine.resize(self.layout.shard_len(*world), 0.0);
        let mut full = vec![0f32; self.layout.len()];
        comm.all_gather_padded_f32(&mine, &mut full)?;
        for e in self.layout.entries() {
            self.model.set_weight(&e.name, &Tensor::from_f32(&e.shape, full[e.range()].to_vec())?)?;
        }
        self.step += 1;
        Ok(ApplyStats { step: self.step, lr, grad_norm })
    }

    /// The full state for a checkpoint; a ZeRO-1 trainer's has no moments (each rank writes its
    /// shard, see [`save_gang`](Self::save_gang)) and takes the weights from the model.
    pub fn training_state(&self, data_position: DataPosition, rng: Vec<u8>, metadata: serde_json::Value) -> Result<TrainingState> {
        let (weights, optimizer) = match &self.opt {
            Optim::Full { master, adamw } => (master.clone(), adamw.state.clone()),
            Optim::Zero1 { .. } => (to_master(&self.model)?, BTreeMap::new()),
        };
        Ok(TrainingState {
            step: self.step,
            weights,
            optimizer,
            schedule: Some(self.schedule),
            data_position,
            rng,
            metadata,
        })
    }

    /// Save atomically (`ckpt-<step>` under the manager's root; older ones pruned). Unsharded
    /// trainers only; a gang uses [`save_gang`](Self::save_gang).
    pub fn save(&self, mgr: &CheckpointManager, data_position: DataPosition, rng: Vec<u8>, metadata: serde_json::Value) -> Result<PathBuf> {
        if self.zero1().is_some() {
            return Err(TrainingError::Invalid("a ZeRO-1 trainer saves with save_gang (every rank writes its shard)".into()));
        }
        Ok(mgr.save(&self.training_state(data_position, rng, metadata)?)?)
    }

    /// Gang checkpoint, called by every rank at the same step; returns the directory on rank 0.
    /// Unsharded: rank 0 writes everything. ZeRO-1: rank 0 opens the temp directory, every rank
    /// writes its optimizer shard into it, rank 0 adds weights, state and the manifest over all
    /// files and renames it into place, so the checkpoint is still all-or-nothing. Nobody
    /// returns before the checkpoint is on disk.
    pub fn save_gang(
        &self,
        comm: &dyn Communicator,
        mgr: &CheckpointManager,
        data_position: DataPosition,
        rng: Vec<u8>,
        metadata: serde_json::Value,
    ) -> Result<Option<PathBuf>> {
        let rank = comm.rank();
        let out = match &self.opt {
            Optim::Full { .. } => {
                if rank == 0 {
                    Some(self.save(mgr, data_position, rng, metadata)?)
                } else {
                    None
                }
            }
            Optim::Zero1 { world, opt, .. } => {
                if rank == 0 {
                    mgr.begin_sharded(self.step)?;
                }
                comm.barrier()?;
                let (m, v) = opt.moments();
                mgr.write_shard(self.step, &OptimizerShard { rank, world_size: *world, pieces: opt.pieces(), m, v })?;
                comm.barrier()?;
                if rank == 0 {
                    let state = self.training_state(data_position, rng, metadata)?;
                    Some(mgr.commit_sharded(&state, *world)?)
                } else {
                    None
                }
            }
        };
        comm.barrier()?;
        Ok(out)
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
        // A checkpoint holds (or reassembles from its shards) the full moments, so either kind of
        // trainer resumes from either kind of checkpoint, under any world size.
        match &mut self.opt {
            Optim::Full { master, adamw } => {
                *master = state.weights;
                adamw.state = state.optimizer;
            }
            Optim::Zero1 { rank, world, opt } => {
                *opt = ShardedAdamW::new(opt.config().clone(), &self.layout, *rank, *world, &state.weights, &state.optimizer)?;
            }
        }
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
