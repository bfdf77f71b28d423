"""Export a full-size random-weight preset to an ONNX artifact and check it against HF.

    python benchmarks/export_onnx.py --precision fp32|int8|int4 --tokenizers DIR [--work /tmp/ej]

Reports the export time, the decoder's bytes against its linear weights in fp16 (parameters x 2),
and the RoboCasa candidate-label NLLs of the artifact (ONNX Runtime,
CPU execution provider) against HF in fp32 on the GPU (TF32 off) for a short clip, with random
weights: a parity check of the graphs at full size, not an accuracy figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgejudge.export.onnx import export_onnx
from edgejudge.export.presets import write_preset_model_dir
from edgejudge.export.verify import OnnxScorer, reference_scorer
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.video import read_video
from edgejudge.specs import get_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-vl-4b-instruct")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--tokenizers", required=True, help="folder holding <preset>/tokenizer.json")
    parser.add_argument("--work", default="/tmp/edgejudge-onnx")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    work = Path(args.work)
    base = write_preset_model_dir(args.preset, work / "base", tokenizer_dir=Path(args.tokenizers) / args.preset,
                                  device="cuda")
    start = time.perf_counter()
    out = export_onnx(base, None, args.precision, work / args.precision, block_size=args.block_size)
    export_s = time.perf_counter() - start
    decoder_bytes = (out / "decoder.onnx.data").stat().st_size
    model = runtime_model.load(out)
    reference = reference_scorer(base, None, device="cuda")
    layers = reference.model.model.language_model.layers
    # The decoder file holds the layers' linear weights (plus small norm weights): compare like with like.
    linear_params = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear))
    spec = get_spec("robocasa-completion")
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, 224, 224, 3), dtype=np.uint8)
    arrays = runtime_model.build_inputs(model, [read_video(frames, fps=4.0)],
                                        spec.user_text.format(instruction="Place the red block in the box."))
    start = time.perf_counter()
    ours = OnnxScorer(out)(model, arrays, spec.labels)
    onnx_s = time.perf_counter() - start
    ref = reference(model, arrays, spec.labels)
    print(json.dumps({
        "preset": args.preset, "precision": args.precision, "block_size": args.block_size, "export_s": round(export_s, 1),
        "decoder_data_gib": round(decoder_bytes / 2**30, 3),
        "decoder_linear_params_b": round(linear_params / 1e9, 3),
        "decoder_vs_fp16_linears": round(decoder_bytes / (2 * linear_params), 3),
        "artifact_gib": round(sum(p.stat().st_size for p in out.iterdir()) / 2**30, 2),
        "prompt_tokens": int(arrays["input_ids"].shape[1]), "onnx_cpu_scoring_s": round(onnx_s, 1),
        "onnx_nll": ours, "hf_fp32_nll": ref,
        "max_abs_nll_diff": max(abs(ours[k] - ref[k]) for k in spec.labels),
        "same_decision": min(ours, key=ours.get) == min(ref, key=ref.get),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
