"""ONNX artifacts: the merged judge as ONNX Runtime graphs the torch-free runtime loads.

So far: Qwen3-VL, as three graphs (vision encoder per 2-frame group with DeepStack, text decoder
from ORT's fused operators with a KV cache, LM head) plus the embedding table. int8/int4 quantize
the decoder's linear layers weight-only to MatMulNBits with ONNX Runtime's own quantizer (RTN,
block-wise, symmetric or not); the vision tower and LM head stay in float. fp16 graphs and the
other families come next.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from edgejudge.errors import InputError
from edgejudge.export.artifact import check_out_dir, finish_artifact
from edgejudge.export.merge import base_class, check_adapter, merge_adapter
from edgejudge.export.onnx_decoder import export_decoder_onnx
from edgejudge.export.onnx_io import save_onnx
from edgejudge.export.qwen3_vl import export_vision_onnx

VISION_NAME = "vision.onnx"
FAMILIES = ("qwen3_vl",)
PRECISIONS = ("fp32", "int8", "int4")


def quantize_decoder(decoder_path: Path, bits: int, block_size: int, symmetric: bool) -> None:
    """Rewrite the decoder's MatMuls with constant weights as MatMulNBits (weight-only RTN)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(decoder_path))
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     algo_config=config)
    quantizer.process()
    save_onnx(quantizer.model.model, decoder_path)


def export_onnx(base_dir: Path, adapter_dir: Path | None, precision: str, out_dir: Path,
                judge_spec: str | None = None, block_size: int = 128, symmetric: bool = True) -> Path:
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
        decoder = export_decoder_onnx(None, out_dir, model=model)
        if precision != "fp32":
            steps.set_postfix_str(f"quantize {precision}")
            quantize_decoder(decoder, bits=int(precision[3:]), block_size=block_size, symmetric=symmetric)
        steps.update()
        steps.set_postfix_str("manifest")
        finish_artifact(base_dir, out_dir, "onnx", precision if precision == "fp32" else
                        f"{precision}-b{block_size}-{'sym' if symmetric else 'asym'}", judge_spec,
                        ("torch", "transformers", "peft", "onnx", "onnxruntime"), copy_config=True)
        steps.update()
    return out_dir
