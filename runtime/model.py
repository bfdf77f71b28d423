"""Load a checkpoint's non-weight files and turn videos + text into the arrays the model sees.

`load()` reads config.json, the processor configs, the tokenizer and the chat template of an HF
model directory (or an edgejudge artifact, which carries the same files) and picks the family
module; `build_inputs()` produces the arrays under the names HF's processor uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from edgejudge.errors import InputError
from edgejudge.manifest import MANIFEST_NAME, verify_artifact
from edgejudge.runtime import qwen2_5_vl, qwen3_5, qwen3_vl
from edgejudge.runtime.compat import parse_release
from edgejudge.runtime.preprocess import VisionPreprocessing, preprocess_video
from edgejudge.runtime.prompt import Prompter, user_turn
from edgejudge.runtime.video import Clip, FramePicker, parse_sample, sample, uniform_indices

FAMILIES: dict[str, ModuleType] = {"qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl, "qwen3_5": qwen3_5}


@dataclass
class Model:
    """What the runtime needs to know about a checkpoint besides its weights."""

    path: Path
    config: dict
    family_name: str
    family: ModuleType
    vision: VisionPreprocessing
    prompter: Prompter
    hf: str  # the HF release whose input behaviour is reproduced
    video_token_id: int
    max_positions: int


def read_config(model_dir: Path) -> dict:
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise InputError(f"{model_dir}: no such model directory")
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: not a directory (expected a model or artifact folder)")
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError(f"{model_dir}: no config.json (expected a model or artifact folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def load(model_dir: str | Path, hf: str | None = None, verify: bool = True) -> Model:
    """Read a model folder. `hf` picks the HF release to mimic; default: the family's own.

    An edgejudge artifact (a folder with edgejudge.json) is checked against its manifest first
    (`verify`): a changed, missing or truncated file is refused, naming the file.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    if verify and (model_dir / MANIFEST_NAME).is_file():
        verify_artifact(model_dir)
    family_name = config.get("model_type", "")
    if family_name not in FAMILIES:
        raise InputError(f"{model_dir}: model_type {family_name!r} is not one of {', '.join(FAMILIES)}")
    family = FAMILIES[family_name]
    hf = hf or family.HF_DEFAULT
    parse_release(hf)
    prompter = Prompter(model_dir)
    text_config = config.get("text_config", config)
    return Model(
        path=model_dir,
        config=config,
        family_name=family_name,
        family=family,
        vision=VisionPreprocessing.from_model_dir(model_dir),
        prompter=prompter,
        hf=hf,
        video_token_id=int(config["video_token_id"]),
        max_positions=int(text_config.get("max_position_embeddings") or prompter.model_max_length or 1 << 30),
    )


def frame_picker(model: Model, policy: str) -> FramePicker | None:
    """The frames a policy keeps, as a function of the source's frame count and rate (for
    `read_video`'s `pick`): none (None: every frame) | uniform:N | fps:F (F frames a second, by
    the family's own fps rule, which differs between Qwen2-VL-style and Qwen3-VL-style processors)."""
    rule = parse_sample(policy)
    if rule.kind == "none":
        return None
    if rule.kind == "uniform":
        return lambda total, fps: uniform_indices(total, rule.n)
    if rule.kind == "fps":
        def pick(total: int, fps: float | None) -> np.ndarray:
            if fps is None:
                raise InputError("fps sampling needs the video's frame rate: pass --fps for array input")
            return model.family.fps_indices(total, fps, rule.fps, model.vision)
        return pick
    raise InputError(f"--sample {policy}: virtual indices are for pairwise judges, not a single video")


def sample_clip(model: Model, clip: Clip, policy: str) -> Clip:
    """Keep the frames of a whole clip that a policy picks (`frame_picker`)."""
    pick = frame_picker(model, policy)
    return clip if pick is None else sample(clip, pick(clip.total_frames, clip.fps))


def render_prompt(model: Model, num_videos: int, text: str, system: str | None = None) -> str:
    """The prompt as the chat template renders it, before video placeholders are expanded."""
    return model.prompter.render(user_turn(num_videos, text, system), add_generation_prompt=True)


def expand_and_encode(model: Model, prompts: list[str], placeholder: str, texts: list[str], what: str
                      ) -> list[np.ndarray]:
    """Token ids of rendered prompts with their i-th `placeholder` replaced by texts[i] (a vision
    input's pad tokens); InputError when the counts differ or a prompt outgrows the context."""
    expanded = []
    for prompt in prompts:
        pieces = prompt.split(placeholder)
        if len(pieces) != len(texts) + 1:
            raise InputError(f"the chat template produced {len(pieces) - 1} {what} placeholders for {len(texts)} {what}s")
        expanded.append(pieces[0] + "".join(text + after for text, after in zip(texts, pieces[1:])))
    ids = model.prompter.encode_many(expanded)
    if (longest := max(len(i) for i in ids)) + 1 > model.max_positions:
        raise InputError(f"the prompt is {longest} tokens, over the model's context of {model.max_positions}")
    return ids


