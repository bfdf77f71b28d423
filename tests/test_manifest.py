"""An artifact's manifest records every file; a changed, missing or truncated file is refused."""

import json
import shutil

import pytest

from edgejudge.errors import InputError
from edgejudge.export.fixtures import tiny_model_dir
from edgejudge.manifest import MANIFEST_NAME, Manifest, read_manifest, verify_artifact, write_manifest
from edgejudge.runtime import model as runtime_model


@pytest.fixture()
def artifact(tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(tiny_model_dir("qwen3_vl"), folder)
    (folder / "weights").mkdir()
    (folder / "weights" / "decoder.onnx.data").write_bytes(bytes(range(256)) * 64)
    model = runtime_model.load(folder)
    special = {t: model.prompter.token_id(t) for t in ("<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    write_manifest(folder, Manifest(
        family=model.family_name, format="onnx", precision="fp32", preprocessing=model.vision.to_dict(),
        special_tokens=special, chat_template=model.prompter.template_source, versions={"edgejudge": "0.1.0"},
    ))
    return folder


def test_round_trip(artifact):
    manifest = verify_artifact(artifact)
    assert manifest.family == "qwen3_vl" and manifest.precision == "fp32"
    assert set(manifest.files) >= {"config.json", "tokenizer.json", "model.safetensors", "weights/decoder.onnx.data"}
    assert MANIFEST_NAME not in manifest.files
    assert manifest.files["weights/decoder.onnx.data"]["bytes"] == 256 * 64
    assert manifest.preprocessing["patch_size"] == 16


def test_one_changed_byte(artifact):
    path = artifact / "weights" / "decoder.onnx.data"
    data = bytearray(path.read_bytes())
    data[1000] ^= 1
    path.write_bytes(bytes(data))
    verify_artifact(artifact, hashes=False)  # same size: only the hash can tell
    with pytest.raises(InputError, match=r"decoder\.onnx\.data: sha256 does not match"):
        verify_artifact(artifact)


def test_missing_and_truncated(artifact):
    data = artifact / "weights" / "decoder.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InputError, match=r"decoder\.onnx\.data: 100 bytes, the manifest says 16384"):
        verify_artifact(artifact, hashes=False)
    (artifact / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="tokenizer.json is missing"):
        verify_artifact(artifact)


def test_load_refuses_a_tampered_artifact(artifact, capsys):
    from edgejudge.cli import main

    runtime_model.load(artifact)
    (artifact / "generation_config.json").write_text("{}")
    with pytest.raises(InputError, match="generation_config.json"):
        runtime_model.load(artifact)
    assert main(["inputs", str(artifact), "--video", "x.npy", "--text", "hi", "--print-prompt"]) == 2
    assert "generation_config.json" in capsys.readouterr().err


def test_not_an_artifact(tmp_path, artifact):
    with pytest.raises(InputError, match="not an edgejudge artifact"):
        read_manifest(tmp_path)
    path = artifact / MANIFEST_NAME
    path.write_text("{")
    with pytest.raises(InputError, match="not a valid manifest"):
        read_manifest(artifact)
    path.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(InputError, match="format_version 99"):
        read_manifest(artifact)
