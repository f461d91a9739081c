"""transformers `generate` on the checkpoint and prompts written by worker/tests/rollout_bench.rs
(docs/performance.md, "Rollout generation (CPU)"): the groups go in batches of `batch_groups`
groups × G copies (the same sequences per decode batch as the onevision worker), sampled at
temperature 1 with the same eos id and max_new_tokens.

    .venv-ref/bin/python worker/tests/rollout_bench_hf.py /tmp/rollout-bench [REPS] [THREADS]
"""
import json
import sys
import time

import torch
from transformers import Qwen2_5_VLForConditionalGeneration


def main() -> None:
    d = sys.argv[1] if len(sys.argv) > 1 else "/tmp/rollout-bench"
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if len(sys.argv) > 3:
        torch.set_num_threads(int(sys.argv[3]))
    bench = json.load(open(f"{d}/bench.json"))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, torch_dtype=torch.float32).eval()
    g, new, eos = bench["group_size"], bench["max_new_tokens"], bench["eos"]
    k = bench.get("batch_groups", 1)
    # All prompts have the same length: a batch is the G copies of each of k prompts, no padding.
    prompts = bench["prompts"]
    batches = [torch.tensor([p for p in prompts[i:i + k] for _ in range(g)]) for i in range(0, len(prompts), k)]
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new,
              eos_token_id=eos, pad_token_id=eos, use_cache=True)
    with torch.inference_mode():
        model.generate(batches[0], attention_mask=torch.ones_like(batches[0]), **{**kw, "max_new_tokens": 4})
        best, tokens = float("inf"), 0
        for _ in range(reps):
            torch.manual_seed(0)
            t = time.perf_counter()
            tokens = 0
            for ids in batches:
                out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)[:, ids.shape[1]:]
                for row in out.tolist():
                    # Count through the first eos (included), like the worker.
                    tokens += row.index(eos) + 1 if eos in row else len(row)
            secs = time.perf_counter() - t
            best = min(best, secs)
            print(f"hf: {tokens} tokens in {secs:.3f} s = {tokens / secs:.1f} tokens/s")
    print(f"RESULT transformers {__import__('transformers').__version__} torch {torch.__version__} "
          f"threads={torch.get_num_threads()}: groups={len(prompts)} G={g} batch={k * g} sequences new={new}: "
          f"{tokens} tokens, best {best:.3f} s, {tokens / best:.1f} tokens/s")


if __name__ == "__main__":
    main()