def prompt_inputs(model: Model, clips: list[Clip], text: str, system: str | None = None) -> dict[str, np.ndarray]:
    """The text side of `build_inputs` (everything but `pixel_values_videos`), for callers that
    preprocess the frames themselves (the engine's vision cache preprocesses only new groups).
    Each video's target size is its grid times the patch size."""
    return prompt_inputs_many(model, clips, [text], system)[0]


def prompt_inputs_many(model: Model, clips: list[Clip], texts: list[str], system: str | None = None
                       ) -> list[dict[str, np.ndarray]]:
    """`prompt_inputs` of several texts about the same videos (a rubric's axes): the videos'
    grids and token texts worked out once, the prompts tokenized as one batch."""
    family, vision = model.family, model.vision
    sizes = [family.target_size(len(c.frames), c.frames.shape[1], c.frames.shape[2], vision, model.hf) for c in clips]
    grids = [vision.grid(len(c.frames), h, w) for c, (h, w) in zip(clips, sizes)]
    video_texts = [family.video_text(clip.indices, clip.fps, grid, vision) for clip, grid in zip(clips, grids)]
    rendered = [render_prompt(model, len(clips), text, system) for text in texts]
    extras = [family.video_extras(clip, vision, model.hf) for clip in clips]
    out = []
    for ids in expand_and_encode(model, rendered, family.video_placeholder(model.hf), video_texts, "video"):
        positions, delta = family.position_ids(ids, model.video_token_id, grids, model.config, extras, model.hf)
        arrays = {
            "input_ids": ids[None, :],
            "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
            "video_grid_thw": np.asarray(grids, dtype=np.int64).reshape(-1, 3),
            "position_ids": positions,
            "rope_deltas": np.asarray([[delta]], dtype=np.int64),
        }
        for key in extras[0] if extras else ():
            arrays[key] = np.asarray([e[key] for e in extras], dtype=np.float32)
        out.append(arrays)
    return out


def build_inputs(model: Model, clips: list[Clip], text: str, system: str | None = None) -> dict[str, np.ndarray]:
    """One user turn: the videos, then the text, then the assistant header.

    Returns input_ids, attention_mask, pixel_values_videos, video_grid_thw, position_ids (3, 1, S),
    rope_deltas, and the family's per-video extras (Qwen2.5-VL: second_per_grid_ts).
    """
    arrays = prompt_inputs(model, clips, text, system)
    grids = arrays["video_grid_thw"]
    # Every video's patches land in one preallocated array (no concatenate copy).
    pixels = np.empty((int(np.prod(grids, axis=1).sum()), model.vision.patch_dim), np.float32)
    row, patch = 0, model.vision.patch_size
    for clip, (t, h, w) in zip(clips, grids.tolist()):
        preprocess_video(clip.frames, (h * patch, w * patch), model.vision, out=pixels[row : row + t * h * w])
        row += t * h * w
    names = ("input_ids", "attention_mask")
    return {**{k: arrays[k] for k in names}, "pixel_values_videos": pixels,
            **{k: v for k, v in arrays.items() if k not in names}}


def image_prompt_inputs(model: Model, messages: list[dict], sizes: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """A conversation with images, as HF's processor and `get_rope_index` give it: input_ids,
    image_grid_thw, position_ids (3, 1, S) and rope_deltas. The messages' `{"type": "image"}`
    items are the images in order; image i is one frame already resized to sizes[i] = (height,
    width), a multiple of the merged patch (HF's image processor then leaves it as it is)."""
    family, vision = model.family, model.vision
    if not hasattr(family, "image_text"):
        raise InputError(f"{model.family_name}: conversations with images are supported for Qwen2.5-VL only")
    grids = [vision.grid(1, h, w) for h, w in sizes]
    prompt = model.prompter.render(messages, add_generation_prompt=True)
    [ids] = expand_and_encode(model, [prompt], family.IMAGE_PAD, [family.image_text(g, vision) for g in grids], "image")
    image_token_id = int(model.config["image_token_id"])
    positions, delta = family.image_position_ids(ids, image_token_id, grids, model.config)
    return {"input_ids": ids[None, :], "image_grid_thw": np.asarray(grids, dtype=np.int64).reshape(-1, 3),
            "position_ids": positions, "rope_deltas": np.asarray([[delta]], dtype=np.int64)}
