"""CPU side by side: onevision's CPU backend vs PyTorch running the same Hugging Face Qwen2.5-VL
checkpoint on the same machine, in one run.

    .venv-ref/bin/python benches/cpu_model.py [--onevision target/release/onevision] [--threads 2]

Writes a small random checkpoint (text 512 hidden x 8 layers, GQA 8/2 heads, vision 256 x 4
blocks; f32 safetensors) to a temp dir, then measures, each in a fresh process so peak RSS is its
own: prefill of 512 tokens, decode of 64 tokens with the KV cache, the vision encoder on a 32x32
patch image, and one SFT training step (forward + backward + AdamW) on 512 tokens. Prints one JSON
line per measurement and a markdown table (what docs/performance.md records).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
    "num_key_value_heads": 2, "vocab_size": 32000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "max_position_embeddings": 32768, "tie_word_embeddings": True, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "image_token_id": 31990, "video_token_id": 31993,
    "vision_start_token_id": 31991, "vision_end_token_id": 31992, "vision_token_id": 31994,
    "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 8,
    "torch_dtype": "float32",
    "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
    "vision_config": {"depth": 4, "hidden_size": 256, "intermediate_size": 688, "num_heads": 4, "in_chans": 3,
                      "out_hidden_size": 512, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [3], "hidden_act": "silu",
                      "tokens_per_second": 2},
}
PROMPT, NEW, PATCHES, TRAIN, ITERS = 512, 64, 32, 512, 3


def write_checkpoint(d: Path) -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**CONFIG))
    model.save_pretrained(d, safe_serialization=True)
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **{"torch_dtype": "float32"}}))


def torch_part(model_dir: str, part: str, threads: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(threads)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 31900, (1, PROMPT), generator=g)

    def timed(fn):
        fn()
        ts = []
        for _ in range(ITERS):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    if part == "prefill":
        model.eval()
        with torch.inference_mode():
            s = timed(lambda: model(input_ids=ids, use_cache=True))
        out = {"bench": "prefill", "shape": {"batch": 1, "prompt": PROMPT}, "ms": s * 1e3, "tokens_per_s": PROMPT / s}
    elif part == "decode":
        # transformers' own decoding loop (generate: cache_position, rope deltas, static
        # shapes as HF intends); decode time = generate(1 + NEW tokens) − generate(1 token).
        model.eval()
        mask = torch.ones_like(ids)

        def gen(n):
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True)
            return time.perf_counter() - t0

        with torch.inference_mode():
            gen(2)
            ts = [gen(1 + NEW) - gen(1) for _ in range(ITERS)]
        s = statistics.median(ts)
        out = {"bench": "decode", "shape": {"batch": 1, "context": PROMPT, "new_tokens": NEW}, "ms": s * 1e3,
               "tokens_per_s": NEW / s}
    elif part == "vision":
        model.eval()
        n = PATCHES * PATCHES
        px = torch.rand((n, 3 * 2 * 14 * 14), generator=g) * 2 - 1
        grid = torch.tensor([[1, PATCHES, PATCHES]])
        with torch.inference_mode():
            s = timed(lambda: model.model.visual(px, grid_thw=grid))
        out = {"bench": "vision", "shape": {"patches": n, "grid": [1, PATCHES, PATCHES]}, "ms": s * 1e3,
               "patches_per_s": n / s}
    elif part == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        tids = torch.randint(3, 31900, (1, TRAIN), generator=g)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=tids, labels=tids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        s = timed(step)
        out = {"bench": "sft_step", "shape": {"batch": 1, "seq": TRAIN, "optimizer": "adamw"}, "ms": s * 1e3,
               "tokens_per_s": TRAIN / s}
    else:
        raise SystemExit(f"unknown part {part}")
    out.update({"impl": f"pytorch-{torch.__version__}-sdpa", "threads": threads,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onevision", default="target/release/onevision", help="the onevision binary")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", help=argparse.SUPPRESS)  # internal: one torch measurement
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--only", default="prefill,decode,vision,train", help="comma-separated parts")
    args = ap.parse_args()
    if args.part:
        print(json.dumps(torch_part(args.model, args.part, args.threads)), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "model"
        write_checkpoint(d)
        for part in args.only.split(","):
            ours = subprocess.run(
                [args.onevision, "bench", "cpu", "--model", str(d), "--only", part, "--iters", str(ITERS),
                 "--prompt-len", str(PROMPT), "--new-tokens", str(NEW), "--vision-patches", str(PATCHES),
                 "--train-len", str(TRAIN)],
                check=True, capture_output=True, text=True, env={**os.environ, "RAYON_NUM_THREADS": str(args.threads)},
            )
            o = json.loads(ours.stdout.strip().splitlines()[-1])
            t = json.loads(subprocess.run(
                [sys.executable, __file__, "--part", part, "--model", str(d), "--threads", str(args.threads)],
                check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for r in (o, t):
                print(json.dumps(r), flush=True)
            rows.append((part, o, t))
    unit = lambda r: next(k for k in r if k.endswith("_per_s"))
    print("\n| measurement | onevision | PyTorch | speed ratio | peak RSS onevision / PyTorch (MiB) |")
    print("|---|---|---|---|---|")
    for part, o, t in rows:
        u = unit(o)
        print(f"| {o['bench']} {json.dumps(o['shape'])} | {o[u]:.1f} {u} | {t[u]:.1f} {u} | {o[u] / t[u]:.2f}x "
              f"| {o['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
