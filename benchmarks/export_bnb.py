"""Export a full-size random-weight preset to bnb nf4 / int8 on the GPU and check the artifact.

    python benchmarks/export_bnb.py --preset qwen3-vl-4b-instruct --tokenizers DIR --work /tmp/ej

For each precision: export time, artifact bytes against the bf16 checkpoint, the artifact loaded
back with plain transformers + bitsandbytes, one forward on a W1 view (64 frames 224x224, inputs
from edgejudge's own pipeline), its peak GPU memory, and the answer-position logit error against
the bf16 model on the same inputs (random weights: a size-of-error check, not an accuracy figure).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgejudge.export.bnb import export_bnb
from edgejudge.export.merge import load_base
from edgejudge.export.presets import write_preset_model_dir
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.video import read_video


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def w1_view(model_dir: Path) -> dict[str, torch.Tensor]:
    model = runtime_model.load(model_dir)
    frames = np.random.default_rng(0).integers(0, 256, (64, 224, 224, 3), dtype=np.uint8)
    arrays = runtime_model.build_inputs(model, [read_video(frames, fps=12.8)], "Instruction: Place the red block in the box.")
    feed = {k: torch.from_numpy(arrays[k]).cuda() for k in ("input_ids", "attention_mask", "pixel_values_videos",
                                                              "video_grid_thw")}
    feed["mm_token_type_ids"] = (feed["input_ids"] == model.video_token_id).long() * 2
    return feed


@torch.no_grad()
def last_logits(model, feed: dict) -> tuple[torch.Tensor, float, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    logits = model(**feed, logits_to_keep=1).logits[0, -1].float()
    torch.cuda.synchronize()
    return logits, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-vl-4b-instruct")
    parser.add_argument("--tokenizers", required=True, help="folder holding <preset>/tokenizer.json")
    parser.add_argument("--work", default="/tmp/edgejudge-export")
    args = parser.parse_args()
    work = Path(args.work)
    base = work / "base"
    start = time.perf_counter()
    write_preset_model_dir(args.preset, base, tokenizer_dir=Path(args.tokenizers) / args.preset, device="cuda")
    print(json.dumps({"base_written_s": round(time.perf_counter() - start, 1), "base_gib": round(folder_bytes(base) / 2**30, 2)}))
    feed = w1_view(base)
    reference = load_base(base, dtype=torch.bfloat16, device="cuda")
    last_logits(reference, feed)  # warm-up
    ref_logits, ref_s, ref_gib = last_logits(reference, feed)
    del reference
    torch.cuda.empty_cache()
    for precision in ("nf4", "int8"):
        out = work / precision
        start = time.perf_counter()
        export_bnb(base, None, precision, out, device="cuda")
        export_s = time.perf_counter() - start
        torch.cuda.empty_cache()
        from transformers import AutoModelForImageTextToText

        quantized = AutoModelForImageTextToText.from_pretrained(out, device_map="cuda")
        last_logits(quantized, feed)  # warm-up
        logits, forward_s, peak_gib = last_logits(quantized, feed)
        print(json.dumps({
            "preset": args.preset, "precision": precision, "export_s": round(export_s, 1),
            "artifact_gib": round(folder_bytes(out) / 2**30, 2),
            "artifact_vs_bf16": round(folder_bytes(out) / folder_bytes(base), 3),
            "w1_view_tokens": int(feed["input_ids"].shape[1]), "forward_s": round(forward_s, 3),
            "peak_gib": round(peak_gib, 2), "bf16_forward_s": round(ref_s, 3), "bf16_peak_gib": round(ref_gib, 2),
            "max_abs_logit_error_vs_bf16": round((logits - ref_logits).abs().max().item(), 4),
            "same_argmax_as_bf16": bool(logits.argmax() == ref_logits.argmax()),
        }), flush=True)
        del quantized
        torch.cuda.empty_cache()
    import bitsandbytes
    import transformers

    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__}))


if __name__ == "__main__":
    main()
