"""The bench's workloads as data and the arithmetic on them: what each seed judge is asked
(`WORKLOADS`), the setups a configuration runs it on (`SETUPS`), its synthetic clips, and the
model shapes, FLOP and byte counts that the plan, the memory cap and the report's floors use.
The counts are functions of JSON dicts (a model's shape, a token plan), so that a report row
is computed from what the planning process wrote.

- Workloads are data (`WORKLOADS`): the model, the clip, the prompt fields, the answer. The bench
  prompts are ours (the seeds' own prompts ship with their models); the clips are synthetic.
- Configurations are a workload on one setup (`SETUPS`): an edgejudge artifact (ONNX fp16 / int4 on
  ONNX Runtime, bnb nf4 on the torch backend) or an HF baseline. The baseline is the seed recipe:
  HF's processor per prompt, SDPA, the LoRA adapter unmerged through PEFT; candidate labels each by
  its own full forward per view, text answers by one `generate` per question.

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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgejudge.specs import JudgeSpec, get_spec

GIB = 1 << 30
# What the memory estimate adds besides weights, KV cache and activations, measured on the lent H100
# (benchmarks/RESULTS.md, 2026-11-23) and rounded up: per backend, what a loaded process holds on
# the device beyond its weights (the CUDA context, the libraries' handles and workspaces, the
# allocator's slack). ONNX: NVML after `Judge.load` of W1 int4 minus its weights (0.89 GiB). torch
# and HF: the largest excess of a measured peak over weights + KV + activations + 0.5 GiB of
# context (W3 nf4 1.0 GiB, W3 HF 1.95 GiB). Rounded so that every peak measured that day is at
# least 0.2 GiB under its estimate.
OVERHEAD_BYTES = {"onnx": 1.0 * GIB, "torch": 1.8 * GIB, "hf": 2.7 * GIB}
# ONNX Runtime's decoder arena at its peak (prefill activations, a step, the LM head): a fixed part
# plus, per token prefilled in one run, this many of one token's (intermediate + hidden) floats;
# fitted on W1 and W3 int4 (1.3 GiB + 8.8 of them: 2.04 and 4.10 GiB measured), rounded up. The
# vision arena, handed back after each call: this many of a patch row's (intermediate + hidden)
# floats per row of its largest run (W1: 0.58 GiB for 8,036 rows).
ONNX_DECODER_FIXED, ONNX_DECODER_PER_TOKEN, ONNX_VISION_PER_ROW = 1.4 * GIB, 9.0, 8.0
# The torch backend's prompt prefill graph keeps its one-row cache, buffers and the memory pool of
# its forward between requests: this many of one prompt token's (intermediate + hidden) floats
# (measured on the H100: 0.609 GiB reserved for W2's 1,224 tokens, 16.3 of them; rounded up).
TORCH_PROMPT_GRAPH_PER_TOKEN = 17.0
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
    target_setups: tuple[str, ...] = ()  # the setups the targets are for (all when empty)

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
             targets={"decode_tokens_per_s": 150}, target_setups=("int4",)),
)}


@dataclass(frozen=True)
class Setup:
    """How a configuration runs: edgejudge on one artifact format, or an HF baseline."""

    name: str
    label: str
    backend: str  # onnx (ONNX Runtime) | torch (edgejudge's torch backend, bnb artifact) | hf (the seed recipe)
    export: str = ""  # the artifact's precision (onnx, bnb), or the baseline's quantization
    weight_bits: float | None = None  # a quantized decoder linear weight's bits, scales included (None: float)
    head_bits: float | None = None  # the ONNX LM head's, likewise (None: float)
    vision_bits: float | None = None  # the ONNX vision tower's linears', likewise (None: float)


NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, an 8-bit absmax per 64, an fp32 scale per 256 absmax
SETUPS: dict[str, Setup] = {s.name: s for s in (
    Setup("fp32", "edgejudge ONNX fp32", "onnx", "fp32"),
    Setup("fp16", "edgejudge ONNX fp16", "onnx", "fp16"),
    # the LM head and the vision tower at 8 bits (llama.cpp's Q4 files keep the head at 6 or more,
    # their vision projectors at 8 or more): half the fp16 weights
    Setup("int4", "edgejudge ONNX int4 (RTN, block 128; int8 LM head and vision)", "onnx", "int4", 4 + 16 / 128,
          8 + 16 / 128, 8 + 16 / 128),
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
        "heads": vision.num_heads, "merge": vision.spatial_merge_size, "out_hidden": vision.out_hidden_size,
        "taps": len(getattr(vision, "deepstack_visual_indexes", None) or ()),
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
    the decoder's linears, the card's recipe and edgejudge's int4 artifact the vision tower's too."""
    linear = shape["decoder"] * (setup.weight_bits / 8 if setup.weight_bits else float_bytes)
    vision_bits = NF4_BITS if setup.name == "hf-nf4" else setup.vision_bits
    vision = (shape["vision"] + shape["merger"]) * (vision_bits / 8 if vision_bits else float_bytes)
    other = (shape["vision_other"] + shape["decoder_other"]) * float_bytes
    if setup.backend == "onnx":
        return linear + vision + other + shape["head"] * (setup.head_bits / 8 if setup.head_bits else float_bytes)
    tables = shape["embed"] + (0 if shape["tied"] else shape["head"])
    return linear + vision + other + tables * float_bytes + shape["lora"] * float_bytes


