"""Qwen2.5-VL's vision encoder on ONNX Runtime, one 2-frame group per batch row (numpy only).

The graph (written by `edgejudge.export.qwen2_5_vl`) takes `patches` (G, S, patch_dim) uint8
levels (`edgejudge.runtime.preprocess.patch_levels`; the graph normalizes them), `window_mask`
(S, S), `cos`, `sin` (S, head_dim) and returns `features` (G, S/4, out), all in the processor's
row order. What depends only on the grid (h, w) is built here from the `.npz` next to
the graph, following HF 5.17:

- `window_index`, `cu_window_seqlens`: `transformers.vision_utils.get_vision_window_index` step
  for step: the (h/2, w/2) grid of merged units is padded on the bottom and right by
  `win - side % win` (a whole empty window when the side is already a multiple; empty windows
  drop out), cut into win x win windows (win = window_size // merge // patch_size), read window by
  window, row-major inside each window.
- `window_mask`: 0 between two patches of the same window, float32's most negative number between
  two patches of different windows. The graph adds it to the attention scores of every block that
  is not in `fullatt_block_indexes`, which equals HF's per-window attention (HF permutes the merged
  units into window order and back; attention with a consistently permuted mask and rotary does
  not care, and the other layers act row by row or on one merged unit).
- `cos`, `sin`: the axial 2D rotary (same as Qwen3-VL's, `edgejudge.runtime.vision.rotary_tables`):
  angles `pos * inv_freq` for the row and the column position, laid out `[h, w, h, w]`.

Groups of one video are contiguous runs of h*w rows in `pixel_values_videos`; windows and full
attention both stay inside one group (HF's `cu_seqlens` and windows are per grid_t index), so
groups can be encoded separately (and cached) or batched, with the same result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgejudge.runtime.vision import GroupedVisionGraph, merge_order_positions, rotary_tables

__all__ = ["VisionEncoder", "merge_order_positions", "rotary_tables", "window_ids", "window_index", "window_mask"]

MASK_VALUE = np.finfo(np.float32).min


def window_index(grid_t: int, grid_h: int, grid_w: int, merge: int, window_size: int, patch_size: int,
                 offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """HF's `get_vision_window_index` for one (t, h, w) entry: (window_index (t*h*w/merge^2,) int64,
    the merged-unit permutation into window order, and the window lengths in merged units, empty
    windows left out). `offset` is added to the indexes, as HF does for later entries."""
    win = window_size // merge // patch_size
    lh, lw = grid_h // merge, grid_w // merge
    index = np.arange(grid_t * lh * lw, dtype=np.int64).reshape(grid_t, lh, lw)
    pad_h = win - lh % win
    pad_w = win - lw % win
    nh, nw = (lh + pad_h) // win, (lw + pad_w) // win
    padded = np.full((grid_t, lh + pad_h, lw + pad_w), -100, dtype=np.int64)
    padded[:, :lh, :lw] = index
    padded = padded.reshape(grid_t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(grid_t, nh * nw, win, win)
    seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
    flat = padded.reshape(-1)
    return flat[flat != -100] + offset, seqlens[seqlens > 0]


def cu_window_seqlens(grid_thw, merge: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """HF's `get_vision_window_index` over several entries: (window_index, cu_window_seqlens int32)."""
    indexes, cu, start = [], [0], 0
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist():
        idx, lens = window_index(t, h, w, merge, window_size, patch_size, offset=start)
        indexes.append(idx)
        cu.extend((np.cumsum(lens) * merge * merge + cu[-1]).tolist())
        start += t * (h // merge) * (w // merge)
    cu_arr = np.asarray(cu, dtype=np.int32)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])  # torch.unique_consecutive
    return (np.concatenate(indexes) if indexes else np.zeros(0, np.int64)), cu_arr[keep]


def window_ids(h: int, w: int, merge: int, window_size: int, patch_size: int) -> np.ndarray:
    """(h*w,) int64: the window each of one group's patches (processor order) attends in."""
    idx, lens = window_index(1, h, w, merge, window_size, patch_size)
    unit_window = np.empty(len(idx), dtype=np.int64)
    unit_window[idx] = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
    return np.repeat(unit_window, merge * merge)


def window_mask(h: int, w: int, merge: int, window_size: int, patch_size: int) -> np.ndarray:
    """(h*w, h*w) float32 additive attention bias of the windowed blocks for one group."""
    ids = window_ids(h, w, merge, window_size, patch_size)
    return np.where(ids[:, None] == ids[None, :], np.float32(0), MASK_VALUE).astype(np.float32)


class VisionEncoder(GroupedVisionGraph):
    """Qwen2.5-VL: windowed attention as an additive mask per grid, 2D rotary."""

    def __init__(self, onnx_path: str | Path, providers=("CPUExecutionProvider",), max_groups: int | None = None,
                 release_arena: bool = True):
        super().__init__(onnx_path, providers, max_groups, release_arena)
        self.patch_size = int(self.tables["patch_size"])
        self.window_size = int(self.tables["window_size"])

    def _grid_tables(self, h: int, w: int) -> dict[str, np.ndarray]:
        cos, sin = rotary_tables(self.inv_freq, h, w, self.merge)
        return {"window_mask": window_mask(h, w, self.merge, self.window_size, self.patch_size), "cos": cos, "sin": sin}

    def encode_groups(self, patches: np.ndarray, h: int, w: int) -> np.ndarray:
        """Run (G, h*w, patch_dim) uint8 groups of one grid: features (G, h*w/4, out)."""
        return self.run_groups(patches, h, w)[0]

    def encode(self, pixel_values_videos: np.ndarray, video_grid_thw: np.ndarray) -> tuple[np.ndarray, list]:
        """(features (N/4, out), []) of HF's float32 pixel values: what `model.model.visual(...)`
        returns as pooler_output, and no DeepStack taps (the same shape of answer as Qwen3-VL's encoder)."""
        return self._encode(pixel_values_videos, video_grid_thw)[0], []
