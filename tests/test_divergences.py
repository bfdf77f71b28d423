"""Each documented difference between HF releases (docs/hf-divergences.md) is reproduced by
`--hf`, and only where documented. Equality with the real releases is tests/test_inputs_parity.py."""

from __future__ import annotations

import numpy as np
import pytest

from edgejudge.errors import InputError
from edgejudge.export.fixtures import tiny_model_dir
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.video import read_video

TEXT = "Is the block in the box?"


def _inputs(family: str, hf: str, frames: np.ndarray, fps: float | None, policy: str = "none"):
    model = runtime_model.load(tiny_model_dir(family), hf=hf)
    clip = runtime_model.sample_clip(model, read_video(frames, fps=fps), policy)
    return model, runtime_model.build_inputs(model, [clip], TEXT)


def _frames(t: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(t * h + w).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_d1_text_after_a_qwen2_5_video():
    """40 frames at 10 fps sampled at 2 fps: 4 temporal patches 2 positions apart (t up to 6)
    on a 3x4 merged grid; text resumes at start+7 before 5.3 and at start+4 from 5.3."""
    frames = _frames(40, 90, 120)
    _, old = _inputs("qwen2_5_vl", "5.2", frames, 10.0, "fps:2")
    model, new = _inputs("qwen2_5_vl", "5.3", frames, 10.0, "fps:2")
    np.testing.assert_array_equal(old["input_ids"], new["input_ids"])
    video = np.flatnonzero(old["input_ids"][0] == model.video_token_id)
    start, after = old["position_ids"][0, 0, video[0]], video[-1] + 1
    assert old["position_ids"][:, 0, after].tolist() == [start + 7] * 3
    assert new["position_ids"][:, 0, after].tolist() == [start + 4] * 3
    assert old["rope_deltas"][0, 0] - new["rope_deltas"][0, 0] == 3
    np.testing.assert_array_equal(old["position_ids"][:, :, :after], new["position_ids"][:, :, :after])


def test_d2_unknown_fps_second_per_grid():
    frames = _frames(8, 56, 56)
    _, old = _inputs("qwen2_5_vl", "4.57", frames, None)
    _, new = _inputs("qwen2_5_vl", "5.0", frames, None)
    assert old["second_per_grid_ts"].tolist() == [1.0]
    assert new["second_per_grid_ts"].tolist() == [np.float32(2 / 24)]
    _, known_old = _inputs("qwen2_5_vl", "4.57", frames, 4.0)
    _, known_new = _inputs("qwen2_5_vl", "5.17", frames, 4.0)
    assert known_old["second_per_grid_ts"].tolist() == known_new["second_per_grid_ts"].tolist() == [0.5]


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_d3_doubled_vision_markers(family):
    frames = _frames(4, 64, 96)
    model, old = _inputs(family, "5.9", frames, 2.0)
    _, new = _inputs(family, "5.10", frames, 2.0)
    start, end = model.prompter.token_id("<|vision_start|>"), model.prompter.token_id("<|vision_end|>")
    old_ids, new_ids = old["input_ids"][0], new["input_ids"][0]
    assert len(new_ids) == len(old_ids) + 2
    assert (new_ids == start).sum() == (old_ids == start).sum() + 1
    assert (new_ids == end).sum() == (old_ids == end).sum() + 1
    np.testing.assert_array_equal(old["pixel_values_videos"], new["pixel_values_videos"])


def test_d4_frame_count_rounding():
    model = runtime_model.load(tiny_model_dir("qwen3_vl"))
    target = model.family.target_size
    # 13 frames round to 12 (half to even) or up to 14; 14 x 1088 x 1920 is over the pixel cap.
    assert target(13, 1080, 1920, model.vision, "4.57") == (1088, 1920)
    assert target(13, 1080, 1920, model.vision, "5.2") == (1024, 1824)
    assert target(13, 1080, 1920, model.vision, "5.15") == (1088, 1920)


def test_d5_tiny_frames():
    frames = _frames(4, 20, 60)
    with pytest.raises(InputError, match="smaller than the model's 32-pixel patch"):
        _inputs("qwen3_vl", "4.57", frames, 2.0)
    _, new = _inputs("qwen3_vl", "5.15", frames, 2.0)
    assert new["video_grid_thw"].tolist() == [[2, 2, 6]]  # 32x96


@pytest.mark.parametrize("hf", ["4.57", "5.2", "5.17"])
def test_d6_single_frame_is_one_temporal_patch(hf):
    _, arrays = _inputs("qwen3_vl", hf, _frames(1, 64, 96), 2.0)
    assert arrays["video_grid_thw"].tolist() == [[1, 4, 6]]


def test_nothing_else_differs_for_a_plain_clip():
    """A clip away from every documented edge: 4.57 and 5.2 give the same arrays."""
    frames = _frames(6, 96, 128)
    for family in ("qwen2_5_vl", "qwen3_vl"):
        _, old = _inputs(family, "4.57", frames, 3.0)
        _, new = _inputs(family, "5.2", frames, 3.0)
        for key in old:
            np.testing.assert_array_equal(old[key], new[key], err_msg=f"{family} {key}")
