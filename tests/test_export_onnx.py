"""`edgejudge export --format onnx`: the artifact's candidate-label NLLs, computed torch-free
(build_inputs -> ONNX vision encoder -> ONNX decoder -> LM head), equal HF's with the UNMERGED
adapter, and the RoboCasa decision is the same. fp32, tiny Qwen3-VL, CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel

from edgejudge.cli import main
from edgejudge.export.fixtures import build_tiny_adapter, tiny_model_dir
from edgejudge.export.merge import load_base
from edgejudge.manifest import verify_artifact
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.decoder import TextDecoder, decode_position_ids
from edgejudge.runtime.video import read_video
from edgejudge.runtime.vision import VisionEncoder
from edgejudge.specs import get_spec

SPEC = get_spec("robocasa-completion")
TEXT = SPEC.user_text.format(instruction="Place the red block in the box.")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    base = tiny_model_dir("qwen3_vl")
    adapter = build_tiny_adapter(base, tmp / "lora")
    out = tmp / "artifact"
    assert main(["export", "--base", str(base), "--adapter", str(adapter), "--format", "onnx",
                 "--precision", "fp32", "--out", str(out), "--spec", SPEC.name]) == 0
    return base, adapter, out


def _label_nll_onnx(artifact, frames) -> dict[str, float]:
    """Each label scored by its own forward over prompt + label (mean NLL per label token)."""
    model = runtime_model.load(artifact)  # checks the manifest
    arrays = runtime_model.build_inputs(model, [read_video(frames, fps=2.0)], TEXT)
    vision, decoder = VisionEncoder(artifact / "vision.onnx"), TextDecoder(artifact)
    features, taps = vision.encode(arrays["pixel_values_videos"], arrays["video_grid_thw"])
    prompt_len = arrays["input_ids"].shape[1]
    scores = {}
    for label in SPEC.labels:
        label_ids = model.prompter.encode(label)[None]
        ids = np.concatenate([arrays["input_ids"], label_ids], axis=1)
        positions = np.concatenate(
            [arrays["position_ids"], decode_position_ids(prompt_len, label_ids.shape[1], arrays["rope_deltas"])], axis=2)
        embeds, deepstack = decoder.multimodal_embeds(ids, model.video_token_id, features, taps)
        hidden = decoder.prefill(embeds, *decoder.cos_sin(positions), deepstack)
        logits = decoder.logits(hidden[:, prompt_len - 1 : -1])[0].astype(np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        scores[label] = float(-logp[np.arange(label_ids.shape[1]), label_ids[0]].mean())
    return scores


def _label_nll_hf(base, adapter, artifact, frames) -> dict[str, float]:
    model = PeftModel.from_pretrained(load_base(base), adapter).eval()  # unmerged
    inputs = runtime_model.load(artifact)
    arrays = runtime_model.build_inputs(inputs, [read_video(frames, fps=2.0)], TEXT)
    prompt_len = arrays["input_ids"].shape[1]
    scores = {}
    for label in SPEC.labels:
        label_ids = torch.from_numpy(inputs.prompter.encode(label))[None]
        ids = torch.cat([torch.from_numpy(arrays["input_ids"]), label_ids], dim=1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values_videos=torch.from_numpy(arrays["pixel_values_videos"]),
                           video_grid_thw=torch.from_numpy(arrays["video_grid_thw"]),
                           mm_token_type_ids=(ids == inputs.video_token_id).long() * 2).logits[0]
        logp = logits[prompt_len - 1 : -1].double().log_softmax(-1)
        scores[label] = float(-logp[torch.arange(label_ids.shape[1]), label_ids[0]].mean())
    return scores


def test_label_nll_matches_hf_with_unmerged_adapter(exported):
    base, adapter, artifact = exported
    manifest = verify_artifact(artifact)
    assert (manifest.format, manifest.precision, manifest.judge_spec) == ("onnx", "fp32", SPEC.name)
    assert {"vision.onnx", "decoder.onnx", "lm_head.onnx", "embed.npy", "config.json"} <= set(manifest.files)
    for seed in range(3):
        frames = np.random.default_rng(seed).integers(0, 256, (6, 64, 96, 3), dtype=np.uint8)
        ours, ref = _label_nll_onnx(artifact, frames), _label_nll_hf(base, adapter, artifact, frames)
        for label in SPEC.labels:
            assert abs(ours[label] - ref[label]) <= 1e-4, (seed, label, ours, ref)
        assert min(ours, key=ours.get) == min(ref, key=ref.get)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_decoder_reports_its_error(exported, precision, tmp_path):
    import onnx

    base, adapter, fp32 = exported
    out = tmp_path / precision
    assert main(["export", "--base", str(base), "--adapter", str(adapter), "--format", "onnx",
                 "--precision", precision, "--out", str(out)]) == 0
    assert verify_artifact(out).precision == f"{precision}-b32-sym"
    ops = {n.op_type for n in onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops
    size = (out / "decoder.onnx.data").stat().st_size
    assert size < (fp32 / "decoder.onnx.data").stat().st_size * {"int8": 0.4, "int4": 0.3}[precision]
    errors = []
    for seed in range(3):
        frames = np.random.default_rng(seed).integers(0, 256, (6, 64, 96, 3), dtype=np.uint8)
        exact, approx = _label_nll_onnx(fp32, frames), _label_nll_onnx(out, frames)
        errors += [abs(exact[label] - approx[label]) for label in SPEC.labels]
    print(f"{precision}: label NLL |error| vs fp32, max {max(errors):.2e}")
    assert 0 < max(errors) < {"int8": 0.01, "int4": 0.2}[precision]


def test_onnx_export_refusals(tmp_path, capsys):
    assert main(["export", "--base", str(tiny_model_dir("qwen2_5_vl")), "--format", "onnx", "--precision", "fp32",
                 "--out", str(tmp_path / "a")]) == 2
    assert "ONNX export supports qwen3_vl so far" in capsys.readouterr().err
    assert main(["export", "--base", str(tiny_model_dir("qwen3_vl")), "--format", "onnx", "--precision", "fp16",
                 "--out", str(tmp_path / "b")]) == 2
    assert "precision fp32, int8, int4 so far" in capsys.readouterr().err
    assert main(["export", "--base", str(tiny_model_dir("qwen3_vl")), "--format", "bnb", "--precision", "fp16",
                 "--out", str(tmp_path / "c")]) == 2
    assert "expected one of nf4, int8" in capsys.readouterr().err
