//! AdamW with fp32 master weights and moments, parameter groups by name pattern, global grad-norm
//! clipping and gradient accumulation; [`ShardedAdamW`] is the ZeRO-1 variant that keeps master
//! weights and moments for one contiguous shard of a [`FlatLayout`] only.

use crate::tensor::{Tensor, TensorMap};
use crate::Real;
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("invalid name pattern {pattern:?} in param group `{group}`: {source}")]
    Pattern {
        group: String,
        pattern: String,
        source: regex::Error,
    },
    #[error("gradient for `{0}` has no matching parameter")]
    UnknownGrad(String),
    #[error("shape mismatch for `{name}`: parameter {param:?}, gradient/state {other:?}")]
    Shape {
        name: String,
        param: Vec<usize>,
        other: Vec<usize>,
    },
    #[error(
        "gradient of `{0}` is not finite (NaN/inf); skip this step or lower the learning rate"
    )]
    NonFinite(String),
    #[error("invalid AdamW hyper-parameter: {0}")]
    Config(String),
    #[error("no micro-batch gradients were accumulated")]
    EmptyAccumulation,
    #[error("ZeRO-1 shard: {0}")]
    Shard(String),
}

/// A parameter group: parameters whose name matches any pattern (regex, searched anywhere in the
/// name) get this weight decay and learning-rate scale. The first matching group wins; unmatched
/// parameters use the optimizer's default weight decay and scale 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSpec {
    pub name: String,
    pub patterns: Vec<String>,
    pub weight_decay: f64,
    #[serde(default = "one")]
    pub lr_scale: f64,
}

fn one() -> f64 {
    1.0
}

impl GroupSpec {
    /// Biases and normalisation weights without weight decay (the HF Trainer convention). Matches
    /// Qwen2.5-VL's `*.bias`, `*layernorm*`, `model.norm`, `visual.blocks.N.norm1/2`, `merger.ln_q`.
    pub fn no_decay_norms_and_biases() -> Self {
        Self {
            name: "no_decay".into(),
            patterns: vec![r"\.bias$".into(), r"(?i)norm".into(), r"(^|\.)ln_".into()],
            weight_decay: 0.0,
            lr_scale: 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Default decoupled weight decay (torch.optim.AdamW default 0.01).
    pub weight_decay: f64,
    pub groups: Vec<GroupSpec>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            groups: vec![GroupSpec::no_decay_norms_and_biases()],
        }
    }
}

/// Per-element hyper-parameters of one update.
#[derive(Debug, Clone, Copy)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One torch.optim.AdamW update of a slice at 1-based step `t`:
///   p ← p·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
///   p ← p − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + ε).
/// Arithmetic in f64 per element, stored back as `T` (f32 master weights/moments in training).
pub fn adamw_update<T: Real>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    t: u64,
    h: &AdamWHyper,
) {
    let bc1 = 1.0 - h.beta1.powf(t as f64);
    let bc2_sqrt = (1.0 - h.beta2.powf(t as f64)).sqrt();
    let step_size = h.lr / bc1;
    let decay = 1.0 - h.lr * h.weight_decay;
    for i in 0..p.len() {
        let gi = g[i].to_f64();
        let mi = h.beta1 * m[i].to_f64() + (1.0 - h.beta1) * gi;
        let vi = h.beta2 * v[i].to_f64() + (1.0 - h.beta2) * gi * gi;
        let denom = vi.sqrt() / bc2_sqrt + h.eps;
        let pi = p[i].to_f64() * decay - step_size * mi / denom;
        m[i] = T::from_f64(mi);
        v[i] = T::from_f64(vi);
        p[i] = T::from_f64(pi);
    }
}

/// Optimizer state of one parameter. `step` is per parameter, as in torch: a parameter that got no
/// gradient in a step (frozen, unused) does not advance its bias correction.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamState {
    pub step: u64,
    pub m: Tensor,
    pub v: Tensor,
}

