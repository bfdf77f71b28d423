"""LoRA merge: the merged judge computes what the adapter computes, every targeted module (the
Qwen3.5 packed Gated-DeltaNet projections and the vision merger included) is folded in with
PEFT's scale, and adapters that would load only partly are refused before any weights are read."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("torchvision")  # the Qwen video processors need it

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from edgejudge.errors import InputError  # noqa: E402
from edgejudge.export import fixtures, presets  # noqa: E402
from edgejudge.export.merge import check_adapter, merge_adapter, save_merged  # noqa: E402
from hf_reference import hf_inputs  # noqa: E402

PROMPT = "Place the red block in the box. Is the task complete? Answer complete or not complete."
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw",
                "second_per_grid_ts", "mm_token_type_ids")


@dataclass
class Case:
    family: str
    model_dir: Path
    adapter_dir: Path
    inputs: dict[str, torch.Tensor]


def video_inputs(model_dir: Path) -> dict[str, torch.Tensor]:
    """One real multimodal prompt: 4 random 64x96 frames + text, through HF's own processor."""
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 96, 3), dtype=np.uint8)
    video = {"frames": frames, "indices": [0, 1, 2, 3], "fps": 2.0, "total_frames": 4}
    arrays = hf_inputs(str(model_dir), [video], PROMPT)
    return {k: torch.from_numpy(arrays[k]) for k in MODEL_INPUTS if k in arrays}


