"""`edgejudge demo`: the shipped demo judge on held-out clips, on the CPU, from a fresh install.

The demo judge (`edgejudge/demo_judge`: a small Qwen3-VL trained by `export/train_demo.py`, a
base plus a LoRA adapter) ships as HF weights, the form a user's own judge comes in, so the demo
takes the path a user's judge takes: on the first run it merges the adapter and exports ONNX
artifacts (`ARTIFACTS`) into a cache folder named after the weights' sha256 (new weights, new
export). Then it generates held-out clips (`edgejudge.synthclips`, a split the judge never trained
on), judges them with the torch-free runtime and prints every decision, the accuracy per task and
the latency. Later runs need neither torch nor the export.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgejudge import synthclips
from edgejudge.errors import InputError
from edgejudge.judge import Judge
from edgejudge.manifest import MANIFEST_NAME, read_manifest
from edgejudge.runtime.video import read_video
from edgejudge.specs import get_spec

DEMO_JUDGE = Path(__file__).resolve().parent / "demo_judge"
HELDOUT_SEED = 1000  # export/train_demo.py SPLIT_SEEDS["heldout"] (a test checks they agree)
SPECS = {"completion": "demo-completion", "plausibility": "demo-gravity"}
# The artifacts the first run exports (name: export_onnx options); `--precision` picks one.
# int4 is the CPU artifact: fp32 activations, as the export recommends for CPU-only targets.
ARTIFACTS: dict[str, dict] = {
    "fp16": {"precision": "fp16"},
    "int4": {"precision": "int4", "activations": "fp32"},
}
EXPORT_MODULES = ("torch", "transformers", "peft", "onnx")


def weights_digest(judge_dir: Path) -> str:
    """sha256 over every file of base/ and adapter/ (names and bytes): the cache key."""
    digest = hashlib.sha256()
    for sub in ("base", "adapter"):
        folder = judge_dir / sub
        if not (folder / "config.json" if sub == "base" else folder / "adapter_config.json").is_file():
            raise InputError(f"{folder}: no demo judge weights here (expected an HF model folder base/ "
                             "and a PEFT adapter folder adapter/, as export/train_demo.py writes them)")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(judge_dir)).encode() + b"\0")
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def default_cache() -> Path:
    return Path(os.environ.get("EDGEJUDGE_CACHE") or Path.home() / ".cache" / "edgejudge") / "demo"


def _exporter() -> Callable[..., Path]:
    for name in EXPORT_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            raise InputError(f"the first run of edgejudge demo exports the shipped judge and needs {name}: "
                             "pip install 'edgejudge[export]'") from None
    import warnings

    from transformers.utils import logging as hf_logging

    from edgejudge.export.onnx import export_onnx

    hf_logging.disable_progress_bar()  # the export's own bar counts its steps
    warnings.simplefilter("ignore")  # the exporters' deprecation chatter; errors still raise
    return export_onnx


def ensure_artifacts(judge_dir: Path, cache: Path, log: Callable[[str], None]) -> dict[str, Path]:
    """The judge's artifacts in `cache`/<sha256 prefix>/<name>, exported if not there yet. Each is
    written to a temporary folder and renamed into place, so an interrupted export is never used."""
    folder = cache / weights_digest(judge_dir)[:16]
    artifacts = {name: folder / name for name in ARTIFACTS}
    missing = [name for name, path in artifacts.items() if not (path / MANIFEST_NAME).is_file()]
    if not missing:
        return artifacts
    export_onnx = _exporter()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{cache}: cannot create the demo cache ({e.strerror})") from None
    log(f"exporting the demo judge (first run only): merge + ONNX {', '.join(missing)} into {folder}")
    start = time.perf_counter()
    for name in missing:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder))
        try:
            export_onnx(judge_dir / "base", judge_dir / "adapter", out_dir=tmp, judge_spec=SPECS["completion"],
                        **ARTIFACTS[name])
            if not (artifacts[name] / MANIFEST_NAME).is_file():
                shutil.rmtree(artifacts[name], ignore_errors=True)  # a folder no export finished
            try:
                tmp.rename(artifacts[name])
            except OSError:  # another run has just exported the same weights: keep its copy
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"exported in {time.perf_counter() - start:.1f} s")
    return artifacts


def judge_clips(completion: Judge, clips_dir: Path, records: dict[str, list[dict]]) -> list[dict]:
    """One row per clip: the truth, the judge's answer, whether it is right, and the judge's
    latency (frames in memory: preprocessing, vision, prefill, scoring or decoding).
    `completion` is the demo-completion judge; the gravity questions go to its engine too."""
    gravity = Judge(completion.engine, get_spec(SPECS["plausibility"]))
    rows = []
    for record in records["completion"]:
        decision = completion.check(record["instruction"], views={"front": read_video(clips_dir / record["video"])})
        rows.append({"task": "completion", "id": record["id"], "kind": record["kind"], "truth": record["label"],
                     "prediction": decision.label, "correct": decision.label == record["label"],
                     "scores": decision.scores, "ms": decision.timings_ms["total"]})
    for record in records["plausibility"]:
        answer = gravity.ask(read_video(clips_dir / record["video"]), caption=record["caption"])
        score = answer.parsed.score if answer.parsed.ok else None
        rows.append({"task": "plausibility", "id": record["id"], "kind": record["kind"], "truth": record["score"],
                     "prediction": score, "correct": score == record["score"],
                     "within_1": score is not None and abs(score - record["score"]) <= 1,
                     "distribution": answer.distribution, "expected": answer.expected,
                     "raw": answer.text, "ms": answer.timings_ms["total"]})
    return rows


def summarize(rows: list[dict]) -> dict:
    """Accuracy per task and latency, from the rows' decisions."""
    comp = [r for r in rows if r["task"] == "completion"]
    plaus = [r for r in rows if r["task"] == "plausibility"]

    def share(hits: list[bool]) -> dict:
        return {"right": int(sum(hits)), "of": len(hits), "accuracy": float(np.mean(hits))}

    def p50(task_rows: list[dict]) -> float:
        return float(np.median([r["ms"] for r in task_rows]))

    return {
        "completion": share([r["correct"] for r in comp]),
        "plausibility_exact": share([r["correct"] for r in plaus]),
        "plausibility_within_1": share([r["within_1"] for r in plaus]),
        "latency_p50_ms": {"all": p50(rows), "completion": p50(comp), "plausibility": p50(plaus)},
    }


