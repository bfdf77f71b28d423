"""`edgejudge bench`: the seed judges' workloads timed stage by stage, on edgejudge and on the seeds'
own HF recipe in the same run, so that a precision and a GPU can be picked from one report.

The workloads, setups and their arithmetic are in bench_workloads.py, the timed runs in
bench_measure.py, the report in bench_report.py; this module plans, builds and runs them.

- Each configuration runs in its own process (spawned), so its memory is measured alone. One
  process first plans every configuration (model shapes on the meta device, token counts, memory
  estimates) and builds the artifacts that are missing from `--cache`; configurations over
  `--gpu-mem-gb` are refused there, before anything is built or loaded.
- Peak memory is device-side and the same for both backends: NVML's used memory of the GPU
  (libnvidia-ml through ctypes), polled every 2 ms by this process while the configuration's
  process lives, minus the reading just before it started. It includes the CUDA context and what
  ONNX Runtime's arena and torch's caching allocator hold. On the CPU: the process's peak RSS.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from edgejudge.bench_measure import measure, probe
from edgejudge.bench_report import finish_row, write_report
from edgejudge.bench_workloads import (
    CAPTION,
    GIB,
    PAIRWISE_PICKS,
    SETUPS,
    WORKLOADS,
    Setup,
    Video,
    Workload,
    memory_estimate,
    model_shape,
    sources,
    synthetic_frames,
    workload_video,
    write_mp4,
)
from edgejudge.errors import InputError
from edgejudge.specs import compose_prompt


# -- planning and artifacts (the first child process: torch, no device time spent measuring) ------
def token_plan(workload: Workload, model_dir: Path, tiny: bool) -> dict:
    """Token counts of one run, from the runtime's own inputs for the workload's clip."""
    from edgejudge.runtime import model as runtime_model
    from edgejudge.runtime.video import read_video
    from edgejudge.torch_backend import shared_prompt

    model = runtime_model.load(model_dir)
    if workload.max_pixels:
        model.vision = replace(model.vision, max_pixels=workload.max_pixels)
    video = workload_video(workload, tiny)
    if workload.spec.answer == "pairwise_tags":
        return pairwise_plan(workload, model, video)
    clip = runtime_model.sample_clip(model, read_video(synthetic_frames(video, 0), fps=video.fps), workload.spec.sample)
    prompts = [runtime_model.prompt_inputs(model, [clip], compose_prompt(workload.spec, q)[1], workload.system)
               for q in workload.questions]
    t, h, w = (int(x) for x in prompts[0]["video_grid_thw"][0])
    plan = {"groups": t, "patches_per_group": h * w, "video_tokens": t * h * w // model.vision.merge_size ** 2,
            "prompt": max(p["input_ids"].shape[1] for p in prompts), "labels": [], "frames": len(clip.frames),
            "frame_size": [h * model.vision.patch_size, w * model.vision.patch_size]}
    if workload.spec.answer == "labels":
        plan.update(videos=len(workload.views), labels=[len(model.prompter.encode(l)) for l in workload.spec.labels])
    else:
        shared, suffixes = shared_prompt(prompts)
        plan.update(videos=1, shared=shared, suffixes=[len(s) for s in suffixes],
                    forced=[len(model.prompter.encode(workload.spec.score_prefix.format(**q))) for q in workload.questions])
    return plan


def pairwise_plan(workload: Workload, model, video: Video) -> dict:
    """The images of the scripted comparison and its prompt at the last turn, built as the loop
    builds them; the per-turn figures (cached, prefilled, decoded) come from the run itself."""
    from edgejudge.runtime.model import image_prompt_inputs
    from edgejudge.runtime.pairwise import Conversation, Settings
    from edgejudge.runtime.preprocess import smart_resize

    settings = Settings.from_spec(workload.spec)
    size = smart_resize(settings.image_size, settings.image_size, model.vision)
    frames = synthetic_frames(video, 0)
    conversation = Conversation([frames, frames], CAPTION, workload.system, settings, size)
    # the cache the loop allocates at the first turn: room for the longest conversation it can become
    longest = image_prompt_inputs(model, *conversation.longest())["input_ids"].shape[1]
    for picks in PAIRWISE_PICKS:
        conversation.reply("")
        conversation.show(list(picks))
    arrays = image_prompt_inputs(model, conversation.messages, [size] * len(conversation.images))
    _, h, w = (int(x) for x in arrays["image_grid_thw"][0])
    images = len(conversation.images)
    return {"videos": 1, "groups": images, "patches_per_group": h * w, "frames": images, "frame_size": list(size),
            "video_tokens": images * h * w // model.vision.merge_size ** 2, "labels": [],
            "prompt": arrays["input_ids"].shape[1] + settings.max_turns * settings.max_new_tokens,
            "cache_tokens": longest + settings.max_turns * settings.max_new_tokens}


def inputs_dir(preset: str, cache: Path, tokenizers: str | None) -> Path:
    """A preset's non-weight files with its tokenizer: enough to count tokens before any weight exists."""
    from edgejudge.export.presets import find_tokenizer_json, preset_dir

    out = cache / preset / "inputs"
    if not (out / "tokenizer.json").is_file():
        tokenizer = find_tokenizer_json(preset, Path(tokenizers) / preset if tokenizers else None)
        out.mkdir(parents=True, exist_ok=True)
        for path in preset_dir(preset).iterdir():
            if path.is_file() and path.suffix in (".json", ".jinja"):
                shutil.copyfile(path, out / path.name)
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out


