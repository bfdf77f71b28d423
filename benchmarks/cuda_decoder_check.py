"""The CUDA decoder (`decoder_cuda.onnx`, the rotary inside GroupQueryAttention) against the portable
one (`decoder.onnx`) on the same GPU: one W1 decision and a greedy continuation with each.

    python benchmarks/cuda_decoder_check.py ARTIFACT [--tokens 12]

W1's shape (2 views x 64 random 224x224 frames, both views in one batch): prints one JSON line with
each decoder's label scores per view, their largest difference, both decisions, and both greedy
token lists after a one-view prompt (the prefill keeping its cache, then cached steps).
Torch-free.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from edgejudge import Judge
from edgejudge.runtime import decoder as decoder_module

INSTRUCTION = "Pick the mug from the counter and place it in the sink."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--tokens", type=int, default=12)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    views = {name: rng.integers(0, 256, (64, 224, 224, 3), dtype=np.uint8) for name in ("right", "left")}
    results = {}
    for graph in (decoder_module.CUDA_DECODER_NAME, decoder_module.DECODER_NAME):
        decoder_module.CUDA_DECODER_NAME = graph  # the graph TextDecoder opens on CUDA
        judge = Judge.load(args.artifact, spec="robocasa-completion", device="cuda")
        decision = [judge.check(INSTRUCTION, views, fps=20.0, sample="none") for _ in range(3)][-1]
        engine = judge.engine
        tokens, _ = engine.generate(engine.prompt([judge._clip(views["left"], 20.0, "none")], "Describe the video."),
                                    args.tokens)
        results[graph] = {"scores": {f"{view}/{label}": score for view, per in decision.views.items()
                                     for label, score in per.items()},
                          "decision": decision.label, "greedy": tokens}
        del judge, engine
    cuda, portable = results.values()
    print(json.dumps({**{name: result for name, result in results.items()},
                      "max_abs_score_diff": max(abs(cuda["scores"][k] - portable["scores"][k]) for k in cuda["scores"]),
                      "same_decision": cuda["decision"] == portable["decision"],
                      "same_greedy": cuda["greedy"] == portable["greedy"]}))


if __name__ == "__main__":
    main()
