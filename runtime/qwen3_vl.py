"""Qwen3-VL: preprocessing constants, prompt expansion and position ids.

Every frame pair (one temporal patch) becomes its own block in the prompt, preceded by its
timestamp as text (`<1.5 seconds>`), so time is carried by text and each block's M-RoPE grid has
t = 1. Where HF releases disagree, `hf` (a release like "4.57" or "5.17") picks the behaviour.
"""

from __future__ import annotations

import math

import numpy as np

from edgejudge.errors import InputError
from edgejudge.runtime import mrope, video
from edgejudge.runtime.compat import hf_at_least
from edgejudge.runtime.preprocess import VisionPreprocessing, smart_resize
from edgejudge.runtime.video import Clip

HF_DEFAULT = "4.57"  # the release line the Qwen3-VL judges were trained with
MROPE_INTERLEAVED = True  # text rotary frequencies cycle t, h, w (HF applies it whatever the config says)
MIN_FRAMES, MAX_FRAMES, DEFAULT_FPS = 4, 768, 24.0  # HF's sample_frames bounds; fps assumed when unknown
VIDEO_PAD, VISION_START, VISION_END = "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"


def target_size(num_frames: int, height: int, width: int, pp: VisionPreprocessing, hf: str) -> tuple[int, int]:
    """Qwen3-VL's smart_resize: the pixel bounds apply to the whole clip (frames x height x width).

    Where releases differ (docs/hf-divergences.md): frames smaller than one merged patch are
    refused before 5.15 and scaled up from 5.15 on; 5.0-5.14 round the frame count up to the
    temporal patch (and accept a single frame), the others round half to even and refuse one
    frame, which we size as the two-frame clip its temporal padding makes of it.
    """
    factor, tf = pp.factor, pp.temporal_patch_size
    ceil_frames = hf_at_least(hf, "5.0") and not hf_at_least(hf, "5.15")
    if not ceil_frames:
        num_frames = max(num_frames, tf)
    if height < factor or width < factor:
        if not hf_at_least(hf, "5.15"):
            raise InputError(f"frames of {height}x{width} are smaller than the model's {factor}-pixel patch")
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    rounded = (math.ceil(num_frames / tf) if ceil_frames else round(num_frames / tf)) * tf
    return smart_resize(height, width, pp, frames=num_frames, rounded_frames=rounded)


def fps_indices(total: int, src_fps: float, fps: float, pp: VisionPreprocessing) -> np.ndarray:
    """HF's fps sampling for this family: round(linspace) over the whole clip."""
    return video.fps_indices_linspace(total, src_fps, fps, MIN_FRAMES, MAX_FRAMES)


def timestamps(indices: np.ndarray, fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch: the mean of its first and last frame's times (the last
    frame repeated to fill an incomplete patch, as the temporal padding does)."""
    idx = list(np.asarray(indices).tolist())
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    secs = [i / fps for i in idx]
    return [(secs[i] + secs[i + temporal_patch_size - 1]) / 2 for i in range(0, len(secs), temporal_patch_size)]


def video_placeholder(hf: str) -> str:
    """What a video's text replaces in the rendered template: releases before 5.10 replace the
    template's whole `<|vision_start|><|video_pad|><|vision_end|>`; 5.10 on replace only `<|video_pad|>`, leaving the
    template's start/end tokens around the frame blocks (doubled)."""
    return VIDEO_PAD if hf_at_least(hf, "5.10") else VISION_START + VIDEO_PAD + VISION_END


def video_text(indices: np.ndarray, fps: float | None, grid: tuple[int, int, int], pp: VisionPreprocessing) -> str:
    """A video's prompt text: per temporal patch its timestamp, then its block of pad tokens."""
    per_frame = grid[1] * grid[2] // pp.merge_size**2
    secs = timestamps(indices, DEFAULT_FPS if fps is None else fps, pp.temporal_patch_size)
    return "".join(f"<{s:.1f} seconds>{VISION_START}{VIDEO_PAD * per_frame}{VISION_END}" for s in secs[: grid[0]])


def video_extras(clip: Clip, pp: VisionPreprocessing, hf: str) -> dict[str, float]:
    """Nothing beyond the grid: time is in the timestamps text."""
    return {}


def position_ids(input_ids: np.ndarray, video_token_id: int, grids: list[tuple[int, int, int]],
                 config: dict, videos: list[dict], hf: str) -> tuple[np.ndarray, int]:
    """One (1, h, w) run per frame block; text resumes after the block's larger side."""
    merge = config["vision_config"]["spatial_merge_size"]
    runs = [(1, h // merge, w // merge) for t, h, w in grids for _ in range(t)]
    return mrope.mrope_position_ids(input_ids, video_token_id, runs, [1] * len(runs), mrope.resume_after_max)
