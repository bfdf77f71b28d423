"""patchify and patch_levels: their reuse paths give the same bits as a fresh call, and the uint8
levels looked up in `normalize_table` (as the ONNX vision graph does) are patchify's float32
values bit for bit, inverted exactly by `levels_from_pixel_values` (HF parity itself:
test_inputs_parity)."""

import numpy as np
import pytest

from edgejudge.errors import InputError
from edgejudge.runtime.preprocess import (
    VisionPreprocessing, levels_from_pixel_values, normalize_table, patch_levels, patchify,
)

QWEN3 = VisionPreprocessing(16, 2, 2, 4096, 25165824, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
QWEN2_5 = VisionPreprocessing(14, 2, 2, 3136, 12845056, (0.48145466, 0.4578275, 0.40821073),
                              (0.26862954, 0.26130258, 0.27577711))
PREPROCESSING = pytest.mark.parametrize("pp", [QWEN3, QWEN2_5], ids=["equal-channels", "per-channel"])


def _frames(pp: VisionPreprocessing, seed: int = 0) -> np.ndarray:
    """5 frames (odd: padded) of every level in every channel."""
    return np.random.default_rng(seed).integers(0, 256, (5, 2 * pp.factor, 3 * pp.factor, 3), dtype=np.uint8)


@PREPROCESSING
def test_out_buffer_and_scratch_reuse(pp):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 2 * pp.factor, 3 * pp.factor, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (4, 4 * pp.factor, 1 * pp.factor, 3), dtype=np.uint8)
    fresh_a, grid_a = patchify(a, pp)
    fresh_a = fresh_a.copy()
    fresh_b, _ = patchify(b, pp)  # another shape in between: the scratch must follow
    out = np.full_like(fresh_a, np.nan)
    again, grid = patchify(a, pp, out)
    assert again is out and grid == grid_a == (3, 2 * pp.merge_size, 3 * pp.merge_size)
    np.testing.assert_array_equal(out, fresh_a)
    assert not np.array_equal(fresh_b[:10], fresh_a[:10])
    with pytest.raises(ValueError, match="out must be"):
        patchify(a, pp, np.empty((1, 1), np.float32))
    levels, level_grid = patch_levels(a, pp)
    reused = np.full_like(levels, 7)
    assert patch_levels(a, pp, reused)[0] is reused and level_grid == grid_a
    np.testing.assert_array_equal(reused, levels)
    with pytest.raises(ValueError, match="out must be"):
        patch_levels(a, pp, np.empty(levels.shape, np.float32))


@PREPROCESSING
@pytest.mark.parametrize("float_type", [np.float32, np.float16])
def test_level_lookup_is_patchify_bit_for_bit(pp, float_type):
    """The vision graph's lookup: column c's level + 256 x its channel indexes the flattened table,
    cast once to the graph's float type. It gives patchify's values, and for fp16 the bits of each
    float32 value cast to fp16 (what HF's fp16 model does with pixel_values_videos)."""
    frames = _frames(pp)
    levels, _ = patch_levels(frames, pp)
    pixels, _ = patchify(frames, pp)
    channel = np.arange(pp.patch_dim) // (pp.temporal_patch_size * pp.patch_size**2)
    looked_up = normalize_table(pp).astype(float_type).reshape(-1)[levels.astype(np.int32) + 256 * channel]
    assert looked_up.dtype == float_type
    np.testing.assert_array_equal(looked_up.view(f"u{looked_up.itemsize}"),
                                  pixels.astype(float_type).view(f"u{looked_up.itemsize}"))


@PREPROCESSING
def test_levels_from_pixel_values_inverts_patchify(pp):
    frames = _frames(pp, seed=1)
    pixels, _ = patchify(frames, pp)
    table = normalize_table(pp)
    assert (np.diff(table, axis=1) > 0).all()  # what the binary search relies on
    np.testing.assert_array_equal(levels_from_pixel_values(pixels, table), patch_levels(frames, pp)[0])
    off_table = pixels.copy()
    off_table[3, 7] = np.nextafter(off_table[3, 7], np.float32(np.inf))
    with pytest.raises(InputError, match="no uint8 level"):
        levels_from_pixel_values(off_table, table)
    with pytest.raises(InputError, match="no uint8 level"):  # beyond the last level
        levels_from_pixel_values(np.full_like(pixels, table.max() + 1), table)
