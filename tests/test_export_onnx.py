"""`edgejudge export --format onnx`: the artifact's candidate-label NLLs, computed torch-free
(build_inputs -> ONNX vision encoder -> ONNX decoder -> LM head), equal HF's with the UNMERGED
adapter, the RoboCasa decision is the same, and so are 16 greedy tokens; the engine's batched
scoring on the artifact (KV cache in place, repeated by cache_rows.onnx) equals the per-label
forwards. Tiny Qwen3-VL and
Qwen2.5-VL, fp32 and fp16, CPU; int8 / int4 (and their mixed-precision options) report their error
against fp32."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgejudge.cli import main
from edgejudge.export.fixtures import build_tiny_adapter, tiny_model_dir
from edgejudge.export.verify import OnnxScorer, reference_scorer
from edgejudge.manifest import verify_artifact
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.engine import Engine
from edgejudge.runtime.video import read_video
from edgejudge.specs import get_spec

SPEC = get_spec("robocasa-completion")
TEXT = SPEC.user_text.format(instruction="Place the red block in the box.")
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
BATCHED_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-3}  # engine (cached, batched) vs per-label forwards
GREEDY_STEPS = 16


def _export(base, adapter, out, precision: str, *options: str) -> None:
    assert main(["export", "--base", str(base), "--adapter", str(adapter), "--format", "onnx",
                 "--precision", precision, "--out", str(out), "--spec", SPEC.name, *options]) == 0


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"onnx-{request.param}")
    base = tiny_model_dir(request.param)
    adapter = build_tiny_adapter(base, tmp / "lora")
    for precision in TOLERANCE:
        _export(base, adapter, tmp / precision, precision)
    return base, adapter, tmp


def _label_nll(artifact, frames, scorer) -> dict[str, float]:
    model = runtime_model.load(artifact)  # checks the manifest
    arrays = runtime_model.build_inputs(model, [read_video(frames, fps=2.0)], TEXT)
    return scorer(model, arrays, SPEC.labels)


def _clips(n: int = 3):
    return [np.random.default_rng(seed).integers(0, 256, (6, 64, 96, 3), dtype=np.uint8) for seed in range(n)]


@pytest.mark.parametrize("precision", list(TOLERANCE))
def test_label_nll_matches_hf_with_unmerged_adapter(exported, precision):
    base, adapter, tmp = exported
    artifact = tmp / precision
    manifest = verify_artifact(artifact)
    assert (manifest.format, manifest.precision, manifest.judge_spec) == ("onnx", precision, SPEC.name)
    assert {"vision.onnx", "decoder.onnx", "lm_head.onnx", "cache_rows.onnx", "splice.onnx", "embed.npy",
            "config.json"} <= set(manifest.files)
    embeds = onnx.load(str(artifact / "decoder.onnx"), load_external_data=False).graph.input[0]
    assert embeds.type.tensor_type.elem_type == {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16}[precision]
    onnx_scorer = OnnxScorer(artifact, manifest.family)
    hf_scorer = reference_scorer(base, adapter)  # HF in fp32, the adapter unmerged
    errors = []
    for frames in _clips():
        ours, ref = _label_nll(artifact, frames, onnx_scorer), _label_nll(artifact, frames, hf_scorer)
        errors += [abs(ours[label] - ref[label]) for label in SPEC.labels]
        assert min(ours, key=ours.get) == min(ref, key=ref.get)
    print(f"{manifest.family} {precision}: label NLL |ONNX - HF| max {max(errors):.2e}")
    assert max(errors) <= TOLERANCE[precision]
    engine = Engine(artifact)
    clip = read_video(_clips(1)[0], fps=2.0)
    batched = engine.score_labels([engine.prompt([clip], TEXT)], SPEC.labels)[0]
    own = _label_nll(artifact, _clips(1)[0], onnx_scorer)
    diff = max(abs(batched[i] - own[label]) for i, label in enumerate(SPEC.labels))
    print(f"{manifest.family} {precision}: engine batched vs per-label forwards max |dNLL| {diff:.2e}")
    assert diff <= BATCHED_TOLERANCE[precision]
    # 16 greedy tokens: the engine on the artifact, HF `generate` with the adapter unmerged.
    tokens = engine.generate(engine.prompt([clip], TEXT), GREEDY_STEPS)[0]
    reference = hf_scorer.greedy(engine.model, runtime_model.build_inputs(engine.model, [clip], TEXT), GREEDY_STEPS)
    assert len(tokens) == GREEDY_STEPS and tokens == reference


QUANTIZED = {  # options -> (bit widths expected in the decoder, max label-NLL error vs fp32 allowed)
    ("int8",): ({8}, 0.02),
    ("int4",): ({4}, 0.2),
    ("int4", "--activations", "fp32", "--asymmetric"): ({4}, 0.2),
    ("int4", "--algorithm", "k_quant"): ({4}, 0.2),
    ("int4", "--int8-last-layers", "1", "--lm-head-bits", "8"): ({4, 8}, 0.2),
    ("int4", "--lm-head-bits", "8", "--vision-bits", "8"): ({4}, 0.2),  # the bench's int4 artifact
}


# The option matrix runs on Qwen3-VL; Qwen2.5-VL checks the default int4.
CASES = [("qwen3_vl", options) for options in QUANTIZED] + [("qwen2_5_vl", ("int4",))]


@pytest.mark.parametrize(("exported", "options"), CASES, indirect=["exported"],
                         ids=[f"{family}-{'-'.join(options)}" for family, options in CASES])
def test_quantized_decoder_reports_its_error(exported, options, tmp_path):
    base, adapter, tmp = exported
    out = tmp_path / "q"
    _export(base, adapter, out, *options, "--block-size", "32")
    precision = verify_artifact(out).precision
    decoder = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    ops = {n.op_type for n in decoder.graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops
    bits = {a.i for n in decoder.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    expected_bits, allowed = QUANTIZED[options]
    assert bits == expected_bits, precision
    head_ops = {n.op_type for n in onnx.load(str(out / "lm_head.onnx"), load_external_data=False).graph.node}
    assert ("MatMulNBits" in head_ops) == ("--lm-head-bits" in options)
    vision = onnx.load(str(out / "vision.onnx"), load_external_data=False)
    vision_bits = {a.i for n in vision.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert vision_bits == ({8} if "--vision-bits" in options else set())
    assert ("MatMul" in {n.op_type for n in vision.graph.node}) == ("--vision-bits" not in options)
    float_type = "fp32" if "fp32" in options else "fp16"
    size = (out / "decoder.onnx.data").stat().st_size
    reference = (tmp / float_type / "decoder.onnx.data").stat().st_size
    errors = []
    for frames in _clips():
        exact = _label_nll(tmp / "fp32", frames, OnnxScorer(tmp / "fp32", verify_artifact(out).family))
        approx = _label_nll(out, frames, OnnxScorer(out, verify_artifact(out).family))
        errors += [abs(exact[label] - approx[label]) for label in SPEC.labels]
    print(f"{precision}: decoder {size / reference:.2f} of {float_type}; label NLL |error| vs fp32 max {max(errors):.2e}")
    assert precision.startswith(f"{options[0]}-b32-") and f"-{float_type}" in precision
    assert size < reference * (0.6 if bits == {8} else 0.5)
    assert 0 < max(errors) < allowed


@pytest.mark.parametrize("exported", ["qwen3_vl"], indirect=True)  # robocasa-completion is a Qwen3-VL judge
def test_verify_command(exported, tmp_path, capsys):
    """The user's accuracy gate: per-video NLLs of artifact and reference, and the agreement."""
    base, adapter, tmp = exported
    artifact = tmp / "fp32"
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
    assert main(["export", "--base", str(tiny_model_dir("qwen3_5")), "--format", "onnx", "--precision", "fp32",
                 "--out", str(tmp_path / "a")]) == 2
    assert "ONNX export supports qwen3_vl, qwen2_5_vl so far, not qwen3_5" in capsys.readouterr().err
    assert main(["export", "--base", str(tiny_model_dir("qwen3_vl")), "--format", "onnx", "--precision", "fp16",
                 "--lm-head-bits", "8", "--out", str(tmp_path / "b")]) == 2
    assert "apply to int8/int4, not fp16" in capsys.readouterr().err
    assert main(["export", "--base", str(tiny_model_dir("qwen3_vl")), "--format", "onnx", "--precision", "fp16",
                 "--vision-bits", "8", "--out", str(tmp_path / "b")]) == 2
    assert "apply to int8/int4, not fp16" in capsys.readouterr().err
    assert main(["export", "--base", str(tiny_model_dir("qwen3_vl")), "--format", "bnb", "--precision", "fp16",
                 "--out", str(tmp_path / "c")]) == 2
    assert "expected one of nf4, int8" in capsys.readouterr().err