/// AdamW over named f32 parameters (the fp32 master copy; the model keeps its own bf16 copy if any).
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub state: BTreeMap<String, ParamState>,
    patterns: Vec<Vec<Regex>>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Result<Self, OptimError> {
        let ok = |x: f64| (0.0..1.0).contains(&x);
        if !(ok(config.beta1) && ok(config.beta2) && config.eps > 0.0 && config.weight_decay >= 0.0)
        {
            return Err(OptimError::Config(format!(
                "need 0 ≤ β1, β2 < 1, ε > 0, weight_decay ≥ 0; got β1 {}, β2 {}, ε {}, wd {}",
                config.beta1, config.beta2, config.eps, config.weight_decay
            )));
        }
        let mut patterns = Vec::with_capacity(config.groups.len());
        for g in &config.groups {
            let mut v = Vec::with_capacity(g.patterns.len());
            for p in &g.patterns {
                v.push(Regex::new(p).map_err(|source| OptimError::Pattern {
                    group: g.name.clone(),
                    pattern: p.clone(),
                    source,
                })?);
            }
            patterns.push(v);
        }
        Ok(Self {
            config,
            state: BTreeMap::new(),
            patterns,
        })
    }

    /// (group name, weight decay, lr scale) for a parameter name.
    pub fn group_of(&self, name: &str) -> (&str, f64, f64) {
        for (g, pats) in self.config.groups.iter().zip(&self.patterns) {
            if pats.iter().any(|r| r.is_match(name)) {
                return (&g.name, g.weight_decay, g.lr_scale);
            }
        }
        ("default", self.config.weight_decay, 1.0)
    }

    /// One optimizer step with learning rate `lr` over every parameter that has a gradient.
    /// Gradients must be finite (clip first; see [`clip_grad_norm`]). Parameters without a
    /// gradient are left untouched.
    pub fn step(
        &mut self,
        params: &mut TensorMap,
        grads: &TensorMap,
        lr: f64,
    ) -> Result<(), OptimError> {
        // Validate everything first so a bad gradient leaves parameters and state unchanged.
        for (name, g) in grads {
            let p = params
                .get(name)
                .ok_or_else(|| OptimError::UnknownGrad(name.clone()))?;
            if p.shape != g.shape {
                return Err(OptimError::Shape {
                    name: name.clone(),
                    param: p.shape.clone(),
                    other: g.shape.clone(),
                });
            }
            if let Some(s) = self.state.get(name) {
                if s.m.shape != p.shape || s.v.shape != p.shape {
                    return Err(OptimError::Shape {
                        name: name.clone(),
                        param: p.shape.clone(),
                        other: s.m.shape.clone(),
                    });
                }
            }
            if g.data.iter().any(|x| !x.is_finite()) {
                return Err(OptimError::NonFinite(name.clone()));
            }
        }
        for (name, g) in grads {
            let (_, wd, scale) = self.group_of(name);
            let h = AdamWHyper {
                lr: lr * scale,
                beta1: self.config.beta1,
                beta2: self.config.beta2,
                eps: self.config.eps,
                weight_decay: wd,
            };
            let p = params.get_mut(name).expect("validated above");
            let st = self
                .state
                .entry(name.clone())
                .or_insert_with(|| ParamState {
                    step: 0,
                    m: Tensor::zeros(&p.shape),
                    v: Tensor::zeros(&p.shape),
                });
            st.step += 1;
            adamw_update(
                &mut p.data,
                &g.data,
                &mut st.m.data,
                &mut st.v.data,
                st.step,
                &h,
            );
        }
        Ok(())
    }
}

impl AdamW {
    /// Bytes of the moments held (m and v, f32).
    pub fn state_bytes(&self) -> usize {
        self.state.values().map(|s| (s.m.data.len() + s.v.data.len()) * 4).sum()
    }
}

/// A fixed flattening of named parameters into one vector: each parameter's row-major data at
/// its offset, in the order given. Data-parallel ranks that build it from the same names agree on
/// every offset, which is what lets ZeRO-1 split the vector into contiguous per-rank shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLayout {
    entries: Vec<FlatEntry>,
    total: usize,
}

/// One parameter in a [`FlatLayout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatEntry {
    pub name: String,
    pub shape: Vec<usize>,
    /// Index of its first element in the flat vector.
    pub offset: usize,
}

impl FlatEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Its elements in the flat vector.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

/// The part of one parameter inside a flat range (see [`FlatLayout::pieces`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece<'a> {
    pub entry: &'a FlatEntry,
    /// Elements within the parameter's own data.
    pub param: Range<usize>,
    /// The same elements relative to the start of the range asked for.
    pub local: Range<usize>,
}

impl FlatLayout {
    pub fn new(params: impl IntoIterator<Item = (String, Vec<usize>)>) -> Self {
        let mut total = 0;
        let entries = params
            .into_iter()
            .map(|(name, shape)| {
                let e = FlatEntry { name, shape, offset: total };
                total += e.numel();
                e
            })
            .collect();
        Self { entries, total }
    }

