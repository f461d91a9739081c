// GRPO token loss (PPO-style clipped surrogate + KL penalty), forward and backward.
// CPU reference: the GRPO loss in worker/train (../shared/reference/r1_onevision_recipe.md, GRPO):
//   ratio = exp(logp - old_logp)
//   obj   = min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
//   KL    = k3: exp(ref - logp) - (ref - logp) - 1 | k1: logp - ref | k2: 0.5 (logp - ref)^2
//   l_t   = -(obj - beta * KL)
//   loss  = sum_t w_t * l_t, where w_t carries the mask and the aggregation chosen by the host
//           (sequence-mean: 1 / (n_seqs * len_i); token-mean (DAPO): 1 / total tokens; Dr.GRPO: 1 / const).
// Gradient wrt logp (min() passes the gradient of the smaller branch; when ratio is inside the clip
// range both branches are equal and have the same derivative):
//   d obj / d logp = ratio * A if ratio * A <= clip(ratio) * A else 0
//   d KL / d logp  = k3: 1 - exp(ref - logp) | k1: 1 | k2: logp - ref
//   dlogp_t = grad_out * w_t * -(d obj - beta * d KL)
// The chain to logits is cross_entropy.cu:ce_chunk_grad_bf16 with dloss = -dlogp.
// Layouts: all [n_tokens] f32 (adv per token: the sequence's advantage broadcast; old_logp null means
// on-policy, ratio = 1 with the gradient of exp(logp - stop_grad(logp)); ref_logp may be null if
// beta = 0). stats [3] f32 (accumulated with atomics): sum w*KL, sum w*clipped, sum w*ratio.

__device__ __forceinline__ void grpo_terms(float lp, float old, float ref, float A, float eps_low, float eps_high,
                                           float beta, int kl_kind, bool has_ref, float* l, float* dl,
                                           float* kl_out, float* clipped, float* ratio_out) {
    const float ratio = __expf(lp - old);
    const float cr = fminf(fmaxf(ratio, 1.f - eps_low), 1.f + eps_high);
    const float un = ratio * A, cl = cr * A;
    const bool take_un = un <= cl;
    const float obj = take_un ? un : cl;
    const float dobj = take_un ? un : 0.f;
    float kl = 0.f, dkl = 0.f;
    if (has_ref && beta != 0.f) {
        const float dlt = ref - lp;
        if (kl_kind == 1) { kl = lp - ref; dkl = 1.f; }
        else if (kl_kind == 2) { kl = 0.5f * dlt * dlt; dkl = -dlt; }
        else { const float e = __expf(dlt); kl = e - dlt - 1.f; dkl = 1.f - e; }
    }
    *l = -(obj - beta * kl);
    *dl = -(dobj - beta * dkl);
    *kl_out = kl;
    *clipped = take_un ? 0.f : 1.f;
    *ratio_out = ratio;
}

// grid: ceil(n/256); block 256. loss_tok[t] = w_t * l_t.
extern "C" __global__ void grpo_loss_fwd_f32(const float* __restrict__ logp, const float* __restrict__ old_logp,
                                             const float* __restrict__ ref_logp, const float* __restrict__ adv,
                                             const float* __restrict__ weight, float* __restrict__ loss_tok,
                                             float* __restrict__ stats, int n, float eps_low, float eps_high,
                                             float beta, int kl_kind) {
    __shared__ float sh[32];
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    float wkl = 0.f, wclip = 0.f, wratio = 0.f;
    if (t < n) {
        const float lp = logp[t];
        const float old = old_logp ? old_logp[t] : lp;
        const float ref = ref_logp ? ref_logp[t] : lp;
        float l, dl, kl, clipped, ratio;
        grpo_terms(lp, old, ref, adv[t], eps_low, eps_high, beta, kl_kind, ref_logp != nullptr, &l, &dl, &kl, &clipped, &ratio);
        const float w = weight[t];
        loss_tok[t] = w * l;
        wkl = w * kl; wclip = w * clipped; wratio = w * ratio;
    }
    if (stats) {
        wkl = block_sum(wkl, sh);
        wclip = block_sum(wclip, sh);
        wratio = block_sum(wratio, sh);
        if (threadIdx.x == 0) { atomicAdd(stats, wkl); atomicAdd(stats + 1, wclip); atomicAdd(stats + 2, wratio); }
    }
}

// grid: ceil(n/256); block 256. grad_out: d(final loss)/d(loss), a device scalar (no host sync).
extern "C" __global__ void grpo_loss_bwd_f32(const float* __restrict__ logp, const float* __restrict__ old_logp,
                                             const float* __restrict__ ref_logp, const float* __restrict__ adv,
                                             const float* __restrict__ weight, const float* __restrict__ grad_out,
                                             float* __restrict__ dlogp, int n, float eps_low, float eps_high,
                                             float beta, int kl_kind) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const float lp = logp[t];
    const float old = old_logp ? old_logp[t] : lp;
    const float ref = ref_logp ? ref_logp[t] : lp;
    float l, dl, kl, clipped, ratio;
    grpo_terms(lp, old, ref, adv[t], eps_low, eps_high, beta, kl_kind, ref_logp != nullptr, &l, &dl, &kl, &clipped, &ratio);
    dlogp[t] = grad_out[0] * weight[t] * dl;
}

// Deterministic sum of n floats into out[0] (single block of 1024, fixed order): total loss.
extern "C" __global__ void reduce_sum_f32(const float* __restrict__ x, float* __restrict__ out, int n) {
    __shared__ float sh[32];
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) out[0] = s;
}
