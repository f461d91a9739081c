"""Attention fwd / fwd+bwd in PyTorch on Qwen2.5-VL shapes: text (head_dim 128, causal, GQA) and vision
(head_dim 80, block-diagonal windows), eager vs SDPA (flash) vs torch.compile; plus decode attention
over a KV cache against the HBM bound. Counterpart of `onevision bench attention --device cuda`.

Needs torch >= 2.5 (SDPA enable_gqa).
usage: python benches/torch_attention.py [--model 3b|7b] [--seq 4096] [--batch 1] [--iters 20]
"""
import argparse
import math

from torch_common import MODELS, VISION, report, require_cuda, time_ms, torch

import torch.nn.functional as F


def eager_attention(q, k, v, causal, mask=None):
    # q [B, H, T, D], k/v [B, Hkv, S, D]; GQA by repeating kv heads, softmax in fp32 (as HF does).
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5)
    if causal:
        t = q.shape[2]
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1).to(q.dtype)) @ v


def sdpa(q, k, v, causal, mask=None):
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def attn_flops(b, h, t, s, d, causal, bwd):
    f = 4 * b * h * t * s * d * (0.5 if causal else 1.0)
    return f * (3.5 if bwd else 1.0)  # bwd = 2.5x fwd (FlashAttention-2 convention)


def bench_case(name, q, k, v, causal, mask, iters):
    b, h, t, d = q.shape
    s = k.shape[2]
    shape = dict(batch=b, heads=h, kv_heads=k.shape[1], seq_q=t, seq_k=s, head_dim=d, causal=causal)
    compiled = torch.compile(sdpa)
    for impl, fn in (("eager", eager_attention), ("sdpa", sdpa), ("compile", compiled)):
        ms = time_ms(lambda: fn(q, k, v, causal, mask), iters)
        density = 1.0 if mask is None else mask.float().mean().item()
        report(f"attention_fwd/{name}", impl, shape, ms, flops=attn_flops(b, h, t, s, d, causal, False) * density)
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

        def fwd_bwd():
            fn(qg, kg, vg, causal, mask).sum().backward()

        ms = time_ms(fwd_bwd, iters)
        report(f"attention_fwd_bwd/{name}", impl, shape, ms, flops=attn_flops(b, h, t, s, d, causal, True) * density)


def window_mask(n, window, device):
    seg = torch.arange(n, device=device) // window
    return (seg[:, None] == seg[None, :])[None, None]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="3b", choices=sorted(MODELS))
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vision-patches", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    dev = require_cuda()
    m = MODELS[a.model]
    bf = dict(device=dev, dtype=torch.bfloat16)
    q = torch.randn(a.batch, m["heads"], a.seq, m["head_dim"], **bf)
    k = torch.randn(a.batch, m["kv_heads"], a.seq, m["head_dim"], **bf)
    v = torch.randn_like(k)
    bench_case(f"text-{a.model}", q, k, v, True, None, a.iters)

    # Vision: windows of 64 patches (window 112 px = 4 merged tokens = 8x8 patches), non-causal.
    n = a.vision_patches
    qv = torch.randn(1, VISION["heads"], n, VISION["head_dim"], **bf)
    kv = torch.randn_like(qv)
    vv = torch.randn_like(qv)
    bench_case("vision-window64", qv, kv, vv, False, window_mask(n, 64, dev), a.iters)
    bench_case("vision-full", qv, kv, vv, False, None, a.iters)

    # Decode: one query per sequence over a KV cache of a.seq tokens; bound = KV bytes / HBM bandwidth.
    for batch in (1, 8, 64):
        qd = torch.randn(batch, m["heads"], 1, m["head_dim"], **bf)
        kc = torch.randn(batch, m["kv_heads"], a.seq, m["head_dim"], **bf)
        vc = torch.randn_like(kc)
        kv_bytes = 2 * kc.numel() * 2
        ms = time_ms(lambda: sdpa(qd, kc, vc, False), a.iters)
        report("decode_attention", "sdpa", dict(batch=batch, cache=a.seq, heads=m["heads"], kv_heads=m["kv_heads"]), ms,
               bytes_moved=kv_bytes)


if __name__ == "__main__":
    main()
