"""Tiny, deterministic reference models of our three base-model families, built with no hub.

Each tiny model is the real preset's config.json with only sizes shrunk: patch sizes, merge
size, window size, tokens_per_second, rope type, mrope sections (scaled to the tiny head),
layer-type pattern, DeepStack / full-attention block pattern and the processor configs are the
real ones, so the tiny model sees and positions video tokens exactly like the real one. The
tokenizer is a small byte-level BPE trained here with the real pre-tokenizer and the real
added/special tokens (at new ids, after the small vocab). Parity tests of the torch-free
runtime run against these; building one takes a few seconds on CPU.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from itertools import product
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoConfig

from edgejudge.export.presets import (
    PRESETS,
    config_from_dict,
    deep_merge,
    model_class,
    preset_config_dict,
    preset_dir,
    set_dtype,
)

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")
FAMILY_PRESET = {preset.family: name for name, preset in PRESETS.items()}

# Bump when the bytes a build writes change, so tiny_model_dir() never reuses a stale cache.
FIXTURE_VERSION = 1

BPE_VOCAB_SIZE = 1536  # target; the corpus decides the final count (bytes + merges)
VOCAB_MULTIPLE = 128  # the real embeddings are padded past the tokenizer too (151669 -> 151936)

# The real tokenizers' pre-tokenizer split (Qwen2/Qwen3 tokenizer.json; Qwen3.5 adds \p{M} to
# letter runs). Facts copied from the shipped tokenizer.json files.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN3_5_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Size overrides merged into each preset's config.json. Everything not listed keeps the real
# value. mrope sections are the real ones scaled to the tiny rotary width (they must sum to
# rotary_dim / 2): Qwen2.5-VL [16,24,24]/8 over head_dim 16; Qwen3-VL [24,20,20]/4 over
# head_dim 32; Qwen3.5 [11,11,10] ~/4 over head_dim 64 * partial_rotary_factor 0.25.
_TINY_VISION = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64}
_TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen2_5_vl": {
        **_TINY_TEXT,
        "num_hidden_layers": 2,
        "rope_scaling": {"mrope_section": [2, 3, 3]},
        # real: full attention every 8th block, ending on the last
        "vision_config": {**_TINY_VISION, "fullatt_block_indexes": [1, 3]},
    },
    "qwen3_vl": {
        "text_config": {**_TINY_TEXT, "num_hidden_layers": 4, "head_dim": 32, "rope_scaling": {"mrope_section": [6, 5, 5]}},
        # real DeepStack taps [5, 11, 17] of 24: 3 taps, not the last
        "vision_config": {**_TINY_VISION, "deepstack_visual_indexes": [0, 1, 2]},
    },
    "qwen3_5": {
        "text_config": {
            **_TINY_TEXT,
            "num_hidden_layers": 4,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"],
            "head_dim": 64,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "rope_parameters": {"mrope_section": [3, 3, 2]},
        },
        "vision_config": _TINY_VISION,
    },
}

# LoRA targets mirroring the seed judges: the language tower's linears only (the vision blocks
# have gate/up/down_proj too, hence an anchored regex, which PEFT full-matches against module
# names); Qwen3.5 adds the Gated-DeltaNet projections and the vision merger.
_TEXT_LINEARS = r".*\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
LORA_TARGETS: dict[str, str] = {
    "qwen2_5_vl": _TEXT_LINEARS,
    "qwen3_vl": _TEXT_LINEARS,
    "qwen3_5": (
        r".*\.language_model\.layers\.\d+\."
        r"(self_attn\.(q|k|v|o)_proj|linear_attn\.(in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|out_proj)"
        r"|mlp\.(gate|up|down)_proj)"
        r"|.*\.visual\.merger\.linear_fc(1|2)"
    ),
}
LORA_RANK = {"qwen2_5_vl": 8, "qwen3_vl": 8, "qwen3_5": 32}  # qwen3_5 mirrors the r32 seed judge
LORA_ALPHA = 16


# --- tokenizer ---------------------------------------------------------------------------------

_VERBS = ["Place", "Put", "Move", "Pick up", "Push", "Open", "Close", "Stack", "Pour", "Turn"]
_COLORS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
_OBJECTS = ["block", "cube", "cup", "mug", "bowl", "apple", "banana", "bottle", "can", "sponge", "drawer", "door"]
_PLACES = ["in the box", "on the plate", "into the sink", "on the table", "next to the bowl", "on the shelf"]
_AXES = [
    "gravity", "inertia", "momentum", "friction", "collision", "support", "buoyancy", "elasticity",
    "rigidity", "continuity", "permanence", "penetration", "trajectory", "velocity", "acceleration",
    "deformation", "fluid", "contact", "stability", "balance",
]
_JUDGE_TEXT = """\
You are a helpful assistant.
You are a judge of robot manipulation videos. Watch the video and decide whether the task was
completed. Question: Did the robot complete the task? Answer with complete or not complete.
Task: {task}. Is the task complete? Answer: complete. Answer: not complete.
<answer>complete</answer> <answer>not complete</answer> <answer>yes</answer> <answer>no</answer>
Rate the physical realism of the generated video on each axis from 1 to 5, where 1 means the
video strongly violates the law and 5 means it is fully consistent with real physics.
Respond in JSON: {{"gravity": 4, "inertia": 3, "momentum": 5, "friction": 2, "score": 1}}
The object falls, slides, rolls, bounces, breaks, floats, sinks, stops and rests on the surface.
First think step by step about what happens in each frame, then give the final answer.
The gripper grasps the object, lifts it, carries it over and releases it; the arm returns.
"""
# More plain English that judge prompts and rationales use, so the BPE learns whole words.
_WORDS = """about above across action actually after again against almost along already also although always
among amount angle another answer anything appear appears approach area around arrive attempt
background backward because become before begin behind being below beneath beside between beyond
bottom bounce brief camera cannot careful carefully carry cause center certain change clear clearly
close closed closer color consistent container contains continue correct correctly counter cover
criteria cutting decide describe description detail different direction distance does doing done
down during each earlier edge effect either empty end enough entire environment error evaluate even
event every evidence exactly example expected explain explanation failed failure fall falling final
finally finger first fixed floor follow following force forward frame frames from front full fully
gently given goal good grasp ground hand handle happen happens hard height held high hold holding
however human image impossible incorrect initial inside instead instruction interaction into itself
just keep kitchen known large last later left length less level lift light likely liquid look
looks lower made main maintain manipulation mass material maybe middle might moment motion
motions moving near nearly never object objects observe obvious often only onto opposite other
outside over overall part partially pass path perform physical physics pick placed placement plausible
point position possible pressure probably properly pull quality quickly rather reach real reason
reasoning reference relative remain remains result right robot robots rotate rotation same scene second
seconds sequence several shape should show shown shows side simulation since single size slightly
slow slowly small smooth solid some something speed start state still straight strong success
successful successfully surface task tasks than that their them then there these they thing this
those through throughout time together toward towards under unless until upon upward used using
verify vertical very view visible wall water weight well were what when where whether which while
whole will with within without world would wrong
"""


def _corpus() -> list[str]:
    """Judge-prompt-like English, deterministic, a few thousand lines."""
    lines = [_JUDGE_TEXT.format(task=f"{v} the {c} {o} {p}") for v, c, o, p in
             product(_VERBS, _COLORS, _OBJECTS[:3], _PLACES[:2])]
    lines += [f"{v} the {c} {o} {p}." for v, c, o, p in product(_VERBS, _COLORS, _OBJECTS, _PLACES)]
    lines += [json.dumps({a: (i + j) % 5 + 1 for j, a in enumerate(_AXES)}) for i in range(5)]
    lines += [f"{a.capitalize()}: {n}/5. {a} score {n}" for a in _AXES for n in range(1, 6)]
    lines += [f"Frame {i}: {t:.1f} seconds <{t:.1f} seconds>" for i, t in enumerate(x / 2 for x in range(64))]
    lines += [" ".join(_WORDS.split()[i::7]) for i in range(7)] * 2
    lines += [w.capitalize() + "." for w in _WORDS.split()]
    lines.append("".join(chr(c) for c in range(32, 127)))  # every printable ASCII char
    return lines


def _added_tokens(family: str) -> list[tuple[int, str, bool]]:
    """(real id, content, special) of every added token, from the preset's tokenizer_config.json
    (whose added_tokens_decoder lists the same tokens as the real tokenizer.json)."""
    cfg = json.loads((preset_dir(FAMILY_PRESET[family]) / "tokenizer_config.json").read_text())
    decoder = cfg["added_tokens_decoder"]
    return sorted((int(i), t["content"], t["special"]) for i, t in decoder.items())


def build_tokenizer_json(family: str) -> dict[str, Any]:
    """The tiny tokenizer.json as a dict: BPE trained on _corpus(), real pre-tokenizer, real
    added tokens appended after the BPE vocab in the real order (as in the real files)."""
    regex = QWEN3_5_SPLIT_REGEX if family == "qwen3_5" else QWEN2_SPLIT_REGEX
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    added = [
        {
            "id": len(vocab) + i,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for i, (_, content, special) in enumerate(_added_tokens(family))
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": model["merges"],
        },
    }


# --- model dir ---------------------------------------------------------------------------------


def _remap_token_ids(cfg: Any, id_map: dict[int, int]) -> Any:
    """Rewrite every *_token_id(s) value from real ids to tiny ids (recursing into sub-configs)."""
    if isinstance(cfg, list):
        return [_remap_token_ids(v, id_map) for v in cfg]
    if not isinstance(cfg, dict):
        return cfg
    out = {}
    for key, value in cfg.items():
        if key.endswith(("token_id", "token_ids")) and value is not None:
            ids = value if isinstance(value, list) else [value]
            missing = [i for i in ids if i not in id_map]
            if missing:
                raise ValueError(f"{key}={value}: no added token has real id {missing}")
            value = [id_map[i] for i in ids] if isinstance(value, list) else id_map[value]
        out[key] = _remap_token_ids(value, id_map)
    return out


def _check_rope(family: str, config: dict[str, Any]) -> None:
    """mrope sections must tile the rotary half-width exactly, or positions silently shift."""
    text = config.get("text_config", config)
    rope = text.get("rope_parameters") or text.get("rope_scaling")
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    if sum(rope["mrope_section"]) * 2 != rotary_dim:
        raise ValueError(f"{family}: mrope_section {rope['mrope_section']} does not tile rotary dim {rotary_dim}")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def build_tiny_model(family: str, out_dir: Path, seed: int = 0, sizes: dict[str, Any] | None = None) -> Path:
    """Write a complete tiny HF model dir for `family` into `out_dir` and return it.

    Loads offline with AutoProcessor / AutoModelForImageTextToText. Deterministic: the same
    family and seed give byte-identical files. `sizes` overrides TINY_OVERRIDES (same layout),
    for a larger small model such as the trained demo judge.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = preset_dir(FAMILY_PRESET[family])

    tokenizer = build_tokenizer_json(family)
    _write_json(out / "tokenizer.json", tokenizer)
    real_ids = {content: real_id for real_id, content, _ in _added_tokens(family)}
    tiny_ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    id_map = {real_ids[c]: tiny_ids[c] for c in real_ids}

    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg["added_tokens_decoder"] = {
        str(id_map[int(i)]): entry for i, entry in tok_cfg["added_tokens_decoder"].items()
    }
    _write_json(out / "tokenizer_config.json", tok_cfg)

    n_tokens = len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"])
    vocab = {"vocab_size": -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE}
    nested = "text_config" in TINY_OVERRIDES[family]  # Qwen2.5-VL's config.json is flat
    overrides = deep_merge(deep_merge(TINY_OVERRIDES[family], sizes), {"text_config": vocab} if nested else vocab)
    config = set_dtype(preset_config_dict(FAMILY_PRESET[family], overrides), torch.float32)
    config = _remap_token_ids(config, id_map)
    _check_rope(family, config)

    hf_config = config_from_dict(config)
    torch.manual_seed(seed)
    model = model_class(hf_config)._from_config(hf_config, dtype=torch.float32)
    model.save_pretrained(out)
    # save_pretrained renders transformers' own config layout; keep the real checkpoint's.
    _write_json(out / "config.json", config)

    if (src / "generation_config.json").is_file():
        generation = json.loads((src / "generation_config.json").read_text())
    else:  # the Qwen3.5 preset ships none: stop on <|im_end|> or <|endoftext|> like its siblings
        generation = {"eos_token_id": [real_ids["<|im_end|>"], real_ids["<|endoftext|>"]],
                      "pad_token_id": real_ids["<|endoftext|>"]}
    _write_json(out / "generation_config.json", _remap_token_ids(generation, id_map))

    for fname in ("preprocessor_config.json", "video_preprocessor_config.json",
                  "chat_template.json", "chat_template.jinja"):
        if (src / fname).is_file():
            shutil.copyfile(src / fname, out / fname)
    return out