@pytest.fixture(scope="module", params=fixtures.FAMILIES)
def case(request, tmp_path_factory) -> Case:
    family = request.param
    model_dir = fixtures.tiny_model_dir(family)
    adapter_dir = fixtures.build_tiny_adapter(model_dir, tmp_path_factory.mktemp(family) / "adapter")
    return Case(family, model_dir, adapter_dir, video_inputs(model_dir))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Plain adapters per family, for the refusal tests (built once)."""
    root = tmp_path_factory.mktemp("adapters")
    return {f: fixtures.build_tiny_adapter(fixtures.tiny_model_dir(f), root / f) for f in fixtures.FAMILIES}


@torch.no_grad()
def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


def test_merged_matches_adapter(case, tmp_path):
    base = merge_adapter(case.model_dir, None)
    base_logits = logits(base, case.inputs)
    unmerged = PeftModel.from_pretrained(merge_adapter(case.model_dir, None), case.adapter_dir).eval()
    lora_logits = logits(unmerged, case.inputs)
    merged = merge_adapter(case.model_dir, case.adapter_dir)
    merged_logits = logits(merged, case.inputs)

    assert (merged_logits - lora_logits).abs().max() <= 1e-5
    assert (merged_logits - base_logits).abs().max() > 1e-3  # a no-op merge fails here
    assert type(merged) is type(base)
    assert not [n for n, _ in merged.named_parameters() if "lora_" in n]
    assert merged.state_dict().keys() == base.state_dict().keys()

    out = save_merged(merged, tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert torch.equal(logits(merge_adapter(out, None), case.inputs), merged_logits)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_every_delta_is_scale_b_a(use_rslora, tmp_path):
    """merged - base == scale * B @ A (from the adapter file, by hand) for every adapted weight, and
    0 everywhere else; scale is alpha/sqrt(r) with rsLoRA, alpha/r without."""
    model_dir = fixtures.tiny_model_dir("qwen3_5")
    adapter_dir = fixtures.build_tiny_adapter(model_dir, tmp_path, use_rslora=use_rslora)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is use_rslora
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if use_rslora else cfg["r"])

    lora = load_file(adapter_dir / "adapter_model.safetensors")
    expected = {}
    for key, a in lora.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            expected[f"{module}.weight"] = scale * lora[key.replace(".lora_A.", ".lora_B.")] @ a

    base = merge_adapter(model_dir, None).state_dict()
    merged = merge_adapter(model_dir, adapter_dir).state_dict()
    # 4 MLPs x 3, 3 linear-attention layers x 5 packed projections, 1 attention x 4, merger x 2
    assert len(expected) == len(lora) // 2 == 4 * 3 + 3 * 5 + 4 + 2
    for name, weight in merged.items():
        delta = weight - base[name]
        if name in expected:
            torch.testing.assert_close(delta, expected[name], rtol=0, atol=1e-6, msg=name)
            assert expected[name].abs().max() > 1e-3, name
        else:
            assert not delta.any(), f"{name} changed but the adapter does not touch it"


def test_qwen3_5_packed_projections_and_merger_merged(tmp_path):
    """The modules other runtimes often skip: every Gated-DeltaNet packed projection of every
    linear-attention layer, and the vision merger, differ from the base after the merge."""
    model_dir = fixtures.tiny_model_dir("qwen3_5")
    adapter_dir = fixtures.build_tiny_adapter(model_dir, tmp_path)
    base = merge_adapter(model_dir, None).state_dict()
    merged = merge_adapter(model_dir, adapter_dir).state_dict()
    layer_types = json.loads((model_dir / "config.json").read_text())["text_config"]["layer_types"]
    names = [f"model.language_model.layers.{i}.linear_attn.{proj}.weight"
             for i, kind in enumerate(layer_types) if kind == "linear_attention"
             for proj in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")]
    names += ["model.visual.merger.linear_fc1.weight", "model.visual.merger.linear_fc2.weight"]
    assert len(names) == 3 * 5 + 2
    for name in names:
        assert (merged[name] - base[name]).abs().max() > 1e-4, name
    untouched = [n for n in base if ".visual.blocks." in n or "embed_tokens" in n]
    assert untouched and all(torch.equal(merged[n], base[n]) for n in untouched)


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_family,base_family,problem", [
    # same module names, other head_dim: k_proj is 4 x 32 wide in Qwen3-VL, 4 x 16 in Qwen2.5-VL
    ("qwen3_vl", "qwen2_5_vl", r"k_proj\.lora_B\.weight has shape \[64, 8\] but the base .* needs \[32, 8\]"),
    # Qwen3.5's layer 0 is linear attention: it has no self_attn.k_proj at all
    ("qwen2_5_vl", "qwen3_5", r"layers\.0\.self_attn\.k_proj\.lora_A\.weight \(and 15 more\) has no LoRA layer"),
], ids=["qwen3_vl-on-qwen2_5_vl", "qwen2_5_vl-on-qwen3_5"])
def test_refuses_adapter_of_another_family(adapters, adapter_family, base_family, problem):
    with pytest.raises(InputError, match=r"tensor base_model\.model\.\S+" + problem):
        merge_adapter(fixtures.tiny_model_dir(base_family), adapters[adapter_family])


def test_refuses_adapter_of_another_size(adapters, tmp_path):
    """A qwen3_5 base twice as wide: same family, same module names, other shapes."""
    config = json.loads((fixtures.tiny_model_dir("qwen3_5") / "config.json").read_text())
    config["text_config"].update(hidden_size=128, intermediate_size=256)
    config["vision_config"]["out_hidden_size"] = 128
    hf_config = presets.config_from_dict(config)
    presets.model_class(hf_config)._from_config(hf_config).save_pretrained(tmp_path)
    with pytest.raises(InputError, match=r"tensor \S+lora_A\.weight has shape \[32, 64\] but .* needs \[32, 128\]"):
        merge_adapter(tmp_path, adapters["qwen3_5"])


def test_refuses_pre_4_52_qwen2_5_vl_layout(adapters, tmp_path):
    """PEFT 0.21 + transformers 5 load these keys as nothing (a warning, B stays 0): a no-op merge."""
    shutil.copy(adapters["qwen2_5_vl"] / "adapter_config.json", tmp_path)
    weights = load_file(adapters["qwen2_5_vl"] / "adapter_model.safetensors")
    old = {k.replace(".model.language_model.", ".model."): v for k, v in weights.items()}
    save_file(old, tmp_path / "adapter_model.safetensors")
    with pytest.raises(InputError, match=r"model\.layers\.0\.\S+ \(and 27 more\) has no LoRA layer .*pre-4\.52"):
        merge_adapter(fixtures.tiny_model_dir("qwen2_5_vl"), tmp_path)


def test_refuses_target_that_matches_nothing(adapters, tmp_path):
    shutil.copy(adapters["qwen3_vl"] / "adapter_model.safetensors", tmp_path)
    cfg = json.loads((adapters["qwen3_vl"] / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj_qkv"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"target_modules \['in_proj_qkv'\] match no module"):
        check_adapter(fixtures.tiny_model_dir("qwen3_vl"), tmp_path)


def test_refuses_missing_adapter_config(tmp_path):
    with pytest.raises(InputError, match="has no adapter_config.json"):
        merge_adapter(fixtures.tiny_model_dir("qwen3_vl"), tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        merge_adapter(fixtures.tiny_model_dir("qwen3_vl"), tmp_path / "nowhere")


def test_refuses_pickle_adapter(adapters, tmp_path):
    shutil.copy(adapters["qwen3_vl"] / "adapter_config.json", tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"not even read")
    with pytest.raises(InputError, match="adapter_model.bin, a pickle file"):
        merge_adapter(fixtures.tiny_model_dir("qwen3_vl"), tmp_path)


def test_refuses_other_peft_type(adapters, tmp_path):
    shutil.copy(adapters["qwen3_vl"] / "adapter_model.safetensors", tmp_path)
    cfg = json.loads((adapters["qwen3_vl"] / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(InputError, match="peft_type is 'IA3'; only LORA"):
        merge_adapter(fixtures.tiny_model_dir("qwen3_vl"), tmp_path)


def test_refuses_unknown_model_type(adapters, tmp_path):
    model_dir = fixtures.tiny_model_dir("qwen3_vl")
    shutil.copy(model_dir / "model.safetensors", tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(InputError, match="unknown model_type 'llava'"):
        merge_adapter(tmp_path, adapters["qwen3_vl"])
    with pytest.raises(InputError, match="unknown model_type 'llava'"):
        merge_adapter(tmp_path, None)
