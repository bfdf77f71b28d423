"""Decode videos into RGB frames and pick which frames a model sees. OpenCV and numpy only.

A video comes in as a file, a .npy array, an in-memory array or the robot's list of frames, and
leaves as a `Clip` holding every decoded frame, or with a `FramePicker` only the frames it picks.
Sampling is separate: an index function turns (total frames, policy) into frame indices and
`sample` selects them. The fps-based index functions reproduce transformers' Qwen video
processors, because a judge model scores differently when it sees different frames than it saw
in training.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Literal, Sequence, Union

import cv2
import numpy as np

from edgejudge.errors import InputError

VideoSource = Union[str, os.PathLike, np.ndarray, Sequence[np.ndarray]]
FramePicker = Callable[[int, float | None], np.ndarray]
"""The source frame indices to keep, from the source's frame count and frame rate (None: unknown)."""


@dataclass(frozen=True)
class Clip:
    """Decoded frames plus where each came from in the source.

    `frames` may share memory with an in-memory array passed to `read_video` (no copy is made).
    `timestamps` are NaN when the frame rate is unknown (an array read without `fps`), so check
    `fps is None` before using time.
    """

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, C-contiguous
    indices: np.ndarray  # (T,) int64: index of each frame in the source's decoded frame sequence
    timestamps: np.ndarray  # (T,) float64 seconds: container timestamps where known, else index / fps
    fps: float | None  # the source's average frame rate, None only if unknown and not given
    total_frames: int  # frames actually decoded from the source


def read_video(source: VideoSource, fps: float | None = None, pick: FramePicker | None = None) -> Clip:
    """Read every frame of `source` into memory as RGB, or with `pick` the frames it picks: the
    same Clip as `sample(read_video(source, fps), pick(total, fps))`, where a video file converts
    and keeps only those frames (`_decode`).

    `source` is a video file path, a path to a .npy file holding a (T, H, W, 3) uint8 RGB array,
    such an array in memory, or a sequence of (H, W, 3) uint8 RGB frames. `fps` is the frame rate
    of array inputs, which carry none. A video file carries its own rate and timestamps, so
    passing `fps` with one is an error rather than a silent no-op or a silent override: a caller
    who does it most likely meant a sampling rate (see `fps_indices_*`).
    """
    if fps is not None:
        if not (math.isfinite(fps) and fps > 0):
            raise InputError(f"fps must be a positive number, got {fps!r}")
        fps = float(fps)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        _check_file(path)
        if path.lower().endswith(".npy"):
            clip = _clip_from_array(_load_npy(path), fps, name=path)
        elif fps is not None:
            raise InputError(
                f"{path}: fps={fps} applies only to arrays and .npy files; a video file carries "
                "its own frame rate (to choose which frames the model sees, use a sample policy)"
            )
        else:
            return _decode(path, pick)
    elif isinstance(source, np.ndarray):
        clip = _clip_from_array(source, fps, name="frame array")
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        clip = _clip_from_array(_stack_frames(source), fps, name="frame sequence")
    else:
        raise InputError(f"unsupported video source of type {type(source).__name__}")
    return clip if pick is None else sample(clip, pick(clip.total_frames, clip.fps))


def _check_file(path: str) -> None:
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, expected a video or .npy file")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _load_npy(path: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)  # never unpickle: a .npy is data, not code
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy array ({_first_line(e)})") from None
    if not isinstance(arr, np.ndarray):  # np.load returns an NpzFile for a .npz in disguise
        raise InputError(f"{path}: not a .npy array (an .npz archive?)")
    return arr


def _clip_from_array(arr: np.ndarray, fps: float | None, name: str) -> Clip:
    if arr.dtype != np.uint8:
        raise InputError(f"{name}: expected uint8 RGB frames, got dtype {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise InputError(f"{name}: expected shape (T, H, W, 3), got {arr.shape}")
    if 0 in arr.shape:
        raise InputError(f"{name}: no frames, shape {arr.shape}")
    total = len(arr)
    indices = np.arange(total, dtype=np.int64)
    timestamps = indices / fps if fps is not None else np.full(total, np.nan)
    return Clip(np.ascontiguousarray(arr), indices, timestamps, fps, total)


def _stack_frames(frames: Sequence[np.ndarray]) -> np.ndarray:
    """Validate the robot's frames one by one, so an error names the bad frame, then stack once."""
    if len(frames) == 0:
        raise InputError("frame sequence is empty")
    first = None
    for i, f in enumerate(frames):
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
            got = f"{f.dtype} {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__
            raise InputError(f"frame sequence: frame {i} is not an (H, W, 3) uint8 array, got {got}")
        if first is None:
            first = f.shape
        elif f.shape != first:
            raise InputError(
                f"frame sequence: frame {i} is {f.shape[1]}x{f.shape[0]} but frame 0 is "
                f"{first[1]}x{first[0]}; all frames must have the same size"
            )
    return np.stack(frames)


# CAP_PROP_ORIENTATION_META is the clockwise rotation that makes the frame upright.
_ROTATE = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}


