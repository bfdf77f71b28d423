"""The `inputs` and `fixtures` verbs: what they write, and one clear line + exit 2 for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from edgejudge.cli import main
from edgejudge.export.fixtures import tiny_model_dir
from hf_reference import hf_inputs

TEXT = "Instruction: Place the red block in the box."


@pytest.fixture(scope="module")
def qwen3_vl() -> str:
    return str(tiny_model_dir("qwen3_vl"))


@pytest.fixture()
def clip_npy(tmp_path) -> str:
    frames = np.random.default_rng(0).integers(0, 256, (6, 64, 96, 3), dtype=np.uint8)
    path = tmp_path / "clip.npy"
    np.save(path, frames)
    return str(path)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_dump_matches_hf(qwen3_vl, clip_npy, tmp_path):
    out = tmp_path / "inputs.npz"
    assert main(["inputs", qwen3_vl, "--video", clip_npy, "--fps", "3", "--sample", "none",
                 "--text", TEXT, "--hf", "5.17", "--dump", str(out)]) == 0
    ours = np.load(out)
    frames = np.load(clip_npy)
    ref = hf_inputs(qwen3_vl, [{"frames": frames, "indices": list(range(6)), "fps": 3.0, "total_frames": 6}], TEXT)
    assert set(ours.files) >= {"input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "position_ids"}
    for key in ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "position_ids", "rope_deltas"):
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    assert ours["position_ids"].shape == (3, 1, ours["input_ids"].shape[1])


def test_print_prompt_is_the_template_render(qwen3_vl, clip_npy, capsys):
    assert main(["inputs", qwen3_vl, "--video", clip_npy, "--fps", "3", "--text", TEXT,
                 "--system", "Be strict.", "--print-prompt"]) == 0
    printed = capsys.readouterr().out
    frames = np.load(clip_npy)
    ref = hf_inputs(qwen3_vl, [{"frames": frames, "indices": list(range(6)), "fps": 3.0, "total_frames": 6}],
                    TEXT, "Be strict.")
    assert printed == str(ref["prompt"])
    assert printed.endswith("<|im_start|>assistant\n")


def test_video_file_input(qwen3_vl, tmp_path, capsys):
    from edgejudge.export.fixtures import write_demo_clip

    clip = write_demo_clip(tmp_path / "clip.mp4", num_frames=12)
    assert main(["inputs", qwen3_vl, "--video", str(clip), "--sample", "uniform:4", "--text", TEXT,
                 "--dump", str(tmp_path / "x.npz")]) == 0
    assert np.load(tmp_path / "x.npz")["video_grid_thw"].tolist() == [[2, 14, 14]]


def _bad_inputs(tmp_path, model: str, clip_npy: str) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, a fragment the one-line error must contain)."""
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00not a video" * 100)
    (tmp_path / "empty.mp4").write_bytes(b"")
    np.save(tmp_path / "float.npy", np.zeros((4, 32, 32, 3), np.float32))
    np.save(tmp_path / "gray.npy", np.zeros((4, 32, 32), np.uint8))
    np.save(tmp_path / "wide.npy", np.zeros((2, 1, 300, 3), np.uint8))
    short_ctx = tmp_path / "short-context"
    shutil.copytree(model, short_ctx)
    config = json.loads((short_ctx / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 64
    (short_ctx / "config.json").write_text(json.dumps(config))
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    common = ["--text", TEXT, "--dump", str(tmp_path / "o.npz")]
    return {
        "missing video": (["inputs", model, "--video", str(tmp_path / "nope.mp4"), *common], "nope.mp4"),
        "directory as video": (["inputs", model, "--video", str(tmp_path), *common], str(tmp_path)),
        "corrupt video": (["inputs", model, "--video", str(tmp_path / "corrupt.mp4"), *common], "corrupt.mp4"),
        "empty video": (["inputs", model, "--video", str(tmp_path / "empty.mp4"), *common], "empty.mp4"),
        "float frames": (["inputs", model, "--video", str(tmp_path / "float.npy"), "--fps", "2", *common], "uint8"),
        "gray frames": (["inputs", model, "--video", str(tmp_path / "gray.npy"), "--fps", "2", *common], "gray.npy"),
        "aspect ratio": (["inputs", model, "--video", str(tmp_path / "wide.npy"), "--fps", "2", "--sample", "none",
                          "--hf", "5.17", *common], "aspect ratio"),
        "too long": (["inputs", str(short_ctx), "--video", clip_npy, "--fps", "2", *common], "context"),
        "missing model": (["inputs", str(tmp_path / "no-model"), "--video", clip_npy, *common], "no-model"),
        "not a model": (["inputs", str(not_model), "--video", clip_npy, *common], "config.json"),
        "bad sample": (["inputs", model, "--video", clip_npy, "--fps", "2", "--sample", "every:3", *common], "every:3"),
        "no fps for fps sampling": (["inputs", model, "--video", clip_npy, *common], "--fps"),
        "bad hf release": (["inputs", model, "--video", clip_npy, "--hf", "latest", *common], "latest"),
    }


def test_bad_input_is_one_line_and_exit_2(qwen3_vl, clip_npy, tmp_path, capsys):
    for name, (argv, fragment) in _bad_inputs(tmp_path, qwen3_vl, clip_npy).items():
        assert main(argv) == 2, name
        line = _error_line(capsys)
        assert line.startswith("edgejudge: error: "), (name, line)
        assert fragment in line, (name, line)


def test_cli_process_exit_code(qwen3_vl, tmp_path):
    """The installed entry point itself: exit 2, one line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "edgejudge.cli", "inputs", qwen3_vl, "--video", str(tmp_path / "missing.mp4"),
         "--text", TEXT, "--dump", str(tmp_path / "o.npz")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing.mp4" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fixtures_verb(tmp_path, capsys):
    assert main(["fixtures", "--out", str(tmp_path), "--family", "qwen3_vl"]) == 0
    capsys.readouterr()
    assert (tmp_path / "qwen3_vl" / "model.safetensors").is_file()
    assert (tmp_path / "qwen3_vl-lora" / "adapter_config.json").is_file()
    cap = cv2.VideoCapture(str(tmp_path / "clip.mp4"))
    assert cap.read()[0]
    cap.release()
    assert main(["fixtures", "--out", str(tmp_path), "--family", "llama"]) == 2
    assert "llama" in _error_line(capsys)
