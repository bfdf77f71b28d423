"""`edgejudge bench`: the seed judges' workloads timed stage by stage, on edgejudge and on the seeds'
own HF recipe in the same run, so that a precision and a GPU can be picked from one report.

- Workloads are data (`WORKLOADS`): the model, the clip, the prompt fields, the answer. The bench
  prompts are ours (the seeds' own prompts ship with their models); the clips are synthetic.
- Configurations are a workload on one setup (`SETUPS`): an edgejudge artifact (ONNX fp16 / int4 on
  ONNX Runtime, bnb nf4 on the torch backend) or an HF baseline. The baseline is the seed recipe:
  HF's processor per prompt, SDPA, the LoRA adapter unmerged through PEFT; candidate labels each by
  its own full forward per view, text answers by one `generate` per question.
- Each configuration runs in its own process (spawned), so its memory is measured alone. One
  process first plans every configuration (model shapes on the meta device, token counts, memory
  estimates) and builds the artifacts that are missing from `--cache`; configurations over
  `--gpu-mem-gb` are refused there, before anything is built or loaded.
- Peak memory is device-side and the same for both backends: NVML's used memory of the GPU
  (libnvidia-ml through ctypes), polled every 2 ms by this process while the configuration's
  process lives, minus the reading just before it started. It includes the CUDA context and what
  ONNX Runtime's arena and torch's caching allocator hold. On the CPU: the process's peak RSS.
- Timings: `warmup` runs, then p50 / p95 over `runs`, of the whole request and of each stage. The
  vision cache is cleared before each run (every group is encoded). In torch processes, vision is
  timed by hooks on the vision tower (a device sync on each side) and taken out of prefill.
- W4 drives `Judge.compare` with scripted replies (random weights never call the frame tool) and
  EOS off, so each of its three replies decodes 256 tokens; its HF baseline, the seed approach of
  re-running the whole conversation every turn, is benchmarks/vrthinker.py's.

FLOPs (`workload_flops`) are the workload's, the same number for every configuration, so effective
TFLOP/s compare: 2 x parameters x tokens for each part where its tokens pass (vision blocks per
patch, the patch merger per merged token, the decoder per prompt, label, forced-prefix and decoded
token, the LM head only where logits are read), plus attention: 4 x heads x head_dim x (keys each
query sees) per full-attention layer (causal in the decoder; per 2-frame group, or per 64-patch
window for Qwen2.5-VL's windowed layers, in the vision tower), and 6 x heads x key_dim x value_dim
per token for each Gated-DeltaNet layer's state update; a comparison's turns count what each one
prefilled on top of its cache and decoded. Parameter counts come from the model class built on the
meta device. The FLOP floor is FLOPs / a measured fp16 matmul rate; the decode floor
is the bytes one decode step must read (decoder and LM head weights at the setup's precision, and
the KV cache) / a measured device copy bandwidth.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgejudge.errors import InputError
from edgejudge.specs import JudgeSpec, compose_prompt, get_spec

GIB = 1 << 30
CUDA_CONTEXT_BYTES = GIB // 2  # what a CUDA context and its libraries' workspaces take, roughly
STAGES = ("decode_video", "preprocess", "vision", "prefill", "scoring", "distribution", "decode")

# -- workloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Video:
    frames: int  # frames in the source (a file is decoded whole; the spec's policy samples)
    height: int
    width: int
    fps: float


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    preset: str  # the full-size model, with random weights
    spec: JudgeSpec  # frame policy, answer mode and token budget of the seed judge; the text is ours
    questions: tuple[dict[str, str], ...]  # the spec's fields: one decision, or one question per axis
    video: Video
    tiny_video: Video  # on the tiny models: the same frames (so the same sampling), smaller, for CI on a CPU
    from_file: bool = False  # offline clips are decoded from mp4; W1's frames come from the robot
    system: str | None = None
    lora_rank: int | None = None
    max_pixels: int | None = None  # the recipe's per-frame pixel cap, when it sets its own
    baselines: tuple[str, ...] = ("hf",)
    targets: dict[str, float] = field(default_factory=dict)  # p50_ms, vs_hf, decode_tokens_per_s

    @property
    def family(self) -> str:
        return self.spec.families[0]

    @property
    def views(self) -> tuple[str, ...]:
        return self.spec.views or (("first", "second") if self.spec.answer == "pairwise_tags" else ("video",))


RUBRIC_SYSTEM = ("You judge the physical realism of generated videos. Watch the whole clip, then rate one "
                 "physical law at a time from 1 (clearly violated) to 5 (fully consistent with the real world). "
                 "Reply with one JSON object and nothing else.")
RUBRIC = JudgeSpec(
    name="bench-rubric", families=("qwen3_5",), sample="fps:2", answer="json_score", fields=("caption", "axis"),
    user_text=('Caption: {caption}\nAxis: {axis}\nHow well does the video obey {axis}? '
               'Answer in JSON: {{"{axis}": N}} with N from 1 to 5.'),
    max_new_tokens=8, score_prefix='{{"{axis}": ',
)
AXES = ("gravity", "inertia", "momentum", "friction", "collision", "support", "buoyancy", "elasticity",
        "rigidity", "continuity", "object permanence", "penetration", "trajectory", "velocity", "acceleration",
        "deformation")
PLAUSIBILITY = JudgeSpec(
    name="bench-plausibility", families=("qwen2_5_vl",), sample="fps:16", answer="answer_tag", fields=("caption",),
    user_text=("Caption: {caption}\nIs this video physically plausible? Rate it from 1 (implausible) to 5 "
               "(plausible) and give the score as <answer>N</answer>."),
    max_new_tokens=8, score_prefix="<answer>",
)
# VR-Thinker's loop with our own system prompt; three replies of 256 tokens: two frame calls, an answer.
PAIRWISE = JudgeSpec(
    name="bench-pairwise", families=("qwen2_5_vl",), sample="virtual:128", answer="pairwise_tags", fields=("caption",),
    user_text="{caption}", max_new_tokens=256, images=True,
    extra={"initial_frames": 4, "image_size": 448, "max_turns": 3, "max_picks": 12},
)
PAIRWISE_SYSTEM = ("You compare two videos generated for one prompt. Reason inside <think></think>. To see more "
                   'frames, call <tool_call>{"name": "select_frames", "arguments": {"target_frames": [indices]}}'
                   "</tool_call>. Finish with <Answer>TA=x, VQ=x, MQ=x, OA=x</Answer>, x being 1, 2 or 0 (a tie).")
PAIRWISE_PICKS = ([16, 48, 80, 112], [8, 40, 72, 104])  # the two scripted frame calls: 4 pairs each
CAPTION = "A red ball rolls off a wooden table, falls to the floor and bounces twice before it stops."
# Cosmos' recipe caps a clip at 8192 merged tokens (x 28 x 28 pixels) in total; qwen-vl-utils gives
# each frame its share, two frames per temporal patch: 80 frames of 360x640 become 280x532.
COSMOS_FRAME_PIXELS = 8192 * 28 * 28 * 2 // 80

WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("W1", "RoboCasa completion check: 2 views x 64 frames 224x224, two labels", "qwen3-vl-4b-instruct",
             get_spec("robocasa-completion"), ({"instruction": "Place the red block in the box."},),
             Video(64, 224, 224, 12.8), Video(64, 64, 64, 12.8), lora_rank=8, baselines=("hf", "hf-nf4"),
             targets={"p50_ms": 70, "vs_hf": 10}),
    Workload("W2", "PhyGround rubric: 5 s 360x640 at fps 2, 16 axes, 8-token answers", "qwen3.5-9b",
             RUBRIC, tuple({"caption": CAPTION, "axis": axis} for axis in AXES),
             Video(120, 360, 640, 24.0), Video(120, 90, 160, 24.0), from_file=True, system=RUBRIC_SYSTEM,
             lora_rank=32, targets={"p50_ms": 500}),
    Workload("W3", "Cosmos plausibility: 5 s 360x640 at fps 16 under the recipe's pixel budget, score 1-5",
             "qwen2.5-vl-7b-instruct", PLAUSIBILITY, ({"caption": CAPTION},),
             Video(120, 360, 640, 24.0), Video(120, 90, 160, 24.0), from_file=True,
             system="You are a careful judge of whether videos could happen in the real world.",
             max_pixels=COSMOS_FRAME_PIXELS, targets={"p50_ms": 300}),
    Workload("W4", "VR-Thinker pairwise: 8 frames 448x448, two tool turns of 4 frame pairs, 256 tokens a turn",
             "qwen2.5-vl-7b-instruct", PAIRWISE, ({"caption": CAPTION},),
             Video(120, 360, 640, 24.0), Video(120, 90, 160, 24.0), from_file=True, system=PAIRWISE_SYSTEM,
             targets={"decode_tokens_per_s": 150}),
)}


@dataclass(frozen=True)
class Setup:
    """How a configuration runs: edgejudge on one artifact format, or an HF baseline."""

    name: str
    label: str
    backend: str  # onnx (ONNX Runtime) | torch (edgejudge's torch backend, bnb artifact) | hf (the seed recipe)
    export: str = ""  # the artifact's precision (onnx, bnb), or the baseline's quantization
    weight_bits: float | None = None  # a quantized decoder linear weight's bits, scales included (None: float)


NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, an 8-bit absmax per 64, an fp32 scale per 256 absmax
SETUPS: dict[str, Setup] = {s.name: s for s in (
    Setup("fp32", "edgejudge ONNX fp32", "onnx", "fp32"),
    Setup("fp16", "edgejudge ONNX fp16", "onnx", "fp16"),
    Setup("int4", "edgejudge ONNX int4 (RTN, block 128)", "onnx", "int4", 4 + 16 / 128),
    Setup("nf4", "edgejudge bnb nf4 (torch backend)", "torch", "nf4", NF4_BITS),
    Setup("hf", "HF + PEFT, SDPA (seed recipe)", "hf"),
    Setup("hf-nf4", "HF nf4 + PEFT (as the card loads it)", "hf", "nf4", NF4_BITS),
)}


# -- clips ---------------------------------------------------------------------------------------
def synthetic_frames(video: Video, seed: int) -> np.ndarray:
    """(T, H, W, 3) uint8: a drifting gradient, a block crossing the frame and mild noise, so that
    an mp4 of it decodes like camera footage rather than like a still or like pure noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(video.frames, dtype=np.float32)[:, None, None]
    y = np.linspace(0, 1, video.height, dtype=np.float32)[None, :, None]
    x = np.linspace(0, 1, video.width, dtype=np.float32)[None, None, :]
    base = 96 + 64 * np.sin(6 * x + 4 * y + t / 8)
    frames = np.repeat(base[..., None], 3, axis=-1) + rng.normal(0, 6, (video.frames, video.height, video.width, 3))
    frames[..., 1] *= 0.8
    for i in range(video.frames):
        left = int((video.width - video.width // 6) * i / max(video.frames - 1, 1))
        top = video.height // 3
        frames[i, top:top + video.height // 6, left:left + video.width // 6] = (200, 40, 40)
    return np.clip(frames, 0, 255).astype(np.uint8)


def write_mp4(frames: np.ndarray, fps: float, path: Path) -> Path:
    import cv2

    partial = path.with_suffix(".partial.mp4")
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames.shape[2], frames.shape[1]))
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()
    partial.rename(path)
    return path


def workload_video(workload: Workload, tiny: bool) -> Video:
    return workload.tiny_video if tiny else workload.video


def sources(workload: Workload, tiny: bool, clips: Path) -> dict[str, np.ndarray | Path]:
    """Per view: an mp4 path (decoded in every run) or the frames in memory (a robot stream)."""
    video = workload_video(workload, tiny)
    out = {}
    for seed, view in enumerate(workload.views):
        if workload.from_file:
            out[view] = clips / f"{workload.name}-{'tiny' if tiny else 'full'}-{view}.mp4"
        else:
            out[view] = synthetic_frames(video, seed)
    return out


# -- model shapes, FLOPs and bytes (pure functions of JSON dicts) -------------------------------
def model_shape(config: dict, lora_rank: int | None) -> dict:
    """Parameter counts by part, from the model class built on the meta device (no weights), and
    the sizes that attention and the caches depend on."""
    import re

    import torch

    from edgejudge.export.fixtures import LORA_TARGETS
    from edgejudge.export.presets import config_from_dict, model_class

    hf_config = config_from_dict(config)
    with torch.device("meta"):
        model = model_class(hf_config)._from_config(hf_config)
    parts = dict.fromkeys(("vision", "merger", "vision_other", "decoder", "decoder_other", "embed", "head"), 0)
    for name, param in model.named_parameters():
        if ".visual." in f".{name}":  # matmul and conv weights by where they apply; the rest is bytes only
            part = "vision_other" if param.dim() < 2 or "embed" in name.rsplit(".", 2)[-2] else \
                "merger" if "merger" in name else "vision"
            parts[part] += param.numel()
        elif "embed_tokens" in name:
            parts["embed"] += param.numel()
        elif name.startswith("lm_head"):
            parts["head"] += param.numel()
        else:
            parts["decoder" if param.dim() == 2 else "decoder_other"] += param.numel()
    text = hf_config.get_text_config()
    parts["head"] = parts["head"] or parts["embed"]  # tied: one table, read by both
    parts["tied"] = bool(getattr(text, "tie_word_embeddings", False) or getattr(hf_config, "tie_word_embeddings", False))
    parts["lora"] = 0
    if lora_rank:
        pattern = re.compile(LORA_TARGETS[config["model_type"]])
        parts["lora"] = sum(lora_rank * (m.in_features + m.out_features) for n, m in model.named_modules()
                            if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n))
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    vision = hf_config.vision_config
    windowed = getattr(vision, "fullatt_block_indexes", None)
    parts["text"] = {
        "config": {k: v for k, v in text.to_dict().items() if isinstance(v, (int, float, str, list))},
        "full_layers": types.count("full_attention"), "linear_layers": types.count("linear_attention"),
        "heads": text.num_attention_heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        "linear_state": (getattr(text, "linear_num_value_heads", 0) * getattr(text, "linear_key_head_dim", 0)
                         * getattr(text, "linear_value_head_dim", 0)),
        "intermediate": text.intermediate_size, "hidden": text.hidden_size, "vocab": text.vocab_size,
    }
    parts["vis"] = {
        "hidden": vision.hidden_size, "depth": vision.depth, "intermediate": vision.intermediate_size,
        "heads": vision.num_heads, "merge": vision.spatial_merge_size,
        "full_layers": len(windowed) if windowed is not None else vision.depth,
        "window": (vision.window_size // vision.patch_size) ** 2 if windowed is not None else None,
    }
    return parts


def vision_flops(shape: dict, groups: int, patches: int) -> float:
    """The vision tower over `groups` 2-frame groups (or images) of `patches` patches each."""
    vis = shape["vis"]
    n = groups * patches
    attention = 4 * vis["hidden"] * groups * patches * (
        vis["full_layers"] * patches + (vis["depth"] - vis["full_layers"]) * min(vis["window"] or patches, patches))
    return 2 * shape["vision"] * n + 2 * shape["merger"] * n / vis["merge"] ** 2 + attention


def text_flops(shape: dict, context: int, tokens: int, logits: int, rows: int = 1) -> float:
    """`tokens` new tokens after `context` cached ones, logits read at `logits` positions, per row."""
    text = shape["text"]
    keys = tokens * context + tokens * (tokens + 1) / 2  # keys seen by the new queries, causally
    per_row = (2 * shape["decoder"] * tokens + 4 * text["full_layers"] * text["heads"] * text["head_dim"] * keys
               + 6 * text["linear_layers"] * text["linear_state"] * tokens + 2 * shape["head"] * logits)
    return rows * per_row


def workload_flops(shape: dict, plan: dict, decoded: int) -> dict[str, float]:
    """The least work the workload needs (see the module docstring), by stage."""
    out = {"vision": plan["videos"] * vision_flops(shape, plan["groups"], plan["patches_per_group"])}
    if plan["labels"]:
        # the prompt once per view (logits at its last token), then each label but its last token
        fed = sum(n - 1 for n in plan["labels"])
        out["prefill"] = text_flops(shape, 0, plan["prompt"], 1, plan["videos"])
        out["scoring"] = text_flops(shape, plan["prompt"], fed, fed, plan["videos"])
        return out
    if "turns" in plan:  # a multi-turn comparison, per turn: tokens kept in the cache, prefilled, decoded
        out["prefill"] = sum(text_flops(shape, kept, new, 1) for kept, new, _ in plan["turns"])
        out["decode"] = sum(text_flops(shape, kept + new, n - 1, n - 1) for kept, new, n in plan["turns"])
        return out
    # the shared prefix once, each question's own tokens, its forced score prefix, its answer
    questions = len(plan["suffixes"])
    out["prefill"] = text_flops(shape, 0, plan["shared"], 0) + sum(
        text_flops(shape, plan["shared"], s, 1) for s in plan["suffixes"])
    out["distribution"] = sum(text_flops(shape, plan["shared"] + s, f, 1)
                              for s, f in zip(plan["suffixes"], plan["forced"]))
    fed = decoded / questions - 1  # an answer's first token comes from its prefill
    out["decode"] = sum(text_flops(shape, plan["shared"] + s, fed, fed) for s in plan["suffixes"])
    return out


def kv_bytes_per_token(shape: dict, float_bytes: int) -> int:
    text = shape["text"]
    return 2 * text["full_layers"] * text["config"]["num_key_value_heads"] * text["head_dim"] * float_bytes


def device_weight_bytes(shape: dict, setup: Setup, float_bytes: int) -> float:
    """Weights on the device: ONNX keeps the embedding table on the host (numpy) and reads a tied
    table on the device as the LM head; torch holds both; nf4 (edgejudge and the card) quantizes
    the decoder's linears, the card's recipe the vision tower's too."""
    linear = shape["decoder"] * (setup.weight_bits / 8 if setup.weight_bits else float_bytes)
    vision = (shape["vision"] + shape["merger"]) * (NF4_BITS / 8 if setup.name == "hf-nf4" else float_bytes)
    other = (shape["vision_other"] + shape["decoder_other"]) * float_bytes
    if setup.backend == "onnx":
        return linear + vision + other + shape["head"] * float_bytes
    tables = shape["embed"] + (0 if shape["tied"] else shape["head"])
    return linear + vision + other + tables * float_bytes + shape["lora"] * float_bytes


def memory_estimate(shape: dict, plan: dict, setup: Setup, workload: Workload, cuda: bool) -> dict[str, float]:
    """Bytes on the device, before anything loads: weights + KV cache + the largest transient
    buffers of one forward (+ a CUDA context). Rows and tokens are what each backend holds at
    its peak: edgejudge copies a prefilled view's cache once per label, the torch backend holds
    a rubric's shared prefix and two copies of the answer rows, HF one sequence at a time."""
    from edgejudge.torch_backend import cache_bytes

    float_bytes = 4 if setup.export == "fp32" or (setup.backend != "onnx" and not cuda) else 2
    text = shape["text"]
    if plan["labels"]:
        width = max(plan["labels"])
        rows, tokens = (plan["videos"] * (1 + len(plan["labels"])), plan["prompt"] + width - 1) \
            if setup.backend != "hf" else (1, plan["prompt"] + width)
    elif setup.backend == "torch":
        rows, tokens = 1 + 2 * len(plan["suffixes"]), plan["prompt"] + workload.spec.max_new_tokens
    else:
        rows, tokens = 1, plan.get("cache_tokens", plan["prompt"] + workload.spec.max_new_tokens)
    kv = cache_bytes(text["config"], rows, tokens, float_bytes)
    prompt_rows = plan["videos"] if plan["labels"] and setup.backend != "hf" else 1
    # HF's forward computes the logits of every position; edgejudge only where they are read
    logit_positions = plan["prompt"] if setup.backend == "hf" and plan["labels"] else rows
    vis, groups, patches = shape["vis"], plan["groups"], plan["patches_per_group"]
    vision = groups * patches * (2 * vis["intermediate"] + 4 * vis["hidden"]) * float_bytes
    if setup.backend == "onnx":  # the traced vision graph materializes each group's scores and their softmax
        vision += 2 * groups * vis["heads"] * patches ** 2 * float_bytes
    activations = max(
        prompt_rows * plan["prompt"] * (2 * text["intermediate"] + 4 * text["hidden"]) * float_bytes
        + logit_positions * text["vocab"] * (4 + float_bytes),
        vision,
    )
    weights = device_weight_bytes(shape, setup, float_bytes)
    total = weights + kv + activations + (CUDA_CONTEXT_BYTES if cuda else 0)
    return {"weights_gib": weights / GIB, "kv_cache_gib": kv / GIB, "activations_gib": activations / GIB,
            "total_gib": total / GIB}


def decode_step_bytes(shape: dict, setup: Setup, context: int) -> float:
    """What one greedy step must read (fp16 / bf16 floats): the decoder's and the LM head's
    weights, and the KV cache."""
    linear = shape["decoder"] * (setup.weight_bits / 8 if setup.weight_bits else 2)
    return linear + shape["head"] * 2 + context * kv_bytes_per_token(shape, 2)


# -- planning and artifacts (the first child process: torch, no device time spent measuring) ------
def token_plan(workload: Workload, model_dir: Path, tiny: bool) -> dict:
    """Token counts of one run, from the runtime's own inputs for the workload's clip."""
    from edgejudge.runtime import model as runtime_model
    from edgejudge.runtime.video import read_video
    from edgejudge.torch_backend import shared_prompt

    model = runtime_model.load(model_dir)
    if workload.max_pixels:
        model.vision = replace(model.vision, max_pixels=workload.max_pixels)
    video = workload_video(workload, tiny)
    if workload.spec.answer == "pairwise_tags":
        return pairwise_plan(workload, model, video)
    clip = runtime_model.sample_clip(model, read_video(synthetic_frames(video, 0), fps=video.fps), workload.spec.sample)
    prompts = [runtime_model.prompt_inputs(model, [clip], compose_prompt(workload.spec, q)[1], workload.system)
               for q in workload.questions]
    t, h, w = (int(x) for x in prompts[0]["video_grid_thw"][0])
    plan = {"groups": t, "patches_per_group": h * w, "video_tokens": t * h * w // model.vision.merge_size ** 2,
            "prompt": max(p["input_ids"].shape[1] for p in prompts), "labels": [], "frames": len(clip.frames),
            "frame_size": [h * model.vision.patch_size, w * model.vision.patch_size]}
    if workload.spec.answer == "labels":
        plan.update(videos=len(workload.views), labels=[len(model.prompter.encode(l)) for l in workload.spec.labels])
    else:
        shared, suffixes = shared_prompt(prompts)
        plan.update(videos=1, shared=shared, suffixes=[len(s) for s in suffixes],
                    forced=[len(model.prompter.encode(workload.spec.score_prefix.format(**q))) for q in workload.questions])
    return plan


def pairwise_plan(workload: Workload, model, video: Video) -> dict:
    """The images of the scripted comparison and its prompt at the last turn, built as the loop
    builds them; the per-turn figures (cached, prefilled, decoded) come from the run itself."""
    from edgejudge.runtime.model import image_prompt_inputs
    from edgejudge.runtime.pairwise import Conversation, Settings
    from edgejudge.runtime.preprocess import smart_resize

    settings = Settings.from_spec(workload.spec)
    size = smart_resize(settings.image_size, settings.image_size, model.vision)
    frames = synthetic_frames(video, 0)
    conversation = Conversation([frames, frames], CAPTION, workload.system, settings, size)
    # the cache the loop allocates at the first turn: room for the longest conversation it can become
    longest = image_prompt_inputs(model, *conversation.longest())["input_ids"].shape[1]
    for picks in PAIRWISE_PICKS:
        conversation.reply("")
        conversation.show(list(picks))
    arrays = image_prompt_inputs(model, conversation.messages, [size] * len(conversation.images))
    _, h, w = (int(x) for x in arrays["image_grid_thw"][0])
    images = len(conversation.images)
    return {"videos": 1, "groups": images, "patches_per_group": h * w, "frames": images, "frame_size": list(size),
            "video_tokens": images * h * w // model.vision.merge_size ** 2, "labels": [],
            "prompt": arrays["input_ids"].shape[1] + settings.max_turns * settings.max_new_tokens,
            "cache_tokens": longest + settings.max_turns * settings.max_new_tokens}


def inputs_dir(preset: str, cache: Path, tokenizers: str | None) -> Path:
    """A preset's non-weight files with its tokenizer: enough to count tokens before any weight exists."""
    from edgejudge.export.presets import find_tokenizer_json, preset_dir

    out = cache / preset / "inputs"
    if not (out / "tokenizer.json").is_file():
        tokenizer = find_tokenizer_json(preset, Path(tokenizers) / preset if tokenizers else None)
        out.mkdir(parents=True, exist_ok=True)
        for path in preset_dir(preset).iterdir():
            if path.is_file() and path.suffix in (".json", ".jinja"):
                shutil.copyfile(path, out / path.name)
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out


def built(out: Path, build) -> Path:
    """`out`, built by `build(partial_dir)` unless an earlier run left it complete."""
    if not out.is_dir():
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        build(partial)
        partial.rename(out)
    return out


def random_adapter(base: Path, family: str, rank: int, out: Path, device: str) -> None:
    """A LoRA adapter of the seed judges' targets with random (non-zero) B matrices, built on the
    device from the base's config, so the unmerged baseline pays what a trained adapter costs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from edgejudge.export.fixtures import LORA_ALPHA, LORA_TARGETS
    from edgejudge.export.presets import config_from_dict, model_class

    config = config_from_dict(json.loads((base / "config.json").read_text()))
    torch.manual_seed(1)
    with torch.device(device):
        model = model_class(config)._from_config(config, dtype=torch.bfloat16)
    lora = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS[family], lora_dropout=0.0,
                      base_model_name_or_path=str(base))
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    peft_model.save_pretrained(out)


def unavailable(workload: Workload, setup: Setup, tiny: bool) -> str | None:
    """Why a setup cannot run a workload, if it cannot."""
    if workload.spec.answer == "pairwise_tags" and setup.backend != "onnx":
        return ("the seed approach to VR-Thinker (the whole conversation re-run by generate every turn) is timed by "
                "benchmarks/vrthinker.py" if setup.backend == "hf" else "the pairwise loop runs on ONNX artifacts")
    if tiny and setup.name == "hf-nf4":
        return ("the card's nf4 recipe quantizes the vision tower, whose tiny layers are narrower than bitsandbytes' "
                "64-value block")
    if setup.backend == "onnx":
        from edgejudge.export.onnx import check_options

        try:
            check_options(workload.family, setup.export, setup.export if setup.export in ("fp32", "fp16") else "fp16",
                          "rtn", None, 0)
        except InputError as e:
            return str(e)
    return None


@dataclass
class Models:
    """Where one workload's models come from."""

    key: str  # the model's name in the results, and its folder in the cache
    inputs: Path  # the non-weight files (config, tokenizer, processor configs): tokens are counted from them
    base: Path | None  # the base checkpoint: HF's baseline loads it, exports start from it
    adapter: Path | None  # a LoRA adapter to build (random) or given
    lora_rank: int | None
    artifact: Path | None = None  # a user's artifact (--artifact): timed as it is, nothing is built


def models(workload: Workload, payload: dict, cache: Path) -> Models:
    if payload["artifact"]:
        adapter = Path(payload["adapter"]) if payload["adapter"] else None
        rank = json.loads((adapter / "adapter_config.json").read_text())["r"] if adapter else None
        return Models(Path(payload["artifact"]).name, Path(payload["artifact"]),
                      Path(payload["reference"]) if payload["reference"] else None, adapter, rank,
                      Path(payload["artifact"]))
    rank, adapter = workload.lora_rank, f"lora{workload.lora_rank}-adapter"
    if payload["tiny"]:
        from edgejudge.export.fixtures import tiny_model_dir

        key, base = f"tiny-{workload.family}", tiny_model_dir(workload.family)
        return Models(key, base, base, cache / key / adapter if rank else None, rank)
    return Models(workload.preset, inputs_dir(workload.preset, cache, payload["tokenizers"]),
                  cache / workload.preset / "base", cache / workload.preset / adapter if rank else None, rank)


def prepare(payload: dict) -> dict:
    """Plan every configuration (availability, token counts, memory estimate against the cap),
    then build the bases, adapters and artifacts that the runnable ones need, cached."""
    cache, device, tiny = Path(payload["cache"]), payload["device"], payload["tiny"]
    cuda = device.startswith("cuda")
    clips = cache / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    configs = []
    for name in payload["workloads"]:
        workload = WORKLOADS[name]
        found = models(workload, payload, cache)
        adapter_key = f"lora{found.lora_rank}" if found.lora_rank else "no-adapter"
        config = json.loads((found.inputs / "config.json").read_text())
        shape, plan = model_shape(config, found.lora_rank), token_plan(workload, found.inputs, tiny)
        runnable = []
        for setup_name in payload["setups"][name]:
            setup = SETUPS[setup_name]
            row = {"workload": name, "setup": setup_name, "model": found.key, "adapter": adapter_key, "status": "ready",
                   "shape": shape, "plan": plan}
            configs.append(row)
            reason = unavailable(workload, setup, tiny)
            if setup.backend == "hf" and found.base is None:
                reason = "the HF baseline of an artifact needs its base model: --reference BASE (and --adapter DIR)"
            if reason:
                row.update(status="not available", reason=reason)
                continue
            row["estimate"] = e = memory_estimate(shape, plan, setup, workload, cuda)
            cap = payload["gpu_mem_gb"]
            if cap is not None and e["total_gib"] > cap:
                row.update(status="refused", reason=(
                    f"{name} {setup.name}: an estimated {e['total_gib']:.3g} GiB (weights {e['weights_gib']:.3g} + KV cache "
                    f"{e['kv_cache_gib']:.3g} + activations {e['activations_gib']:.3g}"
                    f"{' + CUDA context 0.5' if cuda else ''}) is over the --gpu-mem-gb {cap:g} cap"))
                continue
            runnable.append((row, setup))
        if not runnable:
            continue
        if not (tiny or found.artifact):
            from edgejudge.export.presets import write_preset_model_dir

            tokenizer_dir = Path(payload["tokenizers"]) / workload.preset if payload["tokenizers"] else None
            built(found.base, lambda out: write_preset_model_dir(workload.preset, out, tokenizer_dir, device=device))
        if found.adapter and not found.artifact:
            built(found.adapter, lambda out: random_adapter(found.base, workload.family, found.lora_rank, out, device))
        for row, setup in runnable:
            row["adapter_dir"] = str(found.adapter) if found.adapter else None
            row["model_dir"] = str(found.base if setup.backend == "hf" else found.artifact or
                                   artifact(setup, found.base, found.adapter, cache / found.key / adapter_key, device))
        if workload.from_file:
            video = workload_video(workload, tiny)
            for view, path in sources(workload, tiny, clips).items():
                if not path.is_file():
                    write_mp4(synthetic_frames(video, workload.views.index(view)), video.fps, path)
    return {"configs": configs}


def artifact(setup: Setup, base: Path, adapter: Path | None, folder: Path, device: str) -> Path:
    """The setup's artifact of base + adapter, exported once into `folder` (the --cache)."""
    import gc

    import torch

    if setup.backend == "onnx":
        from edgejudge.export.onnx import export_onnx

        # quantized graphs keep fp32 activations for CPU targets (ORT's CPU kernels), fp16 on the GPU
        activations = None if setup.export in ("fp32", "fp16") else ("fp32" if device == "cpu" else "fp16")
        name = f"onnx-{setup.export}" + (f"-b128-{activations}" if activations else "")
        out = built(folder / name, lambda out: export_onnx(base, adapter, setup.export, out, activations=activations,
                                                              device=device))
    else:
        from edgejudge.export.bnb import export_bnb

        out = built(folder / f"bnb-{setup.export}", lambda out: export_bnb(base, adapter, setup.export, out, device=device))
    gc.collect()  # the merged model of one export is gone before the next one loads its own
    if device != "cpu":
        torch.cuda.empty_cache()
    return out


# -- measuring one configuration (a child process each) -----------------------------------------
class VisionClock:
    """Time spent in a torch model's vision tower, by forward hooks with a device sync on each
    side (the tower's work, not its launch): how a torch forward is split into vision and prefill."""

    def __init__(self, model, cuda: bool):
        import torch

        tower = next(m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "visual")
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.ms, self.start = 0.0, 0.0
        tower.register_forward_pre_hook(self._enter)
        tower.register_forward_hook(self._leave)

    def _enter(self, module, args) -> None:
        self.sync()
        self.start = time.perf_counter()

    def _leave(self, module, args, output) -> None:
        self.sync()
        self.ms += (time.perf_counter() - self.start) * 1e3

    def split(self, stages: dict[str, float]) -> None:
        """Move the vision time out of the prefill stage that contained it."""
        stages["vision"] = stages.get("vision", 0.0) + self.ms
        stages["prefill"] -= self.ms
        self.ms = 0.0


@dataclass
class Outcome:
    stages: dict[str, float]  # ms per stage of one run
    decoded: int  # tokens generated (all questions)
    answer: dict  # what the judge said, to show it ran: not a quality figure (random weights)
    turns: list | None = None  # a comparison's turns: [tokens kept in the cache, prefilled, decoded]


def read_clips(inputs: dict, video: Video, stages: dict[str, float]) -> dict:
    """Per view, a Clip: decoded from its file (timed as `decode_video`), or the frames in memory."""
    from edgejudge.runtime.video import read_video

    start = time.perf_counter()
    clips = {view: read_video(source, fps=None if isinstance(source, Path) else video.fps)
             for view, source in inputs.items()}
    if any(isinstance(source, Path) for source in inputs.values()):
        stages["decode_video"] = (time.perf_counter() - start) * 1e3
    return clips


class EdgeRunner:
    """edgejudge's `Judge`: `check` for candidate labels, `ask_many` for text answers."""

    def __init__(self, workload: Workload, video: Video, task: dict):
        from edgejudge.judge import Judge

        self.workload, self.video = workload, video
        cuda = task["device"].startswith("cuda")
        self.judge = Judge.load(task["model_dir"], workload.spec, device=task["device"],
                                gpu_mem_gb=task["gpu_mem_gb"] if cuda else None)
        engine = self.judge.engine
        if workload.max_pixels:
            engine.model.vision = replace(engine.model.vision, max_pixels=workload.max_pixels)
        self.clock = VisionClock(engine.net, cuda) if hasattr(engine, "net") else None  # the torch backend
        if workload.spec.answer == "pairwise_tags":
            engine.eos_ids = set()  # every reply decodes its whole budget, as the workload sets it

    def run(self, inputs: dict) -> Outcome:
        workload, judge = self.workload, self.judge
        stages: dict[str, float] = {}
        clips = read_clips(inputs, self.video, stages)
        if hasattr(judge.engine, "cache"):
            judge.engine.cache.entries.clear()  # every group encoded: no sliding-window reuse
        turns = None
        if workload.spec.answer == "labels":
            decision = judge.check(workload.questions[0]["instruction"], views=clips)
            timings, decoded, answer = decision.timings_ms, 0, {"prediction": decision.label}
        elif workload.spec.answer == "pairwise_tags":
            comparison = judge.compare(*clips.values(), workload.questions[0]["caption"], system=workload.system,
                                       reply=scripted_reply)
            timings, decoded = comparison.timings_ms, sum(len(t.tokens) for t in comparison.turns)
            turns = [[t.cache["kept"], t.cache["prefilled"], len(t.tokens)] for t in comparison.turns]
            answer = {"turns": len(turns), "parsed": comparison.parsed.ok}
        else:
            answers = judge.ask_many(next(iter(clips.values())), list(workload.questions), system=workload.system)
            timings, decoded = answers[0].timings_ms, sum(len(a.token_ids) for a in answers)
            answer = {"parsed": sum(a.parsed.ok for a in answers), "questions": len(answers)}
        stages.update({k: v for k, v in timings.items() if k != "total"})
        if self.clock:
            self.clock.split(stages)
        return Outcome(stages, decoded, answer, turns)


def scripted_reply(turn: int, text: str) -> str:
    """The reply a comparison keeps: the model's text as reasoning, then a frame call (the first
    turns) or an answer. Random weights never call the tool; this gives W4 its two tool turns."""
    if turn <= len(PAIRWISE_PICKS):
        call = {"name": "select_frames", "arguments": {"target_frames": PAIRWISE_PICKS[turn - 1]}}
        return f"<think>{text}</think>\n<tool_call>{json.dumps(call)}</tool_call>"
    return f"<think>{text}</think>\n<Answer>TA=1, VQ=2, MQ=0, OA=1</Answer>"


class FirstToken:
    """A `generate` streamer that notes when the first new token exists: `put` gets the prompt,
    then each new token (already on the host, so the device work before it is done)."""

    def __init__(self):
        self.calls, self.at = 0, 0.0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class HFRunner:
    """The seeds' recipe on transformers: HF's processor per prompt, SDPA, bf16 (fp32 on a CPU)
    or nf4 as the card loads it, the LoRA adapter unmerged through PEFT. Candidate labels: each by
    its own full forward per view over prompt + label. Text: one `generate` per question. Frames
    are sampled by the runtime (the same indices as HF's sampler) and given with their metadata.

    HF's video processors need torchvision. Where it is not installed, the processor's arrays
    come from edgejudge's pipeline reproducing this transformers release (the parity tests hold
    them equal), and the row says so: its preprocess stage is then not HF's."""

    def __init__(self, workload: Workload, video: Video, setup: Setup, task: dict):
        import torch
        import transformers
        from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig
        from transformers.utils import logging as hf_logging

        from edgejudge.runtime import model as runtime_model

        hf_logging.set_verbosity_error()
        self.torch, self.workload, self.video = torch, workload, video
        self.device, cuda = task["device"], task["device"].startswith("cuda")
        dtype = torch.bfloat16 if cuda else torch.float32
        if cuda and task["gpu_mem_gb"]:
            index = torch.device(self.device).index or 0
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, task["gpu_mem_gb"] * GIB / torch.cuda.get_device_properties(index).total_memory), index)
        options = {}
        if setup.export == "nf4":
            options["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model = AutoModelForImageTextToText.from_pretrained(task["model_dir"], dtype=dtype, device_map=self.device,
                                                            attn_implementation="sdpa", **options)
        if task["adapter_dir"]:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, task["adapter_dir"])
        self.model = model.eval()
        self.runtime = runtime_model.load(task["model_dir"], hf=".".join(transformers.__version__.split(".")[:2]))
        if workload.max_pixels:
            self.runtime.vision = replace(self.runtime.vision, max_pixels=workload.max_pixels)
        self.clock = VisionClock(self.model, cuda)
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.note = None
        try:
            self.processor = AutoProcessor.from_pretrained(task["model_dir"])
        except ImportError as e:
            self.processor = None
            self.note = f"inputs built by edgejudge's pipeline for this release: {str(e).strip().splitlines()[0]}"
        self.video_options = {}
        annotations = getattr(getattr(self.processor, "video_processor", None), "valid_kwargs", None)
        if "cap_pixels_per_frame" in getattr(annotations, "__annotations__", {}):
            self.video_options["cap_pixels_per_frame"] = False  # the release's default, without its warning
        if workload.max_pixels:
            self.video_options["size"] = {"shortest_edge": self.runtime.vision.min_pixels,
                                          "longest_edge": workload.max_pixels}
        self.labels = [torch.tensor(self.runtime.prompter.encode(label), device=self.device)
                       for label in workload.spec.labels]

    def inputs(self, clip, fields: dict) -> dict:
        from transformers.video_utils import VideoMetadata

        from edgejudge.runtime import model as runtime_model

        if self.processor is None:
            arrays = runtime_model.build_inputs(self.runtime, [clip], compose_prompt(self.workload.spec, fields)[1],
                                                self.workload.system)
            names = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
            feed = {k: self.torch.from_numpy(arrays[k]) for k in names if k in arrays}
            feed["mm_token_type_ids"] = (feed["input_ids"] == self.runtime.video_token_id).long() * 2
            return {k: v.to(self.device) for k, v in feed.items()}
        messages = [{"role": "system", "content": [{"type": "text", "text": self.workload.system}]}] \
            if self.workload.system else []
        text = compose_prompt(self.workload.spec, fields)[1]
        messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]})
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        meta = VideoMetadata(total_num_frames=clip.total_frames, fps=clip.fps, frames_indices=clip.indices.tolist(),
                             height=clip.frames.shape[1], width=clip.frames.shape[2])
        frames = self.torch.from_numpy(clip.frames).permute(0, 3, 1, 2)
        return self.processor(text=[prompt], videos=[frames], video_metadata=[meta], do_sample_frames=False,
                              return_tensors="pt", **self.video_options).to(self.device)

    def run(self, inputs: dict) -> Outcome:
        from edgejudge.runtime import model as runtime_model

        torch, workload = self.torch, self.workload
        stages = dict.fromkeys(("preprocess", "prefill"), 0.0)
        clips = {view: runtime_model.sample_clip(self.runtime, clip, workload.spec.sample)
                 for view, clip in read_clips(inputs, self.video, stages).items()}
        decoded, answer = 0, {}
        with torch.no_grad():
            if workload.spec.answer == "labels":
                nll = np.zeros(len(self.labels))
                for clip in clips.values():
                    start = time.perf_counter()
                    feed = self.inputs(clip, workload.questions[0])
                    stages["preprocess"] += (time.perf_counter() - start) * 1e3
                    length = feed["input_ids"].shape[1]
                    for i, label in enumerate(self.labels):
                        start = time.perf_counter()
                        ids = torch.cat([feed["input_ids"], label[None]], 1)
                        extra = {"mm_token_type_ids": torch.nn.functional.pad(feed["mm_token_type_ids"], (0, len(label)))} \
                            if "mm_token_type_ids" in feed else {}
                        logits = self.model(**{**feed, "input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}
                                            ).logits[0, length - 1:-1].float()
                        nll[i] += -logits.log_softmax(-1).gather(1, label[:, None]).mean().item()
                        stages["prefill"] += (time.perf_counter() - start) * 1e3
                answer = {"prediction": workload.spec.labels[int(np.argmin(nll))]}
            else:
                clip = next(iter(clips.values()))
                stages["decode"] = 0.0
                for fields in workload.questions:
                    start = time.perf_counter()
                    feed = self.inputs(clip, fields)
                    stages["preprocess"] += (time.perf_counter() - start) * 1e3
                    first, start = FirstToken(), time.perf_counter()
                    out = self.model.generate(**feed, max_new_tokens=workload.spec.max_new_tokens, do_sample=False,
                                              streamer=first)
                    self.sync()
                    end = time.perf_counter()
                    stages["prefill"] += (first.at - start) * 1e3
                    stages["decode"] += (end - first.at) * 1e3
                    decoded += out.shape[1] - feed["input_ids"].shape[1]
                answer = {"questions": len(workload.questions)}
        self.clock.split(stages)
        return Outcome(stages, decoded, answer)


def measure(task: dict) -> dict:
    """Load one configuration, run it `warmup` times, then time `runs` runs."""
    workload, setup = WORKLOADS[task["workload"]], SETUPS[task["setup"]]
    video = workload_video(workload, task["tiny"])
    hf = setup.backend == "hf"
    runner = HFRunner(workload, video, setup, task) if hf else EdgeRunner(workload, video, task)
    inputs = sources(workload, task["tiny"], Path(task["clips"]))
    totals, stages, outcome = [], [], None
    for i in range(task["warmup"] + task["runs"]):
        start = time.perf_counter()
        outcome = runner.run(inputs)
        if i >= task["warmup"]:
            totals.append((time.perf_counter() - start) * 1e3)
            stages.append(outcome.stages)
    versions = {name: sys.modules[name].__version__ for name in
                ("onnxruntime", "torch", "transformers", "peft", "bitsandbytes") if name in sys.modules}
    return {
        "latency_ms": percentiles(totals),
        "stages_ms": {k: percentiles([s.get(k, 0.0) for s in stages]) for k in STAGES if any(k in s for s in stages)},
        "decoded_tokens": outcome.decoded, "answer": outcome.answer, "versions": versions,
        "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        **({"turns": outcome.turns} if outcome.turns else {}),
        **({"note": runner.note} if hf and runner.note else {}),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2)}


