//! Host wrappers for the training/generation kernels that are not `Backend` trait ops: the fused LM
//! head + cross-entropy (chunked over the vocabulary), the GRPO token loss, AdamW with global-norm
//! clipping, and on-device sampling. They take raw device pointers (the caller owns the buffers, e.g.
//! the trainer's flat parameter/gradient arenas) and run on the Gpu's compute stream.
//! Semantics of each are in the corresponding `kernels/*.cu` header comment.

use crate::blas::{Elem, Gemm, Lt};
use crate::error::{CudaError, Result};
use crate::gpu::{Args, Gpu, Launch};

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per).max(1) as u32
}

/// Shapes and options of a fused LM head + cross-entropy call.
#[derive(Debug, Clone, Copy)]
pub struct LmHeadCe {
    /// Tokens (rows of `hidden`).
    pub tokens: usize,
    pub hidden: usize,
    pub vocab: usize,
    /// Vocabulary columns per cuBLASLt call (workspace = tokens x chunk f32).
    pub chunk: usize,
    /// 1 / temperature (1.0 for SFT).
    pub inv_temp: f32,
    /// Round logits to bf16 first, as transformers' bf16 lm_head output does.
    pub round_bf16: bool,
    pub ignore_index: i32,
}

impl LmHeadCe {
    fn check(&self) -> Result<()> {
        if self.chunk == 0 || self.tokens == 0 || self.hidden == 0 || self.vocab == 0 {
            return Err(CudaError::Invalid(format!("LmHeadCe with a zero dimension: {self:?}")));
        }
        Ok(())
    }
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.vocab).step_by(self.chunk).map(move |c0| (c0, self.chunk.min(self.vocab - c0)))
    }
}

/// Forward: loss[t] = lse[t] - logit[t, labels[t]] (0 where labels[t] == ignore_index), lse saved.
/// hidden bf16 [tokens, hidden]; weight bf16 [vocab, hidden]; labels i32 [tokens]; loss, lse f32 [tokens].
#[allow(clippy::too_many_arguments)]
pub fn lm_head_ce_forward(gpu: &Gpu, lt: &Lt, p: &LmHeadCe, hidden: u64, weight: u64, labels: u64, loss: u64, lse: u64) -> Result<()> {
    p.check()?;
    let t = p.tokens;
    let logits = gpu.alloc(t * p.chunk * 4)?;
    let stats = gpu.alloc(3 * t * 4)?;
    let (rmax, rsum, target) = (stats.ptr(), stats.ptr() + (t * 4) as u64, stats.ptr() + (2 * t * 4) as u64);
    gpu.launch("cross_entropy", "ce_init_f32", Launch::linear(t, 256), Args::new().ptr(rmax).ptr(rsum).ptr(target).i32(t as i32))?;
    for (c0, cw) in p.chunks() {
        let w = weight + (c0 * p.hidden * 2) as u64;
        lt.gemm(&Gemm::linear(t, cw, p.hidden, Elem::BF16, Elem::F32, None), hidden, w, logits.ptr())?;
        let cfg = Launch { grid: (t as u32, 1, 1), block: (512, 1, 1), smem: 0 };
        let args = Args::new().ptr(logits.ptr()).i64(cw as i64).ptr(labels).ptr(rmax).ptr(rsum).ptr(target)
            .i32(t as i32).i32(cw as i32).i32(c0 as i32).f32(p.inv_temp).i32(p.round_bf16 as i32);
        gpu.launch("cross_entropy", "ce_chunk_update_f32", cfg, args)?;
    }
    let args = Args::new().ptr(rmax).ptr(rsum).ptr(target).ptr(labels).ptr(loss).ptr(lse).i32(t as i32).i32(p.ignore_index);
    gpu.launch("cross_entropy", "ce_finalize_f32", Launch::linear(t, 256), args)
}

