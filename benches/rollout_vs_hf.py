"""Rollout tokens/s, onevision rollout worker vs transformers `generate`, interleaved
(docs/performance.md, "Rollout generation (CPU)").

For each thread count, RUNS rounds of: one onevision run (worker/tests/rollout_bench.rs: a real
`onevision rollout` process fed through the RolloutPool over loopback gRPC, continuous batching
up to BATCH_GROUPS groups), then one transformers run (worker/tests/rollout_bench_hf.py: the same
checkpoint, prompts and batches of BATCH_GROUPS × G sequences). Each side runs in a fresh process
with a warm-up first; the medians over the rounds are compared. Interleaving keeps both sides
under the same background load on a shared machine.

    cargo test --release -p onevision-worker --test rollout_bench --no-run   # prints the binary
    .venv-ref/bin/python benches/rollout_vs_hf.py --bench-bin target/release/deps/rollout_bench-HASH \\
        --python .venv-ref/bin/python --threads 1,2 --runs 5
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = re.compile(r"RESULT (onevision rollout worker|transformers).*?: (\d+) tokens, best ([0-9.]+) s, ([0-9.]+) tokens/s")
SYNC = re.compile(r"RESULT weight sync: ([0-9.]+) MB in ([0-9.]+) s")


def run(cmd, env):
    r = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{out[-4000:]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-bin", required=True, help="the compiled rollout_bench test binary")
    ap.add_argument("--python", default=sys.executable, help="python with torch + transformers")
    ap.add_argument("--dir", default="/tmp/rollout-bench")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--batch-groups", type=int, default=4)
    a = ap.parse_args()
    common = {"ROLLOUT_BENCH_DIR": a.dir, "ROLLOUT_BENCH_GROUPS": str(a.groups),
              "ROLLOUT_BENCH_BATCH_GROUPS": str(a.batch_groups), "RUST_LOG": "warn"}
    summary = []
    for t in [int(x) for x in a.threads.split(",")]:
        ours, hf, sync = [], [], []
        for i in range(a.runs):
            out = run([a.bench_bin, "--ignored", "--nocapture", "--test-threads", "1"],
                      {**common, "ROLLOUT_BENCH_REPS": "1", "RAYON_NUM_THREADS": str(t)})
            m = RESULT.search(out)
            ours.append((int(m.group(2)), float(m.group(3))))
            s = SYNC.search(out)
            sync.append((float(s.group(1)), float(s.group(2))))
            out = run([a.python, ROOT / "worker/tests/rollout_bench_hf.py", a.dir, "1", str(t)],
                      {"OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)})
            m = RESULT.search(out)
            hf.append((int(m.group(2)), float(m.group(3))))
            print(f"threads={t} round {i + 1}: onevision {ours[-1][0] / ours[-1][1]:.1f} tok/s, "
                  f"transformers {hf[-1][0] / hf[-1][1]:.1f} tok/s", flush=True)
        o = statistics.median(n / s for n, s in ours)
        h = statistics.median(n / s for n, s in hf)
        row = {"threads": t, "onevision_tok_s": o, "transformers_tok_s": h, "ratio": o / h,
               "onevision_runs": [round(n / s, 1) for n, s in ours], "transformers_runs": [round(n / s, 1) for n, s in hf],
               "tokens_onevision": [n for n, _ in ours], "tokens_transformers": [n for n, _ in hf],
               "sync_mb": sync[0][0], "sync_s_median": statistics.median(s for _, s in sync)}
        summary.append(row)
        print(f"threads={t}: median onevision {o:.1f} tok/s, transformers {h:.1f} tok/s, ratio {o / h:.2f}x; "
              f"weight sync {row['sync_mb']:.1f} MB in {row['sync_s_median']:.3f} s (median)", flush=True)
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    main()
