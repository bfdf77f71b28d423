"""Qwen2.5-VL's vision tower as ONNX, one 2-frame group per batch row: ONNX Runtime (CPU, fp32)
against HF's `model.model.visual(pixel_values_videos, grid_thw=video_grid_thw)` on the tiny model,
window attention included, for grids that are multiples of the attention window and grids that
are not.

The tiny checkpoint's vision weights are small (std 0.02, unit norms, zero biases), so its
attention is nearly uniform and a wrong window or rotary moves the output by less than 1e-3. The
parity tests therefore also run a copy with re-drawn, O(1)-scale weights ("sharp"), where dropping
the window mask or the rotary changes the output by O(1) (checked below).

The graph takes uint8 levels and normalizes them with the processor's per-channel mean and std by
a lookup that gives its float values bit for bit, in fp32 and fp16."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from edgejudge.errors import InputError
from edgejudge.export.fixtures import sharpened, tiny_model_dir
from edgejudge.export.onnx_io import IR_VERSION, OPSET
from edgejudge.export.qwen2_5_vl import export_vision_onnx, load_visual
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.preprocess import levels_from_pixel_values
from edgejudge.runtime.video import read_video
from edgejudge.runtime.vision_qwen2_5 import VisionEncoder, cu_window_seqlens, rotary_tables, window_ids

TOL = 1e-4
TEXT = "Instruction: Place the red block in the box.\nIs it complete?"

# (frames, height, width) of each video in one prompt. The tiny model's window is 112 px = 4x4
# merged units (8x8 patches).
CASES = {
    "window_multiple_224x224": [(4, 224, 224)],  # grid 16x16 -> 8x8 merged: 2x2 full windows
    "window_multiple_101x333_odd_frames": [(3, 101, 333)],  # -> 112x336: grid 8x24, 3 frames -> grid_t 2
    "not_multiple_90x120": [(4, 90, 120)],  # -> 84x112: grid 6x8 -> 3x4 merged, one partial window
    "not_multiple_300x500": [(2, 300, 500)],  # grid 22x36 -> 11x18 merged: partial windows on both sides
    "two_videos": [(4, 64, 96), (6, 200, 120)],  # grids 4x6 and 14x8: smaller than / not a multiple of a window
}


@pytest.fixture(scope="module")
def tiny():
    model_dir = tiny_model_dir("qwen2_5_vl")
    return model_dir, load_visual(model_dir)


@pytest.fixture(scope="module")
def visuals(tiny):
    return {"tiny": tiny[1], "sharp": sharpened(tiny[1])}


@pytest.fixture(scope="module")
def exported(tiny, visuals, tmp_path_factory):
    out = {}
    for name, visual in visuals.items():
        path = export_vision_onnx(tiny[0], tmp_path_factory.mktemp(f"vision_{name}") / "vision.onnx", visual=visual)
        out[name] = (path, VisionEncoder(path))
    return out


def _inputs(model_dir, shapes, seed=0) -> dict:
    model = runtime_model.load(model_dir)
    rng = np.random.default_rng(seed)
    clips = [read_video(rng.integers(0, 256, (*s, 3), dtype=np.uint8), fps=2.0) for s in shapes]
    return runtime_model.build_inputs(model, clips, TEXT)


def _hf(visual, arrays):
    with torch.no_grad():
        out = visual(torch.from_numpy(arrays["pixel_values_videos"]),
                     grid_thw=torch.from_numpy(arrays["video_grid_thw"]))
    return out.pooler_output.numpy()


def test_graph_signature(exported, tiny):
    path, _ = exported["tiny"]
    config = tiny[1].config
    graph = onnx.load(str(path), load_external_data=False)
    assert graph.ir_version == IR_VERSION
    assert {o.domain: o.version for o in graph.opset_import}[""] == OPSET
    assert [i.name for i in graph.graph.input] == ["patches", "window_mask", "cos", "sin"]
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in graph.graph.output] == ["features"]
    assert graph.graph.output[0].type.tensor_type.shape.dim[-1].dim_value == config.out_hidden_size
    assert (path.parent / (path.name + ".data")).is_file()
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["edgejudge.component"] == "qwen2_5_vl.vision"


def test_graph_uses_fused_ops(exported, tiny):
    """Fused attention (the window mask as its bias on the windowed blocks only), rotary and
    residual-add + RMSNorm; no matmul + softmax attention."""
    graph = onnx.load(str(exported["tiny"][0]), load_external_data=False).graph
    config = tiny[1].config
    attention = [n for n in graph.node if n.op_type == "MultiHeadAttention"]
    assert len(attention) == config.depth
    masked = [i for i, n in enumerate(attention) if len(n.input) > 5 and n.input[5]]
    assert masked == [i for i in range(config.depth) if i not in config.fullatt_block_indexes]
    ops = [n.op_type for n in graph.node]
    assert ops.count("RotaryEmbedding") == 2 * config.depth
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * config.depth and "Softmax" not in ops


@pytest.mark.parametrize("weights", ["tiny", "sharp"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf(case, weights, tiny, visuals, exported):
    visual = visuals[weights]
    _, encoder = exported[weights]
    arrays = _inputs(tiny[0], CASES[case])
    assert len(arrays["video_grid_thw"]) == len(CASES[case])
    ref = _hf(visual, arrays)
    features, _ = encoder.encode(arrays["pixel_values_videos"], arrays["video_grid_thw"])
    assert features.shape == ref.shape and features.dtype == np.float32
    diff = float(np.abs(features - ref).max())
    print(f"{case}/{weights}: grids {arrays['video_grid_thw'].tolist()} max abs diff {diff:.2e} "
          f"(max |ref| {np.abs(ref).max():.2f})")
    assert diff <= TOL, diff


def test_cases_cover_partial_windows(tiny):
    """The cases above really include grids that are / are not multiples of the window."""
    config = tiny[1].config
    win = config.window_size // config.spatial_merge_size // config.patch_size
    sides = {}
    for case, shapes in CASES.items():
        grids = _inputs(tiny[0], shapes)["video_grid_thw"]
        sides[case] = [(h // 2 % win == 0, w // 2 % win == 0) for _, h, w in grids.tolist()]
    assert sides["window_multiple_224x224"] == [(True, True)]
    assert sides["window_multiple_101x333_odd_frames"] == [(True, True)]
    assert sides["not_multiple_90x120"] == [(False, True)]
    assert sides["not_multiple_300x500"] == [(False, False)]
    assert _inputs(tiny[0], CASES["window_multiple_101x333_odd_frames"])["video_grid_thw"][0, 0] == 2


def test_window_and_rotary_matter(tiny, visuals, exported):
    """Sanity of the test itself: on the sharp weights, no window mask or no rotary is far off."""
    _, encoder = exported["sharp"]
    arrays = _inputs(tiny[0], CASES["not_multiple_300x500"])
    ref = _hf(visuals["sharp"], arrays)
    t, h, w = arrays["video_grid_thw"][0].tolist()
    mask, cos, sin = encoder.grid_inputs(h, w)
    patches = levels_from_pixel_values(arrays["pixel_values_videos"], encoder.normalize_table).reshape(t, h * w, -1)

    def run(m, s):
        return encoder.session.run(None, {"patches": patches, "window_mask": m, "cos": cos, "sin": s})[0].reshape(ref.shape)

    assert np.abs(run(mask, sin) - ref).max() <= TOL
    assert np.abs(run(np.zeros_like(mask), sin) - ref).max() > 0.1
    assert np.abs(run(mask, np.zeros_like(sin)) - ref).max() > 0.1


GRIDS = [[[1, 4, 6]], [[2, 8, 8]], [[1, 16, 16]], [[2, 6, 8]], [[1, 22, 36]], [[3, 14, 8]], [[1, 2, 2]],
         [[1, 8, 24]], [[2, 4, 6], [3, 14, 8], [1, 16, 18]]]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "+".join("x".join(map(str, e)) for e in g))
def test_window_tables_match_hf(tiny, grid):
    """window_index and cu_window_seqlens are HF's exactly (padding of partial windows included);
    the per-patch window ids are the same windows; cos/sin within one float32 ulp of HF's."""
    visual = tiny[1]
    config = visual.config
    merge, window, patch = config.spatial_merge_size, config.window_size, config.patch_size
    grid_t = torch.tensor(grid)
    ref_index, ref_cu = get_vision_window_index(grid_t, spatial_merge_size=merge, window_size=window,
                                                patch_size=patch)
    index, cu = cu_window_seqlens(np.array(grid), merge, window, patch)
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())
    assert index.dtype == np.int64 and cu.dtype == np.int32

    # one group of the first entry: patches with equal ids are exactly HF's window segments
    _, h, w = grid[0]
    one = torch.tensor([[1, h, w]])
    ref_index1, ref_cu1 = get_vision_window_index(one, spatial_merge_size=merge, window_size=window, patch_size=patch)
    ids = window_ids(h, w, merge, window, patch)
    unit = merge * merge
    patch_order = (ref_index1.numpy()[:, None] * unit + np.arange(unit)).reshape(-1)  # HF's window order
    ids_in_window_order = ids[patch_order]
    ref_cu1 = ref_cu1.numpy()
    for k in range(len(ref_cu1) - 1):
        segment = ids_in_window_order[ref_cu1[k]:ref_cu1[k + 1]]
        assert (segment == segment[0]).all()
        assert segment[0] not in ids_in_window_order[:ref_cu1[k]]

    with torch.no_grad():
        ref_cos, ref_sin = visual.rotary_pos_emb(torch.zeros(1), get_vision_position_ids(one, merge))
    cos, sin = rotary_tables(visual.rotary_pos_emb.inv_freq.numpy(), h, w, merge)
    np.testing.assert_allclose(cos, ref_cos.numpy(), rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(sin, ref_sin.numpy(), rtol=0, atol=1.2e-7)


def test_groups_encode_independently(tiny, exported):
    """Each 2-frame group alone gives what it gives in a batch: groups can be cached."""
    path, encoder = exported["sharp"]
    arrays = _inputs(tiny[0], [(8, 90, 330)], seed=3)
    t, h, w = arrays["video_grid_thw"][0].tolist()
    assert t == 4
    groups = levels_from_pixel_values(arrays["pixel_values_videos"], encoder.normalize_table).reshape(t, h * w, -1)
    batched = encoder.encode_groups(groups, h, w)
    for g in range(t):
        np.testing.assert_allclose(encoder.encode_groups(groups[g:g + 1], h, w)[0], batched[g], rtol=0, atol=1e-6)
    order = np.arange(t)[::-1]  # a shuffled batch gives the same per-group result
    np.testing.assert_allclose(encoder.encode_groups(groups[order], h, w), batched[order], rtol=0, atol=1e-6)
    one_at_a_time = VisionEncoder(path, max_groups=1)
    f, _ = one_at_a_time.encode(arrays["pixel_values_videos"], arrays["video_grid_thw"])
    np.testing.assert_allclose(f, batched.reshape(f.shape), rtol=0, atol=1e-6)


def _level_zero_pixels(encoder, rows: int) -> np.ndarray:
    """(rows, patch_dim) pixel values the processor gives for black frames."""
    return np.tile(np.repeat(encoder.normalize_table[:, 0], encoder.patch_dim // 3), (rows, 1))


def test_shape_mismatch_is_an_input_error(exported):
    _, encoder = exported["tiny"]
    with pytest.raises(InputError, match="does not match video_grid_thw"):
        encoder.encode(_level_zero_pixels(encoder, 15), np.array([[1, 4, 4]]))
    with pytest.raises(InputError, match="merge size"):
        encoder.encode(_level_zero_pixels(encoder, 18), np.array([[1, 3, 6]]))
    with pytest.raises(InputError, match="no uint8 level"):  # zero is no level's value here
        encoder.encode(np.zeros((16, encoder.patch_dim), np.float32), np.array([[1, 4, 4]]))
    features, _ = encoder.encode(np.zeros((0, encoder.patch_dim), np.float32), np.zeros((0, 3), np.int64))
    assert features.shape == (0, encoder.out_hidden)


def test_vision_runtime_imports_no_torch(exported):
    path, _ = exported["tiny"]
    code = (
        "import sys, numpy as np\n"
        "from edgejudge.runtime.vision_qwen2_5 import VisionEncoder\n"
        f"enc = VisionEncoder({str(path)!r})\n"
        "f = enc.encode_groups(np.zeros((2, 16 * 12, enc.patch_dim), np.uint8), 16, 12)\n"
        "assert f.shape == (2, 4 * 12, enc.out_hidden)\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'onnx') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"the vision runtime imported {proc.stdout.strip()}"
