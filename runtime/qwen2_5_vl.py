"""Qwen2.5-VL: preprocessing constants, prompt expansion and position ids.

The whole video is one block of `<|video_pad|>` tokens; time is carried by the M-RoPE time axis,
spaced by `tokens_per_second * int(second_per_grid_ts)` per temporal patch, where
second_per_grid_ts = temporal_patch_size / sampled fps. Where HF releases disagree, `hf` (a
release like "4.57" or "5.17") picks the behaviour. An image (VR-Thinker's frames) is one block of
`<|image_pad|>` tokens: one frame, repeated to fill a temporal patch, at a single time position.
"""

from __future__ import annotations

import numpy as np

from edgejudge.runtime import mrope, video
from edgejudge.runtime.compat import hf_at_least
from edgejudge.runtime.preprocess import VisionPreprocessing, smart_resize
from edgejudge.runtime.video import Clip

HF_DEFAULT = "4.57"  # the release line the Qwen2.5-VL judges were trained with
MROPE_INTERLEAVED = False  # text rotary frequencies in contiguous t, h, w sections
MIN_FRAMES, MAX_FRAMES = 4, 768  # HF's sample_frames bounds
VIDEO_PAD = "<|video_pad|>"
IMAGE_PAD = "<|image_pad|>"


def target_size(num_frames: int, height: int, width: int, pp: VisionPreprocessing, hf: str) -> tuple[int, int]:
    """Qwen2-VL's smart_resize: the pixel bounds apply to one frame."""
    return smart_resize(height, width, pp)


def fps_indices(total: int, src_fps: float, fps: float, pp: VisionPreprocessing) -> np.ndarray:
    """HF's fps sampling for Qwen2-VL-style processors: a float-step arange, truncated."""
    return video.fps_indices_arange(total, src_fps, fps, pp.temporal_patch_size, MIN_FRAMES, MAX_FRAMES)


def video_extras(clip: Clip, pp: VisionPreprocessing, hf: str) -> dict[str, float]:
    """second_per_grid_ts: seconds covered by one temporal patch, at the sampled frame rate
    (source fps x sampled / total frames). When the source rate is unknown, 4.x assumes a
    sampled rate of 2 fps and 5.x a source rate of 24 fps."""
    if clip.fps is None and not hf_at_least(hf, "5.0"):
        sampled_fps = 2.0
    else:
        sampled_fps = (24.0 if clip.fps is None else clip.fps) * len(clip.indices) / clip.total_frames
    return {"second_per_grid_ts": pp.temporal_patch_size / sampled_fps}


def video_placeholder(hf: str) -> str:
    """What a video's text replaces in the rendered template."""
    return VIDEO_PAD


def video_text(indices: np.ndarray, fps: float | None, grid: tuple[int, int, int], pp: VisionPreprocessing) -> str:
    """A video's prompt text: one pad per merged token."""
    return VIDEO_PAD * (int(np.prod(grid)) // pp.merge_size**2)


def image_text(grid: tuple[int, int, int], pp: VisionPreprocessing) -> str:
    """An image's prompt text: one pad per merged token (the image is one temporal patch)."""
    return IMAGE_PAD * (int(np.prod(grid)) // pp.merge_size**2)


def position_ids(input_ids: np.ndarray, video_token_id: int, grids: list[tuple[int, int, int]],
                 config: dict, videos: list[dict], hf: str) -> tuple[np.ndarray, int]:
    """One run per video. Text after a video resumes one past its largest position (before 5.3),
    or at its start plus its larger spatial side, ignoring the time axis (5.3 on)."""
    vision = config["vision_config"]
    merge, tps = vision["spatial_merge_size"], vision["tokens_per_second"]
    runs = [(t, h // merge, w // merge) for t, h, w in grids]
    intervals = [tps * int(v["second_per_grid_ts"]) for v in videos]
    resume = mrope.resume_after_spatial_extent if hf_at_least(hf, "5.3") else mrope.resume_after_max
    return mrope.mrope_position_ids(input_ids, video_token_id, runs, intervals, resume)


def image_position_ids(input_ids: np.ndarray, image_token_id: int, grids: list[tuple[int, int, int]],
                       config: dict) -> tuple[np.ndarray, int]:
    """One run per image, all at the time position the image starts at (a still image has no time
    to space out). Text resumes one past the image's larger spatial side, which every release
    agrees on: D1's two rules differ only when the time axis outruns the spatial ones."""
    merge = config["vision_config"]["spatial_merge_size"]
    runs = [(t, h // merge, w // merge) for t, h, w in grids]
    return mrope.mrope_position_ids(input_ids, image_token_id, runs, [0] * len(runs), mrope.resume_after_max)
