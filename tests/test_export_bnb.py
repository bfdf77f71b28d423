"""bnb artifacts: merged + quantized, loadable with plain transformers + bitsandbytes, verified by
their manifest, and feeding the same inputs as the base checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from edgejudge.cli import main
from edgejudge.export.bnb import export_bnb
from edgejudge.export.fixtures import build_tiny_adapter, tiny_model_dir
from edgejudge.export.merge import merge_adapter
from edgejudge.manifest import verify_artifact
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.video import read_video

TEXT = "Instruction: Place the red block in the box.\nIs it complete?"


def _inputs(model_dir) -> dict:
    model = runtime_model.load(model_dir)
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 96, 3), dtype=np.uint8)
    return runtime_model.build_inputs(model, [read_video(frames, fps=2.0)], TEXT)


def _logits(model, arrays: dict) -> torch.Tensor:
    feed = {k: torch.from_numpy(arrays[k]) for k in ("input_ids", "attention_mask", "pixel_values_videos",
                                                       "video_grid_thw")}
    feed["mm_token_type_ids"] = (feed["input_ids"] == model.config.video_token_id).long() * 2
    with torch.no_grad():
        return model(**feed).logits[0].float()


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
@pytest.mark.parametrize("precision", ["nf4", "int8"])
def test_export_loads_and_stays_close(family, precision, tmp_path):
    base = tiny_model_dir(family)
    adapter = build_tiny_adapter(base, tmp_path / "lora")
    out = export_bnb(base, adapter, precision, tmp_path / "artifact")

    manifest = verify_artifact(out)
    assert (manifest.family, manifest.format, manifest.precision) == (family, "bnb", precision)
    assert {"bitsandbytes", "transformers", "peft", "torch"} <= set(manifest.versions)

    arrays = _inputs(out)
    reference = _inputs(base)
    for key in reference:  # the artifact's own files describe the same inputs
        np.testing.assert_array_equal(arrays[key], reference[key], err_msg=key)

    quantized = AutoModelForImageTextToText.from_pretrained(out, device_map="cpu")
    layer = quantized.model.language_model.layers[-1].mlp.down_proj
    assert type(layer).__name__ == {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[precision]
    assert isinstance(quantized.model.visual.merger.linear_fc2, torch.nn.Linear)
    assert type(quantized.model.visual.merger.linear_fc2).__name__ == "Linear"  # vision stays float
    if family == "qwen3_5":
        assert type(quantized.model.language_model.layers[0].linear_attn.in_proj_a).__name__ == "Linear"
        assert type(quantized.model.language_model.layers[0].linear_attn.in_proj_qkv).__name__ != "Linear"

    merged = merge_adapter(base, adapter)
    exact, approx = _logits(merged, arrays), _logits(quantized, arrays)
    error = (exact - approx).abs().max().item()
    print(f"{family} {precision}: max |logit error| vs merged fp32 = {error:.4f}")
    assert 0 < error < {"nf4": 1.0, "int8": 0.2}[precision]  # quantized, and not garbage
    # The decision-relevant quantity: next-token log-probs at the answer position.
    logp_exact, logp_approx = exact[-1].log_softmax(-1), approx[-1].log_softmax(-1)
    assert (logp_exact - logp_approx).abs().max().item() < {"nf4": 1.0, "int8": 0.2}[precision]


def test_cli_export_and_bad_input(tmp_path, capsys):
    base = tiny_model_dir("qwen3_vl")
    assert main(["export", "--base", str(base), "--format", "bnb", "--precision", "int8", "--out", str(tmp_path / "a"),
                 "--spec", "robocasa-completion"]) == 0
    assert verify_artifact(tmp_path / "a").judge_spec == "robocasa-completion"
    capsys.readouterr()
    assert main(["export", "--base", str(base), "--format", "bnb", "--precision", "int8", "--out", str(tmp_path / "a")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", "--base", str(tmp_path), "--format", "bnb", "--precision", "nf4", "--out", str(tmp_path / "b")]) == 2
    assert "config.json" in capsys.readouterr().err
    other = build_tiny_adapter(tiny_model_dir("qwen2_5_vl"), tmp_path / "other-lora")
    assert main(["export", "--base", str(base), "--adapter", str(other), "--format", "bnb", "--precision", "nf4",
                 "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgejudge: error: ")


def test_verify_a_bnb_artifact(tmp_path):
    from edgejudge.export.verify import verify
    from edgejudge.specs import get_spec

    base = tiny_model_dir("qwen3_vl")
    adapter = build_tiny_adapter(base, tmp_path / "lora")
    out = export_bnb(base, adapter, "int8", tmp_path / "artifact")
    model = runtime_model.load(out)
    frames = np.random.default_rng(3).integers(0, 256, (6, 64, 96, 3), dtype=np.uint8)
    spec = get_spec("robocasa-completion")
    [report] = verify(model, base, adapter, spec, [read_video(frames, fps=2.0)], spec.user_text.format(instruction="x"))
    print(f"bnb int8 label NLL |error| vs reference: {report['max_abs_nll_diff']:.2e}")
    assert 0 < report["max_abs_nll_diff"] < 0.05
    assert set(report["artifact"]) == set(spec.labels) and isinstance(report["agree"], bool)
