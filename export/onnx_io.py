"""How every edgejudge ONNX graph is written: one IR version and opset, metadata, and one
external-data file beside the graph."""

from __future__ import annotations

import json
import os
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


def load_visual(model_dir: Path, family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The vision tower of a `family` checkpoint, from safetensors, in eval mode."""
    from edgejudge.errors import InputError
    from edgejudge.export.merge import load_base

    model = load_base(Path(model_dir), dtype=dtype)
    if model.config.model_type != family:
        raise InputError(f"{model_dir}: a {model.config.model_type!r} model, not {family}")
    return model.model.visual.eval()


def export_vision(proto, out_path: Path, component: str, config, tables: dict[str, np.ndarray]) -> Path:
    """A family's per-group vision graph, plus the .npz of tables its runtime builds grid inputs from."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_onnx(proto, out_path, {"edgejudge.component": component, "edgejudge.vision_config": json.dumps(config.to_dict())})
    np.savez(out_path.with_suffix(".npz"), **tables)
    return out_path