    pub fn entries(&self) -> &[FlatEntry] {
        &self.entries
    }

    /// Elements in the flat vector.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Elements per rank when the vector is split over `world_size` ranks; the shards of the
    /// last ranks are padded (the padded reduce-scatter / all-gather of `onevision_comms`).
    pub fn shard_len(&self, world_size: usize) -> usize {
        self.total.div_ceil(world_size.max(1))
    }

    /// The elements rank `rank` owns: `[rank·k, (rank+1)·k)` with `k = shard_len`, cut at the end
    /// of the vector (empty for a rank that only holds padding).
    pub fn shard_range(&self, rank: usize, world_size: usize) -> Range<usize> {
        let k = self.shard_len(world_size);
        let start = (rank * k).min(self.total);
        start..((rank + 1) * k).min(self.total)
    }

    /// The parameters (or parts of them) inside `range`, in order.
    pub fn pieces(&self, range: Range<usize>) -> Vec<Piece<'_>> {
        self.entries
            .iter()
            .filter_map(|e| {
                let r = e.range();
                let (a, b) = (r.start.max(range.start), r.end.min(range.end));
                (a < b).then(|| Piece {
                    entry: e,
                    param: a - r.start..b - r.start,
                    local: a - range.start..b - range.start,
                })
            })
            .collect()
    }
}

/// One parameter's part of a ZeRO-1 shard, with its optimizer step count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPiece {
    pub name: String,
    /// Elements within the parameter's own (row-major) data.
    pub param: Range<usize>,
    /// The same elements within the shard.
    pub local: Range<usize>,
    /// Optimizer steps this parameter has taken (torch's per-parameter `step`).
    pub step: u64,
}

/// ZeRO-1 AdamW: fp32 master weights and moments for one contiguous shard of a [`FlatLayout`]
/// (the shard `layout.shard_range(rank, world_size)`), updated with exactly [`AdamW`]'s
/// arithmetic and parameter groups, element for element. Memory: `3 · 4 · shard` bytes instead
/// of `3 · 4 · all` (master, m, v).
#[derive(Debug)]
pub struct ShardedAdamW {
    /// Config and group patterns; its own `state` stays empty.
    rules: AdamW,
    range: Range<usize>,
    pieces: Vec<ShardPiece>,
    master: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl ShardedAdamW {
    /// Rank `rank`'s shard: master weights sliced from `params`, moments and step counts from
    /// `state` (full, unsharded moments as an [`AdamW`] or a loaded checkpoint holds them);
    /// parameters without state start from zero moments at step 0, as [`AdamW`] does lazily.
    pub fn new(
        config: AdamWConfig,
        layout: &FlatLayout,
        rank: usize,
        world_size: usize,
        params: &TensorMap,
        state: &BTreeMap<String, ParamState>,
    ) -> Result<Self, OptimError> {
        if world_size == 0 || rank >= world_size {
            return Err(OptimError::Shard(format!("rank {rank} is not in a world of {world_size}")));
        }
        let rules = AdamW::new(config)?;
        let range = layout.shard_range(rank, world_size);
        let n = range.len();
        let (mut master, mut m, mut v) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let mut pieces = Vec::new();
        for piece in layout.pieces(range.clone()) {
            let e = piece.entry;
            let p = params.get(&e.name).ok_or_else(|| {
                OptimError::Shard(format!("no weights for parameter `{}` of the layout", e.name))
            })?;
            if p.shape != e.shape {
                return Err(OptimError::Shape { name: e.name.clone(), param: e.shape.clone(), other: p.shape.clone() });
            }
            master[piece.local.clone()].copy_from_slice(&p.data[piece.param.clone()]);
            let step = match state.get(&e.name) {
                Some(st) => {
                    if st.m.shape != e.shape || st.v.shape != e.shape {
                        return Err(OptimError::Shape { name: e.name.clone(), param: e.shape.clone(), other: st.m.shape.clone() });
                    }
                    m[piece.local.clone()].copy_from_slice(&st.m.data[piece.param.clone()]);
                    v[piece.local.clone()].copy_from_slice(&st.v.data[piece.param.clone()]);
                    st.step
                }
                None => 0,
            };
            pieces.push(ShardPiece { name: e.name.clone(), param: piece.param, local: piece.local, step });
        }
        Ok(Self { rules, range, pieces, master, m, v })
    }

    /// The flat elements this shard owns.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    pub fn pieces(&self) -> &[ShardPiece] {
        &self.pieces
    }

