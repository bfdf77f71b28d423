"""Qwen3-VL's vision tower as ONNX, one 2-frame group per batch row: ONNX Runtime (CPU, fp32)
against HF's `model.model.visual(pixel_values_videos, grid_thw=video_grid_thw)` on the tiny model,
DeepStack features included. The graph takes uint8 levels and normalizes them by a lookup that
gives the processor's float values bit for bit, in fp32 and fp16."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

from edgejudge.errors import InputError
from edgejudge.export.fixtures import sharpened, tiny_model_dir
from edgejudge.export.onnx_io import IR_VERSION, OPSET
from edgejudge.export.qwen3_vl import export_vision_onnx, load_visual
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.preprocess import VisionPreprocessing, levels_from_pixel_values, patch_levels, patchify
from edgejudge.runtime.video import read_video
from edgejudge.runtime.vision import VisionEncoder, groups_per_run, position_embeddings, rotary_tables

TOL = 1e-4
TEXT = "Instruction: Place the red block in the box.\nIs it complete?"

# (frames, height, width) of each video in one prompt
CASES = {
    "one_video": [(4, 64, 96)],
    "odd_frames_non_square": [(3, 101, 333)],  # 3 frames -> padded to grid_t 2; 101x333 pixels
    "two_videos": [(4, 64, 96), (6, 200, 120)],
}


@pytest.fixture(scope="module")
def tiny():
    model_dir = tiny_model_dir("qwen3_vl")
    visual = load_visual(model_dir)
    return model_dir, visual


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    model_dir, visual = tiny
    path = export_vision_onnx(model_dir, tmp_path_factory.mktemp("vision") / "vision.onnx", visual=visual)
    return path, VisionEncoder(path)


def _inputs(model_dir, shapes, seed=0) -> dict:
    model = runtime_model.load(model_dir)
    rng = np.random.default_rng(seed)
    clips = [read_video(rng.integers(0, 256, (*s, 3), dtype=np.uint8), fps=2.0) for s in shapes]
    return runtime_model.build_inputs(model, clips, TEXT)


def _hf(visual, arrays):
    with torch.no_grad():
        out = visual(torch.from_numpy(arrays["pixel_values_videos"]),
                     grid_thw=torch.from_numpy(arrays["video_grid_thw"]))
    return out.pooler_output.numpy(), [d.numpy() for d in out.deepstack_features]


def test_graph_signature(exported, tiny):
    path, _ = exported
    config = tiny[1].config
    graph = onnx.load(str(path), load_external_data=False)
    assert graph.ir_version == IR_VERSION
    assert {o.domain: o.version for o in graph.opset_import}[""] == OPSET
    assert [i.name for i in graph.graph.input] == ["patches", "pos_embeds", "cos", "sin"]
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in graph.graph.output] == ["features", "deepstack"]
    deepstack = graph.graph.output[1].type.tensor_type.shape.dim
    assert deepstack[0].dim_param == "groups" and deepstack[1].dim_value == len(config.deepstack_visual_indexes)
    assert deepstack[-1].dim_value == config.out_hidden_size
    assert (path.parent / (path.name + ".data")).is_file()


def test_graph_uses_fused_ops(exported, tiny):
    """One fused op per block for attention, rotary (q and k), the residual-add + norms and the
    GELU: no matmul + softmax attention, no chain of elementwise ops."""
    graph = onnx.load(str(exported[0]), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    depth = tiny[1].config.depth
    assert ops.count("MultiHeadAttention") == depth and ops.count("RotaryEmbedding") == 2 * depth
    assert ops.count("SkipLayerNormalization") == 2 * depth and ops.count("FastGelu") == depth
    assert "Softmax" not in ops and "Tanh" not in ops
    assert "Split" not in ops  # q, k and v are three linears, not one output split in three


def test_fp16_graph_rotates_in_fp16(tmp_path):
    """An fp16 graph rotates q and k in fp16, on fp16 tables: the only Cast is the level lookup's."""
    path = export_vision_onnx(tiny_model_dir("qwen3_vl"), tmp_path / "vision.onnx", torch.float16)
    graph = onnx.load(str(path), load_external_data=False).graph
    assert [n.name for n in graph.node if n.op_type == "Cast"] == ["patches/to_int32"]
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert types["cos"] == types["sin"] == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf(case, tiny, exported):
    model_dir, visual = tiny
    _, encoder = exported
    arrays = _inputs(model_dir, CASES[case])
    assert len(arrays["video_grid_thw"]) == len(CASES[case])
    ref_features, ref_deepstack = _hf(visual, arrays)
    features, deepstack = encoder.encode(arrays["pixel_values_videos"], arrays["video_grid_thw"])
    assert features.shape == ref_features.shape and features.dtype == np.float32
    assert len(deepstack) == len(ref_deepstack) == len(visual.config.deepstack_visual_indexes)
    diffs = [float(np.abs(features - ref_features).max())]
    for ours, ref in zip(deepstack, ref_deepstack):
        assert ours.shape == ref.shape
        diffs.append(float(np.abs(ours - ref).max()))
    print(f"{case}: grids {arrays['video_grid_thw'].tolist()} max abs diff features {diffs[0]:.2e}, "
          f"deepstack {', '.join(f'{d:.2e}' for d in diffs[1:])}")
    assert max(diffs) <= TOL, diffs