def probe(payload: dict) -> dict:
    """The device's measured fp16 matmul rate and copy bandwidth: what the floors divide by."""
    import torch

    device = torch.device(payload["device"])

    def seconds(step, repeats: int = 20) -> float:
        step()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / repeats

    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    matmul = seconds(lambda: a @ a)
    source = torch.empty(GIB, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy = seconds(lambda: target.copy_(source))
    return {"name": torch.cuda.get_device_name(device), "matmul_fp16_tflops": round(2 * 8192**3 / matmul / 1e12, 1),
            "copy_gb_s": round(2 * GIB / copy / 1e9, 1), "torch": torch.__version__}


# -- child processes and device memory ----------------------------------------------------------
def _child(target: str, payload: dict, out: str) -> None:
    """A child process's entry: run `target(payload)`, write its result (or its error) as JSON."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        result = {"ok": globals()[target](payload)}
    except InputError as e:
        result = {"input_error": str(e)}
    except Exception as e:  # a failed configuration is a row with its reason; the bench goes on
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    Path(out).write_text(json.dumps(result))


class _MemoryInfo(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class Nvml:
    """The GPU's used memory from the driver (libnvidia-ml, through ctypes): whatever the library
    or process that holds it."""

    def __init__(self, index: int):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self.handle = ctypes.c_void_p()
        if self.lib.nvmlInit_v2() or self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.handle)):
            raise OSError("NVML could not open the device")

    def used(self) -> int:
        info = _MemoryInfo()
        self.lib.nvmlDeviceGetMemoryInfo(self.handle, ctypes.byref(info))
        return info.used


def open_nvml(device: str) -> Nvml | None:
    if not device.startswith("cuda"):
        return None
    try:
        return Nvml(int(device.partition(":")[2] or 0))
    except OSError:
        return None


def in_child(target: str, payload: dict, nvml: Nvml | None) -> tuple[dict, float | None]:
    """`target(payload)` in a fresh (spawned) process: its result, and the peak device memory it
    added (GiB), polled every 2 ms."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="edgejudge-bench-") as tmp:
        out = Path(tmp) / "result.json"
        idle = nvml.used() if nvml else 0
        peak = [idle]
        process = context.Process(target=_child, args=(target, payload, str(out)))
        process.start()

        def poll() -> None:
            while process.is_alive():
                peak[0] = max(peak[0], nvml.used())
                time.sleep(0.002)

        poller = threading.Thread(target=poll, daemon=True) if nvml else None
        if poller:
            poller.start()
        process.join()
        if poller:
            poller.join()
        result = (json.loads(out.read_text()) if out.is_file() else
                  {"error": f"the process ended with code {process.exitcode}"})
    return result, ((peak[0] - idle) / GIB if nvml else None)


# -- the report ----------------------------------------------------------------------------------
def finish_row(config: dict, measured: dict | None, peak_gib: float | None, device_probe: dict | None,
               env: dict) -> dict:
    """One configuration's row: what was planned, what was measured, and what follows from both."""
    setup, workload = SETUPS[config["setup"]], WORKLOADS[config["workload"]]
    row = {"workload": workload.name, "setup": setup.name, "label": setup.label, "backend": setup.backend,
           "model": config["model"], "adapter": config["adapter"], "weights": "random", **env,
           "status": config["status"], "reason": config.get("reason")}
    if "plan" in config:
        shape = config["shape"]
        row["tokens"] = config["plan"]
        row["parameters"] = {k: shape[k] for k in ("vision", "merger", "decoder", "embed", "head", "lora")}
    if "estimate" in config:
        row["estimate"] = {k: round(v, 3) for k, v in config["estimate"].items()}
    if measured is None:
        return row
    if "ok" not in measured:
        return {**row, "status": "failed", "reason": measured.get("input_error") or measured["error"]}
    row.update(status="ok", **measured["ok"])
    if "turns" in row:
        config["plan"]["turns"] = row["turns"]
    row["peak_memory_gib"] = round(peak_gib if peak_gib is not None else measured["ok"]["host_peak_gib"], 3)
    row["memory_source"] = ("NVML device memory used, peak minus idle" if peak_gib is not None
                            else "host peak RSS of the process")
    p50 = row["latency_ms"]["p50"]
    flops = workload_flops(config["shape"], config["plan"], row["decoded_tokens"])
    row["gflops"] = {k: float(f"{v / 1e9:.4g}") for k, v in flops.items()}
    total = sum(flops.values())
    row["tflops_effective"] = float(f"{total / (p50 / 1e3) / 1e12:.3g}")
    if device_probe:
        row["flop_floor_ms"] = round(total / (device_probe["matmul_fp16_tflops"] * 1e12) * 1e3, 2)
    decode_ms = row["stages_ms"].get("decode", {}).get("p50")
    if decode_ms:  # each answer's first token comes from its prefill; the decode stage makes the rest
        steps = row["decoded_tokens"] - len(config["plan"].get("turns") or config["plan"]["suffixes"])
        row["decode_tokens_per_s"] = round(steps / (decode_ms / 1e3), 1)
        if device_probe:  # one step at the prompt's length reads the weights and that KV cache
            step = decode_step_bytes(config["shape"], setup, config["plan"]["prompt"])
            row["decode_floor_tokens_per_s"] = round(device_probe["copy_gb_s"] * 1e9 / step, 1)
    return row


def compare(rows: list[dict]) -> None:
    """edgejudge rows get `vs`: each baseline's p50 over theirs (same workload, model and device),
    and `targets`: each of the workload's targets met or missed, by how much."""
    for row in rows:
        if row["backend"] == "hf" or row["status"] != "ok":
            continue
        row["vs"] = {b["setup"]: round(b["latency_ms"]["p50"] / row["latency_ms"]["p50"], 2) for b in rows
                     if b["backend"] == "hf" and b["status"] == "ok"
                     and all(b[k] == row[k] for k in ("workload", "model", "device"))}
        if row["model"].startswith("tiny-") or row["device"].startswith("cpu"):
            continue  # the targets are the full-size models' on a GPU
        checks = {}
        for key, goal in WORKLOADS[row["workload"]].targets.items():
            value = {"p50_ms": row["latency_ms"]["p50"], "vs_hf": row["vs"].get("hf"),
                     "decode_tokens_per_s": row.get("decode_tokens_per_s")}[key]
            if value is None:
                checks[key] = "not measured"
                continue
            unit = {"p50_ms": " ms", "vs_hf": "x", "decode_tokens_per_s": " tokens/s"}[key]
            met, op = (value <= goal, "<=") if key == "p50_ms" else (value >= goal, ">=")
            checks[key] = (f"{'met' if met else 'missed'}: {value:.4g}{unit} vs {op} {goal:g}{unit}"
                           + ("" if met else f" ({max(value, goal) / min(value, goal):.2f}x off)"))
        row["targets"] = checks


def _name(row: dict) -> str:
    return row["setup"] + (f" (cap {row['gpu_mem_gb']:g} GiB)" if row.get("gpu_mem_gb") else "")


def _cell(row: dict, stage: str) -> str:
    value = row.get("stages_ms", {}).get(stage)
    return f"{value['p50']:.1f}" if value else "-"


def markdown(rows: list[dict]) -> str:
    """The report as Markdown: one table per workload, ms p50 per stage."""
    lines = ["# edgejudge bench", ""]
    versions: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["status"] == "ok":
            found = versions.setdefault((r["device"], r["date"]), {})
            found.update(r["versions"])
            if r["device_probe"]:
                found["measured fp16 matmul"] = f"{r['device_probe']['matmul_fp16_tflops']} TFLOP/s"
                found["measured copy"] = f"{r['device_probe']['copy_gb_s']} GB/s"
    for (device, date), found in sorted(versions.items()):
        lines.append(f"- {device}, {date}: {', '.join(f'{k} {v}' for k, v in sorted(found.items()))}")
    for name, model in sorted({(r["workload"], r["model"]) for r in rows}):
        group = [r for r in rows if (r["workload"], r["model"]) == (name, model)]
        lines += ["", f"## {name}: {WORKLOADS[name].title}", ""]
        tokens = next((r["tokens"] for r in group if "tokens" in r), None)
        if tokens:
            lines += [f"{model} ({group[0]['weights']} weights, {group[0]['adapter']}): "
                      f"{tokens['frames']} frames at {tokens['frame_size'][0]}x{tokens['frame_size'][1]}, "
                      f"{tokens['video_tokens']} video tokens x {tokens['videos']} video(s), "
                      f"prompt {tokens['prompt']} tokens.", ""]
        lines += ["| configuration | device | cap GiB | p50 ms | p95 ms | vs HF | decode video | preprocess | vision | "
                  "prefill | scoring / decode | tokens/s (floor) | eff. TFLOP/s | FLOP floor ms | peak GiB (est.) | targets |",
                  "|" + "---|" * 16]
        for r in group:
            if r["status"] != "ok":
                lines.append(f"| {r['label']} | {r['device']} | {r.get('gpu_mem_gb') or '-'} | {r['status']}: {r['reason']} |"
                             + " |" * 12)
                continue
            scoring = sum(r["stages_ms"].get(s, {}).get("p50", 0.0) for s in ("scoring", "distribution", "decode"))
            rate = (f"{r['decode_tokens_per_s']:g} ({r.get('decode_floor_tokens_per_s', '-')})"
                    if "decode_tokens_per_s" in r else "-")
            vs = ", ".join(f"{v:g}x {k}" for k, v in r.get("vs", {}).items()) or "-"
            lines.append(
                f"| {r['label']} | {r['device']} | {r.get('gpu_mem_gb') or '-'} | {r['latency_ms']['p50']:.1f} | "
                f"{r['latency_ms']['p95']:.1f} | {vs} | {_cell(r, 'decode_video')} | {_cell(r, 'preprocess')} | "
                f"{_cell(r, 'vision')} | {_cell(r, 'prefill')} | {scoring:.1f} | {rate} | {r['tflops_effective']:g} | "
                f"{r.get('flop_floor_ms', '-')} | {r['peak_memory_gib']:.2f} ({r['estimate']['total_gib']:.2f}) | "
                f"{'; '.join(f'{k} {v}' for k, v in r.get('targets', {}).items()) or '-'} |")
    lines += [f"\n{r['workload']} {r['label']}: {r['note']}" for r in rows if r.get("note")]
    sources = sorted({r["memory_source"] for r in rows if r["status"] == "ok"})
    lines += ["", f"Runs: p50 / p95 over the timed runs after warm-up. Peak memory: {'; '.join(sources)}. "
              "Estimate: weights + KV cache + activations (+ CUDA context), the figure a cap is checked against."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    """Latency p50 by stage for each configuration (one panel per workload), and peak memory
    against the 16 and 24 GB lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "ok"]
    names = sorted({r["workload"] for r in done})
    fig, axes = plt.subplots(len(names) + 1, 1, figsize=(10, 2.2 * (len(names) + 1) + 1), squeeze=False)
    colors = dict(zip(STAGES, plt.get_cmap("tab10").colors))
    for ax, name in zip(axes[:, 0], names):
        group = [r for r in done if r["workload"] == name]
        for y, r in enumerate(group):
            left = 0.0
            for stage in STAGES:
                if stage in r["stages_ms"]:
                    width = r["stages_ms"][stage]["p50"]
                    ax.barh(y, width, left=left, color=colors[stage], label=stage)
                    left += width
        ax.set_yticks(range(len(group)), [_name(r) for r in group], fontsize=8)
        ax.set_title(f"{name}: latency p50 by stage, ms ({', '.join(sorted({r['device'] for r in group}))})", fontsize=9)
        handles = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one entry per stage
        ax.legend(handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax = axes[-1, 0]
    ax.barh(range(len(done)), [r["peak_memory_gib"] for r in done], color="gray")
    ax.set_yticks(range(len(done)), [f"{r['workload']} {_name(r)}" for r in done], fontsize=8)
    for cap in (16, 24):  # the --gpu-mem-gb of a 16 and a 24 GB card (GiB, as the cap counts)
        ax.axvline(cap, color="red", linestyle="--")
        ax.text(cap, -0.5, f" {cap}", color="red", fontsize=7)
    ax.set_title(f"peak memory (GiB; {done[0]['memory_source'] if done else ''})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


REPORT_KEYS = {"workload", "setup", "label", "backend", "model", "device", "date", "status", "reason"}
MEASURED_KEYS = {"latency_ms", "stages_ms", "tokens", "gflops", "tflops_effective", "peak_memory_gib", "memory_source",
                 "estimate", "runs", "warmup", "versions"}


def check_rows(rows: list[dict]) -> None:
    """The report's own format check, before anything is written: every row has its keys, every
    measured one its timings (p50 <= p95), and every reason a row was not measured is given."""
    for row in rows:
        need = REPORT_KEYS | (MEASURED_KEYS if row.get("status") == "ok" else set())
        if missing := need - set(row):
            raise RuntimeError(f"bench row {row.get('workload')} {row.get('setup')} lacks {', '.join(sorted(missing))}")
        if row["status"] != "ok" and not row["reason"]:
            raise RuntimeError(f"bench row {row['workload']} {row['setup']} is {row['status']} without a reason")
        for timing in [row["latency_ms"], *row["stages_ms"].values()] if row["status"] == "ok" else []:
            if not 0 <= timing["p50"] <= timing["p95"]:
                raise RuntimeError(f"bench row {row['workload']} {row['setup']}: p50 / p95 {timing} out of order")


def write_report(out: Path, rows: list[dict]) -> str:
    """Merge `rows` into out/results.json (a configuration measured again replaces its old row),
    then write results.md and results.png from all of them."""
    check_rows(rows)
    path = out / "results.json"
    key = lambda r: (r["workload"], r["setup"], r["model"], r["device"], r.get("gpu_mem_gb"))  # noqa: E731
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    fresh = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in fresh] + rows
    compare(merged)
    path.write_text(json.dumps({"rows": merged}, indent=1) + "\n")
    text = markdown(merged)
    (out / "results.md").write_text(text)
    plot(merged, out / "results.png")
    return text


# -- the command ---------------------------------------------------------------------------------
def _names(value: str, known, what: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise InputError(f"{what} {value!r}: choose from {', '.join(known)}")
    return names


def artifact_setup(folder: Path, names: list[str], precision: str | None) -> str:
    """The setup that times a user's artifact (--artifact), which must fit the one workload named."""
    from edgejudge.manifest import read_manifest

    manifest = read_manifest(folder)
    name = manifest.precision.split("-")[0] if manifest.format == "onnx" else manifest.precision
    if name not in SETUPS or SETUPS[name].backend == "hf":
        raise InputError(f"{folder}: a {manifest.format} {manifest.precision} artifact; the bench times ONNX fp32, fp16 "
                         "or int4 and bnb nf4 artifacts")
    if precision:
        raise InputError("--artifact is timed at its own precision: leave out --precision")
    if len(names) != 1 or WORKLOADS[names[0]].family != manifest.family:
        fits = ", ".join(n for n, w in WORKLOADS.items() if w.family == manifest.family) or "none"
        raise InputError(f"--artifact {folder} is a {manifest.family} judge: name its one workload ({fits})")
    return name


def merge(files: list[str], out: Path) -> int:
    """`--merge`: the rows of earlier runs' results.json files into out's report, nothing run."""
    rows = []
    for name in files:
        try:
            rows += json.loads(Path(name).read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"--merge {name}: not a bench results.json ({type(e).__name__}: {e})") from None
    out.mkdir(parents=True, exist_ok=True)
    print(write_report(out, rows), end="")
    return 0


def run(args) -> int:
    """`edgejudge bench`: plan and build (one process), then each configuration in its own."""
    if args.merge:
        return merge(args.merge, Path(args.out))
    names = list(WORKLOADS) if args.workload == "all" else _names(args.workload, WORKLOADS, "--workload")
    tiny = args.preset == "tiny"
    device = args.device or ("cuda" if open_nvml("cuda") else "cpu")
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:") and device[5:].isdigit()):
        raise InputError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    cuda = device.startswith("cuda")
    if args.artifact:
        edge = [artifact_setup(Path(args.artifact), names, args.precision)]
        tiny = False
    else:
        if not tiny:
            presets = {WORKLOADS[n].preset for n in names}
            if args.preset != "full" and presets != {args.preset}:
                raise InputError(f"--preset {args.preset}: the workloads {', '.join(names)} "
                                 f"use {', '.join(sorted(presets))}")
            if not args.random_weights:
                raise InputError("full-size presets ship no weights: pass --random-weights to time random weights of "
                                 "the real shapes (or --preset tiny, or --artifact DIR)")
        edge = [] if args.precision == "none" else _names(
            args.precision or ("fp16,int4,nf4" if cuda else "fp32"), [s for s in SETUPS if SETUPS[s].backend != "hf"],
            "--precision")
    baselines = {n: [] if args.baseline == "none" else
                 list(WORKLOADS[n].baselines) if args.baseline is None else
                 _names(args.baseline, [s for s in SETUPS if SETUPS[s].backend == "hf"], "--baseline") for n in names}
    if args.runs < 1 or args.warmup < 0:
        raise InputError("--runs must be >= 1 and --warmup >= 0")
    if args.gpu_mem_gb is not None and not args.gpu_mem_gb > 0:
        raise InputError(f"--gpu-mem-gb must be positive, got {args.gpu_mem_gb}")
    out, cache = Path(args.out), Path(args.cache or Path(os.environ.get("EDGEJUDGE_CACHE") or
                                                           Path.home() / ".cache" / "edgejudge") / "bench")
    out.mkdir(parents=True, exist_ok=True)
    nvml = open_nvml(device)

    def log(message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    log(f"planning and building {', '.join(names)} in {cache}")
    planned, _ = in_child("prepare", {"workloads": names, "setups": {n: edge + baselines[n] for n in names},
                                      "cache": str(cache), "device": device, "tiny": tiny,
                                      "tokenizers": args.tokenizers, "gpu_mem_gb": args.gpu_mem_gb,
                                      "artifact": args.artifact, "reference": args.reference,
                                      "adapter": args.adapter}, None)
    if "input_error" in planned:
        raise InputError(planned["input_error"])
    if "error" in planned:  # not the user's input (a full disk, a broken install): one line, exit 1
        print(f"edgejudge: error: bench planning failed: {planned['error']}", file=sys.stderr)
        return 1
    configs = planned["ok"]["configs"]
    refused = [c for c in configs if c["status"] == "refused"]
    ready = [c for c in configs if c["status"] == "ready"]
    if refused and not ready:
        raise InputError(refused[0]["reason"])
    for config in refused:
        print(f"edgejudge: refused: {config['reason']}", file=sys.stderr)
    device_probe = None
    if cuda and ready:
        probed, _ = in_child("probe", {"device": device}, None)
        device_probe = probed.get("ok")
    env = {"device": device_probe["name"] if device_probe else
           device if cuda else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
           "gpu_mem_gb": args.gpu_mem_gb, "date": time.strftime("%Y-%m-%d"), "runs": args.runs, "warmup": args.warmup,
           "device_probe": device_probe}
    rows, text = [], ""
    for config in configs:
        measured = peak = None
        if config["status"] == "ready":
            log(f"measuring {config['workload']} {config['setup']}")
            measured, peak = in_child("measure", {
                **{k: config[k] for k in ("workload", "setup", "model_dir", "adapter_dir")}, "device": device,
                "gpu_mem_gb": args.gpu_mem_gb, "runs": args.runs, "warmup": args.warmup, "tiny": tiny,
                "clips": str(cache / "clips")}, nvml)
        rows.append(finish_row(config, measured, peak, device_probe, env))
        text = write_report(out, rows)  # after every configuration: a run cut short keeps what it measured
    print(text, end="")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0
