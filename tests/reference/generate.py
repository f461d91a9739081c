#!/usr/bin/env python3
"""Reference fixture generator for onevision's Qwen2.5-VL parity tests.

Writes tiny random Qwen2.5-VL checkpoints in the official Hugging Face layout and the outputs
that `transformers` computes on them (see FORMAT.md for the contract). The Rust tests compare
against these files; CI has no torch, so the outputs are committed.

Usage (from the repository root; see README.md in this folder):
    .venv-ref/bin/python tests/reference/generate.py            # model + preprocess fixtures
    .venv-ref/bin/python tests/reference/generate.py --only preprocess
    .venv-ref/bin/python tests/reference/generate.py --only grad   # needs the model fixtures

Deterministic: every random draw comes from fixed seeds, torch runs single-threaded, and each
output directory is deleted and rewritten, so re-running reproduces the same files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
)
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
IMAGES = FIXTURES / "images"

# The real Qwen2.5-VL chat template (chat_template.json of Qwen/Qwen2.5-VL-7B-Instruct).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split pattern (tokenizer.json of the Qwen2/Qwen2.5 family).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Special tokens in a deliberately different order from Qwen's (151643..151656) so that any
# hard-coded id shows up as a test failure.
SPECIAL_TOKENS = [
    "<|im_end|>",
    "<|endoftext|>",
    "<|vision_pad|>",
    "<|im_start|>",
    "<|image_pad|>",
    "<|vision_start|>",
    "<|video_pad|>",
    "<|vision_end|>",
]
BPE_VOCAB = 392  # 256 byte symbols + 136 merges; the 8 specials follow -> 400 tokens

CORPUS = """\
You are a helpful assistant. Describe the image in detail.
What is shown in the picture? Compare the two pictures and explain the difference.
The answer is 42. Let me think step by step: first, count the objects; then add them.
A red square sits next to a blue circle on a white background.
Solve for x: 3x + 5 = 20, so x = 5. The area of the triangle is one half base times height.
Hello, how are you? I am fine, thank you. Please put the final answer in a box.
The quick brown fox jumps over the lazy dog. There are three cats and two dogs in the image.
<think> The image shows a chart; the bars increase from left to right. </think>
<answer> B </answer> Question: which option is correct? Options: A, B, C, D.
"""

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
MIN_PIXELS = 3136  # 56 * 56, the official default
MAX_PIXELS = 12544  # 16 * 28 * 28: small so that the 150x200 image is downscaled


# --------------------------------------------------------------------------------------------
# small helpers


def save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    # np.save writes format v1.0 for every array this small.
    np.save(path, arr, allow_pickle=False)


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def reset_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


# --------------------------------------------------------------------------------------------
# images


@dataclass
class ImageSpec:
    name: str
    height: int
    width: int
    mode: str = "RGB"  # "RGB" or "RGBA"
    fmt: str = "png"  # png | jpeg | webp


# File names carry height x width (numpy order) to avoid PIL's (w, h) ambiguity.
IMAGE_SPECS = [
    ImageSpec("a_h56_w84.png", 56, 84),  # already a multiple of 28: no resize; merged 2x3 pads
    ImageSpec("b_h70_w100.png", 70, 100),  # resize to 56x112 (70/28 = 2.5 rounds to even 2)
    ImageSpec("c_h84_w56.png", 84, 56),  # no resize, merged 3x2 pads the other axis
    ImageSpec("d_h150_w200.png", 150, 200),  # max_pixels downscale (antialiased) to 84x112
    ImageSpec("e_h20_w30.png", 20, 30),  # min_pixels upscale to 56x84
    ImageSpec("f_rgba_h56_w56.png", 56, 56, mode="RGBA"),  # alpha composited onto white
    ImageSpec("g_h42_w98.jpg", 42, 98, fmt="jpeg"),  # JPEG decode; 42/28 = 1.5 rounds to 2
    ImageSpec("h_h64_w48.webp", 64, 48, fmt="webp"),  # lossless WebP; 48/28 -> 56, 64/28 -> 56
]


def make_image_array(spec: ImageSpec, seed: int) -> np.ndarray:
    """Smooth gradients + shapes + noise: enough structure for resampling errors to show."""
    rng = np.random.default_rng(seed)
    h, w = spec.height, spec.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        base = 127.5 + 90 * np.sin(2 * np.pi * (fx * xx / w + fy * yy / h) + ph)
        chans.append(base)
    img = np.stack(chans, axis=-1)
    # a hard-edged rectangle: sharp edges make the cubic kernel's overshoot and clipping matter
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, 12, size=img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if spec.mode == "RGBA":
        alpha = np.clip(np.rint(255 * (xx / max(w - 1, 1))), 0, 255).astype(np.uint8)
        alpha[: h // 4] = 0  # fully transparent band
        alpha[-h // 4 :] = 255  # fully opaque band
        img = np.concatenate([img, alpha[..., None]], axis=-1)
    return img


def write_images() -> list[Path]:
    IMAGES.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, spec in enumerate(IMAGE_SPECS):
        arr = make_image_array(spec, seed=1000 + i)
        im = Image.fromarray(arr, mode=spec.mode)
        path = IMAGES / spec.name
        if spec.fmt == "png":
            im.save(path, format="PNG", optimize=False)
        elif spec.fmt == "jpeg":
            im.save(path, format="JPEG", quality=90, subsampling=0)
        elif spec.fmt == "webp":
            im.save(path, format="WEBP", lossless=True)
        paths.append(path)
    return paths


def load_rgb(path: Path) -> Image.Image:
    """RGB conversion as qwen-vl-utils does it (R1-Onevision's pipeline): RGBA is pasted onto
    white using alpha as the mask; other modes use PIL's convert. (transformers' own
    convert_to_rgb would drop alpha instead; we feed it the already-composited image.)"""
    im = Image.open(path)
    im.load()
    if im.mode == "RGBA":
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.split()[3])
        return bg
    return im.convert("RGB")


# --------------------------------------------------------------------------------------------
# tokenizer and processor files


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    lines = CORPUS.splitlines() * 4
    tok.train_from_iterator(lines, trainer=trainer)
    assert tok.get_vocab_size() == BPE_VOCAB, tok.get_vocab_size()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False) for t in SPECIAL_TOKENS]
    )
    return tok


def write_tokenizer_files(model_dir: Path, tok: Tokenizer) -> dict[str, int]:
    tok.save(str(model_dir / "tokenizer.json"))
    tok.model.save(str(model_dir))  # vocab.json + merges.txt, as in the official repos
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    added = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    save_json(
        model_dir / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": dict(sorted(added.items(), key=lambda kv: int(kv[0]))),
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 2048,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    save_json(model_dir / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    return ids


def preprocessor_config(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> dict:
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": MEAN,
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": STD,
        "max_pixels": max_pixels,
        "merge_size": 2,
        "min_pixels": min_pixels,
        "patch_size": 14,
        "processor_class": "Qwen2_5_VLProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "temporal_patch_size": 2,
    }


def load_processor(model_dir: Path) -> Qwen2_5_VLProcessor:
    # Built by hand (not AutoProcessor) so that the slow, PIL-based image processor is used: its
    # bicubic resize is PIL's, the behaviour the Rust preprocessing reproduces. The video
    # processor is required by the constructor but never used (images only).
    image_processor = Qwen2VLImageProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    video_processor = Qwen2VLVideoProcessor()
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class CkptSpec:
    name: str
    seed: int
    tied: bool
    storage: str  # "float32" | "bfloat16"
    sharded: bool
    layers: int
    rope_theta: float
    vocab_pad: int = 0  # extra embedding rows beyond the tokenizer (Qwen pads its vocab)
    cases: list = field(default_factory=list)


CASES = [
    {"name": "text_only", "prompt": "Hello, how are you?", "images": [], "max_new_tokens": 8},
    {
        "name": "one_image",
        "prompt": "Describe the image.",
        "images": ["../images/a_h56_w84.png"],
        "max_new_tokens": 8,
    },
    {
        "name": "one_image_resized",
        "prompt": "What is shown in the picture?",
        "images": ["../images/b_h70_w100.png"],
        "max_new_tokens": 8,
    },
    {
        "name": "two_images",
        "prompt": "Compare the two pictures.",
        "images": ["../images/c_h84_w56.png", "../images/d_h150_w200.png"],
        "max_new_tokens": 10,
    },
]

CHECKPOINTS = [
    CkptSpec("tiny-tied-f32", seed=11, tied=True, storage="float32", sharded=False, layers=2, rope_theta=100.0),
    CkptSpec(
        "tiny-untied-bf16",
        seed=22,
        tied=False,
        storage="bfloat16",
        sharded=True,
        layers=3,
        rope_theta=10000.0,
        vocab_pad=8,
    ),
]


def model_config(spec: CkptSpec, ids: dict[str, int], vocab: int) -> dict:
    """config.json in the official flat layout (text keys at top level, vision nested)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 2048,
        "max_window_layers": spec.layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": 4,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": spec.rope_theta,
        "sliding_window": 2048,
        "tie_word_embeddings": spec.tied,
        "torch_dtype": spec.storage,
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 4,
            "hidden_act": "silu",
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 56,
            "fullatt_block_indexes": [1, 3],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vocab_size": vocab,
    }


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights with O(1) activations: linear weights ~ N(0, 1/fan_in), biases
    ~ N(0, 0.1^2), norm weights ~ 1 + N(0, 0.1^2), embeddings ~ N(0, 0.3^2). The untied head gets
    a larger gain so logits are peaked (clear greedy argmax) but not one-hot."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=gen)
            elif p.ndim == 1:  # RMSNorm weights
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif "embed_tokens" in name:
                # small enough that the layers, not the residual copy of the input embedding,
                # decide the next token (a tied head otherwise just repeats its input)
                v = 0.3 * torch.randn(p.shape, generator=gen)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                gain = 4.0 if name.startswith("lm_head") else 1.0
                v = gain * torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
            p.copy_(v)


