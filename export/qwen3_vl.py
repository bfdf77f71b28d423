"""Qwen3-VL's vision tower as an ONNX graph that encodes one 2-frame group per batch row.

Every vision attention layer of Qwen3-VL attends inside one temporal patch group (HF splits
`cu_seqlens` per grid_t index), so a video's groups are independent: the graph takes
`patches` (G, S, C*T*P*P) with S = h*w patches of one group, in the processor's row order
(merge-window row, merge-window col, then the 2x2 inside the window), and returns
`features` (G, S/4, out_hidden) (HF's `pooler_output`, the merger's output) and `deepstack`
(len(deepstack_visual_indexes), G, S/4, out_hidden) (HF's `deepstack_features`, stacked).

What depends only on the grid (h, w) is computed outside the graph, by the torch-free runtime
(`edgejudge.runtime.vision`): the learned position embeddings bilinearly resampled to the grid
(`pos_embeds` (S, hidden)) and the 2D rotary tables (`cos`, `sin` (S, head_dim)). The data they
need (the position-embedding table and the rotary inverse frequencies) is written next to the
graph as `<name>.npz`, with the few config numbers the runtime needs.

The attention is plain batched matmul + softmax in fp32 (no cu_seqlens): one group per batch row.
The weights always go to one external-data file (`<name>.onnx.data`) so that the real towers
(over 2 GB in fp32 for the 8B) and the tiny ones are laid out the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgejudge.export import onnx_io

INPUT_NAMES = ("patches", "pos_embeds", "cos", "sin")


def deepstack_taps(config) -> int:
    """How many decoder layers get DeepStack features added (one per tapped vision layer)."""
    return len(config.vision_config.deepstack_visual_indexes)


OUTPUT_NAMES = ("features", "deepstack")


class VisionGroupEncoder(nn.Module):
    """HF's `Qwen3VLVisionModel` weights, run on a batch of independent temporal-patch groups."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        config = visual.config
        self.hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.deepstack_indexes = list(config.deepstack_visual_indexes)

    def _merge(self, merger: nn.Module, x: torch.Tensor) -> torch.Tensor:
        g = x.shape[0]
        y = merger(x.reshape(-1, self.hidden))  # the merger views consecutive 4 rows as one
        return y.reshape(g, -1, y.shape[-1])

    def forward(self, patches: torch.Tensor, pos_embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        proj = self.visual.patch_embed.proj
        weight = proj.weight.reshape(proj.weight.shape[0], -1)  # Conv3d with kernel == stride: a linear
        # patches arrive float32 (the runtime's preprocessing output) and are cast here, on the device:
        # numpy's float32 -> float16 cast of W1's 12,544 rows took 68 ms of host time on the H100 box
        x = torch.matmul(patches.to(weight.dtype), weight.t()) + proj.bias
        x = x + pos_embeds
        cos, sin = cos[None], sin[None]  # (1, S, head_dim): broadcasts over (G, heads, S, head_dim)
        deepstack = []
        for layer, blk in enumerate(self.visual.blocks):
            x = x + onnx_io.group_attention(blk.attn, blk.norm1(x), cos, sin, self.num_heads)
            x = x + blk.mlp(blk.norm2(x))
            if layer in self.deepstack_indexes:
                merger = self.visual.deepstack_merger_list[self.deepstack_indexes.index(layer)]
                deepstack.append(self._merge(merger, x))
        features = self._merge(self.visual.merger, x)
        return features, torch.stack(deepstack, dim=0)


def sidecar_arrays(visual: nn.Module) -> dict[str, np.ndarray]:
    """What the torch-free runtime needs to build `pos_embeds`, `cos` and `sin` for a grid."""
    config = visual.config
    return {
        "pos_embed": visual.pos_embed.weight.detach().float().cpu().numpy(),
        "inv_freq": visual.rotary_pos_emb.inv_freq.detach().float().cpu().numpy(),
        "num_grid_per_side": np.int64(visual.num_grid_per_side),
        "spatial_merge_size": np.int64(config.spatial_merge_size),
        "patch_dim": np.int64(config.in_channels * config.temporal_patch_size * config.patch_size**2),
        "head_dim": np.int64(config.hidden_size // config.num_heads),
        "out_hidden_size": np.int64(config.out_hidden_size),
        "deepstack_visual_indexes": np.asarray(config.deepstack_visual_indexes, dtype=np.int64),
        "align_corners": np.bool_(getattr(visual, "interpolation_align_corners", True)),
    }


def load_visual(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    return onnx_io.load_visual(Path(model_dir), "qwen3_vl", dtype)


def example_inputs(visual: nn.Module, groups: int = 2, h: int = 4, w: int = 6):
    config = visual.config
    hidden, head_dim = config.hidden_size, config.hidden_size // config.num_heads
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
    gen = torch.Generator().manual_seed(0)
    s = h * w
    dtype = visual.patch_embed.proj.weight.dtype
    inputs = (
        torch.randn(groups, s, patch_dim, generator=gen),  # float32 in every graph
        torch.randn(s, hidden, generator=gen, dtype=dtype),
        torch.randn(s, head_dim, generator=gen),  # the rotary tables stay float32
        torch.randn(s, head_dim, generator=gen),
    )
    return tuple(t.to(visual.patch_embed.proj.weight.device) for t in inputs)


def export_vision_onnx(model_dir: str | Path, out_path: str | Path, dtype: torch.dtype = torch.float32,
                       visual: nn.Module | None = None) -> Path:
    """Write `out_path` (+ `.onnx.data` weights, + `.npz` runtime tables) for the model's vision tower,
    in `dtype` (fp32 or fp16; the rotary, the attention softmax and the norms compute in fp32)."""
    out_path = Path(out_path)
    visual = load_visual(model_dir, dtype) if visual is None else visual.to(dtype)
    return onnx_io.export_vision(
        VisionGroupEncoder(visual), example_inputs(visual), out_path, INPUT_NAMES, OUTPUT_NAMES,
        dynamic_axes={"patches": {0: "groups", 1: "patches_per_group"},
                      "pos_embeds": {0: "patches_per_group"},
                      "cos": {0: "patches_per_group"}, "sin": {0: "patches_per_group"},
                      "features": {0: "groups", 1: "tokens_per_group"},
                      "deepstack": {1: "groups", 2: "tokens_per_group"}},
        component="qwen3_vl.vision", config=visual.config, tables=sidecar_arrays(visual),
    )
