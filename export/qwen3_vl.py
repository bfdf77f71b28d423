"""Qwen3-VL's vision tower as an ONNX graph that encodes one 2-frame group per batch row.

Every vision attention layer of Qwen3-VL attends inside one temporal patch group (HF splits
`cu_seqlens` per grid_t index), so a video's groups are independent: the graph takes
`patches` (G, S, C*T*P*P) uint8 levels with S = h*w patches of one group, in the processor's row
order (merge-window row, merge-window col, then the 2x2 inside the window), and returns
`features` (G, S/4, out_hidden) (HF's `pooler_output`, the merger's output) and `deepstack`
(G, len(deepstack_visual_indexes), S/4, out_hidden) (HF's `deepstack_features`, stacked). Both
put the groups first, so a run of consecutive groups is one contiguous block of each output: the
runtime writes each run straight into its store of visual rows on the device.

What depends only on the grid (h, w) is computed outside the graph, by the torch-free runtime
(`edgejudge.runtime.vision`): the learned position embeddings bilinearly resampled to the grid
(`pos_embeds` (S, hidden)) and the 2D rotary tables (`cos`, `sin` (S, head_dim)), both in the
graph's float type. The data they need (the position-embedding table and the rotary inverse
frequencies) is written next to the graph as `<name>.npz`, with the few config numbers the
runtime needs and the normalization table.

The graph is built node by node from ONNX Runtime's fused operators (`export/onnx_graph.py`):
per block a fused residual-add + LayerNorm (its linear's bias included), the rotary in the
graph's float type, MultiHeadAttention with one group per batch row (no cu_seqlens), and
FastGelu (HF's `gelu_pytorch_tanh`). The patch embedding (a Conv3d whose kernel equals its
stride) is a linear, after the processor's normalization as a table lookup of the levels
(`onnx_graph.patch_embed`).
The weights go to one external-data file (`<name>.onnx.data`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgejudge.export import onnx_io
from edgejudge.export.onnx_graph import (
    MS_DOMAIN, Graph, linear, merged_rows, merger_mlp, norm, patch_embed, tensor_type, vision_blocks, vision_rotary,
)
from edgejudge.runtime.preprocess import VisionPreprocessing, normalize_table

INPUT_NAMES = ("patches", "pos_embeds", "cos", "sin")
OUTPUT_NAMES = ("features", "deepstack")


def deepstack_taps(config) -> int:
    """How many decoder layers get DeepStack features added (one per tapped vision layer)."""
    return len(config.vision_config.deepstack_visual_indexes)


def _block_mlp(g: Graph, x: str, block, name: str):
    """linear_fc2(gelu_tanh(linear_fc1(x))), without linear_fc2's bias."""
    mlp = block.mlp
    h = g.op("FastGelu", [linear(g, x, mlp.linear_fc1, f"{name}.fc1", bias=False), g.weight(f"{name}.fc1.bias",
                                                                                           mlp.linear_fc1.bias)],
             domain=MS_DOMAIN, name=f"{name}.gelu")
    return linear(g, h, mlp.linear_fc2, f"{name}.fc2", bias=False), mlp.linear_fc2.bias