def _decode(path: str, pick: FramePicker | None = None) -> Clip:
    """Decode every frame, counting as we go: CAP_PROP_FRAME_COUNT is an estimate, often wrong.

    With `pick`, only the frames it picks are converted to RGB and kept. Decoding is sequential,
    so every frame is still decoded; the color conversions and copies are what is saved (W2's
    120 frames of 360x640, 10 picked: 55-61 ms -> 19-21 ms on the H100 host). Which frames
    `pick` wants is known only from the decoded count and rate, so they are predicted from the
    container's; when decoding finds otherwise and a wanted frame was not kept, the file is
    decoded a second time for exactly the wanted frames. Frames that are not kept are never
    converted, so a resolution change among them goes unnoticed (a whole read refuses it).

    A truncated file returns the frames that decode; only zero decodable frames is an error.
    """
    cap, rotate, container_fps, hint = _open(path)
    try:
        predicted = None if pick is None else _predicted(pick, hint, container_fps)
        frames, stamps = _read_frames(cap, path, rotate, hint, predicted)
    finally:
        cap.release()
    timestamps, fps = _timing(np.array(stamps), container_fps)
    n = len(stamps)
    if predicted is None:
        clip = Clip(frames, np.arange(n, dtype=np.int64), timestamps, fps, n)
        return clip if pick is None else sample(clip, pick(n, fps))
    wanted = _checked_indices(pick(n, fps), n)
    kept = predicted
    if not np.isin(wanted, kept).all():
        kept = np.unique(wanted)
        cap, rotate, _, hint = _open(path)
        try:
            frames, again = _read_frames(cap, path, rotate, hint, kept)
        finally:
            cap.release()
        if len(again) < n:  # a frame that decoded the first time did not: its rows would be unset
            raise InputError(f"{path}: decoding failed at frame {len(again)} of {n} on the second pass")
    return Clip(frames[np.searchsorted(kept, wanted)], wanted, timestamps[wanted], fps, n)


def _open(path: str) -> tuple[cv2.VideoCapture, int | None, float, float]:
    """(capture, the rotation that makes frames upright, the container's fps, its frame count).

    Rotation: phone videos store landscape pixels plus a display-matrix rotation. We turn
    OpenCV's auto-rotation off and apply CAP_PROP_ORIENTATION_META ourselves, so frames are
    rotated exactly once whatever the OpenCV build's default is.
    """
    try:
        cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    except cv2.error as e:
        raise InputError(f"{path}: cannot open as a video ({_first_line(e)})") from None
    if not cap.isOpened():
        raise InputError(f"{path}: cannot open as a video (corrupt, truncated or unsupported format)")
    try:
        cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)
        rotate = _ROTATE.get(int(cap.get(cv2.CAP_PROP_ORIENTATION_META)) % 360)
        return cap, rotate, cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_COUNT)
    except cv2.error as e:
        cap.release()
        raise InputError(f"{path}: decoding failed ({_first_line(e)})") from None


# The frame count only sizes the first buffer or predicts a pick; it can be wildly off (we have
# seen 20480 for a 20-frame file), so it is used only up to this and a buffer grows by doubling.
MAX_COUNT_HINT = 4096


def _predicted(pick: FramePicker, hint: float, container_fps: float) -> np.ndarray | None:
    """The sorted distinct frames `pick` would want if the container's count and rate were right;
    None when the container gives no usable count or `pick` refuses its values."""
    if not 1 <= hint <= MAX_COUNT_HINT:
        return None
    rate = container_fps if math.isfinite(container_fps) and container_fps > 0 else None
    try:
        return np.unique(np.asarray(pick(int(hint), rate), np.int64))
    except InputError:
        return None


