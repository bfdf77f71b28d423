"""Frames -> `pixel_values_videos` and `video_grid_thw`, exactly as the HF Qwen video processors.

Shared by every family: the family module only decides the target size (its smart_resize). The
steps, in HF's order: resize (uint8, bicubic with antialias), rescale + normalize in float32,
temporal padding by repeating the last frame, then the patch flattening order of
Qwen2VLVideoProcessor.patchify, which the vision encoder's patch embedding expects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgejudge.runtime.resize import resize_bicubic_antialias


@dataclass(frozen=True)
class VisionPreprocessing:
    """The processor constants of one checkpoint (its video_preprocessor_config.json)."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def factor(self) -> int:
        """Side lengths must be multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "VisionPreprocessing":
        """Reads video_preprocessor_config.json, falling back to preprocessor_config.json as HF does
        for checkpoints (Qwen2.5-VL) that ship only the latter."""
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = Path(model_dir) / name
            if path.is_file():
                cfg = json.loads(path.read_text())
                break
        else:
            raise FileNotFoundError(f"{model_dir}: no video_preprocessor_config.json or preprocessor_config.json")
        size = cfg.get("size") or {}
        return cls(
            patch_size=int(cfg["patch_size"]),
            temporal_patch_size=int(cfg["temporal_patch_size"]),
            merge_size=int(cfg["merge_size"]),
            min_pixels=int(cfg.get("min_pixels") or size["shortest_edge"]),
            max_pixels=int(cfg.get("max_pixels") or size["longest_edge"]),
            image_mean=tuple(float(x) for x in cfg["image_mean"]),
            image_std=tuple(float(x) for x in cfg["image_std"]),
        )

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _normalize_table(pp: VisionPreprocessing) -> np.ndarray:
    """(3, 256) float32: the normalized value of every uint8 level for each channel.

    HF fuses rescale and normalize as (x - mean/scale) / (std/scale) in float32 with
    scale = 1/255 (mean and std are float32 tensors multiplied by the Python float 1/scale).
    Evaluating that formula once per level and looking it up gives the same float32 bits as
    computing it per pixel, at a fraction of the cost.
    """
    inv_scale = 1.0 / (1.0 / 255.0)
    mean = np.asarray(pp.image_mean, dtype=np.float32) * np.float32(inv_scale)
    std = np.asarray(pp.image_std, dtype=np.float32) * np.float32(inv_scale)
    levels = np.arange(256, dtype=np.float32)
    return ((levels[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)


def patchify(frames: np.ndarray, pp: VisionPreprocessing) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(T, H, W, 3) uint8 frames already at the target size -> (patches, (grid_t, grid_h, grid_w)).

    Odd frame counts are padded by repeating the last frame (HF's temporal padding). Each row is
    one patch: channel, then time within the temporal patch, then the patch's pixels; rows go
    grid_t, then merge-window row and column, then the position inside the 2x2 merge window.
    """
    t, h, w, c = frames.shape
    p, tp, m = pp.patch_size, pp.temporal_patch_size, pp.merge_size
    if pad := -t % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
        t += pad
    gt, gh, gw = t // tp, h // p, w // p
    table = _normalize_table(pp)
    # Normalize while still uint8-sized in memory order: one gather per channel.
    x = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
    # axes: 0 gt, 1 tp, 2 bh, 3 mh, 4 ph, 5 bw, 6 mw, 7 pw, 8 c  ->  gt bh bw mh mw c tp ph pw
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    x = np.ascontiguousarray(x).reshape(gt * gh * gw, c, tp * p * p)
    out = np.empty(x.shape, dtype=np.float32)
    for ch in range(c):
        np.take(table[ch], x[:, ch], out=out[:, ch])
    return out.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def preprocess_video(frames: np.ndarray, size: tuple[int, int], pp: VisionPreprocessing):
    """Resize (T, H, W, 3) uint8 RGB frames to `size` = (height, width) and patchify them."""
    height, width = size
    if frames.shape[1:3] != (height, width):
        frames = resize_bicubic_antialias(frames, height, width)
    return patchify(frames, pp)
