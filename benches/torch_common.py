"""Shared helpers for the PyTorch side-by-side benchmarks (benches/torch_*.py).

Every script prints one JSON object per measurement on stdout:
  {"bench": ..., "impl": "eager|sdpa|compile", "shape": {...}, "ms": ..., "tflops": ..., "gbps": ...}
so that `onevision bench` output (same shapes, same fields) can be joined with it for
docs/performance.md. Timings use CUDA events after warm-up; the median of `iters` runs is reported.
Shapes are Qwen2.5-VL's (../shared/reference/qwen2_5_vl.md): 3B text H=2048, 16 q heads, 2 kv heads,
head_dim 128, I=11008; 7B text H=3584, 28/4 heads, I=18944; vision 1280 hidden, 16 heads of 80.
"""
import json
import statistics
import sys

try:
    import torch
except ImportError:  # the scripts are for GPU machines; say so instead of a traceback
    sys.exit("PyTorch is not installed: pip install torch (CUDA build) on the GPU machine")

MODELS = {
    "3b": dict(hidden=2048, heads=16, kv_heads=2, head_dim=128, inter=11008, vocab=151936),
    "7b": dict(hidden=3584, heads=28, kv_heads=4, head_dim=128, inter=18944, vocab=152064),
}
VISION = dict(hidden=1280, heads=16, head_dim=80, inter=3420)


def require_cuda():
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: these benchmarks only make sense on the GPU being compared")
    return torch.device("cuda")


def time_ms(fn, iters=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def report(bench, impl, shape, ms, flops=None, bytes_moved=None, **extra):
    out = {"bench": bench, "impl": impl, "shape": shape, "ms": round(ms, 4),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if flops is not None:
        out["tflops"] = round(flops / ms / 1e9, 2)
    if bytes_moved is not None:
        out["gbps"] = round(bytes_moved / ms / 1e6, 1)
    out.update(extra)
    print(json.dumps(out), flush=True)


def copy_bandwidth_gbps(nbytes=1 << 30):
    """Device-to-device copy bandwidth (read + write), the reference for memory-bound kernels."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x))
    return 2 * nbytes / ms / 1e6