def _checked_indices(indices: np.ndarray, total: int) -> np.ndarray:
    """`indices` as int64, refused as `sample` refuses them for a clip of `total` frames."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0:
        raise InputError(f"frame indices must be a non-empty 1-D list, got shape {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise InputError(f"frame indices must be integers, got dtype {idx.dtype}")
    bad = idx[(idx < 0) | (idx >= total)]
    if bad.size:
        raise InputError(f"frame index {bad[0]} out of range for a clip of {total} frames")
    return idx.astype(np.int64)


def _read_frames(cap: cv2.VideoCapture, path: str, rotate: int | None, hint: float,
                 keep: np.ndarray | None) -> tuple[np.ndarray, list[float]]:
    """(frames, every frame's timestamp in seconds): all frames as RGB, or with `keep` (sorted
    distinct indices) the kept ones in that order, rows of frames never decoded left unset."""
    slots = None if keep is None else {int(k): row for row, k in enumerate(keep)}
    capacity = len(keep) if keep is not None else int(hint) if 1 <= hint <= MAX_COUNT_HINT else 256
    frames: np.ndarray | None = None
    stamps: list[float] = []
    bgr = rotated = None
    try:
        while cap.grab():
            row = len(stamps) if slots is None else slots.get(len(stamps))
            if row is not None:
                ok, bgr = cap.retrieve(bgr)  # reuses the BGR scratch buffer
                if not ok:
                    break
                if rotate is not None:
                    rotated = cv2.rotate(bgr, rotate, rotated)
                upright = bgr if rotate is None else rotated
                if frames is None:
                    frames = np.empty((capacity, *upright.shape), np.uint8)
                elif upright.shape != frames.shape[1:]:
                    raise InputError(
                        f"{path}: frame {len(stamps)} is {upright.shape[1]}x{upright.shape[0]} but earlier frames "
                        f"are {frames.shape[2]}x{frames.shape[1]}; resolution changes are not supported"
                    )
                if row == len(frames):
                    grown = np.empty((2 * row, *frames.shape[1:]), np.uint8)
                    grown[:row] = frames
                    frames = grown
                cv2.cvtColor(upright, cv2.COLOR_BGR2RGB, dst=frames[row])  # the one copy per frame
            stamps.append(cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
    except cv2.error as e:
        raise InputError(f"{path}: decoding failed ({_first_line(e)})") from None
    if not stamps:
        raise InputError(f"{path}: no decodable video frames")
    return (frames[:len(stamps)] if keep is None else frames), stamps


def _timing(stamps: np.ndarray, container_fps: float) -> tuple[np.ndarray, float | None]:
    """Per-frame seconds and average fps; prefer real timestamps, since variable-rate video is common.

    Timestamps are trusted when finite and strictly increasing; the average rate is then
    (T - 1) / (t_last - t_first). Otherwise fall back to the container's nominal rate.
    """
    n = len(stamps)
    nominal = container_fps if math.isfinite(container_fps) and container_fps > 0 else None
    if np.all(np.isfinite(stamps)) and np.all(np.diff(stamps) > 0):
        fps = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else nominal
        return stamps, fps
    index = np.arange(n, dtype=np.float64)
    return (index / nominal if nominal else np.full(n, np.nan)), nominal


def sample(clip: Clip, indices: Sequence[int] | np.ndarray) -> Clip:
    """The frames of `clip` at positions `indices` (into `clip.frames`, repeats allowed): a view of
    them when the positions are evenly spaced and ascending, else a copy.

    The result's `indices` still point into the original source, so sampling a sampled clip
    keeps provenance; `fps` and `total_frames` stay the source's.
    """
    idx = _checked_indices(indices, len(clip.frames))
    step = int(idx[1] - idx[0]) if idx.size > 1 else 1
    if step > 0 and np.array_equal(idx, idx[0] + step * np.arange(idx.size)):
        # evenly spaced and ascending (RoboCasa's uniform:64 of a 64-frame window): a view of the
        # frames, not a copy; W1's two 9.6 MB copies (page faults included) were host time before
        # any device work
        frames = clip.frames[idx[0]:idx[-1] + 1:step]
    else:
        frames = clip.frames[idx]
    return Clip(frames, clip.indices[idx], clip.timestamps[idx], clip.fps, clip.total_frames)


@dataclass(frozen=True)
class SamplePolicy:
    """Which frames a model sees, parsed from "none", "uniform:N", "fps:F" or "virtual:N"."""

    kind: Literal["none", "uniform", "fps", "virtual"]
    n: int = 0  # frames for "uniform"; virtual positions for "virtual"
    fps: float = 0.0  # target frames per second for "fps"


def parse_sample(spec: str) -> SamplePolicy:
    """Parse a sample policy string (the CLI's --sample); InputError on anything malformed."""
    usage = f"bad sample policy {spec!r}: expected none, uniform:N, fps:F or virtual:N with N, F > 0"
    kind, _, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "none" and not arg:
        return SamplePolicy("none")
    try:
        if kind in ("uniform", "virtual"):
            n = int(arg)
            if n > 0:
                return SamplePolicy(kind, n=n)
        elif kind == "fps":
            fps = float(arg)
            if math.isfinite(fps) and fps > 0:
                return SamplePolicy("fps", fps=fps)
    except ValueError:
        pass
    raise InputError(usage)


def uniform_indices(total: int, n: int) -> np.ndarray:
    """`n` indices evenly spread over `total` frames, first and last included (RoboCasa: 64).

    A video shorter than `n` frames gets frames repeated so the model always sees exactly `n`;
    that is intended, since the judge was trained on fixed-length inputs.
    """
    _check_positive(total=total, n=n)
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def fps_indices_linspace(
    total: int, src_fps: float, fps: float, min_frames: int, max_frames: int
) -> np.ndarray:
    """Qwen3-VL's fps sampling: transformers' Qwen3VLVideoProcessor.sample_frames (num_frames=None).

    A video shorter than `min_frames` yields all of its frames, once each.
    """
    _check_positive(total=total, src_fps=src_fps, fps=fps)
    num = int(total / src_fps * fps)
    num = min(max(num, min_frames), max_frames, total)
    return np.linspace(0, total - 1, num).round().astype(np.int64)


def fps_indices_arange(
    total: int, src_fps: float, fps: float, temporal_patch_size: int, min_frames: int, max_frames: int
) -> np.ndarray:
    """Qwen2-VL's fps sampling: transformers' Qwen2VLVideoProcessor.sample_frames (num_frames=None).

    The count is floored to a multiple of `temporal_patch_size`, so a video with fewer frames
    than that cannot be sampled (transformers divides by zero there; we raise InputError).
    """
    _check_positive(total=total, src_fps=src_fps, fps=fps, temporal_patch_size=temporal_patch_size)
    max_frames = math.floor(min(max_frames, total) / temporal_patch_size) * temporal_patch_size
    num = total / src_fps * fps
    num = min(max(num, min_frames), max_frames, total)
    num = math.floor(num / temporal_patch_size) * temporal_patch_size
    if num == 0:
        raise InputError(
            f"video has {total} frame(s); fps sampling needs at least "
            f"temporal_patch_size={temporal_patch_size} frames"
        )
    # torch.arange(0, total, total / num).int(): length and values computed in float64, stored as
    # float32, then truncated; we mirror those steps. Past ~14,000 frames torch's SIMD lanes round
    # differently from its scalar path (so its answer depends on the CPU), and an index can
    # differ by one frame; shorter videos match exactly.
    step = total / num
    count = math.ceil(total / step)
    return (np.arange(count) * step).astype(np.float32).astype(np.int64)


def virtual_indices(total: int, virtual: int, picks: Sequence[int] | np.ndarray) -> np.ndarray:
    """Map VR-Thinker's virtual frame indices to real ones.

    VR-Thinker addresses a video as `virtual` evenly spaced positions (e.g. 128) whatever its
    real length; virtual index v is real frame round(v * (total - 1) / (virtual - 1)).
    """
    _check_positive(total=total, virtual=virtual)
    p = np.asarray(picks)
    if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
        raise InputError(f"virtual frame indices must be a 1-D list of integers, got {p!r}")
    bad = p[(p < 0) | (p >= virtual)]
    if bad.size:
        raise InputError(f"virtual frame index {bad[0]} out of range 0..{virtual - 1}")
    if virtual == 1:
        return np.zeros(len(p), np.int64)
    real = np.round(p.astype(np.int64) * (total - 1) / (virtual - 1))
    return np.clip(real, 0, total - 1).astype(np.int64)


def virtual_uniform(virtual: int, n: int) -> np.ndarray:
    """`n` evenly placed virtual indices out of `virtual`, ends included (VR-Thinker's first look)."""
    _check_positive(virtual=virtual, n=n)
    return np.linspace(0, virtual - 1, n).round().astype(np.int64)


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not (v > 0 and math.isfinite(v)):
            raise InputError(f"{name} must be positive, got {v}")
