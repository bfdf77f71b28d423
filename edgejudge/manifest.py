"""The artifact manifest, `edgejudge.json`: what an exported folder holds and how to check it.

An artifact is self-contained: the exporter copies the checkpoint's config, tokenizer, chat
template and processor configs beside the weights, and records here the family, the precision,
the preprocessing constants, the special token ids, the exporting libraries' versions and the
sha256 and size of every file. The runtime refuses a folder whose files do not match, naming the
file, so a truncated copy or a swapped weight file never runs silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgejudge.errors import InputError

MANIFEST_NAME = "edgejudge.json"
# A checkpoint's files besides config.json and weights that decide what the model sees; an
# artifact carries them verbatim.
INPUT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)
FORMAT_VERSION = 1
_CHUNK = 1 << 22


@dataclass
class Manifest:
    family: str
    format: str  # onnx | bnb
    precision: str  # fp32 | fp16 | int8 | int4 | nf4
    preprocessing: dict  # VisionPreprocessing.to_dict() of the checkpoint
    special_tokens: dict[str, int]  # token string -> id, for the tokens the runtime relies on
    chat_template: str
    files: dict[str, dict] = field(default_factory=dict)  # relative path -> {"sha256", "bytes"}
    versions: dict[str, str] = field(default_factory=dict)  # exporting libraries
    judge_spec: str | None = None
    format_version: int = FORMAT_VERSION


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(artifact_dir: Path, manifest: Manifest) -> Path:
    """Record every file under `artifact_dir` (but the manifest) and write edgejudge.json."""
    artifact_dir = Path(artifact_dir)
    manifest.files = {
        path.relative_to(artifact_dir).as_posix(): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(artifact_dir.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }
    out = artifact_dir / MANIFEST_NAME
    out.write_text(json.dumps(asdict(manifest), indent=1, ensure_ascii=False) + "\n")
    return out


def read_manifest(artifact_dir: Path) -> Manifest:
    path = Path(artifact_dir) / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{artifact_dir}: no {MANIFEST_NAME} (not an edgejudge artifact; export one with `edgejudge export`)")
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{path}: format_version {data.get('format_version')!r}, this edgejudge reads {FORMAT_VERSION}")
        return Manifest(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise InputError(f"{path}: not a valid manifest ({e})") from None


def verify_artifact(artifact_dir: Path, hashes: bool = True) -> Manifest:
    """Check every file the manifest lists: present, same size, and (with `hashes`) same sha256.

    Sizes catch truncated copies at once; hashes catch any changed byte, at about a second per
    GB, once per load.
    """
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    for name, expected in manifest.files.items():
        path = artifact_dir / name
        if not path.is_file():
            raise InputError(f"{artifact_dir}: {name} is missing (listed in {MANIFEST_NAME})")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise InputError(f"{path}: {size} bytes, the manifest says {expected['bytes']} (truncated or replaced?)")
    if hashes:
        for name, expected in manifest.files.items():
            if sha256_file(artifact_dir / name) != expected["sha256"]:
                raise InputError(f"{artifact_dir / name}: sha256 does not match the manifest (the file was changed)")
    return manifest
