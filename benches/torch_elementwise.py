"""Memory-bound ops in PyTorch (RMSNorm + residual, M-RoPE, SwiGLU, cross-entropy over the vocab)
against measured device copy bandwidth, eager vs torch.compile. Counterpart of
`onevision bench elementwise --device cuda`. Goal for our kernels: >= 80% of copy bandwidth.

usage: python benches/torch_elementwise.py [--model 3b|7b] [--tokens 8192] [--iters 50]
"""
import argparse

from torch_common import MODELS, copy_bandwidth_gbps, report, require_cuda, time_ms, torch


def rmsnorm_residual(x, res, w, eps=1e-6):
    h = x + res
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return w * y.to(h.dtype), h


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope(q, cos, sin):
    # q [T, H, D]; cos/sin [T, 1, D] (M-RoPE tables are built once per batch, not timed here).
    return (q.float() * cos + rotate_half(q.float()) * sin).to(q.dtype)


def swiglu(gate, up):
    return torch.nn.functional.silu(gate) * up


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="3b", choices=sorted(MODELS))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    dev = require_cuda()
    m = MODELS[a.model]
    t, h = a.tokens, m["hidden"]
    bf = dict(device=dev, dtype=torch.bfloat16)
    copy = copy_bandwidth_gbps()
    print(f'{{"bench": "copy", "gbps": {copy:.1f}, "device": "{torch.cuda.get_device_name()}"}}', flush=True)

    x, res, w = torch.randn(t, h, **bf), torch.randn(t, h, **bf), torch.randn(h, **bf)
    q = torch.randn(t, m["heads"], m["head_dim"], **bf)
    cos, sin = torch.randn(t, 1, m["head_dim"], device=dev), torch.randn(t, 1, m["head_dim"], device=dev)
    gate, up = torch.randn(t, m["inter"], **bf), torch.randn(t, m["inter"], **bf)
    cases = [
        ("rmsnorm_residual", rmsnorm_residual, (x, res, w), 4 * t * h * 2),  # read x, res; write y, h
        ("rope", rope, (q, cos, sin), 2 * q.numel() * 2 + 2 * cos.numel() * 4),
        ("swiglu", swiglu, (gate, up), 3 * gate.numel() * 2),
    ]
    for name, fn, args, nbytes in cases:
        for impl, f in (("eager", fn), ("compile", torch.compile(fn))):
            ms = time_ms(lambda: f(*args), a.iters)
            report(name, impl, dict(tokens=t, hidden=h), ms, bytes_moved=nbytes, copy_gbps=round(copy, 1),
                   frac_of_copy=round(nbytes / ms / 1e6 / copy, 3))

    # LM head + cross-entropy: the unfused PyTorch path materialises [T, V] logits (our kernel chunks).
    for tokens in (2048, 8192):
        hid = torch.randn(tokens, h, **bf, requires_grad=True)
        head = torch.randn(m["vocab"], h, **bf, requires_grad=True)
        labels = torch.randint(0, m["vocab"], (tokens,), device=dev)

        def ce():
            logits = hid @ head.t()
            torch.nn.functional.cross_entropy(logits.float(), labels).backward()

        torch.cuda.reset_peak_memory_stats()
        ms = time_ms(ce, 10)
        report("lm_head_ce_fwd_bwd", "eager", dict(tokens=tokens, vocab=m["vocab"], hidden=h), ms,
               flops=6 * tokens * m["vocab"] * h, peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))


if __name__ == "__main__":
    main()
