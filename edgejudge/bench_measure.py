"""Measuring one configuration, in its own process: the runners (edgejudge's `Judge`, and the
seeds' recipe on transformers), the timed runs, and the device probe that the floors divide by.

- Timings: `warmup` runs, then p50 / p95 over `runs`, of the whole request and of each stage. The
  vision cache is cleared before each run (every group is encoded). In torch processes, vision is
  timed by hooks on the vision tower (a device sync on each side) and taken out of prefill.
- W4 drives `Judge.compare` with scripted replies (random weights never call the frame tool) and
  EOS off, so each of its three replies decodes 256 tokens; its HF baseline, the seed approach of
  re-running the whole conversation every turn, is benchmarks/vrthinker.py's.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgejudge.bench_workloads import (
    GIB,
    PAIRWISE_PICKS,
    SETUPS,
    STAGES,
    WORKLOADS,
    Setup,
    Video,
    Workload,
    sources,
    workload_video,
)
from edgejudge.specs import compose_prompt

if TYPE_CHECKING:
    from edgejudge.runtime.video import FramePicker


class VisionClock:
    """Time spent in a torch model's vision tower, by forward hooks with a device sync on each
    side (the tower's work, not its launch): how a torch forward is split into vision and prefill."""

    def __init__(self, model, cuda: bool):
        import torch

        tower = next(m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "visual")
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.ms, self.start = 0.0, 0.0
        tower.register_forward_pre_hook(self._enter)
        tower.register_forward_hook(self._leave)

    def _enter(self, module, args) -> None:
        self.sync()
        self.start = time.perf_counter()

    def _leave(self, module, args, output) -> None:
        self.sync()
        self.ms += (time.perf_counter() - self.start) * 1e3

    def split(self, stages: dict[str, float]) -> None:
        """Move the vision time out of the prefill stage that contained it."""
        stages["vision"] = stages.get("vision", 0.0) + self.ms
        stages["prefill"] -= self.ms
        self.ms = 0.0


@dataclass
class Outcome:
    stages: dict[str, float]  # ms per stage of one run
    decoded: int  # tokens generated (all questions)
    answer: dict  # what the judge said, to show it ran: not a quality figure (random weights)
    turns: list | None = None  # a comparison's turns: [tokens kept in the cache, prefilled, decoded]


def read_clips(inputs: dict, video: Video, stages: dict[str, float], pick: FramePicker | None = None) -> dict:
    """Per view, a Clip of the frames `pick` picks (all without it): decoded from its file (timed
    as `decode_video`), or the frames in memory."""
    from edgejudge.runtime.video import read_video

    start = time.perf_counter()
    clips = {view: read_video(source, fps=None if isinstance(source, Path) else video.fps, pick=pick)
             for view, source in inputs.items()}
    if any(isinstance(source, Path) for source in inputs.values()):
        stages["decode_video"] = (time.perf_counter() - start) * 1e3
    return clips


class EdgeRunner:
    """edgejudge's `Judge`: `check` for candidate labels, `ask_many` for text answers."""

    def __init__(self, workload: Workload, video: Video, task: dict):
        from edgejudge.judge import Judge

        self.workload, self.video = workload, video
        cuda = task["device"].startswith("cuda")
        self.judge = Judge.load(task["model_dir"], workload.spec, device=task["device"],
                                gpu_mem_gb=task["gpu_mem_gb"] if cuda else None)
        engine = self.judge.engine
        if workload.max_pixels:
            engine.model.vision = replace(engine.model.vision, max_pixels=workload.max_pixels)
        self.clock = VisionClock(engine.net, cuda) if hasattr(engine, "net") else None  # the torch backend
        if workload.spec.answer == "pairwise_tags":
            engine.eos_ids = set()  # every reply decodes its whole budget, as the workload sets it

    def run(self, inputs: dict) -> Outcome:
        from edgejudge.runtime.model import frame_picker

        workload, judge = self.workload, self.judge
        stages: dict[str, float] = {}
        # the spec's frames, picked while decoding; a comparison picks its frames turn by turn
        pairwise = workload.spec.answer == "pairwise_tags"
        clips = read_clips(inputs, self.video, stages,
                           None if pairwise else frame_picker(judge.engine.model, workload.spec.sample))
        if hasattr(judge.engine, "cache"):
            judge.engine.cache.entries.clear()  # every group encoded: no sliding-window reuse
        turns = None
        if workload.spec.answer == "labels":
            decision = judge.check(workload.questions[0]["instruction"], views=clips, sample="none")
            timings, decoded, answer = decision.timings_ms, 0, {"prediction": decision.label}
        elif workload.spec.answer == "pairwise_tags":
            comparison = judge.compare(*clips.values(), workload.questions[0]["caption"], system=workload.system,
                                       reply=scripted_reply)
            timings, decoded = comparison.timings_ms, sum(len(t.tokens) for t in comparison.turns)
            turns = [[t.cache["kept"], t.cache["prefilled"], len(t.tokens)] for t in comparison.turns]
            answer = {"turns": len(turns), "parsed": comparison.parsed.ok}
        else:
            answers = judge.ask_many(next(iter(clips.values())), list(workload.questions), sample="none",
                                     system=workload.system)
            timings, decoded = answers[0].timings_ms, sum(len(a.token_ids) for a in answers)
            answer = {"parsed": sum(a.parsed.ok for a in answers), "questions": len(answers)}
        stages.update({k: v for k, v in timings.items() if k != "total"})
        if self.clock:
            self.clock.split(stages)
        return Outcome(stages, decoded, answer, turns)


def scripted_reply(turn: int, text: str) -> str:
    """The reply a comparison keeps: the model's text as reasoning, then a frame call (the first
    turns) or an answer. Random weights never call the tool; this gives W4 its two tool turns."""
    if turn <= len(PAIRWISE_PICKS):
        call = {"name": "select_frames", "arguments": {"target_frames": PAIRWISE_PICKS[turn - 1]}}
        return f"<think>{text}</think>\n<tool_call>{json.dumps(call)}</tool_call>"
    return f"<think>{text}</think>\n<Answer>TA=1, VQ=2, MQ=0, OA=1</Answer>"


class FirstToken:
    """A `generate` streamer that notes when the first new token exists: `put` gets the prompt,
    then each new token (already on the host, so the device work before it is done)."""

    def __init__(self):
        self.calls, self.at = 0, 0.0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class HFRunner:
    """The seeds' recipe on transformers: HF's processor per prompt, SDPA, bf16 (fp32 on a CPU)
    or nf4 as the card loads it, the LoRA adapter unmerged through PEFT. Candidate labels: each by
    its own full forward per view over prompt + label. Text: one `generate` per question. Frames
    are sampled by the runtime (the same indices as HF's sampler) and given with their metadata.

    HF's video processors need torchvision. Where it is not installed, the processor's arrays
    come from edgejudge's pipeline reproducing this transformers release (the parity tests hold
    them equal), and the row says so: its preprocess stage is then not HF's."""

    def __init__(self, workload: Workload, video: Video, setup: Setup, task: dict):
        import torch
        import transformers
        from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig
        from transformers.utils import logging as hf_logging

        from edgejudge.runtime import model as runtime_model

        hf_logging.set_verbosity_error()
        self.torch, self.workload, self.video = torch, workload, video
        self.device, cuda = task["device"], task["device"].startswith("cuda")
        dtype = torch.bfloat16 if cuda else torch.float32
        if cuda and task["gpu_mem_gb"]:
            index = torch.device(self.device).index or 0
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, task["gpu_mem_gb"] * GIB / torch.cuda.get_device_properties(index).total_memory), index)
        options = {}
        if setup.export == "nf4":
            options["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model = AutoModelForImageTextToText.from_pretrained(task["model_dir"], dtype=dtype, device_map=self.device,
                                                            attn_implementation="sdpa", **options)
        if task["adapter_dir"]:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, task["adapter_dir"])
        self.model = model.eval()
        self.runtime = runtime_model.load(task["model_dir"], hf=".".join(transformers.__version__.split(".")[:2]))
        if workload.max_pixels:
            self.runtime.vision = replace(self.runtime.vision, max_pixels=workload.max_pixels)
        self.clock = VisionClock(self.model, cuda)
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.note = None
        try:
            self.processor = AutoProcessor.from_pretrained(task["model_dir"])
        except ImportError as e:
            self.processor = None
            self.note = f"inputs built by edgejudge's pipeline for this release: {str(e).strip().splitlines()[0]}"
        self.video_options = {}
        annotations = getattr(getattr(self.processor, "video_processor", None), "valid_kwargs", None)
        if "cap_pixels_per_frame" in getattr(annotations, "__annotations__", {}):
            self.video_options["cap_pixels_per_frame"] = False  # the release's default, without its warning
        if workload.max_pixels:
            self.video_options["size"] = {"shortest_edge": self.runtime.vision.min_pixels,
                                          "longest_edge": workload.max_pixels}
        self.labels = [torch.tensor(self.runtime.prompter.encode(label), device=self.device)
                       for label in workload.spec.labels]

    def inputs(self, clip, fields: dict) -> dict:
        from transformers.video_utils import VideoMetadata

        from edgejudge.runtime import model as runtime_model

        if self.processor is None:
            arrays = runtime_model.build_inputs(self.runtime, [clip], compose_prompt(self.workload.spec, fields)[1],
                                                self.workload.system)
            names = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
            feed = {k: self.torch.from_numpy(arrays[k]) for k in names if k in arrays}
            feed["mm_token_type_ids"] = (feed["input_ids"] == self.runtime.video_token_id).long() * 2
            return {k: v.to(self.device) for k, v in feed.items()}
        messages = [{"role": "system", "content": [{"type": "text", "text": self.workload.system}]}] \
            if self.workload.system else []
        text = compose_prompt(self.workload.spec, fields)[1]
        messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]})
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        meta = VideoMetadata(total_num_frames=clip.total_frames, fps=clip.fps, frames_indices=clip.indices.tolist(),
                             height=clip.frames.shape[1], width=clip.frames.shape[2])
        frames = self.torch.from_numpy(clip.frames).permute(0, 3, 1, 2)
        return self.processor(text=[prompt], videos=[frames], video_metadata=[meta], do_sample_frames=False,
                              return_tensors="pt", **self.video_options).to(self.device)

    def run(self, inputs: dict) -> Outcome:
        from edgejudge.runtime import model as runtime_model

        torch, workload = self.torch, self.workload
        stages = dict.fromkeys(("preprocess", "prefill"), 0.0)
        clips = read_clips(inputs, self.video, stages, runtime_model.frame_picker(self.runtime, workload.spec.sample))
        decoded, answer = 0, {}
        with torch.no_grad():
            if workload.spec.answer == "labels":
                nll = np.zeros(len(self.labels))
                for clip in clips.values():
                    start = time.perf_counter()
                    feed = self.inputs(clip, workload.questions[0])
                    stages["preprocess"] += (time.perf_counter() - start) * 1e3
                    length = feed["input_ids"].shape[1]
                    for i, label in enumerate(self.labels):
                        start = time.perf_counter()
                        ids = torch.cat([feed["input_ids"], label[None]], 1)
                        extra = {"mm_token_type_ids": torch.nn.functional.pad(feed["mm_token_type_ids"], (0, len(label)))} \
                            if "mm_token_type_ids" in feed else {}
                        logits = self.model(**{**feed, "input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}
                                            ).logits[0, length - 1:-1].float()
                        nll[i] += -logits.log_softmax(-1).gather(1, label[:, None]).mean().item()
                        stages["prefill"] += (time.perf_counter() - start) * 1e3
                answer = {"prediction": workload.spec.labels[int(np.argmin(nll))]}
            else:
                clip = next(iter(clips.values()))
                stages["decode"] = 0.0
                for fields in workload.questions:
                    start = time.perf_counter()
                    feed = self.inputs(clip, fields)
                    stages["preprocess"] += (time.perf_counter() - start) * 1e3
                    first, start = FirstToken(), time.perf_counter()
                    out = self.model.generate(**feed, max_new_tokens=workload.spec.max_new_tokens, do_sample=False,
                                              streamer=first)
                    self.sync()
                    end = time.perf_counter()
                    stages["prefill"] += (first.at - start) * 1e3
                    stages["decode"] += (end - first.at) * 1e3
                    decoded += out.shape[1] - feed["input_ids"].shape[1]
                answer = {"questions": len(workload.questions)}
        self.clock.split(stages)
        return Outcome(stages, decoded, answer)


def measure(task: dict) -> dict:
    """Load one configuration, run it `warmup` times, then time `runs` runs."""
    workload, setup = WORKLOADS[task["workload"]], SETUPS[task["setup"]]
    video = workload_video(workload, task["tiny"])
    hf = setup.backend == "hf"
    runner = HFRunner(workload, video, setup, task) if hf else EdgeRunner(workload, video, task)
    inputs = sources(workload, task["tiny"], Path(task["clips"]))
    totals, stages, outcome = [], [], None
    for i in range(task["warmup"] + task["runs"]):
        start = time.perf_counter()
        outcome = runner.run(inputs)
        if i >= task["warmup"]:
            totals.append((time.perf_counter() - start) * 1e3)
            stages.append(outcome.stages)
    versions = {name: sys.modules[name].__version__ for name in
                ("onnxruntime", "torch", "transformers", "peft", "bitsandbytes") if name in sys.modules}
    return {
        "latency_ms": percentiles(totals),
        "stages_ms": {k: percentiles([s.get(k, 0.0) for s in stages]) for k in STAGES if any(k in s for s in stages)},
        "decoded_tokens": outcome.decoded, "answer": outcome.answer, "versions": versions,
        "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        **({"turns": outcome.turns} if outcome.turns else {}),
        **({"note": runner.note} if hf and runner.note else {}),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2)}


def probe(payload: dict) -> dict:
    """The device's measured fp16 matmul rate and copy bandwidth: what the floors divide by."""
    import torch

    device = torch.device(payload["device"])

    def seconds(step, repeats: int = 20) -> float:
        step()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / repeats

    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    matmul = seconds(lambda: a @ a)
    source = torch.empty(GIB, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy = seconds(lambda: target.copy_(source))
    return {"name": torch.cuda.get_device_name(device), "matmul_fp16_tflops": round(2 * 8192**3 / matmul / 1e12, 1),
            "copy_gb_s": round(2 * GIB / copy / 1e9, 1), "torch": torch.__version__}