def built(out: Path, build) -> Path:
    """`out`, built by `build(partial_dir)` unless an earlier run left it complete."""
    if not out.is_dir():
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        build(partial)
        partial.rename(out)
    return out


def random_adapter(base: Path, family: str, rank: int, out: Path, device: str) -> None:
    """A LoRA adapter of the seed judges' targets with random (non-zero) B matrices, built on the
    device from the base's config, so the unmerged baseline pays what a trained adapter costs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from edgejudge.export.fixtures import LORA_ALPHA, LORA_TARGETS
    from edgejudge.export.presets import config_from_dict, model_class

    config = config_from_dict(json.loads((base / "config.json").read_text()))
    torch.manual_seed(1)
    with torch.device(device):
        model = model_class(config)._from_config(config, dtype=torch.bfloat16)
    lora = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS[family], lora_dropout=0.0,
                      base_model_name_or_path=str(base))
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    peft_model.save_pretrained(out)


def unavailable(workload: Workload, setup: Setup, tiny: bool) -> str | None:
    """Why a setup cannot run a workload, if it cannot."""
    if workload.spec.answer == "pairwise_tags" and setup.backend != "onnx":
        return ("the seed approach to VR-Thinker (the whole conversation re-run by generate every turn) is timed by "
                "benchmarks/vrthinker.py" if setup.backend == "hf" else "the pairwise loop runs on ONNX artifacts")
    if tiny and setup.name == "hf-nf4":
        return ("the card's nf4 recipe quantizes the vision tower, whose tiny layers are narrower than bitsandbytes' "
                "64-value block")
    if setup.backend == "onnx":
        from edgejudge.export.onnx import check_options

        try:
            check_options(workload.family, setup.export, setup.export if setup.export in ("fp32", "fp16") else "fp16",
                          "rtn", None, 0)
        except InputError as e:
            return str(e)
    return None


@dataclass
class Models:
    """Where one workload's models come from."""

    key: str  # the model's name in the results, and its folder in the cache
    inputs: Path  # the non-weight files (config, tokenizer, processor configs): tokens are counted from them
    base: Path | None  # the base checkpoint: HF's baseline loads it, exports start from it
    adapter: Path | None  # a LoRA adapter to build (random) or given
    lora_rank: int | None
    artifact: Path | None = None  # a user's artifact (--artifact): timed as it is, nothing is built


def models(workload: Workload, payload: dict, cache: Path) -> Models:
    if payload["artifact"]:
        adapter = Path(payload["adapter"]) if payload["adapter"] else None
        rank = json.loads((adapter / "adapter_config.json").read_text())["r"] if adapter else None
        return Models(Path(payload["artifact"]).name, Path(payload["artifact"]),
                      Path(payload["reference"]) if payload["reference"] else None, adapter, rank,
                      Path(payload["artifact"]))
    rank, adapter = workload.lora_rank, f"lora{workload.lora_rank}-adapter"
    if payload["tiny"]:
        from edgejudge.export.fixtures import tiny_model_dir

        key, base = f"tiny-{workload.family}", tiny_model_dir(workload.family)
        return Models(key, base, base, cache / key / adapter if rank else None, rank)
    return Models(workload.preset, inputs_dir(workload.preset, cache, payload["tokenizers"]),
                  cache / workload.preset / "base", cache / workload.preset / adapter if rank else None, rank)