def build_tiny_adapter(model_dir: Path, out_dir: Path, seed: int = 1, use_rslora: bool = False) -> Path:
    """Write a PEFT LoRA adapter for the tiny model in `model_dir`, targeting what the seed
    judges target, with random (seeded, non-zero) lora_B so the adapter really moves the logits."""
    model_dir = Path(model_dir)
    family = json.loads((model_dir / "config.json").read_text())["model_type"]
    if family not in FAMILIES:
        raise ValueError(f"{model_dir} holds a {family!r} model, not one of {FAMILIES}")
    base = model_class(AutoConfig.from_pretrained(model_dir)).from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=LORA_RANK[family],
        lora_alpha=LORA_ALPHA,
        target_modules=LORA_TARGETS[family],
        lora_dropout=0.0,
        use_rslora=use_rslora,
        base_model_name_or_path=str(model_dir),
    )
    torch.manual_seed(seed)  # lora_A's kaiming init draws from the global generator
    peft_model = get_peft_model(base, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():  # module order: deterministic
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    out = Path(out_dir)
    peft_model.save_pretrained(out)
    return out


def sharpened(module: torch.nn.Module, seed: int = 1, matrices: bool = True) -> torch.nn.Module:
    """A copy of `module` with random biases and norm weights, and with `matrices` O(1)-scale
    random weights too (unit-variance activations). The tiny checkpoints keep HF's init (std 0.02,
    unit norms, zero biases), on which attention is nearly uniform and every bias path computes
    with zeros."""
    sharp = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sharp.named_parameters():
            if p.ndim >= 2:
                if not matrices:
                    continue
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:  # norm weights
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.1)
    return sharp.eval()