def build_vision_graph(visual: nn.Module, pp: VisionPreprocessing, float_type=np.float32):
    """The ModelProto of HF's `Qwen3VLVisionModel` on a batch of independent temporal-patch groups."""
    from onnx import TensorProto, helper

    config = visual.config
    if config.hidden_act != "gelu_pytorch_tanh":
        raise NotImplementedError(f"vision hidden_act {config.hidden_act!r}")
    hidden, heads, merge = config.hidden_size, config.num_heads, config.spatial_merge_size
    head_dim, out = hidden // heads, config.out_hidden_size
    taps = list(config.deepstack_visual_indexes)
    g = Graph(float_type)
    proj = visual.patch_embed.proj
    x = g.op("Add", [patch_embed(g, proj, pp), "pos_embeds"], name="pos_embed")
    normed, after = vision_blocks(g, x, visual.blocks, visual.merger.norm, heads, vision_rotary(g, heads, head_dim),
                                  _block_mlp)
    merger = visual.merger
    g.op("Identity", [merger_mlp(g, merged_rows(g, normed, hidden, merge, "merger.rows"), merger.linear_fc1,
                                 merger.linear_fc2, "merger")], ["features"], name="features")
    axis1 = g.const("axes.1", np.array([1], np.int64))
    stacked = []
    for n, layer in enumerate(taps):
        m = visual.deepstack_merger_list[n]  # postshuffle norm: over a merged unit's 4 rows side by side
        rows = merged_rows(g, after[layer], hidden, merge, f"deepstack.{n}.rows")
        y = merger_mlp(g, norm(g, rows, m.norm, f"deepstack.{n}.norm"), m.linear_fc1, m.linear_fc2, f"deepstack.{n}")
        stacked.append(g.op("Unsqueeze", [y, axis1], name=f"deepstack.{n}/unsqueeze"))
    g.op("Concat", stacked, ["deepstack"], name="deepstack", axis=1)
    f = tensor_type(float_type)
    inputs = [helper.make_tensor_value_info("patches", TensorProto.UINT8, ["groups", "patches_per_group",
                                                                           proj.weight[0].numel()]),
              helper.make_tensor_value_info("pos_embeds", f, ["patches_per_group", hidden]),
              helper.make_tensor_value_info("cos", f, ["patches_per_group", head_dim]),
              helper.make_tensor_value_info("sin", f, ["patches_per_group", head_dim])]
    outputs = [helper.make_tensor_value_info("features", f, ["groups", "tokens_per_group", out]),
               helper.make_tensor_value_info("deepstack", f, ["groups", len(taps), "tokens_per_group", out])]
    return g.model("qwen3_vl_vision", inputs, outputs)


def sidecar_arrays(visual: nn.Module, pp: VisionPreprocessing) -> dict[str, np.ndarray]:
    """What the torch-free runtime needs to build `pos_embeds`, `cos` and `sin` for a grid, and the
    normalization table (its `encode` turns HF's float pixel values back into levels)."""
    config = visual.config
    return {
        "pos_embed": visual.pos_embed.weight.detach().float().cpu().numpy(),
        "inv_freq": visual.rotary_pos_emb.inv_freq.detach().float().cpu().numpy(),
        "num_grid_per_side": np.int64(visual.num_grid_per_side),
        "spatial_merge_size": np.int64(config.spatial_merge_size),
        "patch_dim": np.int64(config.in_channels * config.temporal_patch_size * config.patch_size**2),
        "head_dim": np.int64(config.hidden_size // config.num_heads),
        "out_hidden_size": np.int64(config.out_hidden_size),
        "normalize_table": normalize_table(pp),
        "deepstack_visual_indexes": np.asarray(config.deepstack_visual_indexes, dtype=np.int64),
        "align_corners": np.bool_(getattr(visual, "interpolation_align_corners", True)),
    }


def load_visual(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    return onnx_io.load_visual(Path(model_dir), "qwen3_vl", dtype)


def export_vision_onnx(model_dir: str | Path | None, out_path: str | Path, dtype: torch.dtype = torch.float32,
                       visual: nn.Module | None = None, pp: VisionPreprocessing | None = None) -> Path:
    """Write `out_path` (+ `.onnx.data` weights, + `.npz` runtime tables) for the model's vision tower,
    in `dtype` (fp32 or fp16; the attention softmax and the norms compute in fp32).
    `visual` and `pp` (the processor constants, whose normalization the graph does) default to
    `model_dir`'s."""
    visual = load_visual(model_dir, dtype) if visual is None else visual.to(dtype)
    pp = VisionPreprocessing.from_model_dir(model_dir) if pp is None else pp
    float_type = np.float16 if dtype == torch.float16 else np.float32
    return onnx_io.export_vision(build_vision_graph(visual, pp, float_type), Path(out_path), "qwen3_vl.vision",
                                 visual.config, sidecar_arrays(visual, pp))