def memory_estimate(shape: dict, plan: dict, setup: Setup, workload: Workload, cuda: bool) -> dict[str, float]:
    """Bytes on the device, before anything loads: weights + KV cache + the largest transient
    buffers of one forward (+ the backend's measured overhead on CUDA, `OVERHEAD_BYTES`). Rows and
    tokens are what each backend holds at its peak: ONNX copies a prefilled view's cache once per
    label of several tokens when there are two or more (`runtime.engine.cache_copies`); the torch
    backend copies it once per label, and holds a rubric's shared prefix and its decode rows (a
    greedy row and a score row per question, their room rounded up to `ROWS_ROOM` tokens); HF one
    sequence at a time. ONNX's cache buffers allocated ahead of a run come from onnxruntime's
    Python-side CUDA arena, which grows by powers of two: up to twice the cache is reserved;
    scoring whose prefill carries every label token holds one layer's cache. ONNX also keeps
    the vision outputs in a store on the device (in that arena too), sized for the cache's groups
    or the call's, and gathers the decoder's inputs from it (`splice.onnx`)."""
    from edgejudge.runtime.engine import CACHE_GROUPS
    from edgejudge.runtime.vision import groups_per_run
    from edgejudge.torch_backend import ROWS_ROOM, cache_bytes

    float_bytes = 4 if setup.export == "fp32" or (setup.backend != "onnx" and not cuda) else 2
    text, vis = shape["text"], shape["vis"]
    fed = sum(n > 1 for n in plan["labels"])
    if plan["labels"]:
        width = max(plan["labels"])
        copies = len(plan["labels"]) if setup.backend == "torch" else (fed if fed > 1 else 0)
        rows, tokens = (plan["videos"] * (1 + copies), plan["prompt"] + width - 1) \
            if setup.backend != "hf" else (1, plan["prompt"] + width)
    elif setup.backend == "torch":  # the prefix, and a greedy row and a score row per question
        rows = 1 + (2 if workload.spec.score_prefix else 1) * len(plan["suffixes"])
        tokens = -(-(plan["prompt"] + workload.spec.max_new_tokens) // ROWS_ROOM) * ROWS_ROOM
    else:
        rows, tokens = 1, plan.get("cache_tokens", plan["prompt"] + workload.spec.max_new_tokens)
    # ONNX scoring whose prefill carries every label token keeps no cache: its layers share one
    # layer's buffers (`TextDecoder.prefill(keep_cache=False)`); cache buffers allocated ahead (for
    # tokens fed after) come from the power-of-two arena
    no_cache = setup.backend == "onnx" and bool(plan["labels"]) and fed <= 1
    arena_cache = setup.backend == "onnx" and cuda
    kv = (cache_bytes(text["config"], rows, tokens, float_bytes) * (2 if arena_cache else 1)
          / (text["full_layers"] if no_cache else 1))
    prompt_rows = plan["videos"] if plan["labels"] and setup.backend != "hf" else 1
    groups, patches = plan["groups"], plan["patches_per_group"]
    if setup.backend == "onnx":
        run_rows = groups_per_run(plan["videos"] * groups, patches) * patches
        vision = ONNX_VISION_PER_ROW * run_rows * (vis["intermediate"] + vis["hidden"]) * float_bytes
        decoder = prompt_rows * plan["prompt"] * ONNX_DECODER_PER_TOKEN * (text["intermediate"] + text["hidden"]) * float_bytes
        # the vision store (in the same Python-side arena as the cache: counted twice on CUDA) and
        # the splice's outputs, the decoder's inputs (held while the prefill runs)
        store = (max(plan["videos"] * groups, CACHE_GROUPS) * (patches // vis["merge"] ** 2) * (1 + vis["taps"])
                 * vis["out_hidden"] * float_bytes) * (2 if cuda else 1)
        splice = prompt_rows * plan["prompt"] * (1 + vis["taps"]) * text["hidden"] * float_bytes
        activations = store + splice + max(vision, decoder + (ONNX_DECODER_FIXED if cuda else 0))
    else:
        # HF's forward computes the logits of every position; edgejudge only where they are read
        logit_positions = plan["prompt"] if setup.backend == "hf" and plan["labels"] else rows
        vision = groups * patches * (2 * vis["intermediate"] + 4 * vis["hidden"]) * float_bytes
        activations = max(prompt_rows * plan["prompt"] * (2 * text["intermediate"] + 4 * text["hidden"]) * float_bytes
                          + logit_positions * text["vocab"] * (4 + float_bytes), vision)
        if setup.backend == "torch" and not plan["labels"]:
            # decode's two CUDA graphs (the rows' common tokens, one token a row) keep their buffers
            # between requests: each its logits and a dequantized weight, the first its activations;
            # so does the prompt's prefill graph, whose pool then holds the prefill's activations
            answer_rows, common = rows - 1, min(plan["suffixes"])
            graph = answer_rows * text["vocab"] * (4 + float_bytes) + text["hidden"] * text["intermediate"] * float_bytes
            prompt_graph = (TORCH_PROMPT_GRAPH_PER_TOKEN * plan["prompt"] * (text["intermediate"] + text["hidden"])
                            * float_bytes)
            activations = (vision + prompt_graph + 2 * graph
                           + answer_rows * common * (2 * text["intermediate"] + 4 * text["hidden"]) * float_bytes)
    weights = device_weight_bytes(shape, setup, float_bytes)
    overhead = OVERHEAD_BYTES[setup.backend] if cuda else 0
    total = weights + kv + activations + overhead
    return {"weights_gib": weights / GIB, "kv_cache_gib": kv / GIB, "activations_gib": activations / GIB,
            "overhead_gib": overhead / GIB, "total_gib": total / GIB}


def decode_step_bytes(shape: dict, setup: Setup, context: int) -> float:
    """What one greedy step must read (fp16 / bf16 floats): the decoder's and the LM head's
    weights, and the KV cache."""
    linear = shape["decoder"] * (setup.weight_bits / 8 if setup.weight_bits else 2)
    head = shape["head"] * (setup.head_bits / 8 if setup.head_bits else 2)
    return linear + head + context * kv_bytes_per_token(shape, 2)
