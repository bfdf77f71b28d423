"""How every edgejudge ONNX graph is written: one IR version and opset, metadata, and one
external-data file beside the graph."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

OPSET = 18
IR_VERSION = 10  # onnx 1.23 writes IR 14 by default; ORT reads 10 everywhere we ship


def save_onnx(model, out_path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `model` to `out_path` with its weights in `<name>.data` (readable by all: artifacts get
    copied around, and onnx creates the file owner-only)."""
    import onnx

    model.ir_version = IR_VERSION
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    data = out_path.with_name(out_path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    os.chmod(data, 0o644)
    return out_path


def export_module(module: torch.nn.Module, args: tuple, out_path: Path, input_names, output_names,
                  dynamic_axes: dict, metadata: dict[str, str], last_dims: dict[str, int] | None = None) -> Path:
    """torch.onnx.export (TorchScript exporter) of `module`, saved with save_onnx.

    The exporter writes a graph over 2 GB as one file per weight: export into a scratch folder,
    load, then save once with a single data file. `last_dims` fixes output sizes the tracer
    leaves symbolic.
    """
    import onnx

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch, torch.no_grad():
        tmp = Path(scratch) / out_path.name
        torch.onnx.export(module, args, str(tmp), dynamo=False, opset_version=OPSET, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic_axes, do_constant_folding=True)
        model = onnx.load(str(tmp))  # external data, if any, is read in here
    for out in model.graph.output:
        if out.name in (last_dims or {}):
            out.type.tensor_type.shape.dim[-1].dim_value = last_dims[out.name]
    return save_onnx(model, out_path, metadata)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def group_attention(attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """A Qwen vision block's attention (fused `qkv`, `proj`) over each group of `x` (G, S, hidden):
    2D rotary on q and k in float32 (`cos`, `sin` (1, S, head_dim) float32), as HF's
    `apply_rotary_pos_emb_vision`; scores, the additive `bias` (S, S) and softmax in float32, so an
    fp16 graph keeps its softmax in fp32."""
    g, s, hidden = x.shape
    head_dim = hidden // num_heads
    qkv = attn.qkv(x).reshape(g, s, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0].float(), qkv[1].float(), qkv[2]  # (G, heads, S, head_dim)
    q = (q * cos + rotate_half(q) * sin).to(x.dtype)
    k = (k * cos + rotate_half(k) * sin).to(x.dtype)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * head_dim**-0.5
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1).to(x.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(g, s, hidden)
    return attn.proj(out)


def load_visual(model_dir: Path, family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The vision tower of a `family` checkpoint, from safetensors, in eval mode."""
    from edgejudge.errors import InputError
    from edgejudge.export.merge import load_base

    model = load_base(Path(model_dir), dtype=dtype)
    if model.config.model_type != family:
        raise InputError(f"{model_dir}: a {model.config.model_type!r} model, not {family}")
    return model.model.visual.eval()


def export_vision(encoder: torch.nn.Module, example_args: tuple, out_path: Path, input_names, output_names,
                  dynamic_axes: dict, component: str, config, tables: dict[str, np.ndarray]) -> Path:
    """A family's per-group vision graph, plus the .npz of tables its runtime builds grid inputs from."""
    export_module(encoder.eval(), example_args, out_path, input_names, output_names, dynamic_axes,
                  metadata={"edgejudge.component": component, "edgejudge.vision_config": json.dumps(config.to_dict())},
                  last_dims={name: config.out_hidden_size for name in output_names})
    np.savez(out_path.with_suffix(".npz"), **tables)
    return out_path
