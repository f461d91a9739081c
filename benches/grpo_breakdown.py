"""GRPO step-time breakdown with rollout workers (docs/performance.md, "GRPO step time").

Writes a synthetic task and a small random model (the quickstart's sizes), runs a short GRPOJob
under the local runner (`onevision run`: one trainer process and `--replicas` real
`onevision rollout` processes on loopback gRPC), then summarises the per-step phase times the
trainer records in metrics.jsonl (time/rollout_wait, time/reference, time/forward_backward,
time/optimizer, time/weight_sync) and the workers' own weight-apply times from their logs.

    python3 benches/grpo_breakdown.py --onevision $CARGO_TARGET_DIR/release/onevision

Standard library only. Step 1 (first contact, first weight push) is reported but left out of
the medians.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ["rollout_wait", "reference", "forward_backward", "optimizer", "weight_sync"]

MANIFEST = """apiVersion: onevision.dev/v1alpha1
kind: GRPOJob
metadata: {{name: bench-grpo}}
spec:
  model: {{path: /data/model}}
  dataset: {{path: /data/data/train.jsonl}}
  output: {{path: /data/out/bench-grpo}}
  storage: {{persistentVolumeClaim: {{claimName: data}}}}
  trainer: {{nodes: 1, image: onevision:bench}}
  rollout: {{replicas: {replicas}}}
  grpo: {{groupSize: {group}, maxNewTokens: {new}, temperature: 1.0, klBeta: 0.04, rewards: [{{name: accuracy}}]}}
  hyperparameters: {{learningRate: 1.0e-4, globalBatchSize: {batch}, microBatchSize: {batch}, maxSteps: {steps}, seed: 0}}
  checkpoint: {{everySteps: 1000}}
"""


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onevision", required=True, help="path of the onevision binary")
    ap.add_argument("--workdir", help="keep everything here (default: a temporary directory)")
    ap.add_argument("--replicas", type=int, default=2, help="rollout workers")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (globalBatchSize)")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (groupSize)")
    ap.add_argument("--new-tokens", type=int, default=96)
    a = ap.parse_args()
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    store = work / "storage"
    ov = a.onevision
    run([ov, "data", "synth", "--out", store / "data", "--train", "400", "--heldout", "10",
         "--families", "color,shape,count", "--difficulty", "1", "--image-size", "112"])
    run([ov, "model", "init", "--out", store / "model", "--tokenizer-corpus", store / "data/train.jsonl"])
    manifest = work / "bench.yaml"
    manifest.write_text(MANIFEST.format(replicas=a.replicas, group=a.group, new=a.new_tokens,
                                        batch=a.prompts, steps=a.steps))
    runs = work / "runs"
    run([ov, "run", manifest, "--workdir", runs, "--data-root", store])
    job = runs / "bench-grpo"
    rows = [json.loads(l) for l in (job / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steady = rows[1:] if len(rows) > 1 else rows

    def med(key):
        return statistics.median(r[key] for r in steady if key in r)

    phases = {p: med(f"time/{p}") for p in PHASES}
    total = sum(phases.values())
    # Worker side: `weights updated version=… bytes=… seconds=…` (receive + validate + apply).
    applied = []
    for log in sorted((job / "logs").glob("bench-grpo-rollout-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "weights updated" in line:
                m = re.search(r"seconds=([0-9.e-]+)", line)
                b = re.search(r"bytes=(\d+)", line)
                if m and b:
                    applied.append((float(m.group(1)), int(b.group(1))))
    print(f"{len(rows)} steps, {a.prompts} prompts x G={a.group}, {a.new_tokens} new tokens max, "
          f"{a.replicas} rollout workers; medians of steps 2..{len(rows)}")
    print(f"{'phase':<18}{'seconds':>10}{'share':>8}")
    for p in PHASES:
        print(f"{p:<18}{phases[p]:>10.3f}{phases[p] / total:>8.1%}")
    print(f"{'sum':<18}{total:>10.3f}")
    print(f"completion tokens/step (median): {med('response_length') * a.prompts * a.group:.0f}" if "response_length" in steady[0] else "")
    summary = {"phases_median_s": phases, "step_sum_s": total, "steps": len(rows), "replicas": a.replicas,
               "prompts": a.prompts, "group": a.group, "new_tokens": a.new_tokens}
    if applied:
        secs = statistics.median(s for s, _ in applied)
        mb = applied[0][1] / 1e6
        print(f"worker-side weight update (receive + apply), median of {len(applied)}: {secs:.3f} s for {mb:.1f} MB")
        summary["worker_apply_median_s"] = secs
        summary["weights_mb"] = mb
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    main()
