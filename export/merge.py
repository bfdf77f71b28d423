"""Fold a judge's LoRA adapter into its base model, so export sees one plain transformers model.

PEFT loads whatever it can and only warns about the rest: an adapter saved for another model size
or layout loads partly (or not at all) and merges into a silently wrong judge. So everything is
checked first, on a meta-device copy of the base (no weights read): the files, the adapter type,
every target pattern, and every adapter tensor's name and shape against the LoRA layers PEFT
itself would build on this base. Only safetensors are ever read; pickles are refused.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open

from edgejudge.errors import InputError

# model_type -> the class that holds the judge (what AutoModelForImageTextToText picks, too).
FAMILY_CLASS = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{path.parent} is not a {what}: it has no {path.name}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def base_class(base_dir: Path) -> tuple[type[transformers.PreTrainedModel], transformers.PreTrainedConfig]:
    """The transformers class and config of the base model in `base_dir`, after checking the
    family is one we support and the weights are safetensors."""
    base_dir = Path(base_dir)
    raw = _read_json(base_dir / "config.json", "model directory")
    family = raw.get("model_type")
    if family not in FAMILY_CLASS:
        raise InputError(f"{base_dir}: unknown model_type {family!r}; edgejudge supports {', '.join(FAMILY_CLASS)}")
    name = (raw.get("architectures") or [FAMILY_CLASS[family]])[0]
    if name != FAMILY_CLASS[family]:
        raise InputError(f"{base_dir}: architectures names {name!r}; a {family} judge is a {FAMILY_CLASS[family]}")
    if not any((base_dir / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        bins = sorted(p.name for p in base_dir.glob("*.bin"))
        why = f" (found {', '.join(bins)}: pickle files are never loaded)" if bins else ""
        raise InputError(f"{base_dir} has no model.safetensors or model.safetensors.index.json{why}")
    config = transformers.AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    return getattr(transformers, name), config


def _adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the adapter's safetensors header (no tensor data read)."""
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise InputError(f"{adapter_dir} holds adapter_model.bin, a pickle file, which is never loaded; "
                             f"save the adapter as {ADAPTER_WEIGHTS}")
        raise InputError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path} is not a readable safetensors file: {e}") from None


def _unmatched_targets(lora: LoraConfig, module_names: list[str]) -> list[str]:
    """target_modules entries that match no module of the base. PEFT only fails when none of them
    match, so an adapter trained with extra targets would otherwise lose them silently."""
    targets = lora.target_modules
    if targets is None or targets == "all-linear":  # all-linear is expanded by PEFT, always matches
        return []
    entries = [targets] if isinstance(targets, str) else sorted(targets)
    unmatched = []
    for entry in entries:
        one = copy.copy(lora)  # PEFT's own matcher: regex full match for a str, suffix for a list
        one.target_modules = entry if isinstance(targets, str) else {entry}
        if not any(check_target_module_exists(one, name) for name in module_names):
            unmatched.append(entry)
    return unmatched


def check_adapter(base_dir: Path, adapter_dir: Path) -> LoraConfig:
    """Refuse (InputError) an adapter that PEFT would load only partly, or not at all, onto the
    base in `base_dir`. Builds the base and PEFT's LoRA layers on the meta device: no weights."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise InputError(f"adapter directory {adapter_dir} does not exist")
    raw = _read_json(adapter_dir / ADAPTER_CONFIG, "PEFT adapter directory")
    if raw.get("peft_type") != "LORA":
        raise InputError(f"{adapter_dir}: peft_type is {raw.get('peft_type')!r}; only LORA adapters can be merged")
    shapes = _adapter_shapes(adapter_dir)
    cls, config = base_class(base_dir)
    with torch.device("meta"):
        base = cls(config)
    lora = LoraConfig.from_pretrained(adapter_dir)

    unmatched = _unmatched_targets(lora, [name for name, _ in base.named_modules()])
    if unmatched:
        raise InputError(f"{adapter_dir}: target_modules {unmatched} match no module of the "
                         f"{cls.__name__} in {base_dir}; the adapter was trained for another model")
    probe = copy.deepcopy(lora)
    probe.base_model_name_or_path = None  # else PEFT warns that it differs from the base's path
    try:
        with torch.device("meta"):
            expected = get_peft_model(base, probe)
    except ValueError as e:  # e.g. a target that is not a layer type LoRA supports
        raise InputError(f"{adapter_dir} does not fit {base_dir}: {str(e).splitlines()[0]}") from None
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(expected).items()}

    for key, shape in shapes.items():
        if key in want and want[key] != shape:
            raise InputError(f"{adapter_dir}: tensor {key} has shape {list(shape)} but the base "
                             f"{base_dir} needs {list(want[key])}; the adapter was trained for another model or model size")
    extra = sorted(set(shapes) - set(want))
    if extra:
        hint = ""
        if config.model_type == "qwen2_5_vl" and extra[0].startswith(("base_model.model.model.layers.",
                                                                       "base_model.model.visual.")):
            hint = " (its keys use the pre-4.52 transformers layout, model.layers / visual)"
        raise InputError(f"{adapter_dir}: tensor {extra[0]} (and {len(extra) - 1} more) has no LoRA layer "
                         f"in the base {base_dir}{hint}; the adapter was trained for another model")
    missing = sorted(set(want) - set(shapes))
    if missing:
        raise InputError(f"{adapter_dir}: no tensor {missing[0]} (and {len(missing) - 1} more missing) for a "
                         f"module its target_modules select in {base_dir}; the adapter was trained for another model")
    return lora


def load_base(base_dir: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The base judge from safetensors, in eval mode; never runs code from the model dir."""
    cls, config = base_class(base_dir)
    model = cls.from_pretrained(
        base_dir, config=config, dtype=dtype, device_map=device, use_safetensors=True, trust_remote_code=False
    )
    return model.eval()


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path | None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """The base model with `adapter_dir`'s LoRA folded into its weights (or the base alone when
    `adapter_dir` is None), as a plain transformers model of the base's own class."""
    if adapter_dir is None:
        return load_base(base_dir, dtype, device)
    lora = check_adapter(base_dir, adapter_dir)  # before any weights are read
    base = load_base(base_dir, dtype, device)
    cls = type(base)
    # low_cpu_mem_usage: LoRA layers start on meta and take the file's tensors as they are; a
    # tensor the check missed would stay meta and fail the merge loudly, never merge as zero.
    peft_model = PeftModel.from_pretrained(
        base, adapter_dir, config=lora, low_cpu_mem_usage=True, torch_device=str(device)
    )
    merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/inf deltas

    leftover = [n for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    leftover += [n for n, _ in merged.named_parameters() if "lora_" in n]
    if leftover or type(merged) is not cls:
        raise RuntimeError(f"LoRA merge left {type(merged).__name__} with unmerged parts: {leftover[:3]}")
    return merged.eval()


def save_merged(model: torch.nn.Module, out_dir: Path) -> Path:
    """Write the merged model as safetensors shards + config.json + generation_config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # transformers 5 writes safetensors only
    return out
