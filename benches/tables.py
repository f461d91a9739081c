"""Turns the JSON lines of `onevision bench ...` and benches/torch_*.py (run side by side by
scripts/gpu-bench) into the markdown tables of docs/performance.md. Rows join on (bench, shape);
columns are the implementations. Pure standard library: runs anywhere.

usage: python3 benches/tables.py OUT_DIR/*.jsonl > OUT_DIR/tables.md
"""
import json
import sys
from collections import OrderedDict

OURS = ("onevision-cuda", "onevision-cpu")
SECTIONS = [  # (title, bench-name prefix, the rate column)
    ("Attention (TFLOP/s)", ("attention_fwd", "attention_fwd_bwd"), "tflops"),
    ("Decode attention over the KV cache (GB/s of K+V read)", ("decode_attention",), "gbps"),
    ("Memory-bound ops (GB/s; fraction of measured copy bandwidth)", ("rmsnorm", "rope", "swiglu", "copy"), "gbps"),
    ("One decoder layer fwd+bwd (TFLOP/s, MFU)", ("decoder_layer_fwd_bwd",), "tflops"),
    ("SFT step (tokens/s, MFU)", ("sft_step",), "tflops"),
    ("Decode (tokens/s vs the memory bound)", ("decode/",), "gbps"),
]


def load(paths):
    rows = []
    for p in paths:
        with open(p) as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue  # progress or log lines mixed into a capture
                try:
                    v = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "bench" in v and "impl" in v and "ms" in v:
                    rows.append(v)
    return rows


def shape_str(s):
    return ", ".join(f"{k}={v}" for k, v in s.items()) if isinstance(s, dict) else str(s)


def cell(v, rate):
    out = f"{v['ms']:.3f} ms"
    if rate in v:
        unit = "TFLOP/s" if rate == "tflops" else "GB/s"
        out += f", {v[rate]:.1f} {unit}"
    for k, label in (("mfu", "MFU"), ("frac_of_copy", "of copy"), ("frac_of_bound", "of bound")):
        if k in v:
            out += f", {100 * v[k]:.0f}% {label}"
    if "tokens_per_s" in v:
        out += f", {v['tokens_per_s']:.0f} tok/s"
    return out


def table(rows, title, prefixes, rate):
    sel = [r for r in rows if r["bench"].startswith(prefixes)]
    if not sel:
        return ""
    impls = sorted({r["impl"] for r in sel}, key=lambda i: (i not in OURS, i))
    groups = OrderedDict()
    for r in sel:
        groups.setdefault((r["bench"], json.dumps(r.get("shape"), sort_keys=True)), {})[r["impl"]] = r
    lines = [f"### {title}", "", "| bench | shape | " + " | ".join(impls) + " | ours / best PyTorch |",
             "|---" * (len(impls) + 3) + "|"]
    for (bench, _), by in groups.items():
        any_row = next(iter(by.values()))
        ours = next((by[i] for i in OURS if i in by), None)
        theirs = [v for i, v in by.items() if i not in OURS]
        speed = ""
        if ours and theirs:
            best = min(v["ms"] for v in theirs)
            speed = f"{best / ours['ms']:.2f}x"
        cells = [cell(by[i], rate) if i in by else "" for i in impls]
        lines.append(f"| {bench} | {shape_str(any_row.get('shape'))} | " + " | ".join(cells) + f" | {speed} |")
    devices = sorted({r.get("device", "?") for r in sel})
    lines += ["", f"Device: {', '.join(devices)}.", ""]
    return "\n".join(lines)


def main(paths):
    rows = load(paths)
    if not rows:
        sys.exit("no benchmark lines found in " + " ".join(paths))
    print("\n".join(t for t in (table(rows, *s) for s in SECTIONS) if t))


if __name__ == "__main__":
    main(sys.argv[1:])