/// Backward: with upstream dloss f32 [tokens] (e.g. 1/n_valid for a mean; -dlogp for GRPO log-probs),
/// d_hidden f32 [tokens, hidden] = sum_c G_c W_c (overwritten) and d_weight f32 [vocab, hidden]
/// (+)= G^T hidden (`accumulate_dw`: tied embeddings / gradient accumulation).
#[allow(clippy::too_many_arguments)]
pub fn lm_head_ce_backward(
    gpu: &Gpu, lt: &Lt, p: &LmHeadCe, hidden: u64, weight: u64, labels: u64, lse: u64, dloss: u64, d_hidden: u64, d_weight: u64,
    accumulate_dw: bool,
) -> Result<()> {
    p.check()?;
    let (t, h) = (p.tokens, p.hidden);
    let logits = gpu.alloc(t * p.chunk * 4)?;
    let grad = gpu.alloc(t * p.chunk * 2)?;
    for (i, (c0, cw)) in p.chunks().enumerate() {
        let w = weight + (c0 * h * 2) as u64;
        lt.gemm(&Gemm::linear(t, cw, h, Elem::BF16, Elem::F32, None), hidden, w, logits.ptr())?;
        let cfg = Launch { grid: (t as u32, blocks(cw, 1024), 1), block: (256, 1, 1), smem: 0 };
        let args = Args::new().ptr(logits.ptr()).i64(cw as i64).ptr(labels).ptr(lse).ptr(dloss).ptr(grad.ptr()).i64(cw as i64)
            .i32(t as i32).i32(cw as i32).i32(c0 as i32).f32(p.inv_temp).i32(p.round_bf16 as i32).i32(p.ignore_index);
        gpu.launch("cross_entropy", "ce_chunk_grad_bf16", cfg, args)?;
        // d_hidden (+)= G_c [t, cw] . W_c [cw, h]
        let g = Gemm { m: t, n: h, k: cw, trans_a: false, trans_b: false, ab_type: Elem::BF16, c_type: Elem::F32, alpha: 1.0, beta: if i == 0 { 0.0 } else { 1.0 }, bias: None, batch: None };
        lt.gemm(&g, grad.ptr(), w, d_hidden)?;
        // d_weight[c0..c0+cw] (+)= G_c^T [cw, t] . hidden [t, h]
        let g = Gemm { m: cw, n: h, k: t, trans_a: true, trans_b: false, ab_type: Elem::BF16, c_type: Elem::F32, alpha: 1.0, beta: if accumulate_dw { 1.0 } else { 0.0 }, bias: None, batch: None };
        lt.gemm(&g, grad.ptr(), hidden, d_weight + (c0 * h * 4) as u64)?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlKind {
    K3 = 0,
    K1 = 1,
    K2 = 2,
}

#[derive(Debug, Clone, Copy)]
pub struct GrpoParams {
    pub eps_low: f32,
    pub eps_high: f32,
    pub beta: f32,
    pub kl: KlKind,
}

/// Per-token buffers of the GRPO loss (all f32 [n]); old/ref may be absent (on-policy / beta = 0).
#[derive(Debug, Clone, Copy)]
pub struct GrpoInputs {
    pub n: usize,
    pub logp: u64,
    pub old_logp: Option<u64>,
    pub ref_logp: Option<u64>,
    pub adv: u64,
    pub weight: u64,
}

/// loss_tok f32 [n] = w * l; total f32 [1] = sum (deterministic); stats f32 [3] (+)= (sum w*KL,
/// sum w*clipped, sum w*ratio): zero it first for per-step statistics.
pub fn grpo_loss_forward(gpu: &Gpu, x: &GrpoInputs, p: &GrpoParams, loss_tok: u64, total: u64, stats: u64) -> Result<()> {
    let args = Args::new().ptr(x.logp).opt(x.old_logp).opt(x.ref_logp).ptr(x.adv).ptr(x.weight).ptr(loss_tok).ptr(stats)
        .i32(x.n as i32).f32(p.eps_low).f32(p.eps_high).f32(p.beta).i32(p.kl as i32);
    gpu.launch("grpo_loss", "grpo_loss_fwd_f32", Launch::linear(x.n, 256), args)?;
    let cfg = Launch { grid: (1, 1, 1), block: (1024, 1, 1), smem: 0 };
    gpu.launch("grpo_loss", "reduce_sum_f32", cfg, Args::new().ptr(loss_tok).ptr(total).i32(x.n as i32))
}

/// dlogp f32 [n] = grad_out[0] * w * dl/dlogp (grad_out: device scalar).
pub fn grpo_loss_backward(gpu: &Gpu, x: &GrpoInputs, p: &GrpoParams, grad_out: u64, dlogp: u64) -> Result<()> {
    let args = Args::new().ptr(x.logp).opt(x.old_logp).opt(x.ref_logp).ptr(x.adv).ptr(x.weight).ptr(grad_out).ptr(dlogp)
        .i32(x.n as i32).f32(p.eps_low).f32(p.eps_high).f32(p.beta).i32(p.kl as i32);
    gpu.launch("grpo_loss", "grpo_loss_bwd_f32", Launch::linear(x.n, 256), args)
}

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// <= 0 disables clipping.
    pub max_grad_norm: f32,
}

/// One flat parameter buffer: fp32 master, bf16 working copy, fp32 grad and moments, n elements.
#[derive(Debug, Clone, Copy)]
pub struct ParamBuffer {
    pub master: u64,
    pub param: u64,
    pub grad: u64,
    pub m: u64,
    pub v: u64,
    pub n: usize,
}

/// Global-norm clip over all buffers, then AdamW (step counts from 1). norm_out f32 [2] receives
/// (norm, clip coefficient); a non-finite norm leaves every parameter unchanged (the caller reads
/// norm_out to report the skipped step).
pub fn adamw_step(gpu: &Gpu, bufs: &[ParamBuffer], p: &AdamWParams, step: u32, norm_out: u64) -> Result<()> {
    if step == 0 {
        return Err(CudaError::Invalid("AdamW step numbers start at 1 (bias correction)".into()));
    }
    let per = (2 * gpu.sm_count()).max(1) as usize;
    let partial = gpu.alloc(per * bufs.len().max(1) * 4)?;
    for (i, b) in bufs.iter().enumerate() {
        let cfg = Launch { grid: (per as u32, 1, 1), block: (256, 1, 1), smem: 0 };
        gpu.launch("adamw", "sumsq_partial_f32", cfg, Args::new().ptr(b.grad).i64(b.n as i64).ptr(partial.ptr() + (i * per * 4) as u64))?;
    }
    let cfg = Launch { grid: (1, 1, 1), block: (1024, 1, 1), smem: 0 };
    gpu.launch("adamw", "grad_norm_finalize_f32", cfg, Args::new().ptr(partial.ptr()).i32((per * bufs.len()) as i32).f32(p.max_grad_norm).ptr(norm_out))?;
    let bc1 = 1.0 - p.beta1.powi(step as i32);
    let bc2 = 1.0 - p.beta2.powi(step as i32);
    for b in bufs {
        let args = Args::new().ptr(b.master).ptr(b.param).ptr(b.grad).ptr(b.m).ptr(b.v).i64(b.n as i64)
            .f32(p.lr).f32(p.beta1).f32(p.beta2).f32(p.eps).f32(p.weight_decay).f32(bc1).f32(bc2).ptr(norm_out);
        gpu.launch("adamw", "adamw_step_bf16", Launch::linear(b.n.div_ceil(4), 256), args)?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// <= 0: greedy.
    pub temperature: f32,
    /// 0: disabled; 1: greedy.
    pub top_k: i32,
    /// >= 1: disabled.
    pub top_p: f32,
    pub seed: u64,
}

/// out i32 [rows] = one token per row of logits f32 [rows, vocab] (row stride ld).
#[allow(clippy::too_many_arguments)]
pub fn sample(gpu: &Gpu, logits: u64, ld: usize, rows: usize, vocab: usize, s: &Sampling, step: u64, out: u64) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let cfg = Launch { grid: (rows as u32, 1, 1), block: (1024, 1, 1), smem: 0 };
    let args = Args::new().ptr(logits).i64(ld as i64).ptr(out).i32(rows as i32).i32(vocab as i32)
        .f32(s.temperature).i32(s.top_k).f32(s.top_p).u64(s.seed).u64(step);
    gpu.launch("sampling", "sample_tokens_f32", cfg, args)
}
