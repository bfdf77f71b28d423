"""3D M-RoPE position ids, the mechanism all three families share.

Text tokens advance one position at a time on all three axes. A run of vision tokens laid out as a
(t, h, w) grid of merged tokens gets (start + t * time_interval, start + row, start + column);
what differs per family (and per HF release) is the time interval and where the text after the
run resumes, so those come in as arguments.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

# Where text resumes after a vision run: given the run's start and its positions, return the next.
ResumeRule = Callable[[int, np.ndarray], int]


def resume_after_max(start: int, positions: np.ndarray) -> int:
    """One past the largest position any axis of the run used."""
    return int(positions.max()) + 1


def resume_after_spatial_extent(start: int, positions: np.ndarray) -> int:
    """start + the larger spatial side, ignoring how far the time axis went."""
    return int(max(positions[1].max(), positions[2].max())) + 1


@lru_cache(maxsize=64)
def _grid_positions(grid: tuple[int, int, int], time_interval: int) -> np.ndarray:
    """Positions of a run starting at 0; cached because every frame block of a clip shares one."""
    t, h, w = grid
    tt, hh, ww = np.meshgrid(np.arange(t) * time_interval, np.arange(h), np.arange(w), indexing="ij")
    positions = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]).astype(np.int64)
    positions.flags.writeable = False
    return positions


def vision_positions(start: int, grid: tuple[int, int, int], time_interval: int) -> np.ndarray:
    """(3, t*h*w) positions of one run of merged vision tokens, row-major over (t, h, w)."""
    return _grid_positions(tuple(int(g) for g in grid), int(time_interval)) + start


def mrope_position_ids(
    input_ids: np.ndarray,
    vision_token_id: int,
    grids: Sequence[tuple[int, int, int]],
    time_intervals: Sequence[int],
    resume: ResumeRule,
) -> tuple[np.ndarray, int]:
    """Position ids (3, 1, S) for one sequence, and the rope delta used when decoding after it.

    `grids[i]` is the merged-token grid of the i-th contiguous run of `vision_token_id` tokens.
    The rope delta is (largest position + 1) - S: a decoded token at sequence index i sits at
    position i + delta on every axis.
    """
    ids = np.asarray(input_ids).reshape(-1)
    is_vision = ids == vision_token_id
    # Boundaries of runs where is_vision changes value.
    edges = np.flatnonzero(np.diff(is_vision.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(ids)]])
    pieces, pos, run = [], 0, 0
    for s, e in zip(starts, ends):
        if not is_vision[s]:
            pieces.append(np.broadcast_to(np.arange(pos, pos + e - s, dtype=np.int64), (3, e - s)))
            pos += e - s
            continue
        if run >= len(grids):
            raise ValueError(f"more vision-token runs in the prompt than grids ({len(grids)})")
        grid = grids[run]
        if int(np.prod(grid)) != e - s:
            raise ValueError(f"vision run {run} has {e - s} tokens but its grid {grid} needs {int(np.prod(grid))}")
        positions = vision_positions(pos, grid, time_intervals[run])
        pieces.append(positions)
        pos = resume(pos, positions)
        run += 1
    if run != len(grids):
        raise ValueError(f"{len(grids)} grids but {run} vision-token runs in the prompt")
    positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions[:, None, :].copy(), delta
