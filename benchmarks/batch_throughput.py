"""Decisions per second of `edgejudge run`'s judging path for W1-sized jobs, batched vs one at a time.

    python benchmarks/batch_throughput.py ARTIFACT [--jobs 32] [--batch 1 --batch 8] [--device cuda]

Each job is a RoboCasa decision over 2 views x 64 frames of 224x224 (.npy files, read per job as
the run does). The judge is loaded once (`batch.judge_decider`, what `edgejudge run` builds), then
the same jobs are judged in batches of each size after one warm-up batch; the time covers reading
the videos, preprocessing, vision, prefill and scoring, not the judge's load or the results file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from edgejudge.batch import batches_of, judge_decider, read_jobs
from edgejudge.specs import get_spec

SPEC = get_spec("robocasa-completion")


def write_jobs(folder: Path, count: int, frames: int) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        videos = []
        for view in SPEC.views:
            path = folder / f"job{i}-{view}.npy"
            np.save(path, rng.integers(0, 256, (frames, 224, 224, 3), dtype=np.uint8))
            videos.append(str(path))
        lines.append(json.dumps({"id": f"job{i}", "video": videos, "instruction": "Place the red block in the box."}))
    jobs = folder / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = read_jobs(write_jobs(Path(tmp), args.jobs, args.frames), SPEC)
        decide = judge_decider(args.artifact, SPEC.name, f"uniform:{args.frames}", 8.0, None, args.device)
        vision_cache = decide.args[0].engine.cache  # the judge inside run's decider
        report = {"artifact": str(args.artifact), "jobs": args.jobs, "views": len(SPEC.views), "frames": args.frames}
        for size in args.batch or [1, 8]:
            decide(jobs[:size])  # warm-up at this batch shape
            vision_cache.entries.clear()  # no job is seen twice: nothing to reuse
            start = time.perf_counter()
            rows = [row for batch in batches_of(jobs, size) for row in decide(batch)]
            seconds = time.perf_counter() - start
            failed = [r for r in rows if isinstance(r, BaseException) or not r.get("prediction")]
            report[f"batch_{size}"] = {"seconds": round(seconds, 2), "decisions_per_s": round(len(rows) / seconds, 2),
                                       "failed": len(failed)}
        print(json.dumps(report))


if __name__ == "__main__":
    main()
