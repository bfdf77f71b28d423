"""VR-Thinker's pairwise loop: decode speed and a 3-turn comparison, edgejudge vs the seed's approach.

    python benchmarks/vrthinker.py --out DIR --tokenizers DIR [--work /tmp/ej-vrthinker]
        [--precision fp16 --precision int4] [--artifact NAME=DIR ...] [--export-only] [--no-hf]
    python benchmarks/vrthinker.py --out DIR --smoke          # tiny model on the CPU, a minute

The full run builds the random-weight Qwen2.5-VL-7B preset on the GPU (kept in --work), exports it
to ONNX per precision (an artifact already in --work, or given with --artifact, is reused) and
measures, per artifact on ONNX Runtime's CUDA provider:
- decode: greedy tokens/s at batch 1 after the first turn's prefill (256 tokens, EOS off, after a
  warm-up run; the step time only: embed, decoder step, LM head, pick), and its split into the
  decoder step (with its host-side inputs), the LM head and the pick;
- both with the decoding step captured as a CUDA graph (the runtime's default) and without, in
  the same run, whether the two give the same tokens, and on a fixed 2,239-token text prompt how
  many greedy steps they agree for and how far their logits are apart until then;
- compare: the wall time of a 3-turn comparison (two scripted select_frames calls of 8 frames,
  then an answer; 256 tokens a turn, EOS off; vision cache cleared first) through
  `runtime.pairwise.compare` with the reused KV cache;
and the same comparison the seed's way (`HFSeedSession`): HF transformers in bf16 with SDPA,
the whole conversation re-rendered, re-processed and re-run by `generate` every turn, plus HF's
own decode rate on the first turn's prompt. Writes DIR/vrthinker.json (and prints it). Random weights: speed, not judgments.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from edgejudge.runtime.engine import Engine, StageTimer
from edgejudge.runtime.model import Model
from edgejudge.runtime.pairwise import TOOL_ARGUMENT, TOOL_NAME, CachedSession, Conversation, Settings, compare
from edgejudge.runtime.preprocess import smart_resize
from edgejudge.runtime.video import virtual_uniform
from edgejudge.specs import get_spec

PRESET = "qwen2.5-vl-7b-instruct"
SPEC = get_spec("vrthinker-pairwise")
CAPTION = "A red ball rolls off a wooden table and bounces twice on the floor."
SYSTEM = ("You compare two generated videos. Think inside <think></think>. To see more frames, call "
          f'<tool_call>{{"name": "{TOOL_NAME}", "arguments": {{"{TOOL_ARGUMENT}": [indices]}}}}</tool_call>. '
          "Finish with <Answer>TA=x, VQ=x, MQ=x, OA=x</Answer>.")


class HFSeedSession:
    """The seed script's way through HF: every turn the whole conversation is rendered, every image
    processed again and `generate` runs it from scratch. `record` keeps each turn's processor
    inputs and generate's raw logits (parity tests); `min_new_tokens` keeps EOS away (timing)."""

    def __init__(self, model, processor, record: bool = False, min_new_tokens: int = 0):
        self.model, self.processor, self.record, self.min_new_tokens = model, processor, record, min_new_tokens
        self.turns: list[dict] = []

    def generate(self, conversation: Conversation, max_new_tokens: int, on_token, timer: StageTimer):
        device = self.model.device
        with timer("preprocess"):
            prompt = self.processor.apply_chat_template(conversation.messages, tokenize=False,
                                                        add_generation_prompt=True)
            images = [torch.from_numpy(image).permute(2, 0, 1) for image in conversation.images]
            inputs = self.processor(text=[prompt], images=images, return_tensors="pt").to(device)
        with timer("generate"), torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=self.min_new_tokens,
                                      do_sample=False, temperature=None, output_logits=self.record,
                                      return_dict_in_generate=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        length = inputs["input_ids"].shape[1]
        if self.record:
            self.turns.append({"inputs": inputs, "logits": torch.cat(out.logits).float().cpu().numpy()})
        return out.sequences[0, length:].tolist(), {"prefilled": length}


def scripted(picks: list[list[int]]):
    """A reply hook: turn k calls for picks[k - 1] while there are any, then answers."""
    def reply(turn: int, text: str) -> str:
        if turn <= len(picks):
            call = {"name": TOOL_NAME, "arguments": {TOOL_ARGUMENT: picks[turn - 1]}}
            return f"<think>{text}</think>\n<tool_call>{json.dumps(call)}</tool_call>"
        return f"<think>{text}</think>\n<Answer>TA=1, VQ=2, MQ=0, OA=1</Answer>"
    return reply


def videos(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((96, 360, 640, 3), (81, 480, 480, 3))]


