"""A full SFT step in PyTorch on Qwen2.5-VL text shapes with fewer layers: embedding, N decoder layers
(torch_layer.Layer, RoPE left out), final RMSNorm, tied (3B) or separate (7B) LM head, cross-entropy
over every token, backward, AdamW on fp32 master weights (bf16 compute via autocast), eager vs
torch.compile. Counterpart of `onevision bench sft-step`; same bench name, shape and FLOP formula
(layers x layer_flops + 6*T*H*V for the LM head).

usage: python benches/torch_sft_step.py [--model 3b|7b] [--layers 4] [--seq 4096] [--batch 1] [--iters 5]
       [--peak-tflops 989]
"""
import argparse

from torch_common import MODELS, report, require_cuda, time_ms, torch
from torch_layer import Layer, RMSNorm, layer_flops

import torch.nn as nn
import torch.nn.functional as F


class Model(nn.Module):
    def __init__(self, m, layers):
        super().__init__()
        self.embed = nn.Embedding(m["vocab"], m["hidden"])
        self.layers = nn.ModuleList(Layer(m["hidden"], m["heads"], m["kv_heads"], m["head_dim"], m["inter"]) for _ in range(layers))
        self.norm = RMSNorm(m["hidden"])
        self.head = None if m["tied"] else nn.Linear(m["hidden"], m["vocab"], bias=False)

    def forward(self, ids, labels):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        logits = x @ (self.embed.weight if self.head is None else self.head.weight).t()
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def sft_flops(m, layers, batch, seq):
    # layer_flops counts one sequence of `tokens` (attention ~ tokens^2): per sequence, times batch.
    return batch * layers * layer_flops(m, seq) + 6 * batch * seq * m["hidden"] * m["vocab"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="3b", choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    a = ap.parse_args()
    dev = require_cuda()
    m = dict(MODELS[a.model], tied=a.model == "3b")
    flops = sft_flops(m, a.layers, a.batch, a.seq)
    for impl in ("eager", "compile"):
        model = Model(m, a.layers).to(dev)  # fp32 master weights
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        fwd = torch.compile(model) if impl == "compile" else model
        ids = torch.randint(0, m["vocab"], (a.batch, a.seq), device=dev)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(ids, ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = time_ms(step, a.iters, warmup=2)
        tf = flops / ms / 1e9
        report(f"sft_step/{a.model}", impl, dict(batch=a.batch, seq=a.seq, layers=a.layers), ms, flops=flops,
               mfu=round(tf / a.peak_tflops, 3), tokens_per_s=round(a.batch * a.seq / ms * 1e3, 1))
        del model, opt, fwd
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
