"""Frames -> `pixel_values_videos` and `video_grid_thw`, exactly as the HF Qwen video processors.

Shared by every family: the family module only decides the target size (its smart_resize). The
steps, in HF's order: resize (uint8, bicubic with antialias), rescale + normalize in float32,
temporal padding by repeating the last frame, then the patch flattening order of
Qwen2VLVideoProcessor.patchify, which the vision encoder's patch embedding expects.

Normalization maps each uint8 level to one float32 value per channel (`normalize_table`), so it
commutes with the patch shuffle. The ONNX vision graph takes the shuffled uint8 levels
(`patch_levels`) and looks them up in that table on the device: a quarter of the bytes to upload
and no float pass on the host. `patchify` gives the float32 values themselves (HF's model input:
the torch backend and the parity checks), and `levels_from_pixel_values` inverts it exactly.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edgejudge.errors import InputError
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

    @property
    def patch_dim(self) -> int:
        """Values in one patch row: 3 channels x temporal patch x patch x patch."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The patch grid of `num_frames` frames resized to height x width (odd counts padded)."""
        return -(-num_frames // self.temporal_patch_size), height // self.patch_size, width // self.patch_size

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def smart_resize(height: int, width: int, pp: VisionPreprocessing, frames: int = 1, rounded_frames: int = 1
                 ) -> tuple[int, int]:
    """HF's smart_resize: sides rounded to multiples of the merged patch, then scaled (keeping the
    aspect ratio) until rounded_frames x height x width lies within the pixel bounds. Qwen2-VL-style
    processors bound one frame (frames = 1); Qwen3-VL-style ones the whole clip."""
    factor = pp.factor
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over the model's limit of 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if rounded_frames * h_bar * w_bar > pp.max_pixels:
        beta = math.sqrt(frames * height * width / pp.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif rounded_frames * h_bar * w_bar < pp.min_pixels:
        beta = math.sqrt(pp.min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _fused_mean_std(pp: VisionPreprocessing) -> tuple[np.ndarray, np.ndarray]:
    """HF fuses rescale and normalize as (x - mean/scale) / (std/scale) in float32 with
    scale = 1/255: mean and std are float32 tensors multiplied by the Python float 1/scale."""
    inv_scale = np.float32(1.0 / (1.0 / 255.0))
    return np.asarray(pp.image_mean, np.float32) * inv_scale, np.asarray(pp.image_std, np.float32) * inv_scale


def normalize_table(pp: VisionPreprocessing) -> np.ndarray:
    """(3, 256) float32: the normalized value of every uint8 level for each channel. Evaluating
    HF's formula once per level and looking it up gives the same float32 bits as computing it per
    pixel, at a fraction of the cost; the vision graph holds this table and looks levels up on the
    device."""
    mean, std = _fused_mean_std(pp)
    levels = np.arange(256, dtype=np.float32)
    return (levels[None, :] - mean[:, None]) / std[:, None]


def levels_from_pixel_values(pixel_values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(N, patch_dim) normalized float32 pixel values (HF's `pixel_values_videos`) -> the uint8
    levels they were looked up from in `table` (`normalize_table`, columns grouped by channel).
    Exact: each channel's table is strictly increasing, so a binary search finds the one level a
    value is; a value that is no level's (not the processor's output) is an InputError."""
    levels = np.empty(pixel_values.shape, np.uint8)
    per_channel = pixel_values.shape[1] // len(table)
    for channel, values in enumerate(table):
        columns = slice(channel * per_channel, (channel + 1) * per_channel)
        found = np.minimum(np.searchsorted(values, pixel_values[:, columns]), 255)
        if not np.array_equal(values[found], pixel_values[:, columns]):
            raise InputError("pixel values that no uint8 level normalizes to: not the processor's output")
        levels[:, columns] = found
    return levels


def _row_dtype(nbytes: int) -> np.dtype:
    """The widest plain dtype that tiles a patch row of `nbytes` uint8 pixels."""
    for dtype in (np.complex128, np.uint64, np.uint32, np.uint16):
        if nbytes % np.dtype(dtype).itemsize == 0:
            return np.dtype(dtype)
    return np.dtype(np.uint8)


_scratch = threading.local()


def _scratch_buffer(role: str, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 work buffer per thread and role, kept for the last shape seen: a control loop calls
    with the same shape every time, and first-touch page faults cost as much as the work itself."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(role)
    if buffer is None or buffer.shape != shape:
        buffer = buffers[role] = np.empty(shape, np.uint8)
    return buffer


def _checked_out(out: np.ndarray | None, shape: tuple[int, int], dtype: type) -> np.ndarray:
    """`out` if it is a contiguous `dtype` array of `shape`, a new array when it is None."""
    if out is None:
        return np.empty(shape, dtype)
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous {np.dtype(dtype).name} array of shape {shape}")
    return out


def patch_levels(frames: np.ndarray, pp: VisionPreprocessing, out: np.ndarray | None = None
                 ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(T, H, W, 3) uint8 frames already at the target size -> (levels, (grid_t, grid_h, grid_w)):
    the (N, patch_dim) uint8 patch rows, before normalization. What the ONNX vision graph takes.

    Odd frame counts are padded by repeating the last frame (HF's temporal padding). Each row is
    one patch: channel, then time within the temporal patch, then the patch's pixels; rows go
    grid_t, then merge-window row and column, then the position inside the merge window.

    The shuffle moves each patch row of pixels as one wide element, which keeps numpy's copy loops
    long. `out`, a uint8 buffer of the result's size, saves the allocation when the caller reuses
    one (benchmarks/preprocess.py times both ways).
    """
    t, h, w, c = frames.shape
    p, tp, m = pp.patch_size, pp.temporal_patch_size, pp.merge_size
    if pad := -t % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
        t += pad
    gt, gh, gw = t // tp, h // p, w // p
    n = gt * gh * gw
    out = _checked_out(out, (n, c * tp * p * p), np.uint8)
    planes = _scratch_buffer("planes", (c, t * h, w))
    cv2.split(np.ascontiguousarray(frames).reshape(t * h, w, c), list(planes))
    shuffled = out.reshape(n, c, tp, p, p)
    row = _row_dtype(p)
    k = p // row.itemsize  # wide elements per patch row
    for ch in range(c):
        src = planes[ch].view(row).reshape(gt, tp, gh // m, m, p, gw // m, m, k)
        dst = shuffled[:, ch].view(row).reshape(gt, gh // m, gw // m, m, m, tp, p, k)
        dst[...] = src.transpose(0, 2, 5, 3, 6, 1, 4, 7)
    return out, (gt, gh, gw)


def patchify(frames: np.ndarray, pp: VisionPreprocessing, out: np.ndarray | None = None
             ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(T, H, W, 3) uint8 frames already at the target size -> (patches, (grid_t, grid_h, grid_w)):
    HF's normalized float32 pixel values (the torch backend and HF parity take these), in
    `patch_levels`' order.

    The shuffle happens on uint8 levels, and only then does a lookup table turn them into
    normalized float32: the float pass is single. `out`, a float32 buffer of the result's size,
    saves the allocation when the caller reuses one.
    """
    grid = pp.grid(len(frames), frames.shape[1], frames.shape[2])
    n = int(np.prod(grid))
    out = _checked_out(out, (n, pp.patch_dim), np.float32)
    levels, _ = patch_levels(frames, pp, _scratch_buffer("levels", (n, pp.patch_dim)))
    table = normalize_table(pp)
    rows = levels.reshape(n * 3, -1)
    if (table == table[0]).all():  # same mean and std on every channel (Qwen3-VL, Qwen3.5): one pass
        cv2.LUT(rows, table[0].reshape(1, 256), dst=out.reshape(n * 3, -1))
    else:  # per-channel constants: levels to float, then HF's (x - mean) / std in place
        cv2.LUT(rows, np.arange(256, dtype=np.float32).reshape(1, 256), dst=out.reshape(n * 3, -1))
        mean, std = _fused_mean_std(pp)
        patches = out.reshape(n, 3, -1)
        patches -= mean[None, :, None]
        patches /= std[None, :, None]
    return out, grid


def _at_size(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames resized to `size` = (height, width), unless they are already."""
    height, width = size
    if frames.shape[1:3] != (height, width):
        frames = resize_bicubic_antialias(frames, height, width)
    return frames


def preprocess_video(frames: np.ndarray, size: tuple[int, int], pp: VisionPreprocessing,
                     out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resize (T, H, W, 3) uint8 RGB frames to `size` = (height, width) and patchify them (float32)."""
    return patchify(_at_size(frames, size), pp, out)


def preprocess_video_levels(frames: np.ndarray, size: tuple[int, int], pp: VisionPreprocessing,
                            out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resize (T, H, W, 3) uint8 RGB frames to `size` = (height, width) and shuffle them into the
    uint8 patch rows the ONNX vision graph takes (`patch_levels`)."""
    return patch_levels(_at_size(frames, size), pp, out)