def prepare(payload: dict) -> dict:
    """Plan every configuration (availability, token counts, memory estimate against the cap),
    then build the bases, adapters and artifacts that the runnable ones need, cached."""
    cache, device, tiny = Path(payload["cache"]), payload["device"], payload["tiny"]
    cuda = device.startswith("cuda")
    clips = cache / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    configs = []
    for name in payload["workloads"]:
        workload = WORKLOADS[name]
        found = models(workload, payload, cache)
        adapter_key = f"lora{found.lora_rank}" if found.lora_rank else "no-adapter"
        config = json.loads((found.inputs / "config.json").read_text())
        shape, plan = model_shape(config, found.lora_rank), token_plan(workload, found.inputs, tiny)
        runnable = []
        for setup_name in payload["setups"][name]:
            setup = SETUPS[setup_name]
            row = {"workload": name, "setup": setup_name, "model": found.key, "adapter": adapter_key, "status": "ready",
                   "shape": shape, "plan": plan}
            configs.append(row)
            reason = unavailable(workload, setup, tiny)
            if setup.backend == "hf" and found.base is None:
                reason = "the HF baseline of an artifact needs its base model: --reference BASE (and --adapter DIR)"
            if reason:
                row.update(status="not available", reason=reason)
                continue
            row["estimate"] = e = memory_estimate(shape, plan, setup, workload, cuda)
            cap = payload["gpu_mem_gb"]
            if cap is not None and e["total_gib"] > cap:
                row.update(status="refused", reason=(
                    f"{name} {setup.name}: an estimated {e['total_gib']:.3g} GiB (weights {e['weights_gib']:.3g} + KV cache "
                    f"{e['kv_cache_gib']:.3g} + activations {e['activations_gib']:.3g} + runtime overhead "
                    f"{e['overhead_gib']:.3g}) is over the --gpu-mem-gb {cap:g} cap"))
                continue
            runnable.append((row, setup))
        if not runnable:
            continue
        if not (tiny or found.artifact):
            from edgejudge.export.presets import write_preset_model_dir

            tokenizer_dir = Path(payload["tokenizers"]) / workload.preset if payload["tokenizers"] else None
            built(found.base, lambda out: write_preset_model_dir(workload.preset, out, tokenizer_dir, device=device))
        if found.adapter and not found.artifact:
            built(found.adapter, lambda out: random_adapter(found.base, workload.family, found.lora_rank, out, device))
        for row, setup in runnable:
            row["adapter_dir"] = str(found.adapter) if found.adapter else None
            row["model_dir"] = str(found.base if setup.backend == "hf" else found.artifact or
                                   artifact(setup, found.base, found.adapter, cache / found.key / adapter_key, device))
        if workload.from_file:
            video = workload_video(workload, tiny)
            for view, path in sources(workload, tiny, clips).items():
                if not path.is_file():
                    write_mp4(synthetic_frames(video, workload.views.index(view)), video.fps, path)
    return {"configs": configs}


def artifact(setup: Setup, base: Path, adapter: Path | None, folder: Path, device: str) -> Path:
    """The setup's artifact of base + adapter, exported once into `folder` (the --cache)."""
    import gc

    import torch

    if setup.backend == "onnx":
        from edgejudge.export.onnx import export_onnx

        # quantized graphs keep fp32 activations for CPU targets (ORT's CPU kernels), fp16 on the GPU
        activations = None if setup.export in ("fp32", "fp16") else ("fp32" if device == "cpu" else "fp16")
        head_bits, vision_bits = (8 if bits else None for bits in (setup.head_bits, setup.vision_bits))
        name = f"onnx-{setup.export}" + (f"-b128-{activations}" if activations else "") + (
            f"+head{head_bits}" if head_bits else "") + (f"+vision{vision_bits}" if vision_bits else "")
        out = built(folder / name, lambda out: export_onnx(base, adapter, setup.export, out, activations=activations,
                                                              lm_head_bits=head_bits, vision_bits=vision_bits,
                                                              device=device))
    else:
        from edgejudge.export.bnb import export_bnb

        out = built(folder / f"bnb-{setup.export}", lambda out: export_bnb(base, adapter, setup.export, out, device=device))
    gc.collect()  # the merged model of one export is gone before the next one loads its own
    if device != "cpu":
        torch.cuda.empty_cache()
    return out


