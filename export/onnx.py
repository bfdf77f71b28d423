"""ONNX artifacts: the merged judge as ONNX Runtime graphs the torch-free runtime loads.

So far: Qwen3-VL in fp32, as three graphs (vision encoder per 2-frame group with DeepStack,
text decoder from ORT's fused operators with a KV cache, LM head) plus the embedding table.
fp16, int8/int4 (MatMulNBits) and the other families come next.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from edgejudge.errors import InputError
from edgejudge.export.artifact import check_out_dir, finish_artifact
from edgejudge.export.merge import base_class, check_adapter, merge_adapter
from edgejudge.export.onnx_decoder import export_decoder_onnx
from edgejudge.export.qwen3_vl import export_vision_onnx

VISION_NAME = "vision.onnx"
FAMILIES = ("qwen3_vl",)
PRECISIONS = ("fp32",)


def export_onnx(base_dir: Path, adapter_dir: Path | None, precision: str, out_dir: Path,
                judge_spec: str | None = None) -> Path:
    """Merge `adapter_dir` into `base_dir` and write the ONNX artifact folder."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    _, config = base_class(base_dir)
    if config.model_type not in FAMILIES:
        raise InputError(f"ONNX export supports {', '.join(FAMILIES)} so far, not {config.model_type} (use --format bnb)")
    if precision not in PRECISIONS:
        raise InputError(f"ONNX export supports precision {', '.join(PRECISIONS)} so far, not {precision}")
    if adapter_dir is not None:
        check_adapter(base_dir, Path(adapter_dir))
    check_out_dir(out_dir)
    with tqdm(total=4, desc=f"export onnx {precision}", unit="step") as steps, torch.no_grad():
        steps.set_postfix_str("merge")
        model = merge_adapter(base_dir, adapter_dir, dtype=torch.float32)
        steps.update()
        steps.set_postfix_str("vision")
        out_dir.mkdir(parents=True, exist_ok=True)
        export_vision_onnx(None, out_dir / VISION_NAME, visual=model.model.visual)
        steps.update()
        steps.set_postfix_str("decoder")
        export_decoder_onnx(None, out_dir, model=model)
        steps.update()
        steps.set_postfix_str("manifest")
        finish_artifact(base_dir, out_dir, "onnx", precision, judge_spec,
                        ("torch", "transformers", "peft", "onnx", "onnxruntime"), copy_config=True)
        steps.update()
    return out_dir
