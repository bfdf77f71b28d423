"""Qwen2.5-VL's vision tower as an ONNX graph that encodes one 2-frame group per batch row.

Every vision attention layer of Qwen2.5-VL attends inside one temporal patch group: the
full-attention blocks (`fullatt_block_indexes`) use `cu_seqlens` split per grid_t index, and the
other blocks attend inside square windows (`window_size / patch_size / spatial_merge_size` merged
units per side) that are laid out per grid_t index too. So a video's groups are independent, and
the graph takes `patches` (G, S, C*T*P*P) uint8 levels (normalized in the graph by a table lookup,
`onnx_graph.patch_embed`) with S = h*w patches of one group, in the processor's row order
(merge-window row, merge-window col, then the 2x2 inside the window), and returns
`features` (G, S/4, out_hidden) in that same (merged) order: HF's `pooler_output` after its
`reverse_indices` gather.

HF permutes the merged units into window order (`get_vision_window_index`), runs the blocks with
`cu_window_seqlens` / `cu_seqlens`, and restores the order after the merger. Nothing in a block but
attention mixes tokens, and the merger only mixes the 4 rows of one merged unit, so the graph skips
the permutation and expresses the windows as an additive attention bias instead:
`window_mask` (S, S) float, 0 where two patches share a window and a large negative number where
they do not (built by the torch-free runtime, `edgejudge.runtime.vision_qwen2_5`, from HF's own
window index, padding rule for grids that are not multiples of the window included). Inside one
window the keys keep HF's relative order, so the windowed softmax sums the same terms (plus exact
zeros). The full-attention blocks attend over the whole group without a mask.

The 2D rotary tables `cos`, `sin` (S, head_dim) are also computed outside the graph, in the
processor's order. The data they need (the rotary inverse frequencies) is written next to the graph
as `<name>.npz`, with the few config numbers the runtime needs and the normalization table.

The graph is built node by node from ONNX Runtime's fused operators (`export/onnx_graph.py`), as
Qwen3-VL's: per block a fused residual-add + RMSNorm, the rotary, MultiHeadAttention
with one group per batch row (the window mask as its attention bias), and the SiLU-gated MLP. The
weights go to one external-data file (`<name>.onnx.data`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgejudge.export import onnx_io
from edgejudge.export.onnx_graph import (
    Graph, cast, linear, merged_rows, merger_mlp, patch_embed, tensor_type, vision_blocks, vision_rotary,
)
from edgejudge.runtime.preprocess import VisionPreprocessing, normalize_table

INPUT_NAMES = ("patches", "window_mask", "cos", "sin")
OUTPUT_NAMES = ("features",)
FP16_LOWEST = -65504.0


def deepstack_taps(config) -> int:
    return 0


def _config_int(config, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise AttributeError(f"vision config has none of {names}")


def _block_mlp(g: Graph, x: str, block, name: str):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), without down_proj's bias."""
    mlp = block.mlp
    gate = linear(g, x, mlp.gate_proj, f"{name}.gate_proj")
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{name}.sigmoid")], name=f"{name}.silu")
    gated = g.op("Mul", [act, linear(g, x, mlp.up_proj, f"{name}.up_proj")], name=f"{name}.gated")
    return linear(g, gated, mlp.down_proj, f"{name}.down_proj", bias=False), mlp.down_proj.bias