# -- child processes and device memory ----------------------------------------------------------
def _child(target: str, payload: dict, out: str) -> None:
    """A child process's entry: run `target(payload)`, write its result (or its error) as JSON. The
    target goes by name: a spawned process gets `_child` and its arguments pickled."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        result = {"ok": {"prepare": prepare, "measure": measure, "probe": probe}[target](payload)}
    except InputError as e:
        result = {"input_error": str(e)}
    except Exception as e:  # a failed configuration is a row with its reason; the bench goes on
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    Path(out).write_text(json.dumps(result))


class _MemoryInfo(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class Nvml:
    """The GPU's used memory from the driver (libnvidia-ml, through ctypes): whatever the library
    or process that holds it."""

    def __init__(self, index: int):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self.handle = ctypes.c_void_p()
        if self.lib.nvmlInit_v2() or self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.handle)):
            raise OSError("NVML could not open the device")

    def used(self) -> int:
        info = _MemoryInfo()
        self.lib.nvmlDeviceGetMemoryInfo(self.handle, ctypes.byref(info))
        return info.used


def open_nvml(device: str) -> Nvml | None:
    if not device.startswith("cuda"):
        return None
    try:
        return Nvml(int(device.partition(":")[2] or 0))
    except OSError:
        return None


def in_child(target: str, payload: dict, nvml: Nvml | None) -> tuple[dict, float | None]:
    """`target(payload)` in a fresh (spawned) process: its result, and the peak device memory it
    added (GiB), polled every 2 ms."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="edgejudge-bench-") as tmp:
        out = Path(tmp) / "result.json"
        idle = nvml.used() if nvml else 0
        peak = [idle]
        process = context.Process(target=_child, args=(target, payload, str(out)))
        process.start()

        def poll() -> None:
            while process.is_alive():
                peak[0] = max(peak[0], nvml.used())
                time.sleep(0.002)

        poller = threading.Thread(target=poll, daemon=True) if nvml else None
        if poller:
            poller.start()
        process.join()
        if poller:
            poller.join()
        result = (json.loads(out.read_text()) if out.is_file() else
                  {"error": f"the process ended with code {process.exitcode}"})
    return result, ((peak[0] - idle) / GIB if nvml else None)


