"""`edgejudge export --format onnx`: the artifact's candidate-label NLLs, computed torch-free
(build_inputs -> ONNX vision encoder -> ONNX decoder -> LM head), equal HF's with the UNMERGED
adapter, and the RoboCasa decision is the same. fp32, tiny Qwen3-VL, CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgejudge.cli import main
from edgejudge.export.fixtures import build_tiny_adapter, tiny_model_dir
from edgejudge.export.verify import OnnxScorer, reference_scorer
from edgejudge.manifest import verify_artifact
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.video import read_video
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


def _label_nll(artifact, frames, scorer) -> dict[str, float]:
    model = runtime_model.load(artifact)  # checks the manifest
    arrays = runtime_model.build_inputs(model, [read_video(frames, fps=2.0)], TEXT)
    return scorer(model, arrays, SPEC.labels)


def test_label_nll_matches_hf_with_unmerged_adapter(exported):
    base, adapter, artifact = exported
    manifest = verify_artifact(artifact)
    assert (manifest.format, manifest.precision, manifest.judge_spec) == ("onnx", "fp32", SPEC.name)
    assert {"vision.onnx", "decoder.onnx", "lm_head.onnx", "embed.npy", "config.json"} <= set(manifest.files)
    onnx_scorer, hf_scorer = OnnxScorer(artifact), reference_scorer(base, adapter)  # HF: adapter unmerged
    for seed in range(3):
        frames = np.random.default_rng(seed).integers(0, 256, (6, 64, 96, 3), dtype=np.uint8)
        ours, ref = _label_nll(artifact, frames, onnx_scorer), _label_nll(artifact, frames, hf_scorer)
        for label in SPEC.labels:
            assert abs(ours[label] - ref[label]) <= 1e-4, (seed, label, ours, ref)
        assert min(ours, key=ours.get) == min(ref, key=ref.get)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_decoder_reports_its_error(exported, precision, tmp_path):
    import onnx

    base, adapter, fp32 = exported
    out = tmp_path / precision
    assert main(["export", "--base", str(base), "--adapter", str(adapter), "--format", "onnx",
                 "--precision", precision, "--block-size", "32", "--out", str(out)]) == 0
    assert verify_artifact(out).precision == f"{precision}-b32-sym"
    ops = {n.op_type for n in onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops
    size = (out / "decoder.onnx.data").stat().st_size
    assert size < (fp32 / "decoder.onnx.data").stat().st_size * {"int8": 0.4, "int4": 0.3}[precision]
    errors = []
    for seed in range(3):
        frames = np.random.default_rng(seed).integers(0, 256, (6, 64, 96, 3), dtype=np.uint8)
        exact, approx = _label_nll(fp32, frames, OnnxScorer(fp32)), _label_nll(out, frames, OnnxScorer(out))
        errors += [abs(exact[label] - approx[label]) for label in SPEC.labels]
    print(f"{precision}: label NLL |error| vs fp32, max {max(errors):.2e}")
    assert 0 < max(errors) < {"int8": 0.01, "int4": 0.2}[precision]


def test_verify_command(exported, tmp_path, capsys):
    """The user's accuracy gate: per-video NLLs of artifact and reference, and the agreement."""
    base, adapter, artifact = exported
    videos = []
    for seed in range(2):
        path = tmp_path / f"clip{seed}.npy"
        np.save(path, np.random.default_rng(seed).integers(0, 256, (6, 64, 96, 3), dtype=np.uint8))
        videos += ["--video", str(path)]
    capsys.readouterr()
    assert main(["verify", str(artifact), "--reference", str(base), "--adapter", str(adapter), *videos,
                 "--fps", "2", "--sample", "none", "--instruction", "Place the red block in the box."]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and lines[-1]["videos"] == 2 and lines[-1]["decision_agreement"] == 1.0
    assert lines[-1]["max_abs_nll_diff"] <= 1e-4
    assert set(lines[0]["artifact"]) == set(SPEC.labels)
    # Without the adapter the reference is another judge: the gate must show it.
    assert main(["verify", str(artifact), "--reference", str(base), *videos, "--fps", "2", "--sample", "none",
                 "--instruction", "Place the red block in the box."]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["max_abs_nll_diff"] > 1e-3
    assert main(["verify", str(artifact), "--reference", str(base), *videos, "--fps", "2"]) == 2
    assert "needs --instruction" in capsys.readouterr().err


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
