"""Time building full-size random-weight models from the presets on a GPU (no hub, no files).

    python -m benchmarks.presets [--save qwen3-vl-4b-instruct]

For each preset: build on the device with the model's own seeded init, count parameters, run one
text-only forward to check the weights are finite; optionally time saving one to safetensors.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import transformers

from edgejudge.export.presets import PRESETS, random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", help="also time save_pretrained of this preset")
    args = parser.parse_args()
    torch.randn(1024, 1024, device="cuda").normal_()  # CUDA context and RNG kernels, before timing
    rows = []
    for name in PRESETS:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model = random_model(name, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        build_s = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            logits = model(input_ids=torch.arange(16, device="cuda")[None]).logits
        row = {"preset": name, "params_b": round(params / 1e9, 2), "build_s": round(build_s, 2),
               "finite_logits": bool(torch.isfinite(logits).all()),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
        if name == args.save:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                model.save_pretrained(tmp)
                row["save_s"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, logits
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
