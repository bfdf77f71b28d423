"""Smoke tests for the Hugging Face oracle in tests/hf_reference.py.

Runs the oracle for each family on a processor folder built from the preset plus the
real tokenizer.json, in the pinned transformers (this interpreter) and, where
available, in the version each judge was trained with:

* Qwen2.5-VL / Qwen3-VL: transformers 4.57.x, from ``EDGEJUDGE_TF_LEGACY`` or
  ``/tmp/tf457`` (+ ``/tmp/tf457deps``: huggingface_hub<1.0 and requests);
* Qwen3.5: transformers 5.2.0, from ``EDGEJUDGE_TF_QWEN35`` or ``/tmp/tf520full``.

Either variable may hold several folders joined by ``os.pathsep``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_reference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "edgejudge" / "presets"
SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"

# name, model_type, legacy env var, default legacy path entries, patch size, video token id
FAMILIES = [
    ("qwen2.5-vl-7b-instruct", "qwen2_5_vl", "EDGEJUDGE_TF_LEGACY", ["/tmp/tf457", "/tmp/tf457deps"], 14, 151656),
    ("qwen3-vl-4b-instruct", "qwen3_vl", "EDGEJUDGE_TF_LEGACY", ["/tmp/tf457", "/tmp/tf457deps"], 16, 151656),
    ("qwen3.5-9b", "qwen3_5", "EDGEJUDGE_TF_QWEN35", ["/tmp/tf520full"], 16, 248057),
]
MERGE = 2


def _legacy_path(env_var: str, defaults: list[str]) -> str | None:
    value = os.environ.get(env_var)
    entries = [p for p in value.split(os.pathsep) if p] if value else [p for p in defaults if os.path.isdir(p)]
    if any((Path(p) / "transformers" / "__init__.py").is_file() for p in entries):
        return os.pathsep.join(entries)
    return None


def _model_dir(tmp_path: Path, name: str) -> str:
    tok = SHARED_MODELS / name / "tokenizer.json"
    assert tok.is_file(), f"missing {tok}"
    dst = tmp_path / name
    shutil.copytree(PRESETS / name, dst, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    shutil.copy(tok, dst / "tokenizer.json")
    return str(dst)


def _clip():
    frames = np.random.default_rng(7).integers(0, 256, (4, 64, 96, 3), dtype=np.uint8)
    # 4 frames out of a 32-frame 16 fps source: sampled at 2 fps
    return [{"frames": frames, "indices": [0, 8, 16, 24], "fps": 16.0, "total_frames": 32}]


def _check(out: dict, model_type: str, patch: int, video_token_id: int) -> None:
    ids = out["input_ids"]
    assert ids.dtype == np.int64 and ids.ndim == 2 and ids.shape[0] == 1
    seq = ids.shape[1]
    assert out["attention_mask"].shape == (1, seq) and (out["attention_mask"] == 1).all()
    grid = out["video_grid_thw"]
    assert grid.dtype == np.int64 and grid.shape == (1, 3)
    # 64x96 stays 64x96 for Qwen3-VL/3.5 (factor 32); Qwen2.5-VL rounds to 56x84 (factor 28)
    assert grid.tolist() == [[2, 4, 6]]
    n_patches = int(np.prod(grid, axis=1).sum())
    assert out["pixel_values_videos"].dtype == np.float32
    assert out["pixel_values_videos"].shape == (n_patches, 3 * 2 * patch * patch)
    assert int((ids == video_token_id).sum()) == n_patches // MERGE**2
    assert out["position_ids"].dtype == np.int64 and out["position_ids"].shape == (3, 1, seq)
    assert out["rope_deltas"].shape == (1, 1)
    assert int(out["rope_deltas"][0, 0]) == int(out["position_ids"].max()) + 1 - seq
    prompt = str(out["prompt"])
    assert prompt.count("<|video_pad|>") == 1 and prompt.endswith("<|im_start|>assistant\n" if model_type != "qwen3_5" else "</think>\n\n")
    if model_type == "qwen2_5_vl":
        # second_per_grid_ts = temporal_patch_size / sampled fps = 2 / 2
        np.testing.assert_allclose(out["second_per_grid_ts"], [1.0])
    else:
        assert "second_per_grid_ts" not in out


@pytest.mark.parametrize("name,model_type,env_var,defaults,patch,video_token_id", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_hf_inputs_pinned(tmp_path, name, model_type, env_var, defaults, patch, video_token_id):
    out = hf_reference.hf_inputs(_model_dir(tmp_path, name), _clip(), "Is the task complete?", system="You judge.")
    _check(out, model_type, patch, video_token_id)


@pytest.mark.parametrize("name,model_type,env_var,defaults,patch,video_token_id", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_hf_inputs_legacy(tmp_path, name, model_type, env_var, defaults, patch, video_token_id):
    legacy = _legacy_path(env_var, defaults)
    if legacy is None:
        where = f"{env_var}={os.environ[env_var]!r}" if os.environ.get(env_var) else f"defaults {defaults}"
        pytest.skip(f"no legacy transformers tree ({where}); point {env_var} at one")
    model_dir = _model_dir(tmp_path, name)
    old = hf_reference.hf_inputs_in(legacy, model_dir, _clip(), "Is the task complete?", system="You judge.")
    new = hf_reference.hf_inputs(model_dir, _clip(), "Is the task complete?", system="You judge.")
    assert str(old["transformers_version"]) != str(new["transformers_version"]), "legacy path did not take effect"
    _check(old, model_type, patch, video_token_id)
    # the pixels are the same in every version for this clip (verified; see docs/hf-divergences.md)
    assert str(old["prompt"]) == str(new["prompt"])
    np.testing.assert_array_equal(old["pixel_values_videos"], new["pixel_values_videos"])
