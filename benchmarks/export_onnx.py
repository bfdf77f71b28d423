"""Export a full-size random-weight preset to an ONNX artifact and check it against HF on the GPU.

    python benchmarks/export_onnx.py --preset qwen3-vl-4b-instruct --precision fp16|int4|... \
        --tokenizers DIR [--work /tmp/ej] [--time-views 2 --time-frames 64]

One precision per call (the work folder keeps the base model, the artifacts and the HF reference
between calls; an artifact already there is reused, its export time then reported as null). Reports the export time, the decoder's bytes against its linear weights in fp16
(parameters x 2), and the RoboCasa candidate-label NLLs and 16 greedy tokens of the artifact, run
by the runtime's engine on ONNX Runtime's CUDA execution provider, against HF in fp32 on the GPU
(TF32 off) for a short clip. Random weights: a parity check of the graphs at full size, not an
accuracy figure.
With --time-views, also the latency of `Judge.check` (W1's shape: views x frames at 224x224).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgejudge.export.onnx import export_onnx
from edgejudge.export.presets import write_preset_model_dir
from edgejudge.export.verify import reference_scorer
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.engine import Engine
from edgejudge.runtime.video import read_video
from edgejudge.specs import get_spec

SPEC = get_spec("robocasa-completion")
TEXT = SPEC.user_text.format(instruction="Place the red block in the box.")
GREEDY_STEPS = 16


def clip_arrays(model, frames: int):
    pixels = np.random.default_rng(0).integers(0, 256, (frames, 224, 224, 3), dtype=np.uint8)
    clip = read_video(pixels, fps=4.0)
    return clip, runtime_model.build_inputs(model, [clip], TEXT)


def reference_nll(base: Path, work: Path, frames: int, dtype: torch.dtype = torch.float32) -> dict:
    """HF on the GPU (fp32: the reference; fp16: HF's own fp16 error, the floor an fp16 artifact
    is compared with): the label NLLs and GREEDY_STEPS greedy tokens, cached in the work folder
    (one reference for every precision)."""
    path = work / f"reference-{frames}-{str(dtype).split('.')[-1]}.json"
    if not path.is_file():
        reference = reference_scorer(base, None, device="cuda", dtype=dtype)
        model = runtime_model.load(base)
        arrays = clip_arrays(model, frames)[1]
        path.write_text(json.dumps({"nll": reference(model, arrays, SPEC.labels),
                                    "greedy": reference.greedy(model, arrays, GREEDY_STEPS)}))
        del reference
        gc.collect()
        torch.cuda.empty_cache()
    return json.loads(path.read_text())


def same_steps(tokens: list[int], reference: list[int]) -> int:
    """How many greedy steps agree before the first different token."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def decoder_linear_params(base: Path) -> int:
    config = json.loads((base / "config.json").read_text())
    tc = config.get("text_config", config)
    hidden, inter, heads, kv = tc["hidden_size"], tc["intermediate_size"], tc["num_attention_heads"], tc["num_key_value_heads"]
    head_dim = tc.get("head_dim") or hidden // heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * inter
    return per_layer * tc["num_hidden_layers"]


def time_check(artifact: Path, views: int, frames: int, runs: int) -> dict:
    from edgejudge.judge import Judge

    judge = Judge.load(artifact, spec=SPEC.name, device="cuda")
    rng = np.random.default_rng(1)
    view_frames = {name: rng.integers(0, 256, (frames, 224, 224, 3), dtype=np.uint8) for name in SPEC.views[:views]}
    latencies, stages = [], []
    for i in range(runs + 3):
        judge.engine.cache.entries.clear()  # every run encodes every group: the worst case, not a sliding window
        start = time.perf_counter()
        decision = judge.check("Place the red block in the box.", views=view_frames, fps=8.0)
        if i >= 3:
            latencies.append((time.perf_counter() - start) * 1e3)
            stages.append(decision.timings_ms)
    return {"views": views, "frames": frames, "runs": runs, "p50_ms": round(float(np.median(latencies)), 1),
            "p95_ms": round(float(np.percentile(latencies, 95)), 1),
            "stage_p50_ms": {k: round(float(np.median([s[k] for s in stages])), 1) for k in stages[0]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-vl-4b-instruct")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--tokenizers", required=True, help="folder holding <preset>/tokenizer.json")
    parser.add_argument("--work", default="/tmp/edgejudge-onnx")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--option", action="append", default=[], help="extra export option key=value")
    parser.add_argument("--time-views", type=int, default=0)
    parser.add_argument("--time-frames", type=int, default=64)
    parser.add_argument("--time-runs", type=int, default=20)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    work = Path(args.work) / args.preset
    base = work / "base"
    if not (base / "config.json").is_file():
        write_preset_model_dir(args.preset, base, tokenizer_dir=Path(args.tokenizers) / args.preset, device="cuda")
    options = {k: int(v) if v.isdigit() else v for k, v in (o.split("=", 1) for o in args.option)}
    name = "-".join([args.precision] + [f"{k}{v}" for k, v in options.items()])
    out, export_s = work / name, None
    if not (out / "edgejudge.json").is_file():  # an artifact exported by an earlier call is reused
        start = time.perf_counter()
        export_onnx(base, None, args.precision, out, block_size=args.block_size, device="cuda", **options)
        export_s = round(time.perf_counter() - start, 1)
    gc.collect()
    torch.cuda.empty_cache()
    reference = reference_nll(base, work, args.frames)
    hf_fp16_run = reference_nll(base, work, args.frames, torch.float16)
    hf_fp16 = hf_fp16_run["nll"]
    ref = reference["nll"]
    engine = Engine(out, device="cuda")
    clip, arrays = clip_arrays(engine.model, args.frames)
    scores = engine.score_labels([engine.prompt([clip], TEXT)], SPEC.labels)[0]
    ours = dict(zip(SPEC.labels, scores.tolist()))
    greedy = engine.generate(engine.prompt([clip], TEXT), GREEDY_STEPS)[0]
    decoder_bytes = (out / "decoder.onnx.data").stat().st_size
    report = {
        "preset": args.preset, "artifact": name, "frames": args.frames,
        "export_s": export_s, "decoder_data_gib": round(decoder_bytes / 2**30, 3),
        "decoder_vs_fp16_linears": round(decoder_bytes / (2 * decoder_linear_params(base)), 3),
        "artifact_gib": round(sum(p.stat().st_size for p in out.iterdir()) / 2**30, 2),
        "prompt_tokens": int(arrays["input_ids"].shape[1]),
        "onnx_cuda_nll": ours, "hf_fp32_nll": ref, "hf_fp16_nll": hf_fp16,
        "max_abs_nll_diff": max(abs(ours[k] - ref[k]) for k in SPEC.labels),
        "hf_fp16_max_abs_nll_diff": max(abs(hf_fp16[k] - ref[k]) for k in SPEC.labels),
        "same_decision": min(ours, key=ours.get) == min(ref, key=ref.get),
        "greedy_tokens": greedy, "hf_fp32_greedy_tokens": reference["greedy"],
        "greedy_same_steps": same_steps(greedy, reference["greedy"]),
        # HF's own fp16 run against its fp32 run: how far greedy stays equal on these weights at all
        "hf_fp16_greedy_same_steps": same_steps(hf_fp16_run["greedy"], reference["greedy"]),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    }
    import onnxruntime
    import transformers

    report.update(onnxruntime=onnxruntime.__version__, transformers=transformers.__version__,
                  providers=engine.decoder.session.get_providers()[:1])
    del engine
    if args.time_views:
        report["check"] = time_check(out, args.time_views, args.time_frames, args.time_runs)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
