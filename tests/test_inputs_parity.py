"""Our torch-free inputs equal what HF transformers feeds the model, for all three families.

The pinned transformers (the venv's) is compared with `--hf` set to its release; the releases the
seed judges were trained with (4.57 for Qwen2.5-VL / Qwen3-VL, 5.2 for Qwen3.5) run in
subprocesses from side folders that .ci/run installs (EDGEJUDGE_TF_LEGACY, EDGEJUDGE_TF_QWEN35)
and are compared with our default behaviour.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import transformers

from edgejudge.export.fixtures import tiny_model_dir
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.video import read_video
from hf_reference import hf_inputs, hf_inputs_in

PINNED = ".".join(transformers.__version__.split(".")[:2])
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")
TEXT = "Instruction: Place the red block in the box.\nIs the instruction complete?"
SYSTEM = "You are a careful judge."
# Where each family's default behaviour (the release its judges were trained with) can be run.
LEGACY = {
    "qwen2_5_vl": ("4.57", "EDGEJUDGE_TF_LEGACY"),
    "qwen3_vl": ("4.57", "EDGEJUDGE_TF_LEGACY"),
    "qwen3_5": ("5.2", "EDGEJUDGE_TF_QWEN35"),
}
# (source frames, height, width, source fps, sampling policy)
CASES = [
    (1, 90, 120, 10.0, "none"),
    (3, 101, 333, 10.0, "none"),
    (17, 90, 120, 8.0, "none"),
    (40, 333, 101, 10.0, "fps:2"),  # portrait, fps sampling
    (40, 90, 120, 10.0, "fps:2"),  # Qwen2.5-VL: the time axis outruns the spatial one
    (30, 224, 224, 15.0, "uniform:8"),
    (25, 120, 90, 5.0, "uniform:5"),
]


def _frames(t: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def _as_reference(clip, family: str) -> dict:
    """The clip as the HF harness takes it. HF's Qwen3-VL processor refuses one frame; we treat
    it as the two-frame clip temporal padding makes of it, so that is what HF gets."""
    frames, indices = clip.frames, clip.indices
    if family != "qwen2_5_vl" and len(frames) == 1:
        frames, indices = np.repeat(frames, 2, axis=0), np.repeat(indices, 2)
    return {"frames": frames, "indices": indices.tolist(), "fps": clip.fps, "total_frames": clip.total_frames}


def _assert_same(ours: dict, ref: dict) -> None:
    for key in ("input_ids", "attention_mask", "video_grid_thw", "position_ids", "rope_deltas"):
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    assert ours["pixel_values_videos"].dtype == np.float32
    np.testing.assert_array_equal(ours["pixel_values_videos"], ref["pixel_values_videos"])
    if "second_per_grid_ts" in ref:
        np.testing.assert_array_equal(ours["second_per_grid_ts"], ref["second_per_grid_ts"])


def _ours(family: str, hf: str, case, seed: int = 0, n_videos: int = 1):
    t, h, w, fps, policy = case
    model = runtime_model.load(tiny_model_dir(family), hf=hf)
    clips = [
        runtime_model.sample_clip(model, read_video(_frames(t, h, w, seed + i), fps=fps), policy)
        for i in range(n_videos)
    ]
    return model, clips, runtime_model.build_inputs(model, clips, TEXT, SYSTEM)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}f-{c[1]}x{c[2]}-{c[4]}")
def test_pinned_release(family, case):
    model, clips, ours = _ours(family, PINNED, case)
    ref = hf_inputs(str(model.path), [_as_reference(c, family) for c in clips], TEXT, SYSTEM)
    _assert_same(ours, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_videos_pinned(family):
    model, clips, ours = _ours(family, PINNED, (12, 90, 120, 6.0, "fps:2"), n_videos=2)
    ref = hf_inputs(str(model.path), [_as_reference(c, family) for c in clips], TEXT, SYSTEM)
    _assert_same(ours, ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES[1:5], ids=lambda c: f"{c[0]}f-{c[1]}x{c[2]}-{c[4]}")
def test_default_is_the_training_release(family, case):
    release, env = LEGACY[family]
    side = os.environ.get(env)
    if not side:
        if os.environ.get("CI"):
            pytest.fail(f"{env} must point to a transformers {release} folder in CI")
        pytest.skip(f"{env} not set: the transformers {release} side folder is not installed (.ci/run installs it)")
    model, clips, ours = _ours(family, None, case)
    assert model.hf == release
    ref = hf_inputs_in(side, str(model.path), [_as_reference(c, family) for c in clips], TEXT, SYSTEM)
    assert str(ref["transformers_version"]).startswith(release)
    _assert_same(ours, ref)