def timed_compare(session_factory, model: Model, settings: Settings, picks, before=None) -> tuple[dict, list]:
    """One warm-up comparison, then one timed: (wall seconds, stage ms, tokens and prefilled tokens
    per turn; each turn's tokens). The videos are in memory before the clock starts."""
    pair = videos()
    for run in range(2):
        if before:
            before()
        start = time.perf_counter()
        result = compare(session_factory(), model, pair, CAPTION, SYSTEM, settings, reply=scripted(picks))
        seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "turns": len(result.turns), "stage_ms": {k: round(v, 1) for k, v in
            result.timings_ms.items()}, "tokens": [len(t.tokens) for t in result.turns],
            "prefilled": [t.cache.get("prefilled") for t in result.turns], "ok": result.parsed.ok}, \
        [t.tokens for t in result.turns]


def decode_rate(engine: Engine, settings: Settings, tokens: int) -> dict:
    """Greedy decoding after the first turn's prefill, EOS off: the decode stage of
    `CachedSession.generate` (one warm-up), then the same steps split by hand."""
    engine.eos_ids = set()
    model, decoder = engine.model, engine.decoder
    conversation = Conversation(videos(), CAPTION, SYSTEM, settings,
                                smart_resize(settings.image_size, settings.image_size, model.vision))
    session = CachedSession(engine)
    rates = []
    for run in range(4):  # run 0 prefills the prompt; the others rerun its last token and decode
        timer = StageTimer()
        session.generate(conversation, tokens, None, timer)
        if run >= 2:
            rates.append((tokens - 1) / (timer.ms["decode"] / 1e3))
    prompt = len(session.cached) - tokens + 1
    decoder.truncate(prompt)
    split = {"step_ms": 0.0, "head_ms": 0.0, "pick_ms": 0.0}  # embed + cos/sin + decoder run; LM head; argmax
    token, delta = int(session.cached[-1]), np.zeros((1, 1), np.int64)  # text positions: timing only
    for _ in range(tokens - 1):
        t0 = time.perf_counter()
        hidden = decoder.step_token(np.array([token]), delta)
        t1 = time.perf_counter()
        logits = decoder.logits(hidden)[0, -1]
        t2 = time.perf_counter()
        token = int(np.argmax(logits))
        t3 = time.perf_counter()
        for key, ms in zip(split, (t1 - t0, t2 - t1, t3 - t2)):
            split[key] += ms * 1e3 / (tokens - 1)
    return {"prompt_tokens": prompt, "tokens": tokens, "tokens_per_s": round(float(np.median(rates)), 1),
            "ms_per_token": round(1e3 / float(np.median(rates)), 2),
            "split_ms": {k: round(v, 3) for k, v in split.items()}}


def greedy_trace(engine: Engine, prompt: int = 2239, steps: int = 64) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and each step's logits after a fixed random text prompt (text positions)."""
    decoder = engine.decoder
    ids = np.random.default_rng(0).integers(0, decoder.vocab_size, (1, prompt))
    cos, sin = decoder.cos_sin(np.broadcast_to(np.arange(prompt)[None, None], (3, 1, prompt)))
    hidden = decoder.prefill(decoder.embed(ids), cos, sin, capacity=prompt + steps, on_device=True)
    return decoder.greedy(decoder.logits(hidden, slice(-1, None))[0, -1], prompt, np.zeros((1, 1), np.int64),
                          steps, (), return_logits=True)


def divergence(a: tuple[list[int], list[np.ndarray]], b: tuple[list[int], list[np.ndarray]]) -> dict:
    """Steps two greedy traces agree for; max |dlogit| over the steps that share a history, and b's
    gap between its top two logits where they part (a near-tie flips on any rounding)."""
    (tokens_a, logits_a), (tokens_b, logits_b) = a, b
    agree = next((i for i, (x, y) in enumerate(zip(tokens_a, tokens_b)) if x != y), len(tokens_a))
    shared = range(min(agree + 1, len(tokens_a)))
    top2 = np.sort(logits_b[min(agree, len(tokens_b) - 1)])[-2:]
    return {"steps": len(tokens_a), "agree_steps": agree,
            "max_abs_dlogit": float(max(np.abs(logits_a[i] - logits_b[i]).max() for i in shared)),
            "top2_gap_where_parted": float(top2[1] - top2[0])}


def hf_decode_rate(hf, processor, model: Model, settings: Settings, tokens: int) -> dict:
    """HF's greedy tokens/s on the first turn's prompt: (generate of `tokens` - generate of one
    token) / (tokens - 1), medians of three after a warm-up, EOS kept away."""
    conversation = Conversation(videos(), CAPTION, SYSTEM, settings,
                                smart_resize(settings.image_size, settings.image_size, model.vision))
    session = HFSeedSession(hf, processor)
    seconds = {}
    for count in (1, tokens):
        session.min_new_tokens, runs = count, []
        for run in range(4):
            timer = StageTimer()
            session.generate(conversation, count, None, timer)
            runs.append(timer.ms["generate"] / 1e3)
        seconds[count] = float(np.median(runs[1:]))
    rate = (tokens - 1) / (seconds[tokens] - seconds[1])
    return {"tokens": tokens, "tokens_per_s": round(rate, 1), "ms_per_token": round(1e3 / rate, 2),
            "first_token_s": round(seconds[1], 3)}


