"""Full-size, random-weight versions of our judges' base models, built from the packaged configs.

The repo ships the real config.json / processor configs / chat templates of each base model
(`edgejudge/presets/<name>/`) but no weights. These helpers turn them into a model on a device, or
into a directory that loads exactly like a downloaded checkpoint, without any hub access: good for
benchmarks (true shapes, true FLOPs) and export plumbing, useless for accuracy.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig

from edgejudge.errors import InputError
from edgejudge.manifest import INPUT_FILES


@dataclass(frozen=True)
class Preset:
    family: str  # one of fixtures.FAMILIES: which tiny fixture mirrors this model
    hub_id: str  # where the config came from (documentation only: never fetched)


PRESETS: dict[str, Preset] = {
    "qwen3-vl-4b-instruct": Preset("qwen3_vl", "Qwen/Qwen3-VL-4B-Instruct"),
    "qwen2.5-vl-7b-instruct": Preset("qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct"),
    "qwen3.5-9b": Preset("qwen3_5", "Qwen/Qwen3.5-9B"),
}

_REPO_ROOT = Path(__file__).resolve().parents[1]


def preset_dir(name: str) -> Path:
    """The packaged folder of preset `name` (config.json, processor configs, chat template)."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    path = Path(str(resources.files("edgejudge.presets") / name))
    if not (path / "config.json").is_file():
        raise InputError(f"preset {name!r} is not installed as files: {path} has no config.json")
    return path


def deep_merge(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of `base` with `overrides` applied; nested dicts (text_config, ...) merge key by key."""
    out = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dtype(config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Rewrite the dtype keys a config.json already has, so `from_pretrained(dtype="auto")` (the
    transformers 5 default) loads the weights in the dtype they were saved in."""
    name = str(dtype).removeprefix("torch.")
    out = copy.deepcopy(config)
    for cfg in (out, out.get("text_config"), out.get("vision_config")):
        if isinstance(cfg, dict):
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = name
    return out


def preset_config_dict(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preset's config.json as a dict (in the checkpoint's own layout), with `overrides` merged."""
    config = json.loads((preset_dir(name) / "config.json").read_text())
    return deep_merge(config, overrides)


def config_from_dict(config: dict[str, Any]) -> transformers.PreTrainedConfig:
    """A transformers config object from a raw config.json dict (same path from_pretrained takes)."""
    model_type = config["model_type"]
    return AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})


def model_class(config: transformers.PreTrainedConfig) -> type[transformers.PreTrainedModel]:
    """The transformers class named by the config's `architectures`."""
    return getattr(transformers, config.architectures[0])


def random_model(
    name: str,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """Preset `name` with seeded random weights, built directly on `device`.

    `_from_config` allocates every parameter under the device context and runs the model's own
    `_init_weights` there (normal(0, initializer_range) for linears/embeddings, norms at identity,
    Gated-DeltaNet A_log/dt_bias as the family defines them), so 9B parameters never touch the
    CPU and the init is a few fused kernels per tensor. `overrides` (merged into config.json)
    shrinks a preset for CPU tests, e.g. {"text_config": {"num_hidden_layers": 1}}.
    """
    config = config_from_dict(set_dtype(preset_config_dict(name, overrides), dtype))
    torch.manual_seed(seed)  # seeds every device's generator
    with torch.device(device):
        model = model_class(config)._from_config(config, dtype=dtype)
    return model.eval()


def find_tokenizer_json(name: str, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """The real tokenizer.json for preset `name` (not shipped in the package: it is 11-20 MB).

    Looked up in `tokenizer_dir` when given, else in $EDGEJUDGE_TOKENIZERS/<name>/, else in
    ../shared/models/<name>/ next to the repo checkout.
    """
    if tokenizer_dir is not None:
        candidates = [Path(tokenizer_dir) / "tokenizer.json"]
    else:
        candidates = []
        if env := os.environ.get("EDGEJUDGE_TOKENIZERS"):
            candidates.append(Path(env) / name / "tokenizer.json")
        candidates.append(_REPO_ROOT.parent / "shared" / "models" / name / "tokenizer.json")
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise InputError(f"no tokenizer.json for preset {name!r}; tried: {tried}")


def write_preset_model_dir(
    name: str,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight checkpoint of preset `name` that loads like the real one.

    The dir holds the preset's config.json (its own layout, with `overrides` and the dtype
    applied), the processor configs, tokenizer config and chat template verbatim, the real
    tokenizer.json and model safetensors.
    """
    tokenizer_json = find_tokenizer_json(name, tokenizer_dir)  # fail before the slow part
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = random_model(name, device=device, dtype=dtype, seed=seed, overrides=overrides)
    model.save_pretrained(out)
    # save_pretrained wrote transformers' own rendering of the config; keep the checkpoint's.
    config = set_dtype(preset_config_dict(name, overrides), dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    src = preset_dir(name)
    (out / "generation_config.json").unlink(missing_ok=True)
    for fname in INPUT_FILES:  # everything in a preset folder but config.json (no tokenizer.json there)
        if (src / fname).is_file():
            shutil.copyfile(src / fname, out / fname)
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    return out
