"""bitsandbytes artifacts: the merged judge quantized to nf4 (double quant) or int8, as safetensors
that load with plain transformers + bitsandbytes (the runtime's second backend).

Quantization happens where bitsandbytes does it, at load time: the merged model is written once in
its float dtype, then loaded back with a BitsAndBytesConfig and saved again. The vision tower, the
LM head and Qwen3.5's gate projections stay in the float dtype: a small share of the bytes, and the
most sensitive to rounding.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from edgejudge.errors import InputError
from edgejudge.export.artifact import check_out_dir, finish_artifact
from edgejudge.export.merge import base_class, check_adapter, merge_adapter, save_merged

PRECISIONS = ("nf4", "int8")
# Kept in the float dtype (name prefixes or suffixes): the vision tower and LM head, and Qwen3.5's
# per-head gate projections in_proj_a/in_proj_b (hidden -> heads: a rounding error there scales a
# whole head's state decay, for a negligible share of the bytes).
SKIP_MODULES = ["model.visual", "lm_head", "in_proj_a", "in_proj_b"]


def quantization_config(precision: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if precision == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=SKIP_MODULES)
    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_MODULES)
    raise InputError(f"bnb precision {precision!r}: expected one of {', '.join(PRECISIONS)}")


def export_bnb(base_dir: Path, adapter_dir: Path | None, precision: str, out_dir: Path,
               device: str = "cpu", judge_spec: str | None = None) -> Path:
    """Merge `adapter_dir` into `base_dir`, quantize with bitsandbytes, write an artifact folder."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    cls, _ = base_class(base_dir)  # every input is checked before any weight is read
    if adapter_dir is not None:
        check_adapter(base_dir, Path(adapter_dir))
    check_out_dir(out_dir)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    quant = quantization_config(precision, dtype)
    with tempfile.TemporaryDirectory(prefix="edgejudge-merged-") as tmp, \
            tqdm(total=4, desc=f"export bnb {precision}", unit="step") as steps:
        steps.set_postfix_str("merge")
        save_merged(merge_adapter(base_dir, adapter_dir, dtype=dtype, device=device), Path(tmp))
        steps.update()
        steps.set_postfix_str("quantize")
        model = cls.from_pretrained(tmp, quantization_config=quant, dtype=dtype, device_map=device,
                                    use_safetensors=True, trust_remote_code=False)
        steps.update()
        steps.set_postfix_str("save")
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        steps.update()
        steps.set_postfix_str("manifest")
        finish_artifact(base_dir, out_dir, "bnb", precision, judge_spec,
                        ("torch", "transformers", "peft", "bitsandbytes"), copy_config=False)
        steps.update()
    return out_dir
