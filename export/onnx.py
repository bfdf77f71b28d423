"""ONNX artifacts: the merged judge as ONNX Runtime graphs the torch-free runtime loads.

Qwen3-VL and Qwen2.5-VL, as three graphs (the family's vision encoder per 2-frame group, the
text decoder from ORT's fused operators with a KV cache, the LM head) plus the embedding table.

Precisions: fp32 and fp16 are the float graphs. int8 / int4 quantize the decoder's linear layers
weight-only to MatMulNBits with ONNX Runtime's own quantizers (RTN by default, or ORT's k_quant;
block-wise; symmetric or not) on top of float graphs in `activations` (fp16 by default: the GPU
artifact; fp32 for CPU-only targets). The vision tower stays in the float type unless
`vision_bits=8` (its linears as int8 MatMulNBits: half the fp16 tower's device memory). Two options
keep the most sensitive weights at 8 bits inside an int4 artifact: `lm_head_bits=8` (the LM head as
an int8 MatMulNBits) and `int8_last_layers=N` (the linears of the last N decoder layers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edgejudge.errors import InputError
from edgejudge.export import qwen2_5_vl, qwen3_vl
from edgejudge.export.artifact import check_out_dir, finish_artifact
from edgejudge.export.merge import base_class, check_adapter, merge_adapter
from edgejudge.export.onnx_decoder import (LM_HEAD_NAME, build_quantizable_lm_head_graph, export_decoder_onnx, head_weight,
                                           write_cuda_decoder)
from edgejudge.export.onnx_io import save_onnx
from edgejudge.runtime.preprocess import VisionPreprocessing

VISION_NAME = "vision.onnx"
FAMILIES = {"qwen3_vl": qwen3_vl, "qwen2_5_vl": qwen2_5_vl}
PRECISIONS = ("fp32", "fp16", "int8", "int4")
ALGORITHMS = ("rtn", "k_quant")
TORCH_FLOAT = {"fp32": torch.float32, "fp16": torch.float16}


def quantize_matmuls(path: Path, bits: int, block_size: int, symmetric: bool, algorithm: str = "rtn",
                     bits_by_node: dict[str, int] | None = None) -> None:
    """Rewrite the MatMuls with constant weights in `path` as MatMulNBits (weight-only), in place.
    `bits_by_node` overrides `bits` for the named MatMul nodes (mixed precision)."""
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    logging.getLogger(nbits.__name__).setLevel(logging.WARNING)  # one INFO line per node otherwise
    model = onnx.load(str(path))
    overrides = bits_by_node or {}
    if algorithm == "k_quant":
        # k_quant takes per-node settings in one pass
        config = nbits.KQuantWeightOnlyQuantConfig(customized_weight_config={n: {"bits": b} for n, b in overrides.items()})
        quantizer = nbits.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                               algo_config=config)
        quantizer.process()
        model = quantizer.model.model
    else:
        # ORT's default RTN quantizer has one bit width per pass (and nodes_to_include does not narrow
        # it): each override group first with every other MatMul excluded, then the rest.
        groups = [(b, {n for n, nb in overrides.items() if nb == b}) for b in sorted(set(overrides.values()))]
        for pass_bits, only in groups + [(bits, None)]:
            exclude = [] if only is None else [n.name for n in model.graph.node
                                               if n.op_type == "MatMul" and n.name not in only]
            config = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=pass_bits)
            quantizer = nbits.MatMulNBitsQuantizer(model, bits=pass_bits, block_size=block_size,
                                                   is_symmetric=symmetric, nodes_to_exclude=exclude, algo_config=config)
            quantizer.process()
            model = quantizer.model.model
    save_onnx(model, path)


def last_layer_linears(num_layers: int, count: int) -> list[str]:
    """The decoder graph's linear-layer node names of the last `count` layers."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    return [f"layers.{i}.{n}" for i in range(max(num_layers - count, 0), num_layers) for n in names]


def write_int8_lm_head(model, out_dir: Path, float_type: str, block_size: int, symmetric: bool) -> None:
    """Replace the float LM head (a Gemm reading embed.npy / lm_head.npy) by an int8 MatMulNBits head."""
    weight, tied = head_weight(model)
    dtype = np.float16 if float_type == "fp16" else np.float32
    head_path = out_dir / LM_HEAD_NAME
    save_onnx(build_quantizable_lm_head_graph(weight.detach().float().cpu().numpy().astype(dtype)), head_path)
    quantize_matmuls(head_path, 8, block_size, symmetric)
    if not tied:
        (out_dir / "lm_head.npy").unlink()  # the float copy of an untied head is not read any more