# -- the command ---------------------------------------------------------------------------------
def _names(value: str, known, what: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise InputError(f"{what} {value!r}: choose from {', '.join(known)}")
    return names


def artifact_setup(folder: Path, names: list[str], precision: str | None) -> str:
    """The setup that times a user's artifact (--artifact), which must fit the one workload named."""
    from edgejudge.manifest import read_manifest

    manifest = read_manifest(folder)
    name = manifest.precision.split("-")[0] if manifest.format == "onnx" else manifest.precision
    if name not in SETUPS or SETUPS[name].backend == "hf":
        raise InputError(f"{folder}: a {manifest.format} {manifest.precision} artifact; the bench times ONNX fp32, fp16 "
                         "or int4 and bnb nf4 artifacts")
    if precision:
        raise InputError("--artifact is timed at its own precision: leave out --precision")
    if len(names) != 1 or WORKLOADS[names[0]].family != manifest.family:
        fits = ", ".join(n for n, w in WORKLOADS.items() if w.family == manifest.family) or "none"
        raise InputError(f"--artifact {folder} is a {manifest.family} judge: name its one workload ({fits})")
    return name


def merge(files: list[str], out: Path) -> int:
    """`--merge`: the rows of earlier runs' results.json files into out's report, nothing run."""
    rows = []
    for name in files:
        try:
            rows += json.loads(Path(name).read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"--merge {name}: not a bench results.json ({type(e).__name__}: {e})") from None
    out.mkdir(parents=True, exist_ok=True)
    print(write_report(out, rows), end="")
    return 0


def run(args) -> int:
    """`edgejudge bench`: plan and build (one process), then each configuration in its own."""
    if args.merge:
        return merge(args.merge, Path(args.out))
    names = list(WORKLOADS) if args.workload == "all" else _names(args.workload, WORKLOADS, "--workload")
    tiny = args.preset == "tiny"
    device = args.device or ("cuda" if open_nvml("cuda") else "cpu")
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:") and device[5:].isdigit()):
        raise InputError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    cuda = device.startswith("cuda")
    if args.artifact:
        edge = [artifact_setup(Path(args.artifact), names, args.precision)]
        tiny = False
    else:
        if not tiny:
            presets = {WORKLOADS[n].preset for n in names}
            if args.preset != "full" and presets != {args.preset}:
                raise InputError(f"--preset {args.preset}: the workloads {', '.join(names)} "
                                 f"use {', '.join(sorted(presets))}")
            if not args.random_weights:
                raise InputError("full-size presets ship no weights: pass --random-weights to time random weights of "
                                 "the real shapes (or --preset tiny, or --artifact DIR)")
        edge = [] if args.precision == "none" else _names(
            args.precision or ("fp16,int4,nf4" if cuda else "fp32"), [s for s in SETUPS if SETUPS[s].backend != "hf"],
            "--precision")
    baselines = {n: [] if args.baseline == "none" else
                 list(WORKLOADS[n].baselines) if args.baseline is None else
                 _names(args.baseline, [s for s in SETUPS if SETUPS[s].backend == "hf"], "--baseline") for n in names}
    if args.runs < 1 or args.warmup < 0:
        raise InputError("--runs must be >= 1 and --warmup >= 0")
    if args.gpu_mem_gb is not None and not args.gpu_mem_gb > 0:
        raise InputError(f"--gpu-mem-gb must be positive, got {args.gpu_mem_gb}")
    out, cache = Path(args.out), Path(args.cache or Path(os.environ.get("EDGEJUDGE_CACHE") or
                                                           Path.home() / ".cache" / "edgejudge") / "bench")
    out.mkdir(parents=True, exist_ok=True)
    nvml = open_nvml(device)

    def log(message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    log(f"planning and building {', '.join(names)} in {cache}")
    planned, _ = in_child("prepare", {"workloads": names, "setups": {n: edge + baselines[n] for n in names},
                                      "cache": str(cache), "device": device, "tiny": tiny,
                                      "tokenizers": args.tokenizers, "gpu_mem_gb": args.gpu_mem_gb,
                                      "artifact": args.artifact, "reference": args.reference,
                                      "adapter": args.adapter}, None)
    if "input_error" in planned:
        raise InputError(planned["input_error"])
    if "error" in planned:  # not the user's input (a full disk, a broken install): one line, exit 1
        print(f"edgejudge: error: bench planning failed: {planned['error']}", file=sys.stderr)
        return 1
    configs = planned["ok"]["configs"]
    refused = [c for c in configs if c["status"] == "refused"]
    ready = [c for c in configs if c["status"] == "ready"]
    if refused and not ready:
        raise InputError(refused[0]["reason"])
    for config in refused:
        print(f"edgejudge: refused: {config['reason']}", file=sys.stderr)
    device_probe = None
    if cuda and ready:
        probed, _ = in_child("probe", {"device": device}, None)
        device_probe = probed.get("ok")
    env = {"device": device_probe["name"] if device_probe else
           device if cuda else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
           "gpu_mem_gb": args.gpu_mem_gb, "date": time.strftime("%Y-%m-%d"), "runs": args.runs, "warmup": args.warmup,
           "device_probe": device_probe}
    rows, text = [], ""
    for config in configs:
        measured = peak = None
        if config["status"] == "ready":
            log(f"measuring {config['workload']} {config['setup']}")
            measured, peak = in_child("measure", {
                **{k: config[k] for k in ("workload", "setup", "model_dir", "adapter_dir")}, "device": device,
                "gpu_mem_gb": args.gpu_mem_gb, "runs": args.runs, "warmup": args.warmup, "tiny": tiny,
                "clips": str(cache / "clips")}, nvml)
        rows.append(finish_row(config, measured, peak, device_probe, env))
        text = write_report(out, rows)  # after every configuration: a run cut short keeps what it measured
    print(text, end="")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0