def export_artifacts(base: Path, work: Path, precisions: list[str], given: dict[str, Path], device: str
                     ) -> dict[str, Path]:
    from edgejudge.export.onnx import export_onnx

    artifacts = dict(given)
    for precision in precisions:
        out = work / precision
        if precision not in artifacts and not (out / "edgejudge.json").is_file():
            start = time.perf_counter()
            export_onnx(base, None, precision, out, judge_spec=SPEC.name, device=device)
            print(json.dumps({"exported": precision, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        artifacts.setdefault(precision, out)
    return artifacts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for vrthinker.json")
    parser.add_argument("--work", default="/tmp/ej-vrthinker", help="keeps the base model and the artifacts")
    parser.add_argument("--tokenizers", help=f"folder holding {PRESET}/tokenizer.json (full run)")
    parser.add_argument("--precision", action="append", help="artifacts to export / time (default fp16, int4)")
    parser.add_argument("--artifact", action="append", default=[], help="NAME=DIR: an artifact exported earlier")
    parser.add_argument("--export-only", action="store_true", help="build and export, time nothing")
    parser.add_argument("--no-hf", action="store_true", help="skip the seed approach through HF")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per turn")
    parser.add_argument("--smoke", action="store_true", help="the tiny Qwen2.5-VL on the CPU, fp32, 8 tokens a turn")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) / ("smoke" if args.smoke else PRESET)
    given = {name: Path(path) for name, _, path in (a.partition("=") for a in args.artifact)}
    if args.smoke:
        from edgejudge.export.fixtures import tiny_model_dir

        base, device, tokens, dtype = tiny_model_dir("qwen2_5_vl"), "cpu", 8, torch.float32
        precisions = args.precision or ["fp32"]
    else:
        from edgejudge.export.presets import write_preset_model_dir

        base, device, tokens, dtype = work / "base", "cuda", args.tokens, torch.bfloat16
        precisions = args.precision or ["fp16", "int4"]
        torch.backends.cuda.matmul.allow_tf32 = False
        if not (base / "config.json").is_file():
            write_preset_model_dir(PRESET, base, tokenizer_dir=Path(args.tokenizers) / PRESET, device="cuda")
    artifacts = export_artifacts(base, work, precisions, given, device)
    if args.export_only:
        return
    settings = dataclasses.replace(Settings.from_spec(SPEC), max_new_tokens=tokens)
    picks = [virtual_uniform(settings.virtual, 8).tolist(), list(range(5, 125, 15))]
    report: dict = {"preset": "tiny qwen2_5_vl" if args.smoke else PRESET, "tokens_per_turn": tokens,
                    "image_size": settings.image_size, "picks": picks, "onnx": {}}
    replies, traces = {}, {}
    graph_modes = (True, False) if device == "cuda" else (True,)
    for (name, folder), cuda_graph in ((a, g) for a in artifacts.items() for g in graph_modes):
        label = name if cuda_graph else f"{name}, no CUDA graph"
        engine = Engine(folder, device=device, cuda_graph=cuda_graph)
        engine.eos_ids = set()
        timing, replies[label] = timed_compare(partial(CachedSession, engine), engine.model, settings, picks,
                                               engine.cache.entries.clear)
        report["onnx"][label] = {"decode": decode_rate(engine, settings, tokens), "compare": timing,
                                 "provider": engine.decoder.session.get_providers()[0],
                                 "graphs_captured": engine.decoder.graphs_captured}
        traces[label] = greedy_trace(engine, *((2239, 64) if device == "cuda" else (64, 8)))
        if not cuda_graph:
            report["onnx"][label]["same_tokens_as_graph"] = [a == b for a, b in zip(replies[label], replies[name])]
            report["onnx"][label]["greedy_vs_graph"] = divergence(traces[name], traces[label])
        print(json.dumps({label: report["onnx"][label]}), flush=True)
        del engine
        gc.collect()
    if not args.no_hf:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from edgejudge.runtime.model import load

        hf = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, attn_implementation="sdpa",
                                                         device_map=device).eval()
        processor = AutoProcessor.from_pretrained(base)
        report["hf_seed"], seed_replies = timed_compare(partial(HFSeedSession, hf, processor, min_new_tokens=tokens),
                                                        load(base), settings, picks)
        report["hf_seed"]["dtype"] = str(dtype).split(".")[-1]
        report["hf_seed"]["decode"] = hf_decode_rate(hf, processor, load(base), settings, tokens)
        # the same greedy tokens as HF's (fp32 smoke: expected; fp16/int4 vs bf16: how far they go together)
        report["hf_seed"]["same_tokens_as"] = {name: [a == b for a, b in zip(ours, seed_replies)]
                                               for name, ours in replies.items()}
        print(json.dumps({"hf_seed": report["hf_seed"]}), flush=True)
    import onnxruntime
    import transformers

    report.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                  transformers=transformers.__version__, onnxruntime=onnxruntime.__version__)
    (out / "vrthinker.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