def precision_label(precision: str, activations: str, block_size: int, symmetric: bool, algorithm: str,
                    lm_head_bits: int | None, int8_last_layers: int, vision_bits: int | None = None) -> str:
    """The manifest's precision string, e.g. `int4-b128-sym-rtn-fp16+head8+last2x8+vision8`."""
    if precision in TORCH_FLOAT:
        return precision
    label = f"{precision}-b{block_size}-{'sym' if symmetric else 'asym'}-{algorithm.replace('_', '')}-{activations}"
    if lm_head_bits:
        label += f"+head{lm_head_bits}"
    if int8_last_layers:
        label += f"+last{int8_last_layers}x8"
    if vision_bits:
        label += f"+vision{vision_bits}"
    return label


def check_options(family: str, precision: str, activations: str, algorithm: str, lm_head_bits: int | None,
                  int8_last_layers: int, vision_bits: int | None = None) -> None:
    if family not in FAMILIES:
        raise InputError(f"ONNX export supports {', '.join(FAMILIES)} so far, not {family} "
                         "(use --format bnb; Qwen3.5 ONNX is planned)")
    if precision not in PRECISIONS:
        raise InputError(f"ONNX export supports precision {', '.join(PRECISIONS)}, not {precision}")
    if activations not in TORCH_FLOAT:
        raise InputError(f"activations must be fp32 or fp16, not {activations}")
    if precision in TORCH_FLOAT and (lm_head_bits or int8_last_layers or vision_bits or algorithm != "rtn"):
        raise InputError(f"--lm-head-bits, --int8-last-layers, --vision-bits and --algorithm apply to int8/int4, "
                         f"not {precision}")
    if algorithm not in ALGORITHMS:
        raise InputError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm}")
    if lm_head_bits not in (None, 8):
        raise InputError(f"--lm-head-bits must be 8 (the head stays float otherwise), not {lm_head_bits}")
    if int8_last_layers < 0:
        raise InputError("--int8-last-layers must be >= 0")
    if vision_bits not in (None, 8):
        raise InputError(f"--vision-bits must be 8 (the vision tower stays float otherwise), not {vision_bits}")


def export_onnx(base_dir: Path, adapter_dir: Path | None, precision: str, out_dir: Path,
                judge_spec: str | None = None, block_size: int = 128, symmetric: bool = True,
                activations: str | None = None, algorithm: str = "rtn", lm_head_bits: int | None = None,
                int8_last_layers: int = 0, vision_bits: int | None = None, device: str = "cpu") -> Path:
    """Merge `adapter_dir` into `base_dir` and write the ONNX artifact folder.

    `activations`: the float type of the graphs (default: the precision itself for fp32/fp16,
    fp16 for int8/int4). `device`: where the merge runs.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    _, config = base_class(base_dir)
    activations = activations or (precision if precision in TORCH_FLOAT else "fp16")
    check_options(config.model_type, precision, activations, algorithm, lm_head_bits, int8_last_layers, vision_bits)
    family = FAMILIES[config.model_type]
    if adapter_dir is not None:
        check_adapter(base_dir, Path(adapter_dir))
    check_out_dir(out_dir)
    with tqdm(total=4, desc=f"export onnx {precision}", unit="step") as steps, torch.no_grad():
        steps.set_postfix_str("merge")
        model = merge_adapter(base_dir, adapter_dir, dtype=torch.float32, device=device)
        steps.update()
        steps.set_postfix_str("decoder")
        out_dir.mkdir(parents=True, exist_ok=True)
        decoder = export_decoder_onnx(model, out_dir, family, activations)
        if precision not in TORCH_FLOAT:
            steps.set_postfix_str(f"quantize {precision}")
            num_layers = model.config.get_text_config().num_hidden_layers
            quantize_matmuls(decoder, int(precision[3:]), block_size, symmetric, algorithm,
                             {n: 8 for n in last_layer_linears(num_layers, int8_last_layers)})
            if lm_head_bits:
                write_int8_lm_head(model, out_dir, activations, block_size, symmetric)
        write_cuda_decoder(decoder)
        steps.update()
        steps.set_postfix_str("vision")
        # the decoder is written: the vision tower can be cast in place
        family.export_vision_onnx(None, out_dir / VISION_NAME, TORCH_FLOAT[activations], visual=model.model.visual,
                                  pp=VisionPreprocessing.from_model_dir(base_dir))
        if vision_bits:
            quantize_matmuls(out_dir / VISION_NAME, vision_bits, block_size, symmetric)
        steps.update()
        steps.set_postfix_str("manifest")
        finish_artifact(base_dir, out_dir, "onnx",
                        precision_label(precision, activations, block_size, symmetric, algorithm, lm_head_bits,
                                        int8_last_layers, vision_bits),
                        judge_spec, ("torch", "transformers", "peft", "onnx", "onnxruntime"), copy_config=True)
        steps.update()
    return out_dir