def test_matches_hf_with_sharp_weights(tiny, tmp_path):
    """The tiny checkpoint's biases are zero and its attention nearly uniform, so the biases the
    graph moves (v's, added after proj) and the reordered q/k rows of the rotary are checked on a
    copy with O(1)-scale weights and biases, where either going wrong moves the output by O(1)."""
    model_dir, visual = tiny
    sharp = sharpened(visual)
    encoder = VisionEncoder(export_vision_onnx(model_dir, tmp_path / "vision.onnx", visual=sharp))
    arrays = _inputs(model_dir, CASES["two_videos"])
    ref_features, ref_deepstack = _hf(sharp, arrays)
    features, deepstack = encoder.encode(arrays["pixel_values_videos"], arrays["video_grid_thw"])
    for ours, ref in zip([features, *deepstack], [ref_features, *ref_deepstack]):
        assert np.abs(ref).max() > 0.5
        assert float(np.abs(ours - ref).max()) <= TOL


def test_odd_frame_count_pads_to_two_groups(tiny):
    arrays = _inputs(tiny[0], CASES["odd_frames_non_square"])
    t, h, w = arrays["video_grid_thw"][0].tolist()
    assert t == 2 and h != w


@pytest.mark.parametrize("h,w", [(4, 6), (6, 20), (48, 48), (100, 36), (2, 2)])
def test_grid_tables_match_hf(tiny, h, w):
    """pos_embeds are bit-identical to HF's; cos/sin within one float32 ulp (torch's own cos/sin
    kernels are not reproducible bit for bit in numpy)."""
    visual = tiny[1]
    merge = visual.config.spatial_merge_size
    grid = torch.tensor([[1, h, w]])
    idx, weights = get_vision_interpolation_indices_and_weights(
        grid, visual.num_grid_per_side, mode="bilinear", align_corners=True, spatial_merge_size=merge)
    with torch.no_grad():
        ref_pos = (visual.pos_embed(idx) * weights[:, :, None]).sum(1).numpy()
        ref_cos, ref_sin = visual.rotary_pos_emb(torch.zeros(1), get_vision_position_ids(grid, merge))
    pos = position_embeddings(visual.pos_embed.weight.detach().numpy(), h, w, merge)
    cos, sin = rotary_tables(visual.rotary_pos_emb.inv_freq.numpy(), h, w, merge)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_allclose(cos, ref_cos.numpy(), rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(sin, ref_sin.numpy(), rtol=0, atol=1.2e-7)


def test_groups_encode_independently(tiny, exported):
    """Each 2-frame group alone gives what it gives in a batch: groups can be cached."""
    _, encoder = exported
    arrays = _inputs(tiny[0], [(8, 64, 96)], seed=3)
    t, h, w = arrays["video_grid_thw"][0].tolist()
    groups = levels_from_pixel_values(arrays["pixel_values_videos"], encoder.normalize_table).reshape(t, h * w, -1)
    batched_f, batched_d = encoder.encode_groups(groups, h, w)
    for g in range(t):
        alone_f, alone_d = encoder.encode_groups(groups[g:g + 1], h, w)
        np.testing.assert_allclose(alone_f[0], batched_f[g], rtol=0, atol=1e-6)
        np.testing.assert_allclose(alone_d[0], batched_d[g], rtol=0, atol=1e-6)
    # a shuffled batch gives the same per-group result
    order = np.arange(t)[::-1]
    shuffled_f, _ = encoder.encode_groups(groups[order], h, w)
    np.testing.assert_allclose(shuffled_f, batched_f[order], rtol=0, atol=1e-6)
    # and running one group per session call (max_groups=1) changes nothing either
    one_at_a_time = VisionEncoder(exported[0], max_groups=1)
    f, d = one_at_a_time.encode(arrays["pixel_values_videos"], arrays["video_grid_thw"])
    np.testing.assert_allclose(f, batched_f.reshape(f.shape), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.stack(d), np.moveaxis(batched_d, 0, 1).reshape(len(d), *f.shape), rtol=0, atol=1e-6)


@pytest.mark.parametrize("groups, patches, max_groups, expected", [
    (64, 196, None, 32),  # W1: 8,192 rows allow 41 a run; two runs of 32, not 41 + 23
    (41, 196, None, 41),  # one run
    (65, 196, None, 33),  # two runs: 33 + 32
    (40, 760, None, 10),  # W3: four runs of 10
    (7, 196, 3, 3),  # three runs: 3 + 3 + 1, none larger than three runs need
    (1, 10_000, None, 1),  # a group over the row limit still runs, alone
])
def test_groups_per_run(groups, patches, max_groups, expected):
    step = groups_per_run(groups, patches, max_groups)
    assert step == expected
    runs = -(-groups // step)
    assert runs == -(-groups // (max_groups or max(1, 8192 // patches)))  # no more runs than the limit needs


def _level_zero_pixels(encoder, rows: int) -> np.ndarray:
    """(rows, patch_dim) pixel values the processor gives for black frames."""
    return np.tile(np.repeat(encoder.normalize_table[:, 0], encoder.patch_dim // 3), (rows, 1))


def test_shape_mismatch_is_an_input_error(exported):
    _, encoder = exported
    with pytest.raises(InputError, match="does not match video_grid_thw"):
        encoder.encode(_level_zero_pixels(encoder, 15), np.array([[1, 4, 4]]))
    with pytest.raises(InputError, match="merge size"):
        encoder.encode(_level_zero_pixels(encoder, 18), np.array([[1, 3, 6]]))
    with pytest.raises(InputError, match="uint8 levels"):  # float pixel values where levels go
        encoder.encode_groups(_level_zero_pixels(encoder, 16)[None], 4, 4)
    features, deepstack = encoder.encode(np.zeros((0, encoder.patch_dim), np.float32), np.zeros((0, 3), np.int64))
    assert features.shape == (0, encoder.out_hidden) and len(deepstack) == len(encoder.deepstack_indexes)


def test_vision_runtime_imports_no_torch(exported):
    path, _ = exported
    code = (
        "import sys, numpy as np\n"
        "from edgejudge.runtime.vision import VisionEncoder\n"
        f"enc = VisionEncoder({str(path)!r})\n"
        "f, d = enc.encode_groups(np.zeros((1, 16, enc.patch_dim), np.uint8), 4, 4)\n"
        "assert f.shape == (1, 4, enc.out_hidden) and d.shape[1] == len(enc.deepstack_indexes)\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'onnx') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"the vision runtime imported {proc.stdout.strip()}"


def test_encode_takes_only_processor_values(exported, tiny):
    """`encode` turns HF's float pixel values back into levels: exactly, so the features are those
    of the levels themselves; a value no level normalizes to is refused."""
    _, encoder = exported
    arrays = _inputs(tiny[0], [(2, 64, 96)], seed=5)
    pixels, grid = arrays["pixel_values_videos"], arrays["video_grid_thw"]
    _, h, w = grid[0].tolist()
    features, _ = encoder.encode(pixels, grid)
    levels = levels_from_pixel_values(pixels, encoder.normalize_table)
    np.testing.assert_array_equal(features, encoder.encode_groups(levels[None], h, w)[0][0])
    off_table = pixels.copy()
    off_table[0, 0] = np.nextafter(off_table[0, 0], np.float32(0))
    with pytest.raises(InputError, match="no uint8 level"):
        encoder.encode(off_table, grid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])  # one mean and std; per-channel ones
def test_graph_lookup_is_patchify_bit_for_bit(family, tmp_path, dtype):
    """The graph's normalized patches (the Gather feeding the patch embedding) equal the
    processor's float32 values cast to the graph's float type, bit for bit."""
    import onnxruntime as ort

    from edgejudge.export.onnx import FAMILIES
    from edgejudge.runtime.vision import load_vision_encoder

    model_dir = tiny_model_dir(family)
    pp = VisionPreprocessing.from_model_dir(model_dir)
    exporter = FAMILIES[family]
    path = exporter.export_vision_onnx(model_dir, tmp_path / "vision.onnx", dtype, visual=exporter.load_visual(model_dir))
    proto = onnx.load(str(path))
    lookup = next(n for n in proto.graph.node if n.op_type == "Gather").output[0]
    float_type = onnx.TensorProto.FLOAT16 if dtype == torch.float16 else onnx.TensorProto.FLOAT
    proto.graph.output.append(onnx.helper.make_tensor_value_info(lookup, float_type, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    frames = np.random.default_rng(0).integers(0, 256, (2, 4 * pp.factor, 2 * pp.factor, 3), dtype=np.uint8)
    levels, (_, h, w) = patch_levels(frames, pp)
    encoder = load_vision_encoder(path, family)
    feed = dict(zip(encoder.input_types, encoder.grid_inputs(h, w)), patches=levels[None])
    looked_up = session.run([lookup], feed)[0][0]
    expected = patchify(frames, pp)[0].astype(np.float16 if dtype == torch.float16 else np.float32)
    assert looked_up.dtype == expected.dtype
    np.testing.assert_array_equal(looked_up.view(np.uint8), expected.view(np.uint8))


def test_float_patch_graph_is_refused(exported, tmp_path):
    """A graph exported before the graph took uint8 levels: a one-line InputError, not a type
    error from ONNX Runtime at the first run."""
    path, _ = exported
    proto = onnx.load(str(path), load_external_data=False)
    proto.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT  # the Cast takes floats too
    onnx.save(proto, str(tmp_path / path.name))
    for suffix in (".onnx.data", ".npz"):
        shutil.copy(path.with_name(path.stem + suffix), tmp_path)  # ORT refuses data behind a symlink
    with pytest.raises(InputError, match="older edgejudge"):
        VisionEncoder(tmp_path / path.name)
