"""Tiny reference models and full-size presets load and run in transformers, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("torchvision")  # the Qwen video processors need it

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from edgejudge.errors import InputError  # noqa: E402
from edgejudge.export import fixtures, presets  # noqa: E402

PROMPT = "Place the red block in the box. Is the task complete? Answer complete or not complete."


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(model dir, adapter dir) per family, built once for the module."""
    out = {}
    for family in fixtures.FAMILIES:
        root = tmp_path_factory.mktemp(family)
        model_dir = fixtures.build_tiny_model(family, root / "model")
        out[family] = (model_dir, fixtures.build_tiny_adapter(model_dir, root / "adapter"))
    return out


def video_inputs(processor, frames: np.ndarray, prompt: str = PROMPT) -> dict:
    """Chat-template-rendered prompt + video through the processor, as the judges are called."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs = {}
    if "Qwen3VL" in type(processor.video_processor).__name__:  # frames are pre-sampled: say so
        metadata = {"fps": 2.0, "total_num_frames": len(frames), "frames_indices": list(range(len(frames)))}
        kwargs = {"do_sample_frames": False, "video_metadata": [metadata]}
    return processor(text=[text], videos=[frames], return_tensors="pt", **kwargs)


def random_video(seed: int, frames: int = 4, height: int = 64, width: int = 160) -> np.ndarray:
    # 160 px wide: more than one Qwen2.5-VL attention window (112 px) across.
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_tokenizer_and_config_ids(built, family):
    model_dir, _ = built[family]
    config = json.loads((model_dir / "config.json").read_text())
    text_config = config.get("text_config", config)
    tok = AutoProcessor.from_pretrained(model_dir).tokenizer
    real = json.loads((presets.preset_dir(fixtures.FAMILY_PRESET[family]) / "tokenizer_config.json").read_text())
    real_added = sorted((int(i), t["content"], t["special"]) for i, t in real["added_tokens_decoder"].items())
    tiny = json.loads((model_dir / "tokenizer.json").read_text())["added_tokens"]
    # Same added tokens, same order and special flags, packed right after the BPE vocab.
    assert [(t["content"], t["special"]) for t in tiny] == [(c, s) for _, c, s in real_added]
    assert [t["id"] for t in tiny] == list(range(tiny[0]["id"], tiny[0]["id"] + len(tiny)))
    assert len(tok) <= text_config["vocab_size"] < len(tok) + fixtures.VOCAB_MULTIPLE

    for key, token in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]:
        assert tok.encode(token, add_special_tokens=False) == [config[key]]
        assert tok.decode([config[key]]) == token
    assert tok.convert_tokens_to_ids(tok.eos_token) == tok.convert_tokens_to_ids("<|im_end|>")
    for t in tiny:
        assert tok.encode(t["content"], add_special_tokens=False) == [t["id"]]
    ids = tok.encode(PROMPT, add_special_tokens=False)
    assert tok.decode(ids) == PROMPT and len(ids) < len(PROMPT) / 3  # trained merges, not bytes


@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_forward_and_adapter(built, family):
    model_dir, adapter_dir = built[family]
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    assert model.dtype == torch.float32
    inputs = video_inputs(processor, random_video(0))
    other = video_inputs(processor, random_video(1))
    video_id = model.config.video_token_id
    assert (inputs["input_ids"] == video_id).sum() == inputs["video_grid_thw"].prod() // 4

    with torch.no_grad():
        logits = model(**inputs).logits
        assert logits.shape[-1] == model.config.get_text_config().vocab_size
        assert torch.isfinite(logits).all()
        assert not torch.allclose(logits, model(**other).logits, atol=1e-4)  # the video matters
        lora = PeftModel.from_pretrained(model, adapter_dir).eval()
        lora_logits = lora(**inputs).logits
    assert torch.isfinite(lora_logits).all()
    assert (lora_logits - logits).abs().max() > 1e-3

    targets = {name.rsplit(".lora_A", 1)[0] for name, _ in lora.named_parameters() if ".lora_A." in name}
    assert not any(".visual.blocks." in t for t in targets)
    suffixes = {t.rsplit(".", 1)[-1] for t in targets}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= suffixes
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == fixtures.LORA_RANK[family]
    assert adapter_config["base_model_name_or_path"] == str(model_dir)
    if family == "qwen3_5":
        assert {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"} <= suffixes
        assert any(".visual.merger." in t for t in targets)


def test_structure_kept(built):
    """The tiny configs keep what decides positions and what the vision tower sees."""
    loaded = {f: AutoModelForImageTextToText.from_pretrained(built[f][0]).config for f in fixtures.FAMILIES}
    q25 = loaded["qwen2_5_vl"]
    assert (q25.vision_config.window_size, q25.vision_config.tokens_per_second) == (112, 2)
    assert q25.vision_config.fullatt_block_indexes == [1, 3]
    assert q25.vision_config.patch_size == 14 and q25.vision_config.temporal_patch_size == 2
    assert loaded["qwen3_vl"].vision_config.deepstack_visual_indexes == [0, 1, 2]
    q35 = loaded["qwen3_5"].text_config
    assert q35.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert q35.rope_parameters["partial_rotary_factor"] == 0.25
    for family in ("qwen3_vl", "qwen3_5"):
        assert loaded[family].get_text_config().rope_parameters["mrope_interleaved"] is True
    for family in fixtures.FAMILIES:
        src = presets.preset_dir(fixtures.FAMILY_PRESET[family])
        for name in ("preprocessor_config.json", "video_preprocessor_config.json",
                     "chat_template.json", "chat_template.jinja"):
            if (src / name).is_file():
                assert (built[family][0] / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_deterministic(built, family, tmp_path):
    model_dir, adapter_dir = built[family]
    again = fixtures.build_tiny_model(family, tmp_path / "model")
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name
    adapter = fixtures.build_tiny_adapter(model_dir, tmp_path / "adapter")
    name = "adapter_model.safetensors"
    assert (adapter / name).read_bytes() == (adapter_dir / name).read_bytes()


def test_rslora_adapter(built, tmp_path):
    model_dir, adapter_dir = built["qwen3_5"]
    rs = fixtures.build_tiny_adapter(model_dir, tmp_path, use_rslora=True)
    assert json.loads((rs / "adapter_config.json").read_text())["use_rslora"] is True
    # Same seeded A/B as the plain adapter: only the scale (alpha/sqrt(r) vs alpha/r) differs.
    assert (rs / "adapter_model.safetensors").read_bytes() == (adapter_dir / "adapter_model.safetensors").read_bytes()


def test_tiny_model_dir_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEJUDGE_CACHE", str(tmp_path))
    first = fixtures.tiny_model_dir("qwen3_vl")
    assert first == tmp_path / "tiny" / f"qwen3_vl-v{fixtures.FIXTURE_VERSION}"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert fixtures.tiny_model_dir("qwen3_vl") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [first.name]  # no temp dirs left


def test_presets_full_size_on_meta():
    """True shapes: the packaged configs build the real parameter counts (no memory used)."""
    expected = {"qwen3-vl-4b-instruct": 4.44e9, "qwen2.5-vl-7b-instruct": 8.29e9, "qwen3.5-9b": 9.41e9}
    for name, n_params in expected.items():
        model = presets.random_model(name, device="meta")
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(n_params, rel=0.01)
        assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_preset_model_dir_cpu(name, tmp_path):
    """A shrunk preset (the tiny sizes, but the real vocab and tokenizer) saves, loads and runs."""
    try:
        presets.find_tokenizer_json(name)
    except InputError as e:
        pytest.skip(str(e))
    family = presets.PRESETS[name].family
    out = presets.write_preset_model_dir(
        name, tmp_path, device="cpu", dtype=torch.float32, overrides=fixtures.TINY_OVERRIDES[family]
    )
    config = json.loads((out / "config.json").read_text())
    real = json.loads((presets.preset_dir(name) / "config.json").read_text())
    assert config["video_token_id"] == real["video_token_id"]  # real ids, real tokenizer
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(model).__name__ == real["architectures"][0]
    with torch.no_grad():
        logits = model(**video_inputs(processor, random_video(0, width=64))).logits
    assert logits.shape[-1] == model.config.get_text_config().vocab_size
    assert torch.isfinite(logits).all()


def test_missing_tokenizer_names_paths(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path)):
        presets.find_tokenizer_json("qwen3.5-9b", tokenizer_dir=tmp_path)
    with pytest.raises(InputError, match="unknown preset"):
        presets.preset_dir("qwen9")
