"""What every export format does last: copy the files that decide what the model sees, and write
the manifest that the runtime checks before it loads anything."""

from __future__ import annotations

import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from edgejudge.errors import InputError
from edgejudge.manifest import INPUT_FILES, Manifest, write_manifest
from edgejudge.runtime import model as runtime_model

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>")


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir}: output folder is not empty")


def library_versions(*names: str) -> dict[str, str]:
    found = {}
    for name in ("edgejudge", *names):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def finish_artifact(base_dir: Path, out_dir: Path, fmt: str, precision: str, judge_spec: str | None,
                    libraries: tuple[str, ...], copy_config: bool) -> Path:
    """Copy the checkpoint's input files (and config.json when the format did not write one),
    then record every file with its sha256 in edgejudge.json."""
    for name in INPUT_FILES + (("config.json",) if copy_config else ()):
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out_dir / name)
    inputs = runtime_model.load(out_dir, verify=False)
    write_manifest(out_dir, Manifest(
        family=inputs.family_name, format=fmt, precision=precision, preprocessing=inputs.vision.to_dict(),
        special_tokens={t: inputs.prompter.token_id(t) for t in SPECIAL_TOKENS},
        chat_template=inputs.prompter.template_source, judge_spec=judge_spec, versions=library_versions(*libraries),
    ))
    return out_dir