def official_name(name: str) -> str:
    """transformers >= 4.52 module names -> the official checkpoint tensor names."""
    if name.startswith("model.visual."):
        return name[len("model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def write_weights(model: torch.nn.Module, spec: CkptSpec, model_dir: Path) -> None:
    dtype = torch.float32 if spec.storage == "float32" else torch.bfloat16
    tensors = {}
    for name, t in model.state_dict().items():
        if spec.tied and name == "lm_head.weight":
            continue  # tied checkpoints carry no lm_head tensor (as Qwen2.5-VL-3B)
        tensors[official_name(name)] = t.detach().to(dtype).contiguous().clone()
    if not spec.sharded:
        save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    # two shards: vision tower first, then the language model (as the official 7B splits
    # by size; the split point does not matter to a loader that follows the index)
    names = sorted(tensors)
    groups = [[n for n in names if n.startswith("visual.")], [n for n in names if not n.startswith("visual.")]]
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(model_dir / fname), metadata={"format": "pt"})
        for n in group:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    save_json(
        model_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )


def build_checkpoint(spec: CkptSpec, tok: Tokenizer, root: Path) -> Path:
    model_dir = root / "model"
    model_dir.mkdir(parents=True)
    ids = write_tokenizer_files(model_dir, tok)
    vocab = tok.get_vocab_size() + spec.vocab_pad
    cfg = model_config(spec, ids, vocab)
    save_json(model_dir / "config.json", cfg)
    save_json(
        model_dir / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "do_sample": False,
            "transformers_version": "4.41.2",
        },
    )
    save_json(model_dir / "preprocessor_config.json", preprocessor_config())

    config = transformers.AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    randomize_(model, spec.seed)
    if spec.tied:
        model.tie_weights()
    write_weights(model, spec, model_dir)
    return model_dir


