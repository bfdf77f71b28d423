"""Time the text decoder with its device-resident KV cache, and check the cached steps, on a GPU.

    python benchmarks/decoder_cuda.py ARTIFACT [--device cuda] [--batch 2] [--tokens 1873] [--labels 3]
                                      [--decode 16] [--runs 10]

The judge's scoring shape on random text tokens: prefill a batch x tokens prompt (room for one
more token), LM head on each row's last position (read on the device), `repeat_cache(labels)`,
one batched step for all rows and its logits; then greedy decoding of one row. Prints one JSON line
with p50 milliseconds per stage, what copying the prefill's hidden states to the host would cost
(the host path avoided), whether the steps wrote in place (same buffer address), and the max abs
logit difference of the batched step against a full uncached forward of prompt + token.
Torch-free: only the runtime (numpy + onnxruntime-gpu).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort

from edgejudge.runtime.decoder import TextDecoder, decode_position_ids
from edgejudge.runtime.sessions import execution_providers


def p50_ms(run, runs: int) -> float:
    run()  # warm-up: arena growth, kernel selection
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return round(float(np.median(times)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1873)
    parser.add_argument("--labels", type=int, default=3)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    decoder = TextDecoder(args.artifact, execution_providers(args.device))
    b, s, labels = args.batch, args.tokens, args.labels
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, min(decoder.vocab_size, 100_000), (b, s))
    nexts = rng.integers(0, min(decoder.vocab_size, 100_000), (b * labels, 1))
    zero = np.zeros((1, 1), np.int64)
    embeds = decoder.embed(prompt)
    cos, sin = decoder.cos_sin(decode_position_ids(0, s, zero, b))
    step_embeds = decoder.embed(nexts)
    step_cos, step_sin = decoder.cos_sin(decode_position_ids(s, 1, zero, b * labels))

    def prefill():
        return decoder.prefill(embeds, cos, sin, capacity=s + 1, on_device=True)

    def scoring():
        decoder.repeat_cache(labels)
        step = decoder.step(step_embeds, step_cos, step_sin, on_device=True)
        return decoder.logits(step)

    hidden = prefill()
    timings = {
        "prefill": p50_ms(prefill, args.runs),
        "last_logits": p50_ms(lambda: decoder.logits(hidden, slice(-1, None)), args.runs),
        "hidden_to_host": p50_ms(hidden.numpy, args.runs),
    }
    snapshot = decoder.snapshot()

    def repeat_and_step():
        decoder.restore(snapshot)
        return scoring()

    timings["repeat_step_logits"] = p50_ms(repeat_and_step, args.runs)
    decoder.restore(snapshot)
    timings["repeat_cache"] = p50_ms(lambda: (decoder.restore(snapshot), decoder.repeat_cache(labels)), args.runs)
    decoder.restore(snapshot)
    decoder.repeat_cache(labels)
    buffer = decoder.past[0][0].data_ptr()
    cached = decoder.logits(decoder.step(step_embeds, step_cos, step_sin, on_device=True))[:, 0]
    in_place = decoder.past[0][0].data_ptr() == buffer

    # the same rows uncached: prompt + token in one forward, logits at the token
    full = np.concatenate([np.repeat(prompt, labels, axis=0), nexts], axis=1)
    full_cos, full_sin = decoder.cos_sin(decode_position_ids(0, s + 1, zero, b * labels))
    uncached = decoder.logits(decoder.prefill(decoder.embed(full), full_cos, full_sin, on_device=True),
                              slice(-1, None))[:, 0]

    # greedy decoding of one row, the cache sized for it
    one_embeds, one_cos, one_sin = embeds[:1], cos[:1], sin[:1]

    def decode():
        hidden = decoder.prefill(one_embeds, one_cos, one_sin, capacity=s + args.decode - 1, on_device=True)
        first = decoder.logits(hidden, slice(-1, None))[0, -1]
        start = time.perf_counter()
        tokens = decoder.greedy(first, s, zero, args.decode)
        return tokens, (time.perf_counter() - start) * 1e3 / max(len(tokens) - 1, 1)

    decode()
    per_token = float(np.median([decode()[1] for _ in range(max(args.runs // 2, 1))]))
    print(json.dumps({
        "artifact": args.artifact, "device": args.device, "providers": decoder.session.get_providers()[:1],
        "onnxruntime": ort.__version__, "float": np.dtype(decoder.dtype).name, "batch": b, "tokens": s,
        "labels": labels, "timings_ms_p50": timings, "greedy_ms_per_token": round(per_token, 3),
        "kv_cache_gib_scoring": round(decoder.kv_cache_bytes(b * (1 + labels), s + 1) / 2**30, 3),
        "steps_in_place": in_place,
        "step_vs_full_forward_max_abs_logit_diff": float(np.abs(cached - uncached).max()),
        "date": time.strftime("%Y-%m-%d"),
    }))


if __name__ == "__main__":
    main()
