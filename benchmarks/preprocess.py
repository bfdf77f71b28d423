"""Time the torch-free input pipeline on one CPU core: frames in memory -> model arrays.

    python -m benchmarks.preprocess [--repeats 50]

Each workload starts from decoded uint8 frames (the robot stream) and ends with the arrays the
model sees; stages: resize + normalize + patchify ("pixels", HF's float32 values), resize +
patch shuffle into a reused buffer ("levels", the uint8 rows the engine gives the ONNX vision
graph, which normalizes them) and the whole build_inputs call (template, placeholder expansion,
tokenization, position ids). The floor printed beside them is the memory traffic of writing the
float32 patches once, at the machine's copy bandwidth.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, before numpy loads its BLAS

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.preprocess import preprocess_video, preprocess_video_levels
from edgejudge.runtime.video import read_video

PRESETS = Path(__file__).resolve().parents[1] / "edgejudge" / "presets"
TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "models"

# name, preset, frames, height, width, frames kept, what it stands for
WORKLOADS = [
    ("W1 one view", "qwen3-vl-4b-instruct", 64, 224, 224, "none", "RoboCasa: 64 frames 224x224"),
    ("W2 clip", "qwen3.5-9b", 10, 360, 640, "none", "PhyGround: 5 s at fps 2, 360x640"),
    ("W3 clip", "qwen2.5-vl-7b-instruct", 80, 360, 640, "none", "Cosmos: 5 s at fps 16, 360x640"),
]


def model_dir(preset: str, tmp: Path) -> Path:
    """A preset folder with its tokenizer, which is too big to ship in the package."""
    out = tmp / preset
    shutil.copytree(PRESETS / preset, out)
    shutil.copy(TOKENIZERS / preset / "tokenizer.json", out / "tokenizer.json")
    return out


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3, float(np.percentile(times, 95)) * 1e3


def hf_processor_call(model_dir: Path, clip, text: str):
    """The baseline: the same clip and text through transformers' own processor (one thread),
    or None when transformers/torchvision are not installed."""
    try:
        import torch
        from transformers import AutoProcessor
        from transformers.video_utils import VideoMetadata
    except ImportError:
        return None
    torch.set_num_threads(1)
    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    metadata = VideoMetadata(total_num_frames=clip.total_frames, fps=clip.fps, frames_indices=clip.indices.tolist())
    video = torch.from_numpy(clip.frames).permute(0, 3, 1, 2)
    kwargs = {"video_metadata": [metadata], "do_sample_frames": False, "return_tensors": "pt"}
    if "cap_pixels_per_frame" in getattr(processor.video_processor, "valid_kwargs", object).__annotations__:
        kwargs["cap_pixels_per_frame"] = False
    return lambda: processor(text=[prompt], videos=[video], **kwargs)


def copy_bandwidth() -> float:
    """Bytes per second of a large float32 copy on this core (read + write counted)."""
    src = np.ones(64 << 20 >> 2, np.float32)
    dst = np.empty_like(src)
    ms, _ = timed(lambda: np.copyto(dst, src), 10)
    return 2 * src.nbytes / (ms / 1e3)


def ratio(row: dict) -> str:
    hf = row["hf_processor_ms_p50"]
    return f"{hf / row['build_inputs_ms_p50']:.1f}x" if hf else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, preset, t, h, w, policy, what in WORKLOADS:
            model = runtime_model.load(model_dir(preset, Path(tmp)))
            frames = np.random.default_rng(0).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
            clip = runtime_model.sample_clip(model, read_video(frames, fps=float(t) / 5), policy)
            size = model.family.target_size(t, h, w, model.vision, model.hf)
            pixels_ms, pixels_p95 = timed(lambda: preprocess_video(clip.frames, size, model.vision), args.repeats)
            arrays = runtime_model.build_inputs(model, [clip], "Is the instruction complete?")
            baseline = hf_processor_call(model.path, clip, "Is the instruction complete?")
            hf_ms = timed(baseline, max(5, args.repeats // 5))[0] if baseline else None
            reused = np.empty_like(arrays["pixel_values_videos"])
            reuse_ms, reuse_p95 = timed(lambda: preprocess_video(clip.frames, size, model.vision, reused), args.repeats)
            levels = np.empty(reused.shape, np.uint8)
            levels_ms, levels_p95 = timed(lambda: preprocess_video_levels(clip.frames, size, model.vision, levels),
                                          args.repeats)
            total_ms, total_p95 = timed(
                lambda: runtime_model.build_inputs(model, [clip], "Is the instruction complete?"), args.repeats
            )
            patches = arrays["pixel_values_videos"]
            floor_ms = patches.nbytes / bandwidth * 1e3
            rows.append({
                "workload": name, "what": what, "resized_to": list(size), "tokens": int(arrays["input_ids"].shape[1]),
                "patch_bytes": int(patches.nbytes), "pixels_ms_p50": round(pixels_ms, 2), "pixels_ms_p95": round(pixels_p95, 2),
                "pixels_reused_out_ms_p50": round(reuse_ms, 2), "pixels_reused_out_ms_p95": round(reuse_p95, 2),
                "levels_reused_out_ms_p50": round(levels_ms, 2), "levels_reused_out_ms_p95": round(levels_p95, 2),
                "build_inputs_ms_p50": round(total_ms, 2), "build_inputs_ms_p95": round(total_p95, 2),
                "floor_ms": round(floor_ms, 2), "hf_processor_ms_p50": hf_ms and round(hf_ms, 1),
            })
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cores": 1,
                      "copy_GBps": round(bandwidth / 1e9, 1), "numpy": np.__version__, "rows": rows}, indent=1))
    print("\n| workload | input | resized to | tokens | pixels p50 / p95 ms | pixels into a reused buffer p50 / p95 ms "
          "| levels into a reused buffer p50 / p95 ms | build_inputs p50 / p95 ms | HF processor p50 ms "
          "| HF / build_inputs | floor ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['what']} | {r['resized_to'][0]}x{r['resized_to'][1]} | {r['tokens']} | "
              f"{r['pixels_ms_p50']} / {r['pixels_ms_p95']} | {r['pixels_reused_out_ms_p50']} / {r['pixels_reused_out_ms_p95']} | "
              f"{r['levels_reused_out_ms_p50']} / {r['levels_reused_out_ms_p95']} | "
              f"{r['build_inputs_ms_p50']} / {r['build_inputs_ms_p95']} | {r['hf_processor_ms_p50'] or 'n/a'} | "
              f"{ratio(r)} | {r['floor_ms']} |")


if __name__ == "__main__":
    main()
