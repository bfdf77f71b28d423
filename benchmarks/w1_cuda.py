"""Where W1's time and memory go: `Judge.check` on 2 views x 64 frames of 224x224, split into the
calls it makes, with the GPU's used memory after each stage.

    python benchmarks/w1_cuda.py ARTIFACT [--runs 20] [--gpu-mem-gb 16] [--keep-vision-arena]
                                          [--patches-per-run N] [--provider-option K=V ...]

- Calls: each engine / decoder / vision method below is wrapped by a clock (ONNX Runtime's runs
  return when the device is done, so host clocks around them hold the device time); p50 ms per
  call name over the timed runs, summed within a run.
- Memory: NVML's used memory of the GPU minus the reading before the judge loaded, after each
  session loads, after loading and after each stage of the first run, and the peak polled every
  2 ms: over the whole process, within each run, and within each call of the first run.
- `--keep-vision-arena`: the vision session keeps its arena's free memory after each call (ORT's
  default), for the comparison with `runtime.sessions.release_after_runs`; `--provider-option
  K=V` adds CUDA provider options.
(ONNX Runtime's own profile is not used: on CUDA it times each kernel's launch on the host, not
its device time.) `--kernels N`: one more run under torch's profiler, whose CUPTI tracing sees
every CUDA kernel of the process, ONNX Runtime's included: the N kernels of most device time,
each with its calls and summed device ms, the GPU's idle time within the run and its N longest
gaps, the N CUDA runtime calls of most host time, and per stage (vision, splice, decoder,
scoring) its wall time and how much of it the device was busy (the one use of torch here,
imported only then).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgejudge import Judge
from edgejudge.bench import open_nvml
from edgejudge.runtime import decoder as decoder_module
from edgejudge.runtime import engine as engine_module
from edgejudge.runtime import sessions
from edgejudge.runtime import vision as vision_module

GIB = 2**30
INSTRUCTION = "Pick the mug from the counter and place it in the sink."


class Clock:
    """Wraps callables so each call adds its wall time to `ms[name]` (per run); while `trace` is a
    list, each call also appends (name, device memory in use after it, the most in use during it;
    GiB). `window[0]`: the most in use since the innermost running call began (the poller raises it)."""

    def __init__(self, used):
        self.ms: dict[str, float] = defaultdict(float)
        self.used = used
        self.trace: list | None = None
        self.window = [0]

    def wrap(self, owner, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start, outer = time.perf_counter(), self.window[0]
            self.window[0] = self.used()
            try:
                return original(*args, **kwargs)
            finally:
                self.ms[name] += (time.perf_counter() - start) * 1e3
                after = self.used()
                during = max(self.window[0], after)
                self.window[0] = max(outer, during)  # the enclosing call saw this call's peak too
                if self.trace is not None:
                    self.trace.append((name, round(after / GIB, 3), round(during / GIB, 3)))

        setattr(owner, attribute, timed)


STAGES = (("engine", "visual", "vision"), ("decoder", "multimodal_embeds", "splice"),
          ("decoder", "_run_fixed_prefill", "decoder"), ("decoder", "_run", "decoder"), ("engine", "_score_batch", "scoring"))


def busy_within(intervals: list[tuple[int, int]], start: int, end: int) -> float:
    """Microseconds of [start, end] covered by the union of (sorted) `intervals`."""
    busy, reach = 0, start
    for a, b in intervals:
        a, b = max(a, reach), min(b, end)
        if b > a:
            busy, reach = busy + b - a, b
    return float(busy)


def device_kernels(run, engine, top: int) -> dict:
    """Device time of one `run()` (the vision cache emptied first) by CUDA kernel, from CUPTI; the
    GPU's idle time within the run (between its first and last kernel) with the longest idle gaps
    and the kernels on either side; the CUDA runtime calls of most host time (a synchronizing
    copy or free shows here); per stage (`STAGES`, a profiler range around each call), its wall
    time and the device's busy time inside it (ONNX Runtime's runs return when the device is done,
    so a stage's kernels fall inside its range; the profiler's own cost inflates the wall times)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    owners = {"engine": engine, "decoder": engine.decoder}
    originals = [(owners[owner], attribute, getattr(owners[owner], attribute)) for owner, attribute, _ in STAGES]
    for (owner, attribute, original), (_, _, name) in zip(originals, STAGES):
        def ranged(*args, _original=original, _name=name, **kwargs):
            with record_function(f"stage:{_name}"):
                return _original(*args, **kwargs)

        setattr(owner, attribute, ranged)
    engine.cache.entries.clear()
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
    finally:
        for owner, attribute, original in originals:
            setattr(owner, attribute, original)
    # a stage's range shows on the device too (a user annotation spanning its kernels): not a kernel
    rows = [(e.key, e.count, e.device_time_total / 1e3) for e in prof.key_averages()
            if e.device_time_total > 0 and not e.key.startswith("stage:")]
    rows.sort(key=lambda row: -row[2])
    events = prof.events()
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith("stage:")),
                     key=lambda e: e.time_range.start)
    gaps, busy_until = [], kernels[0].time_range.end if kernels else 0
    previous = kernels[0].name if kernels else ""
    for e in kernels[1:]:
        if e.time_range.start > busy_until:
            gaps.append(((e.time_range.start - busy_until) / 1e3, previous[:80], e.name[:80]))
        if e.time_range.end > busy_until:
            busy_until, previous = e.time_range.end, e.name
    span = (busy_until - kernels[0].time_range.start) / 1e3 if kernels else 0.0
    api: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.device_type == DeviceType.CPU and e.name.startswith("cuda"):
            api[e.name][0] += 1
            api[e.name][1] += e.cpu_time_total / 1e3
    intervals = [(e.time_range.start, e.time_range.end) for e in kernels]
    stages: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in events:
        if e.device_type == DeviceType.CPU and e.name.startswith("stage:"):
            stage = stages[e.name[len("stage:"):]]
            stage[0] += (e.time_range.end - e.time_range.start) / 1e3
            stage[1] += busy_within(intervals, e.time_range.start, e.time_range.end) / 1e3
    return {"total_device_ms": round(sum(ms for _, _, ms in rows), 2),
            "stages": {name: {"wall_ms": round(wall, 2), "device_busy_ms": round(busy, 2)}
                       for name, (wall, busy) in stages.items()},
            "span_ms": round(span, 2), "idle_ms": round(sum(g[0] for g in gaps), 2),
            "idle_gaps": [{"ms": round(ms, 3), "after": a, "before": b} for ms, a, b in sorted(gaps, reverse=True)[:top]],
            "runtime_calls": [{"call": name, "calls": n, "ms": round(ms, 3)}
                              for name, (n, ms) in sorted(api.items(), key=lambda kv: -kv[1][1])[:top]],
            "top": [{"kernel": key[:160], "calls": count, "ms": round(ms, 3)} for key, count, ms in rows[:top]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--gpu-mem-gb", type=float)
    parser.add_argument("--keep-vision-arena", action="store_true",
                        help="the vision session keeps its free arena memory after a call (ORT's default)")
    parser.add_argument("--patches-per-run", type=int, help="the vision graph's patch rows per run "
                        "(default: edgejudge.runtime.vision.PATCHES_PER_RUN)")
    parser.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra CUDA provider option (repeatable)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    parser.add_argument("--kernels", type=int, default=0, help="list the N kernels of most device time in one run")
    args = parser.parse_args()
    if args.keep_vision_arena:
        vision_module.release_after_runs = lambda providers: None
    if args.patches_per_run:
        vision_module.PATCHES_PER_RUN = args.patches_per_run
    if args.provider_option:
        extra = dict(option.split("=", 1) for option in args.provider_option)
        providers = sessions.execution_providers

        def with_options(device, gpu_mem_gb=None):
            chosen = providers(device, gpu_mem_gb)
            return [(chosen[0][0], {**chosen[0][1], **extra}), *chosen[1:]] if device != "cpu" else chosen

        engine_module.execution_providers = with_options
    nvml = open_nvml(args.device)
    used = nvml.used if nvml else (lambda: 0)  # a CPU smoke run has no device memory to read
    idle = used()
    peak, run_peak, run_peaks = [idle], [idle], []
    done = threading.Event()
    clock = Clock(lambda: used() - idle)

    def poll() -> None:
        while not done.is_set():
            now = used()
            peak[0] = max(peak[0], now)
            clock.window[0] = max(clock.window[0], now - idle)
            run_peak[0] = max(run_peak[0], now)
            time.sleep(0.002)

    threading.Thread(target=poll, daemon=True).start()
    memory: dict[str, float] = {}
    sessions_loaded = []
    for module in (decoder_module, vision_module):
        def opened(path, providers, _open=module.open_session):
            session = _open(path, providers)
            sessions_loaded.append((Path(path).name, round((used() - idle) / GIB, 3)))
            return session

        module.open_session = opened
    judge = Judge.load(args.artifact, spec="robocasa-completion", device=args.device, gpu_mem_gb=args.gpu_mem_gb)
    memory["loaded"] = (used() - idle) / GIB
    engine = judge.engine
    clock.trace = []  # the first run's calls
    decoder, vision = engine.decoder, engine.vision
    for owner, attribute, name in (
            (engine, "prompt", "engine.prompt"), (engine, "visual", "engine.visual"),
            (engine, "prefill", "engine.prefill"), (engine, "_score_batch", "engine.score_batch"),
            (engine_module.VisionCache, "key", "vision_cache.key"), (engine_module, "preprocess_video_levels", "preprocess_video_levels"),
            (vision, "run_into", "vision.run_into"), (decoder, "multimodal_embeds", "decoder.multimodal_embeds"),
            (decoder, "cos_sin", "decoder.cos_sin"), (decoder, "reset", "decoder.reset"), (decoder, "_run", "decoder.run"),
            (decoder, "_run_fixed_prefill", "decoder.fixed_prefill"),
            (decoder, "logits", "decoder.logits"), (decoder, "repeat_cache", "decoder.repeat_cache"),
            (engine_module, "log_sum_exp", "log_sum_exp")):
        clock.wrap(owner, attribute, name)
    shape: dict[str, int] = {}
    for owner, attribute, name in ((engine, "visual", "vision"), (decoder, "reset", "kv_cache"),
                                   (engine, "prefill", "prefill"), (engine, "_score_batch", "scoring")):

        def after(*a, _inner=getattr(owner, attribute), _name=name, **k):
            out = _inner(*a, **k)
            memory.setdefault(_name, (used() - idle) / GIB)  # the first run, when the stage first allocates
            if _name == "prefill":
                shape.update(rows=len(a[0]), tokens=a[0][0].length)
            return out

        setattr(owner, attribute, after)
    rng = np.random.default_rng(0)
    views = {name: rng.integers(0, 256, (args.frames, 224, 224, 3), dtype=np.uint8) for name in ("right", "left")}
    samples: dict[str, list[float]] = defaultdict(list)
    for run in range(args.runs + 3):
        engine.cache.entries.clear()
        clock.ms.clear()
        run_peak[0] = used()
        decision = judge.check(INSTRUCTION, views, fps=20.0, sample="none")
        run_peaks.append(round((max(run_peak[0], used()) - idle) / GIB, 3))
        if run == 0:
            first_run_trace, clock.trace = clock.trace, None
        if run >= 3:
            for name, ms in {**clock.ms, **{f"stage.{k}": v for k, v in decision.timings_ms.items()}}.items():
                samples[name].append(ms)
    done.set()
    kernels = device_kernels(lambda: judge.check(INSTRUCTION, views, fps=20.0, sample="none"), engine,
                             args.kernels) if args.kernels else None
    report = {
        "artifact": args.artifact, "vision_arena_released": not args.keep_vision_arena, "gpu_mem_gb": args.gpu_mem_gb,
        "provider_options": args.provider_option, "patches_per_run": vision_module.PATCHES_PER_RUN,
        "p50_ms": {name: round(float(np.median(v)), 2) for name, v in sorted(samples.items())},
        "memory_gib_after": {k: round(v, 3) for k, v in memory.items()}, "sessions_loaded_gib": sessions_loaded,
        "peak_gib": round((peak[0] - idle) / GIB, 3), "peak_gib_per_run": run_peaks,
        "first_run_memory_trace": first_run_trace,
        "prefill_rows": shape, "onnxruntime": ort.__version__, "kernels": kernels,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
