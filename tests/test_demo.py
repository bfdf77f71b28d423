"""`edgejudge demo` end to end on a stand-in judge (the demo judge's sizes, random weights, a
random LoRA adapter): first run exports, a second run reuses the cache without torch, the printed
accuracy is the share of printed decisions that are right, and bad input is one line, exit 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from edgejudge import demo, synthclips  # noqa: E402
from edgejudge.cli import main  # noqa: E402
from edgejudge.export import fixtures, train_demo  # noqa: E402
from edgejudge.judge import Judge  # noqa: E402
from edgejudge.runtime.video import read_video  # noqa: E402
from edgejudge.specs import get_spec  # noqa: E402

CLIPS = 2
ROW = re.compile(r"(completion|plausibility) +(\S+) +truth (.+?) \((\w+)\) +judge (.+?) +(ok|WRONG|near) +"
                 r"(NLL not complete -?\d+\.\d+, complete -?\d+\.\d+|p\(1\.\.5\)( \d\.\d\d){5}, expected \d\.\d\d)"
                 r" +\d+ ms")
SHARE = r"(\d+)/(\d+) \((\d+\.\d)%\)"


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("standin")
    fixtures.build_tiny_model("qwen3_vl", folder / "base", sizes=train_demo.SIZES)
    fixtures.build_tiny_adapter(folder / "base", folder / "adapter", seed=1)
    return folder


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["demo", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_exports_once_judges_and_counts(standin, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, out, _ = run(capsys, "--judge", standin, "--cache", cache, "--clips", CLIPS)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("exporting the demo judge (first run only)") and lines[1].startswith("exported in")
    rows = [ROW.fullmatch(line) for line in lines if line.startswith(("completion  ", "plausibility  "))]
    assert len(rows) == 2 * CLIPS and all(rows), lines
    # truth and the printed id are the held-out split's clips, in order
    for task in ("completion", "plausibility"):
        ids = [m[2] for m in rows if m[1] == task]
        assert ids == [synthclips.make_clip(task, demo.HELDOUT_SEED, i)[1]["id"] for i in range(CLIPS)]
    # the summary is computed from the decisions above
    comp = [m for m in rows if m[1] == "completion"]
    plaus = [m for m in rows if m[1] == "plausibility"]
    for m in comp:
        assert (m[6] == "ok") == (m[5] == m[3])
    accuracy = re.search(f"completion accuracy: {SHARE}", out)
    assert accuracy and int(accuracy[1]) == sum(m[6] == "ok" for m in comp) and int(accuracy[2]) == CLIPS
    plausibility = re.search(f"plausibility accuracy: exact {SHARE}, within 1 {SHARE}", out)
    assert int(plausibility[1]) == sum(m[6] == "ok" for m in plaus)
    assert int(plausibility[4]) == sum(m[6] in ("ok", "near") for m in plaus)
    assert re.search(r"latency p50: \d+ ms a decision .*ONNX int4-b128-sym-rtn-fp32 on the CPU", out)

    # second run: the cache is reused (no export, files untouched), torch never imported
    (folder,) = cache.iterdir()
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    script = ("import sys; sys.modules['torch'] = None; from edgejudge.cli import main; "
              f"sys.exit(main(['demo', '--judge', {str(standin)!r}, '--cache', {str(cache)!r}, "
              f"'--clips', '{CLIPS}', '--json']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "exporting" not in done.stderr
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamps
    *records, summary = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["prediction"] if r["prediction"] is not None else f"unparseable {r['raw']!r}" for r in records] == \
        [m[5] for m in rows]
    assert summary["summary"]["completion"]["right"] == sum(r["correct"] for r in records if r["task"] == "completion")
    assert summary["summary"]["plausibility_within_1"]["right"] == \
        sum(r["within_1"] for r in records if r["task"] == "plausibility")

    # what the demo prints is the judge's own output on those clips
    comp_record, plaus_record = records[0], records[CLIPS]
    clips = tmp_path / "clips"
    heldout = {t: synthclips.generate(clips, t, 1, demo.HELDOUT_SEED)[0] for t in ("completion", "plausibility")}
    judge = Judge.load(summary["artifact"], "demo-completion")
    decision = judge.check(heldout["completion"]["instruction"],
                           views={"front": read_video(clips / heldout["completion"]["video"])})
    assert comp_record["scores"] == pytest.approx(decision.scores, abs=1e-6)
    answer = Judge(judge.engine, get_spec("demo-gravity")).ask(
        read_video(clips / heldout["plausibility"]["video"]), caption=heldout["plausibility"]["caption"])
    assert plaus_record["raw"] == answer.text and plaus_record["expected"] == pytest.approx(answer.expected, abs=1e-6)


def test_new_weights_get_their_own_export(standin, tmp_path):
    copy = shutil.copytree(standin, tmp_path / "copy")
    assert demo.weights_digest(copy) == demo.weights_digest(standin)  # where they live does not matter
    (copy / "adapter" / "adapter_config.json").write_text(
        (copy / "adapter" / "adapter_config.json").read_text().replace('"r": 8', '"r":  8'))
    assert demo.weights_digest(copy) != demo.weights_digest(standin)


def test_demo_split_and_sampling_are_the_training_ones():
    assert demo.HELDOUT_SEED == train_demo.SPLIT_SEEDS["heldout"]
    assert {get_spec(name).sample for name in demo.SPECS.values()} == {train_demo.SAMPLE}


def test_bad_input_is_one_line(standin, tmp_path, capsys, monkeypatch):
    for argv, message in (
        (["--clips", "0"], "--clips must be at least 1"),
        (["--judge", tmp_path / "nowhere"], "no demo judge weights here"),
    ):
        code, out, err = run(capsys, "--cache", tmp_path / "cache", *argv)
        assert code == 2 and out == "" and len(err.splitlines()) == 1 and message in err, err
    monkeypatch.setitem(sys.modules, "peft", None)  # the export extra is not installed
    code, out, err = run(capsys, "--judge", standin, "--cache", tmp_path / "empty")
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'edgejudge[export]'" in err, err
    assert not (tmp_path / "empty").exists()
