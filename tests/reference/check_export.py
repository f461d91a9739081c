"""Load a checkpoint directory written by onevision's HF export in transformers and print its SFT
loss on the given tokens as JSON (last stdout line): {"loss": ..., "tensors": N}.

Used by worker/tests/adamw_torch.rs when ONEVISION_REFERENCE_PYTHON points at a python with
tests/reference/requirements.txt installed:
    python tests/reference/check_export.py DIR --input-ids 1,2,3 --labels -100,2,3
"""
import argparse
import json

import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--input-ids", required=True)
    ap.add_argument("--labels", required=True)
    args = ap.parse_args()
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise SystemExit(f"{args.model_dir}: checkpoint did not load cleanly: {bad}")
    AutoProcessor.from_pretrained(args.model_dir)  # tokenizer, chat template and image processor load too
    ids = torch.tensor([[int(x) for x in args.input_ids.split(",")]])
    labels = torch.tensor([[int(x) for x in args.labels.split(",")]])
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    print(json.dumps({"loss": float(loss), "tensors": len(model.state_dict())}))


if __name__ == "__main__":
    main()