def format_row(row: dict) -> str:
    truth, said, mark = f"{row['truth']} ({row['kind']})", row["prediction"], "ok" if row["correct"] else "WRONG"
    if row["task"] == "completion":
        detail = "NLL " + ", ".join(f"{label} {nll:.3f}" for label, nll in row["scores"].items())
    else:
        if said is None:
            said = f"unparseable {row['raw']!r}"
        elif row["within_1"] and not row["correct"]:
            mark = "near"
        detail = f"p(1..5) {' '.join(f'{p:.2f}' for p in row['distribution'].values())}, expected {row['expected']:.2f}"
    return (f"{row['task']:<12}  {row['id']:<22} truth {truth:<28} judge {str(said):<13} {mark:<5}  {detail}  "
            f"{row['ms']:.0f} ms")


def format_summary(summary: dict, artifact: str) -> list[str]:
    def pct(share: dict) -> str:
        return f"{share['right']}/{share['of']} ({100 * share['accuracy']:.1f}%)"

    latency = summary["latency_p50_ms"]
    return [
        f"completion accuracy: {pct(summary['completion'])}",
        f"plausibility accuracy: exact {pct(summary['plausibility_exact'])}, "
        f"within 1 {pct(summary['plausibility_within_1'])}",
        f"latency p50: {latency['all']:.0f} ms a decision (completion {latency['completion']:.0f} ms, "
        f"plausibility {latency['plausibility']:.0f} ms), ONNX {artifact} on the CPU",
    ]


def run_demo(clips: int, cache: Path | None, precision: str, as_json: bool, judge_dir: Path = DEMO_JUDGE) -> int:
    if clips < 1:
        raise InputError(f"--clips must be at least 1, got {clips}")
    if precision not in ARTIFACTS:
        raise InputError(f"--precision must be one of {', '.join(ARTIFACTS)}, not {precision}")
    start = time.perf_counter()

    def log(line: str) -> None:
        print(line, file=sys.stderr if as_json else sys.stdout, flush=True)

    artifact = ensure_artifacts(Path(judge_dir), Path(cache) if cache else default_cache(), log)[precision]
    with tempfile.TemporaryDirectory(prefix="edgejudge-demo-") as tmp:
        records = {task: synthclips.generate(tmp, task, clips, HELDOUT_SEED) for task in SPECS}
        log(f"judging {clips} held-out clips per task with {artifact}")
        rows = judge_clips(Judge.load(artifact, SPECS["completion"]), Path(tmp), records)
    summary = summarize(rows)
    for row in rows:
        print(json.dumps(row) if as_json else format_row(row))
    if as_json:
        print(json.dumps({"summary": summary, "precision": precision, "artifact": str(artifact),
                          "seconds": time.perf_counter() - start}))
    else:
        for line in format_summary(summary, read_manifest(artifact).precision):
            print(line)
        print(f"total {time.perf_counter() - start:.1f} s")
    return 0
