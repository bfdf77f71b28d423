"""patchify's reuse paths give the same bits as a fresh call (HF parity itself: test_inputs_parity)."""

import numpy as np
import pytest

from edgejudge.runtime.preprocess import VisionPreprocessing, patchify

QWEN3 = VisionPreprocessing(16, 2, 2, 4096, 25165824, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
QWEN2_5 = VisionPreprocessing(14, 2, 2, 3136, 12845056, (0.48145466, 0.4578275, 0.40821073),
                              (0.26862954, 0.26130258, 0.27577711))


@pytest.mark.parametrize("pp", [QWEN3, QWEN2_5], ids=["equal-channels", "per-channel"])
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
