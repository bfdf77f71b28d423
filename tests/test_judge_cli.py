"""`edgejudge judge`: one decision per call on an ONNX artifact (tiny Qwen3-VL, fp32, CPU), the
same numbers as the Python API, and bad input as one line with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgejudge import Judge, specs
from edgejudge.cli import main
from edgejudge.export.fixtures import tiny_model_dir
from edgejudge.export.onnx import export_onnx
from edgejudge.specs import JudgeSpec

INSTRUCTION = "Close the cabinet door."
SCORE_SPEC = JudgeSpec(
    name="test-score", families=("qwen3_vl",), sample="none", answer="json_score", fields=("caption", "axis"),
    user_text="Caption: {caption}\nRate the {axis} of the video from 1 to 5. Answer in JSON.",
    score_prefix='{{"{axis}": ', max_new_tokens=6,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("judge_cli")
    artifact = export_onnx(tiny_model_dir("qwen3_vl"), None, "fp32", tmp / "artifact", judge_spec="robocasa-completion")
    videos = {}
    for seed, name in enumerate(("right", "left")):
        videos[name] = np.random.default_rng(seed).integers(0, 256, (6, 64, 96, 3), dtype=np.uint8)
        np.save(tmp / f"{name}.npy", videos[name])
    return artifact, tmp, videos


def run(capsys, *argv) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = main(["judge", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_label_decision(setup, capsys):
    artifact, tmp, videos = setup
    common = ["--instruction", INSTRUCTION, "--sample", "none", "--fps", "2", "--json"]
    code, lines, _ = run(capsys, artifact, "--view", f"right={tmp / 'right.npy'}", "--view", f"left={tmp / 'left.npy'}",
                         *common)
    assert code == 0 and len(lines) == 1
    line = json.loads(lines[0])
    assert set(line) == {"prediction", "scores", "views", "timings_ms"} and set(line["views"]) == {"right", "left"}
    decision = Judge.load(artifact).check(INSTRUCTION, videos, fps=2.0, sample="none")
    assert line["prediction"] == decision.label
    assert line["scores"] == pytest.approx(decision.scores, abs=1e-9)
    # --video in the spec's view order is the same decision
    code, lines, _ = run(capsys, artifact, "--video", tmp / "right.npy", "--video", tmp / "left.npy", *common)
    assert code == 0 and json.loads(lines[0])["views"] == line["views"]  # same computation, same bits
    code, lines, _ = run(capsys, artifact, "--video", tmp / "right.npy", "--video", tmp / "left.npy", *common[:-1])
    assert code == 0 and lines[0].startswith(decision.label + "  (")


def test_print_prompt(setup, capsys):
    artifact = setup[0]
    code, lines, _ = run(capsys, artifact, "--instruction", INSTRUCTION, "--print-prompt")
    assert code == 0 and lines[:2] == ["<|im_start|>user", f"<|vision_start|><|video_pad|><|vision_end|>Instruction: {INSTRUCTION}"]
    assert lines[-2:] == ["Answer exactly one label: not complete or complete.<|im_end|>", "<|im_start|>assistant"]


def test_score_answer_per_axis(setup, capsys, monkeypatch):
    artifact, tmp, videos = setup
    monkeypatch.setitem(specs.SPECS, SCORE_SPEC.name, SCORE_SPEC)
    code, lines, _ = run(capsys, artifact, "--spec", SCORE_SPEC.name, "--video", tmp / "right.npy",
                         "--caption", "A door swings shut.", "--axis", "gravity", "--axis", "inertia", "--json")
    assert code == 0 and [json.loads(x)["key"] for x in lines] == ["gravity", "inertia"]
    answer = Judge.load(artifact, spec=SCORE_SPEC).ask(videos["right"], caption="A door swings shut.", axis="inertia")
    line = json.loads(lines[1])
    assert line["raw"] == answer.text and line["tokens"] == len(answer.token_ids)
    assert line["score"] == answer.parsed.score and line["ok"] == answer.parsed.ok
    assert line["expected"] == pytest.approx(answer.expected, abs=1e-9)
    assert [line["distribution"][str(d)] for d in range(1, 6)] == pytest.approx(
        [answer.distribution[d] for d in range(1, 6)], abs=1e-9)


def test_bad_input_is_one_line(setup, capsys, monkeypatch):
    artifact, tmp, _ = setup
    monkeypatch.setitem(specs.SPECS, SCORE_SPEC.name, SCORE_SPEC)
    right, left = tmp / "right.npy", tmp / "left.npy"
    cases = [
        ([artifact, "--video", right, "--instruction", INSTRUCTION], "takes 2 views (right, left): got 1 --video"),
        ([artifact, "--view", f"right={right}", "--view", f"top={left}", "--instruction", INSTRUCTION],
         "takes views right, left; got right, top"),
        ([artifact, "--view", f"right{right}", "--instruction", INSTRUCTION], "expected NAME=VIDEO"),
        ([artifact, "--video", right, "--view", f"left={left}", "--instruction", INSTRUCTION], "one of the two"),
        ([artifact, "--video", right, "--video", left], "needs a non-empty instruction"),
        ([artifact, "--video", right, "--video", left, "--instruction", " "], "needs a non-empty instruction"),
        ([artifact, "--video", right, "--video", left, "--instruction", INSTRUCTION, "--caption", "x"], "not --caption"),
        ([artifact, "--video", right, "--video", tmp / "missing.npy", "--instruction", INSTRUCTION], "no such file"),
        ([artifact, "--spec", "phyground", "--video", right, "--caption", "x", "--axis", "y"],
         "is a qwen3_vl model; spec phyground needs qwen3_5"),
        ([artifact, "--spec", "nope", "--video", right], "unknown judge spec 'nope'"),
        ([artifact, "--spec", SCORE_SPEC.name, "--video", right, "--video", left, "--caption", "x", "--axis", "y"],
         "judges one video per decision; got 2"),
        ([artifact, "--video", right, "--video", left, "--instruction", INSTRUCTION, "--device", "cuda:x"],
         "expected cpu, cuda or cuda:N"),
    ]
    for argv, message in cases:
        code, lines, err = run(capsys, *argv)
        assert code == 2 and lines == [], (argv, lines)
        assert err.startswith("edgejudge: error: ") and err.count("\n") == 1 and message in err, (argv, err)