def load_reference_model(model_dir: Path) -> Qwen2_5_VLForConditionalGeneration:
    """Load what we wrote through from_pretrained (proves the layout loads) and compute in f32:
    bf16 checkpoints are upcast, so the expected outputs are the f32 math on bf16-rounded
    weights, which a Rust loader that upcasts reproduces to f32 rounding."""
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"checkpoint did not load cleanly: {bad}"
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# per-case expected outputs


def messages_for(case: dict) -> list[dict]:
    content = [{"type": "image"} for _ in case["images"]] + [{"type": "text", "text": case["prompt"]}]
    return [{"role": "user", "content": content}]


def process_case(processor, case: dict, case_root: Path) -> dict:
    text = processor.apply_chat_template(messages_for(case), add_generation_prompt=True, tokenize=False)
    images = [load_rgb((case_root / p).resolve()) for p in case["images"]]
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    return inputs


@torch.no_grad()
def write_case(model, processor, case: dict, case_root: Path) -> None:
    out = case_root / case["name"]
    out.mkdir(parents=True)
    inputs = process_case(processor, case, case_root)
    input_ids = inputs["input_ids"]
    L = input_ids.shape[1]
    save_npy(out / "input_ids.npy", input_ids[0].numpy().astype(np.int64))
    grid = inputs.get("image_grid_thw")
    pixel_values = inputs.get("pixel_values")
    if grid is not None:
        save_npy(out / "pixel_values.npy", pixel_values.numpy().astype(np.float32))
        save_npy(out / "image_grid_thw.npy", grid.numpy().astype(np.int64))
        vision = model.model.visual(pixel_values, grid_thw=grid)
        n_img_tokens = int((input_ids == model.config.image_token_id).sum())
        assert vision.shape[0] == n_img_tokens, (vision.shape, n_img_tokens)
        save_npy(out / "vision_out.npy", vision.float().numpy())
    else:
        save_npy(out / "image_grid_thw.npy", np.zeros((0, 3), dtype=np.int64))

    position_ids, rope_delta = model.model.get_rope_index(
        input_ids, grid, None, None, attention_mask=inputs["attention_mask"]
    )
    save_npy(out / "position_ids.npy", position_ids[:, 0, :].numpy().astype(np.int64))
    save_json(out / "rope_delta.json", {"rope_delta": int(rope_delta.reshape(-1)[0])})

    logits = model(**inputs).logits[0].float()
    assert logits.shape[0] == L
    save_npy(out / "logits.npy", logits.numpy())

    gen = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=case["max_new_tokens"],
        repetition_penalty=1.0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new_tokens = gen.sequences[0, L:].tolist()
    # The smallest top-1/top-2 gap over the decoding steps: greedy parity is only meaningful if
    # it is far above f32 noise (~1e-5 relative), so fail loudly instead of writing a flaky case.
    margins = []
    for step_logits in gen.logits:
        top2 = torch.topk(step_logits[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    assert min(margins) > 1e-3, f"{case['name']}: greedy near-tie {min(margins)}; change the seed"
    save_json(
        out / "greedy.json",
        {
            "prompt_token_ids": input_ids[0].tolist(),
            "token_ids": new_tokens,
            "text": processor.tokenizer.decode(new_tokens, skip_special_tokens=True),
            "text_with_special": processor.tokenizer.decode(new_tokens, skip_special_tokens=False),
            "min_top2_margin": round(min(margins), 6),
        },
    )


def generate_model_fixtures() -> None:
    tok = build_tokenizer()
    for spec in CHECKPOINTS:
        root = FIXTURES / spec.name
        reset_dir(root)
        model_dir = build_checkpoint(spec, tok, root)
        model = load_reference_model(model_dir)
        processor = load_processor(model_dir)
        save_json(root / "cases.json", CASES)
        for case in CASES:
            write_case(model, processor, case, root)
        print(f"wrote {root.relative_to(HERE)}")


# --------------------------------------------------------------------------------------------
# preprocess-only fixtures (image processor on its own, every image)


def generate_preprocess_fixtures() -> None:
    root = FIXTURES / "preprocess"
    reset_dir(root)
    cfg = preprocessor_config()
    save_json(root / "preprocessor_config.json", cfg)
    proc = Qwen2VLImageProcessor(**{k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")})
    cases = []
    for spec in IMAGE_SPECS:
        stem = spec.name.rsplit(".", 1)[0]
        rgb = load_rgb(IMAGES / spec.name)
        out = proc(images=[rgb], return_tensors="np")
        (gt, gh, gw) = [int(x) for x in out["image_grid_thw"][0]]
        save_npy(root / stem / "pixel_values.npy", out["pixel_values"].astype(np.float32))
        save_npy(root / stem / "image_grid_thw.npy", out["image_grid_thw"].astype(np.int64))
        # the decoded RGB bytes before resizing: lets a test separate decoder from resampler
        save_npy(root / stem / "decoded_rgb.npy", np.asarray(rgb, dtype=np.uint8))
        cases.append(
            {
                "name": stem,
                "image": f"../images/{spec.name}",
                "format": spec.fmt,
                "mode": spec.mode,
                "height": spec.height,
                "width": spec.width,
                "resized_height": gh * 14,
                "resized_width": gw * 14,
                "image_grid_thw": [gt, gh, gw],
                "num_image_tokens": gt * gh * gw // 4,
            }
        )
    save_json(root / "cases.json", cases)
    print(f"wrote {root.relative_to(HERE)}")


# --------------------------------------------------------------------------------------------
# gradient fixtures (for the training engine): SFT loss, per-token log-probs, parameter grads

GRAD_CASES = [
    {"name": "grad_text_only", "prompt": "Solve for x: 3x + 5 = 20.", "images": [],
     "answer": "<think> 3x = 15 </think> <answer> 5 </answer>"},
    {"name": "grad_two_images", "prompt": "Compare the two pictures.",
     "images": ["../images/a_h56_w84.png", "../images/e_h20_w30.png"],
     "answer": "The answer is B."},
]


def write_grad_case(model, processor, case: dict, root: Path) -> None:
    """Prompt (chat template, generation prompt) + answer + <|im_end|>, labels -100 on the
    prompt: the SFT objective. transformers' loss shifts labels by one and averages the
    cross-entropy (fp32 logits) over non-ignored tokens."""
    out = root / case["name"]
    out.mkdir(parents=True)
    inputs = process_case(processor, case, root)
    prompt_ids = inputs["input_ids"][0]
    answer_ids = processor.tokenizer(case["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt_ids, torch.tensor(answer_ids, dtype=torch.long)])[None]
    labels = ids.clone()
    labels[0, : prompt_ids.shape[0]] = -100
    fwd = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "pixel_values" in inputs:
        fwd["pixel_values"] = inputs["pixel_values"]
        fwd["image_grid_thw"] = inputs["image_grid_thw"]
        save_npy(out / "pixel_values.npy", inputs["pixel_values"].numpy().astype(np.float32))
        save_npy(out / "image_grid_thw.npy", inputs["image_grid_thw"].numpy().astype(np.int64))
    else:
        save_npy(out / "image_grid_thw.npy", np.zeros((0, 3), dtype=np.int64))
    save_npy(out / "input_ids.npy", ids[0].numpy().astype(np.int64))
    save_npy(out / "labels.npy", labels[0].numpy().astype(np.int64))

    model.zero_grad(set_to_none=True)
    res = model(**fwd, labels=labels)
    res.loss.backward()
    logp = torch.log_softmax(res.logits[0].float(), dim=-1)
    token_logprobs = logp[:-1].gather(1, ids[0, 1:, None])[:, 0]
    save_npy(out / "token_logprobs.npy", token_logprobs.detach().numpy().astype(np.float32))
    n_label = int((labels[0, 1:] != -100).sum())
    save_json(out / "loss.json", {"loss": float(res.loss.detach()), "num_label_tokens": n_label})
    grads = {}
    # Tied lm_head is the embedding (listed once, both uses accumulated). Parameters outside
    # the graph (the vision tower in a text-only case) have no gradient and are left out.
    for name, p in model.named_parameters():
        if p.grad is not None:
            grads[official_name(name)] = p.grad.detach().float().contiguous().clone()
    save_file(dict(sorted(grads.items())), str(out / "grads.safetensors"), metadata={"format": "pt"})


def generate_grad_fixtures() -> None:
    for spec in CHECKPOINTS:
        root = FIXTURES / spec.name
        model_dir = root / "model"
        assert model_dir.exists(), f"{model_dir} missing: generate the model fixtures first"
        for old in [d for d in root.glob("grad_*") if d.is_dir()]:
            shutil.rmtree(old)
        model = load_reference_model(model_dir)
        processor = load_processor(model_dir)
        save_json(root / "grad_cases.json", GRAD_CASES)
        with torch.enable_grad():
            for case in GRAD_CASES:
                write_grad_case(model, processor, case, root)
        print(f"wrote {root.relative_to(HERE)}/grad_*")


# --------------------------------------------------------------------------------------------
# GRPO gradient fixtures: a batch of prompt groups with completions and rewards, one policy
# iteration (old policy = current, ratio 1 but gradient A·ratio), k3 KL to a reference model.

GRPO_ROWS = [
    {"group": "g0", "prompt": "What color is the large shape?", "images": ["../../images/a_h56_w84.png"],
     "completion": "<think> the shape is red </think> <answer> red </answer>", "reward": 1.0},
    {"group": "g0", "prompt": "What color is the large shape?", "images": ["../../images/a_h56_w84.png"],
     "completion": "<answer> blue </answer>", "reward": 0.0},
    {"group": "g0", "prompt": "What color is the large shape?", "images": ["../../images/a_h56_w84.png"],
     "completion": "I think it is red.", "reward": 0.5},
    {"group": "g1", "prompt": "Solve for x: 3x + 5 = 20.", "images": [],
     "completion": "<think> 3x = 15 </think> <answer> 5 </answer>", "reward": 2.0},
    {"group": "g1", "prompt": "Solve for x: 3x + 5 = 20.", "images": [],
     "completion": "<answer> 6 </answer>", "reward": 0.0},
]
GRPO_VARIANTS = [  # (name, beta, clip_eps): β = 0 skips the reference model entirely
    ("kl", 0.04, 0.2),
    ("nokl", 0.0, 0.2),
]


def perturbed_reference(model_dir: Path, spec: CkptSpec, out_dir: Path) -> Path:
    """The KL reference: the same checkpoint with every weight moved by ~5% of its scale, so
    log π_ref differs from log π_θ and the k3 term has a non-zero gradient."""
    ref_dir = out_dir / "ref_model"
    ref_dir.mkdir(parents=True)
    shutil.copy(model_dir / "config.json", ref_dir / "config.json")
    model = load_reference_model(model_dir)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    if spec.tied:
        model.tie_weights()
    write_weights(model, dataclasses.replace(spec, sharded=False), ref_dir)
    return ref_dir


def grpo_token_logprobs(model, processor, row: dict, root: Path):
    """(log π of each completion token, number of tokens): prompt via the chat template with the
    generation prompt, completion = tokenize(completion) + <|im_end|>, all scored."""
    case = {"prompt": row["prompt"], "images": row["images"]}
    inputs = process_case(processor, case, root)
    prompt_ids = inputs["input_ids"][0]
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    comp = processor.tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [im_end]
    ids = torch.cat([prompt_ids, torch.tensor(comp, dtype=torch.long)])[None]
    fwd = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "pixel_values" in inputs:
        fwd["pixel_values"] = inputs["pixel_values"]
        fwd["image_grid_thw"] = inputs["image_grid_thw"]
    logits = model(**fwd).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    p = prompt_ids.shape[0]
    targets = ids[0, p:]
    return logp[p - 1 : -1].gather(1, targets[:, None])[:, 0], len(comp)


def grpo_advantages(rows: list[dict]) -> list[float]:
    """(r − mean_g) / (std_g + 1e-4), sample std (n − 1)."""
    out = []
    for row in rows:
        rs = torch.tensor([r["reward"] for r in rows if r["group"] == row["group"]], dtype=torch.float64)
        out.append(float((row["reward"] - rs.mean()) / (rs.std(unbiased=True) + 1e-4)))
    return out


def generate_grpo_fixtures() -> None:
    for spec in CHECKPOINTS:
        root = FIXTURES / spec.name
        model_dir = root / "model"
        assert model_dir.exists(), f"{model_dir} missing: generate the model fixtures first"
        out = root / "grpo"
        reset_dir(out)
        ref_dir = perturbed_reference(model_dir, spec, out)
        with open(out / "rows.jsonl", "w") as f:
            for row in GRPO_ROWS:
                content = "<image>" * len(row["images"]) + row["prompt"]
                f.write(json.dumps({"group": row["group"], "messages": [{"role": "user", "content": content}],
                                    "images": row["images"], "completion": row["completion"],
                                    "reward": row["reward"]}) + "\n")
        model = load_reference_model(model_dir)
        ref = load_reference_model(ref_dir)
        processor = load_processor(model_dir)
        adv = grpo_advantages(GRPO_ROWS)
        results = {}
        for name, beta, eps in GRPO_VARIANTS:
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                per_seq, total_tokens = [], 0
                for row, a in zip(GRPO_ROWS, adv):
                    logp, n = grpo_token_logprobs(model, processor, row, out)
                    total_tokens += n
                    ratio = torch.exp(logp - logp.detach())
                    tok = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
                    if beta > 0:
                        with torch.no_grad():
                            ref_logp, _ = grpo_token_logprobs(ref, processor, row, out)
                        d = ref_logp - logp
                        tok = tok + beta * (torch.exp(d) - d - 1)
                    per_seq.append(tok.mean())  # seq-mean-token-mean
                loss = torch.stack(per_seq).mean()
                loss.backward()
            grads = {official_name(n): p.grad.detach().float().contiguous().clone()
                     for n, p in model.named_parameters() if p.grad is not None}
            save_file(dict(sorted(grads.items())), str(out / f"grads_{name}.safetensors"), metadata={"format": "pt"})
            results[name] = {"beta": beta, "clip_eps": eps, "loss": float(loss.detach()), "tokens": total_tokens}
        save_json(out / "expected.json", {"advantages": adv, "variants": results})
        print(f"wrote {out.relative_to(HERE)}")


# --------------------------------------------------------------------------------------------
# AdamW fixture: three SFT steps with torch.optim.AdamW (norms and biases without weight decay)

ADAMW = {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "steps": 3}


def generate_adamw_fixtures() -> None:
    spec = CHECKPOINTS[0]
    root = FIXTURES / spec.name
    out = root / "adamw"
    reset_dir(out)
    model = load_reference_model(root / "model")
    processor = load_processor(root / "model")
    case = GRAD_CASES[0]
    inputs = process_case(processor, case, root)
    prompt_ids = inputs["input_ids"][0]
    answer_ids = processor.tokenizer(case["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt_ids, torch.tensor(answer_ids, dtype=torch.long)])[None]
    labels = ids.clone()
    labels[0, : prompt_ids.shape[0]] = -100
    # The same convention as onevision's GroupSpec::no_decay_norms_and_biases.
    no_decay = lambda n: n.endswith(".bias") or "norm" in n.lower() or ".ln_" in ("." + n)
    named = [(official_name(n), p) for n, p in model.named_parameters()]
    groups = [
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": ADAMW["weight_decay"]},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"])
    losses = []
    with torch.enable_grad():
        for _ in range(ADAMW["steps"]):
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
            loss.backward()
            losses.append(float(loss.detach()))
            opt.step()
    params = {n: p.detach().float().contiguous().clone() for n, p in named}
    save_file(dict(sorted(params.items())), str(out / "params_after.safetensors"), metadata={"format": "pt"})
    save_json(out / "expected.json", {**ADAMW, "case": case["name"], "losses_before_each_step": losses})
    print(f"wrote {out.relative_to(HERE)}")


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["images", "model", "preprocess", "grad", "grpo", "adamw"], action="append")
    args = ap.parse_args()
    only = set(args.only or ["images", "model", "preprocess", "grad", "grpo", "adamw"])
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    write_images()  # always: the other kinds read them
    if "model" in only:
        generate_model_fixtures()
    if "preprocess" in only:
        generate_preprocess_fixtures()
    if "grad" in only:
        generate_grad_fixtures()
    if "grpo" in only:
        generate_grpo_fixtures()
    if "adamw" in only:
        generate_adamw_fixtures()


if __name__ == "__main__":
    main()
