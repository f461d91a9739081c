"""One Qwen2.5-VL text decoder layer (pre-norm attention with q/k/v bias + SwiGLU MLP, GQA; the RoPE
rotation is left out of both sides' timing) fwd+bwd in PyTorch eager and torch.compile, and the implied
MFU; the counterpart of `onevision bench layer`. The layer is defined locally with the same structure
and shapes as transformers' Qwen2 decoder layer. Needs torch >= 2.5 (SDPA enable_gqa).

usage: python benches/torch_layer.py [--model 3b|7b] [--tokens 8192] [--iters 10] [--peak-tflops 989]
(peak: dense bf16 TFLOP/s of the GPU, 989 for H100 SXM; used only to print MFU.)
"""
import argparse

from torch_common import MODELS, report, require_cuda, time_ms, torch

import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, h, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Layer(nn.Module):
    def __init__(self, hidden, heads, kv_heads, head_dim, inter):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, head_dim
        self.ln1, self.ln2 = RMSNorm(hidden), RMSNorm(hidden)
        self.q = nn.Linear(hidden, heads * head_dim, bias=True)
        self.k = nn.Linear(hidden, kv_heads * head_dim, bias=True)
        self.v = nn.Linear(hidden, kv_heads * head_dim, bias=True)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        y = self.ln1(x)
        q = self.q(y).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k(y).view(b, t, self.kv, self.d).transpose(1, 2)
        v = self.v(y).view(b, t, self.kv, self.d).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        y = self.ln2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


def layer_flops(m, tokens):
    h, d, hq, hkv, i = m["hidden"], m["head_dim"], m["heads"], m["kv_heads"], m["inter"]
    linear = 2 * tokens * h * (hq * d + 2 * hkv * d) + 2 * tokens * hq * d * h + 3 * 2 * tokens * h * i
    attn = 4 * tokens * tokens * hq * d * 0.5  # causal
    return 3 * (linear + attn)  # fwd + bwd (bwd = 2x fwd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="3b", choices=sorted(MODELS))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    a = ap.parse_args()
    dev = require_cuda()
    m = MODELS[a.model]
    layer = Layer(m["hidden"], m["heads"], m["kv_heads"], m["head_dim"], m["inter"]).to(dev, torch.bfloat16)
    x = torch.randn(1, a.tokens, m["hidden"], device=dev, dtype=torch.bfloat16, requires_grad=True)
    flops = layer_flops(m, a.tokens)
    for impl, mod in (("eager", layer), ("compile", torch.compile(layer))):
        def step():
            mod(x).sum().backward()

        ms = time_ms(step, a.iters)
        tf = flops / ms / 1e9
        report(f"decoder_layer_fwd_bwd/{a.model}", impl, dict(tokens=a.tokens), ms, flops=flops,
               mfu=round(tf / a.peak_tflops, 3))


if __name__ == "__main__":
    main()
