"""Where W1's vision stage goes: the parts of `Engine.encode_frames` timed one by one on the GPU.

    python benchmarks/vision_cuda.py ARTIFACT [--views 2 --frames 64 --runs 20]

Parts, p50 over the runs (after 3 warm-ups), for views x frames of 224x224 RGB:
- `keys`: the vision cache's sha256 of every 2-frame group;
- `patch_levels`: resize-free preprocessing into the uint8 patch rows the graph takes (it
  normalizes them on the device);
- `session`: the vision runs as the engine makes them (`run_into`: patches from the host, the
  outputs written into a store of rows on the device, nothing copied back);
and an ONNX Runtime profile of one session run: time per op type and the Memcpy nodes, against
the FLOP floor of the graph's linears (2 x parameters x patches, at the H100's dense fp16 peak).
On CUDA the profile's kernel times are the launches' host time, not device time (the graph's
device time is `session` less the copies; benchmarks/RESULTS.md, 2026-11-23, third session).
Torch-free.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.engine import Engine, VisionCache
from edgejudge.runtime.preprocess import preprocess_video_levels

H100_DENSE_FP16_TFLOPS = 989.0


def p50(samples: list[float]) -> float:
    return round(float(np.median(samples)), 2)


def profile_ops(vision_path: Path, feeds: dict, out_dir: Path, provider: str) -> dict:
    """One profiled run of the vision graph: milliseconds per op type (Memcpy included)."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(out_dir / "vision_profile")
    session = ort.InferenceSession(str(vision_path), options, providers=[provider])
    for _ in range(3):
        session.run(None, feeds)
    session.end_profiling()
    session = ort.InferenceSession(str(vision_path), options, providers=[provider])
    session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    providers: dict[str, str] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[args.get("op_name", "?")] += event["dur"] / 1e3
            providers[args.get("op_name", "?")] = args.get("provider", "?")
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:12]
    return {"ms_per_op_type": {op: round(ms, 2) for op, ms in top}, "total_kernel_ms": round(sum(per_op.values()), 2),
            "provider_per_op_type": {op: providers[op] for op, _ in top}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=".")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    args = parser.parse_args()
    engine = Engine(args.artifact, device=args.device)
    pp = engine.model.vision
    tp, patch = pp.temporal_patch_size, pp.patch_size
    size = (224, 224)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (args.frames, *size, 3), dtype=np.uint8) for _ in range(args.views)]
    groups = [f[i:i + tp] for f in frames for i in range(0, len(f), tp)]
    h, w = size[0] // patch, size[1] // patch
    vision = engine.vision
    tokens_per_group = h * w // vision.merge**2
    tables = [ort.OrtValue.ortvalue_from_shape_and_type(
        [len(groups) * tokens_per_group * vision.rows_per_token(k), vision.out_hidden], vision.output_type,
        *vision.device) for k in range(len(vision.outputs))]
    times: dict[str, list[float]] = defaultdict(list)
    for run in range(args.runs + 3):
        clock = {}
        start = time.perf_counter()
        [VisionCache.key(g, size) for g in groups]
        clock["keys"] = time.perf_counter()
        patches = np.empty((len(groups), h * w, pp.patch_dim), np.uint8)
        for row, g in zip(patches, groups):
            preprocess_video_levels(g, size, pp, out=row)
        clock["patch_levels"] = time.perf_counter()
        vision.run_into(patches, h, w, tables, 0)
        clock["session"] = time.perf_counter()
        if run >= 3:
            last = start
            for part, t in clock.items():
                times[part].append((t - last) * 1e3)
                last = t
            times["total"].append((last - start) * 1e3)
    config = runtime_model.read_config(Path(args.artifact))["vision_config"]
    hidden, inter, depth = config["hidden_size"], config["intermediate_size"], config["depth"]
    linear_params = depth * (4 * hidden * hidden + 2 * hidden * inter)
    tokens = len(groups) * h * w
    floor_ms = 2 * linear_params * tokens / (H100_DENSE_FP16_TFLOPS * 1e12) * 1e3
    report = {
        "artifact": args.artifact, "views": args.views, "frames": args.frames, "groups": len(groups),
        "patch_rows": tokens, "patch_bytes": int(patches.nbytes),
        "p50_ms": {part: p50(samples) for part, samples in times.items()},
        "linear_flop_floor_ms": round(floor_ms, 2),
        "profile": profile_ops(Path(args.artifact) / "vision.onnx",
                               {"patches": patches, **vision._grid_cache[(h, w)]},
                               Path(args.out),
                               "CUDAExecutionProvider" if args.device.startswith("cuda") else "CPUExecutionProvider"),
        "onnxruntime": ort.__version__,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