def build_vision_graph(visual: nn.Module, pp: VisionPreprocessing, float_type=np.float32):
    """The ModelProto of HF's `Qwen2_5_VisionTransformerPretrainedModel` on a batch of independent
    temporal-patch groups."""
    from onnx import TensorProto, helper

    config = visual.config
    if config.hidden_act != "silu":
        raise NotImplementedError(f"vision hidden_act {config.hidden_act!r}")
    hidden, heads, merge = config.hidden_size, config.num_heads, config.spatial_merge_size
    head_dim, fullatt = hidden // heads, {int(i) for i in config.fullatt_block_indexes}
    g = Graph(float_type)
    x = patch_embed(g, visual.patch_embed.proj, pp)
    # the window mask as MultiHeadAttention's (1, 1, S, S) bias in the float type; in fp16 float32's
    # lowest becomes fp16's lowest rather than -inf: either gives exp() = 0 against the unmasked keys
    mask = "window_mask"
    if float_type == np.float16:
        mask = cast(g, g.op("Max", [mask, g.const("mask.lowest", np.array(FP16_LOWEST, np.float32))],
                            name="mask/clip"), float_type, "mask/to_float_type")
    mask = g.op("Unsqueeze", [mask, g.const("axes.01", np.array([0, 1], np.int64))], name="mask/unsqueeze")
    merger = visual.merger
    normed, _ = vision_blocks(g, x, visual.blocks, merger.ln_q, heads, vision_rotary(g, heads, head_dim), _block_mlp,
                              lambda layer: None if layer in fullatt else mask)
    features = merger_mlp(g, merged_rows(g, normed, hidden, merge, "merger.rows"), merger.mlp[0], merger.mlp[2],
                          "merger")
    g.op("Identity", [features], ["features"], name="features")
    patch_dim = _config_int(config, "in_channels", "in_chans") * config.temporal_patch_size * config.patch_size**2
    inputs = [helper.make_tensor_value_info("patches", TensorProto.UINT8, ["groups", "patches_per_group", patch_dim]),
              helper.make_tensor_value_info("window_mask", TensorProto.FLOAT, ["patches_per_group", "patches_per_group"]),
              helper.make_tensor_value_info("cos", tensor_type(float_type), ["patches_per_group", head_dim]),
              helper.make_tensor_value_info("sin", tensor_type(float_type), ["patches_per_group", head_dim])]
    outputs = [helper.make_tensor_value_info("features", tensor_type(float_type),
                                             ["groups", "tokens_per_group", config.out_hidden_size])]
    return g.model("qwen2_5_vl_vision", inputs, outputs)


def sidecar_arrays(visual: nn.Module, pp: VisionPreprocessing) -> dict[str, np.ndarray]:
    """What the torch-free runtime needs to build `window_mask`, `cos` and `sin` for a grid, and the
    normalization table (its `encode` turns HF's float pixel values back into levels)."""
    config = visual.config
    in_channels = _config_int(config, "in_channels", "in_chans")
    return {
        "inv_freq": visual.rotary_pos_emb.inv_freq.detach().float().cpu().numpy(),
        "spatial_merge_size": np.int64(config.spatial_merge_size),
        "patch_size": np.int64(config.patch_size),
        "window_size": np.int64(config.window_size),
        "fullatt_block_indexes": np.asarray(config.fullatt_block_indexes, dtype=np.int64),
        "patch_dim": np.int64(in_channels * config.temporal_patch_size * config.patch_size**2),
        "head_dim": np.int64(config.hidden_size // config.num_heads),
        "out_hidden_size": np.int64(config.out_hidden_size),
        "normalize_table": normalize_table(pp),
    }


def load_visual(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    return onnx_io.load_visual(Path(model_dir), "qwen2_5_vl", dtype)


def export_vision_onnx(model_dir: str | Path | None, out_path: str | Path, dtype: torch.dtype = torch.float32,
                       visual: nn.Module | None = None, pp: VisionPreprocessing | None = None) -> Path:
    """Write `out_path` (+ `.onnx.data` weights, + `.npz` runtime tables) for the model's vision tower,
    in `dtype` (fp32 or fp16; the attention softmax and the RMSNorms compute in fp32).
    `visual` and `pp` (the processor constants, whose normalization the graph does) default to
    `model_dir`'s."""
    visual = load_visual(model_dir, dtype) if visual is None else visual.to(dtype)
    pp = VisionPreprocessing.from_model_dir(model_dir) if pp is None else pp
    float_type = np.float16 if dtype == torch.float16 else np.float32
    return onnx_io.export_vision(build_vision_graph(visual, pp, float_type), Path(out_path), "qwen2_5_vl.vision",
                                 visual.config, sidecar_arrays(visual, pp))