    /// The fp32 master weights of the shard (what the all-gather distributes).
    pub fn master(&self) -> &[f32] {
        &self.master
    }

    /// First and second moments of the shard.
    pub fn moments(&self) -> (&[f32], &[f32]) {
        (&self.m, &self.v)
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.rules.config
    }

    /// Bytes held: master weights and both moments of the shard (f32).
    pub fn state_bytes(&self) -> usize {
        (self.master.len() + self.m.len() + self.v.len()) * 4
    }

    /// One AdamW step of the shard with `grad`, this rank's shard of the flattened (reduced,
    /// clipped) gradient. A non-finite gradient leaves everything unchanged.
    pub fn step(&mut self, grad: &[f32], lr: f64) -> Result<(), OptimError> {
        if grad.len() != self.range.len() {
            return Err(OptimError::Shard(format!(
                "gradient shard of {} elements for a shard of {}",
                grad.len(),
                self.range.len()
            )));
        }
        for p in &self.pieces {
            if grad[p.local.clone()].iter().any(|x| !x.is_finite()) {
                return Err(OptimError::NonFinite(p.name.clone()));
            }
        }
        for p in &mut self.pieces {
            let (_, wd, scale) = self.rules.group_of(&p.name);
            let h = AdamWHyper {
                lr: lr * scale,
                beta1: self.rules.config.beta1,
                beta2: self.rules.config.beta2,
                eps: self.rules.config.eps,
                weight_decay: wd,
            };
            p.step += 1;
            let r = p.local.clone();
            adamw_update(&mut self.master[r.clone()], &grad[r.clone()], &mut self.m[r.clone()], &mut self.v[r], p.step, &h);
        }
        Ok(())
    }
}

/// Scale factor `torch.nn.utils.clip_grad_norm_` applies for a global gradient norm.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Multiplies gradients by a clip coefficient < 1 (f64 product, stored as f32, as
/// [`clip_grad_norm`] does); 1 leaves them untouched.
pub fn scale_grads(data: &mut [f32], coef: f64) {
    if coef < 1.0 {
        data.iter_mut().for_each(|x| *x = (*x as f64 * coef) as f32);
    }
}

/// Global L2 norm of all gradients (f64 accumulation), then scale them by
/// `min(1, max_norm / (norm + 1e-6))` as `torch.nn.utils.clip_grad_norm_` does. Returns the norm
/// before clipping. A non-finite norm is an error naming the first non-finite tensor.
pub fn clip_grad_norm(grads: &mut TensorMap, max_norm: f64) -> Result<f64, OptimError> {
    let mut sq = 0.0f64;
    for (name, g) in grads.iter() {
        let s: f64 = g.data.iter().map(|x| (*x as f64) * (*x as f64)).sum();
        if !s.is_finite() {
            return Err(OptimError::NonFinite(name.clone()));
        }
        sq += s;
    }
    let norm = sq.sqrt();
    let coef = clip_coefficient(norm, max_norm);
    for g in grads.values_mut() {
        scale_grads(&mut g.data, coef);
    }
    Ok(norm)
}

/// Sums micro-batch gradients (in f32, like torch's `.grad` accumulation) and hands back the
/// mean or the sum scaled as asked.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: TensorMap,
    micro_batches: usize,
}

impl GradAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one micro-batch's gradients, each multiplied by `scale` (e.g. 1/accumulation_steps when the
    /// losses were per-micro-batch means, or 1 when they already used a global denominator).
    pub fn add(&mut self, grads: &TensorMap, scale: f32) -> Result<(), OptimError> {
        for (name, g) in grads {
            if let Some(s) = self.sums.get(name) {
                if s.shape != g.shape {
                    return Err(OptimError::Shape {
                        name: name.clone(),
                        param: s.shape.clone(),
                        other: g.shape.clone(),
                    });
                }
            }
        }
        for (name, g) in grads {
            let s = self
                .sums
                .entry(name.clone())
                .or_insert_with(|| Tensor::zeros(&g.shape));
            s.data
                .iter_mut()
                .zip(&g.data)
                .for_each(|(a, b)| *a += b * scale);
        }
        self.micro_batches += 1;
        Ok(())
    }

    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The accumulated gradients; the accumulator is empty afterwards.
    pub fn take(&mut self) -> Result<TensorMap, OptimError> {
        if self.micro_batches == 0 {
            return Err(OptimError::EmptyAccumulation);
        }
        self.micro_batches = 0;
        Ok(std::mem::take(&mut self.sums))
    }
}