def tiny_model_dir(family: str) -> Path:
    """The tiny model of `family`, built once into the cache and reused after.

    Cache root: $EDGEJUDGE_CACHE, else ~/.cache/edgejudge; the model lives in
    <root>/tiny/<family>-v<FIXTURE_VERSION>. Built in a temp dir and renamed into place, so
    concurrent callers never see a half-written model.
    """
    root = Path(os.environ.get("EDGEJUDGE_CACHE") or Path.home() / ".cache" / "edgejudge")
    final = root / "tiny" / f"{family}-v{FIXTURE_VERSION}"
    if (final / "model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=final.parent))
    try:
        build_tiny_model(family, tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process won the race; its build is identical
            if not (final / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_demo_clip(path: Path, num_frames: int = 32, height: int = 224, width: int = 224, fps: float = 8.0) -> Path:
    """A short synthetic robot-style clip (a red block sliding into a box), for demos and smoke
    runs of the commands that read videos; its content means nothing to a random model."""
    import cv2
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    box = (int(width * 0.6), int(height * 0.55), int(width * 0.9), int(height * 0.85))
    for i in range(num_frames):
        frame = np.full((height, width, 3), 200, np.uint8)
        cv2.rectangle(frame, box[:2], box[2:], (60, 60, 60), 3)
        x = int(width * 0.1 + (box[0] + 10 - width * 0.1) * i / max(num_frames - 1, 1))
        y = int(height * 0.6)
        cv2.rectangle(frame, (x, y), (x + width // 10, y + height // 10), (0, 0, 220), -1)  # BGR red
        writer.write(frame)
    writer.release()
    return path
