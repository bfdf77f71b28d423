"""`edgejudge` command line: one verb per job.

Bad input (a missing file, a corrupt video, an over-long prompt) ends with one line on stderr and
exit code 2; anything else that fails is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from edgejudge.errors import InputError


def _add_video_options(parser: argparse.ArgumentParser) -> None:
    """The frame options every verb that reads videos shares."""
    parser.add_argument("--fps", type=float, help="frame rate of .npy / array input (files carry their own)")
    parser.add_argument(
        "--sample",
        default="fps:2",
        help="frames to keep: none | uniform:N | fps:F (the model family's fps sampler); "
             "default fps:2 (verify, run: the judge spec's policy)",
    )
    parser.add_argument("--hf", help="transformers release whose input behaviour to reproduce, e.g. 4.57 or 5.17 "
                        "(default: the release line the family's judges were trained with)")


def _array_fps(video: str, fps: float | None) -> float | None:
    """--fps describes .npy input; video files carry their own rate."""
    return fps if video.endswith(".npy") else None


def _cmd_inputs(args: argparse.Namespace) -> int:
    from edgejudge.runtime import model as runtime_model
    from edgejudge.runtime.video import read_video

    model = runtime_model.load(args.model, hf=args.hf)
    if args.print_prompt:
        print(runtime_model.render_prompt(model, len(args.video), args.text, args.system), end="")
        return 0
    pick = runtime_model.frame_picker(model, args.sample)
    clips = [read_video(v, fps=_array_fps(v, args.fps), pick=pick) for v in args.video]
    arrays = runtime_model.build_inputs(model, clips, args.text, args.system)
    out = Path(args.dump)
    if out.parent and not out.parent.is_dir():
        raise InputError(f"{out.parent}: output folder does not exist")
    np.savez(out, **arrays)
    ids = arrays["input_ids"]
    video_tokens = int((ids == model.video_token_id).sum())
    print(f"{out}: {ids.shape[1]} tokens ({video_tokens} video), grids {arrays['video_grid_thw'].tolist()}, "
          f"pixel_values_videos {tuple(arrays['pixel_values_videos'].shape)}")
    return 0


def _cmd_fixtures(args: argparse.Namespace) -> int:
    import warnings

    from transformers.utils import logging as hf_logging

    from edgejudge.export.fixtures import FAMILIES, build_tiny_adapter, build_tiny_model, write_demo_clip

    hf_logging.disable_progress_bar()  # our own one line per model is enough
    warnings.simplefilter("ignore", FutureWarning)

    out = Path(args.out)
    for family in args.family or FAMILIES:
        if family not in FAMILIES:
            raise InputError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
        model_dir = build_tiny_model(family, out / family, seed=args.seed)
        adapter_dir = build_tiny_adapter(model_dir, out / f"{family}-lora", seed=args.seed + 1)
        print(f"{family}: model {model_dir}, adapter {adapter_dir}")
    print(f"demo clip: {write_demo_clip(out / 'clip.mp4')}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import warnings

    from transformers.utils import logging as hf_logging

    from edgejudge.specs import get_spec

    hf_logging.disable_progress_bar()  # our own bar counts the export's steps
    warnings.simplefilter("ignore")  # the exporters' deprecation chatter; errors still raise

    if args.spec:
        get_spec(args.spec)
    adapter = Path(args.adapter) if args.adapter else None
    if args.format == "bnb":
        from edgejudge.export.bnb import export_bnb

        out = export_bnb(Path(args.base), adapter, args.precision, Path(args.out), device=args.device,
                         judge_spec=args.spec)
    else:
        from edgejudge.export.onnx import export_onnx

        out = export_onnx(Path(args.base), adapter, args.precision, Path(args.out), judge_spec=args.spec,
                          block_size=args.block_size, symmetric=not args.asymmetric, activations=args.activations,
                          algorithm=args.algorithm, lm_head_bits=args.lm_head_bits,
                          int8_last_layers=args.int8_last_layers, vision_bits=args.vision_bits, device=args.device)
    print(f"{out}: {args.format} {args.precision} artifact")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import json
    import warnings

    warnings.simplefilter("ignore")
    from edgejudge.export.verify import verify
    from edgejudge.manifest import read_manifest
    from edgejudge.runtime import model as runtime_model
    from edgejudge.runtime.video import read_video
    from edgejudge.specs import get_spec

    name = args.spec or read_manifest(Path(args.artifact)).judge_spec
    if not name:
        raise InputError(f"{args.artifact} records no judge spec: pass --spec")
    spec = get_spec(name)
    fields = {"instruction": args.instruction}
    missing = [f for f in spec.fields if not fields.get(f)]
    if missing:
        raise InputError(f"spec {spec.name} needs --{' --'.join(missing)}")
    model = runtime_model.load(Path(args.artifact), hf=args.hf)
    pick = runtime_model.frame_picker(model, args.sample or spec.sample)
    clips = [read_video(v, fps=_array_fps(v, args.fps), pick=pick) for v in args.video]
    reports = verify(model, Path(args.reference), Path(args.adapter) if args.adapter else None,
                     spec, clips, spec.user_text.format(**fields), device=args.device)
    for video, report in zip(args.video, reports):
        print(json.dumps({"video": video, **report}))
    agreement = sum(r["agree"] for r in reports) / len(reports)
    print(json.dumps({"videos": len(reports), "decision_agreement": agreement,
                      "max_abs_nll_diff": max(r["max_abs_nll_diff"] for r in reports)}))
    return 0


def _cmd_judge(args: argparse.Namespace) -> int:
    import json

    from edgejudge.judge import Judge, check_family
    from edgejudge.manifest import read_manifest
    from edgejudge.runtime import model as runtime_model
    from edgejudge.runtime.video import read_video
    from edgejudge.specs import compose_prompt, get_spec, read_prompts, rubric_axes

    name = args.spec or read_manifest(Path(args.artifact)).judge_spec
    if not name:
        raise InputError(f"{args.artifact} records no judge spec: pass --spec")
    spec = get_spec(name)
    fields = {f: getattr(args, f) for f in ("instruction", "caption") if getattr(args, f) is not None}
    unknown = sorted((set(fields) | ({"axis"} if args.axis else set())) - set(spec.fields))
    if unknown:
        takes = ", ".join("--" + f for f in spec.fields) or "no text fields"
        raise InputError(f"spec {spec.name} takes {takes}; not --{', --'.join(unknown)}")
    check_family(Path(args.artifact), spec)
    prompts = read_prompts(spec, args.prompt_dir or args.artifact) if spec.prompt_sources else None
    # A rubric judge answers every axis its prompt files define unless --axis picks some.
    axes = args.axis or (rubric_axes(spec, prompts) if "axis" in spec.fields and prompts is not None else [])
    questions = [{**fields, "axis": axis} for axis in axes] or [fields]
    composed = [compose_prompt(spec, question, prompts) for question in questions]
    if args.print_prompt:
        model = runtime_model.load(Path(args.artifact), hf=args.hf)
        for system, text in composed:
            print(runtime_model.render_prompt(model, 1, text, system), end="")
        return 0
    if bool(args.video) == bool(args.view):
        raise InputError("pass the videos with --video V (in the spec's view order) or with --view NAME=V, one of the two")
    if args.view:
        pairs = [v.partition("=") for v in args.view]
        if bad := next((v for v, (n, eq, path) in zip(args.view, pairs) if not (n and eq and path)), None):
            raise InputError(f"--view {bad}: expected NAME=VIDEO")
        if len({n for n, _, _ in pairs}) != len(pairs):
            raise InputError("--view: a view name is given twice")
        sources = {n: path for n, _, path in pairs}
    elif spec.answer == "labels" and spec.views:
        if len(args.video) != len(spec.views):
            raise InputError(f"spec {spec.name} takes {len(spec.views)} views ({', '.join(spec.views)}): "
                             f"got {len(args.video)} --video")
        sources = dict(zip(spec.views, args.video))
    else:
        sources = {path: path for path in args.video}
    clips = {n: read_video(path, fps=_array_fps(path, args.fps)) for n, path in sources.items()}
    judge = Judge.load(Path(args.artifact), spec, device=args.device, gpu_mem_gb=args.gpu_mem_gb, hf=args.hf,
                       prompt_dir=args.prompt_dir)
    if spec.answer == "pairwise_tags":
        return _compare(judge, [clips[path] for path in args.video] if args.video else list(clips.values()),
                        fields.get("caption"), args.stream)
    if spec.answer == "labels":
        decision = judge.check(fields.get("instruction"), clips, sample=args.sample)
        print(json.dumps(decision.to_dict()) if args.json else
              f"{decision.label}  ({', '.join(f'{k} {v:.4f}' for k, v in decision.scores.items())}; "
              f"{decision.timings_ms['total']:.0f} ms)")
        return 0
    if len(clips) != 1:
        raise InputError(f"spec {spec.name} judges one video per decision; got {len(clips)}")
    (clip,) = clips.values()
    answers = judge.ask_many(clip, questions, sample=args.sample)
    for axis, answer in zip(axes or [None], answers):
        score = answer.parsed.score if answer.parsed.ok else f"unparseable ({answer.parsed.reason})"
        expected = "" if answer.expected is None else f", expected {answer.expected:.2f}"
        print(json.dumps(answer.to_dict(key=axis)) if args.json else
              f"{axis + ': ' if axis else ''}{score}{expected}; raw {answer.text!r}")
    return 0


def _compare(judge, videos: list, caption: str | None, stream: bool) -> int:
    """A pairwise judge's comparison as one JSON line; `stream` writes each reply's text to stderr
    as it is decoded, under a [turn N] line (stdout stays one JSON line)."""
    import json

    if len(videos) != 2:
        raise InputError(f"spec {judge.spec.name} compares two videos: pass --video twice (got {len(videos)})")
    turn_shown = [0]

    def show(turn: int, text: str) -> None:
        if turn != turn_shown[0]:
            sys.stderr.write(("\n" if turn_shown[0] else "") + f"[turn {turn}]\n")
            turn_shown[0] = turn
        sys.stderr.write(text)
        sys.stderr.flush()

    result = judge.compare(*videos, caption=caption, stream=show if stream else None)
    if turn_shown[0]:
        sys.stderr.write("\n")
    print(json.dumps(result.to_dict()))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    try:
        from edgejudge.evaluate import evaluate, summary_markdown, write_html
    except ModuleNotFoundError as e:
        raise InputError(f"edgejudge eval needs {e.name}: pip install 'edgejudge[eval]'") from None

    evaluation = evaluate(Path(args.results), Path(args.labels))
    report = write_html(evaluation, Path(args.out)) if args.out else None
    if args.json:
        print(json.dumps({**evaluation.to_json(), "report": str(report) if report else None}))
    else:
        print(summary_markdown(evaluation) + (f"\n\nreport: {report}" if report else ""))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from edgejudge.batch import run_command

    return run_command(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from edgejudge.demo import DEMO_JUDGE, run_demo

    return run_demo(args.clips, args.cache, args.precision, args.json, args.judge or DEMO_JUDGE)


def _cmd_bench(args: argparse.Namespace) -> int:
    from edgejudge.bench import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgejudge", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("inputs", help="write the arrays a model sees for a video and a prompt")
    p.add_argument("model", help="model folder (HF checkpoint or edgejudge artifact)")
    p.add_argument("--video", action="append", required=True, help="video file, .npy (T,H,W,3) uint8; repeatable")
    p.add_argument("--text", required=True, help="user text, placed after the video(s)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--dump", help="write the arrays to this .npz")
    p.add_argument("--print-prompt", action="store_true", help="print the rendered prompt and exit")
    _add_video_options(p)
    p.set_defaults(run=_cmd_inputs)

    p = verbs.add_parser("export", help="merge a LoRA adapter into its base and write a quantized artifact")
    p.add_argument("--base", required=True, help="base model folder (HF checkpoint, safetensors)")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder to merge")
    p.add_argument("--format", choices=["onnx", "bnb"], required=True,
                   help="onnx: ONNX Runtime graphs (Qwen3-VL, Qwen2.5-VL); bnb: bitsandbytes safetensors (all families)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4", "nf4"], required=True,
                   help="onnx: fp32, fp16, or int8 / int4 decoder weights; bnb: nf4 or int8")
    p.add_argument("--out", required=True, help="artifact folder to write (must be empty or absent)")
    p.add_argument("--device", default="cpu", help="where the merge (and bnb quantization) runs, cpu or cuda")
    p.add_argument("--block-size", type=int, default=128, help="onnx int8/int4: weights per quantization block")
    p.add_argument("--asymmetric", action="store_true", help="onnx int8/int4: zero points (default symmetric)")
    p.add_argument("--activations", choices=["fp16", "fp32"],
                   help="onnx int8/int4: float type of the graphs (default fp16; fp32 for CPU-only targets)")
    p.add_argument("--algorithm", choices=["rtn", "k_quant"], default="rtn", help="onnx int8/int4: ORT quantizer")
    p.add_argument("--lm-head-bits", type=int, choices=[8], help="onnx int8/int4: an int8 LM head (default float)")
    p.add_argument("--vision-bits", type=int, choices=[8],
                   help="onnx int8/int4: the vision tower's linears at 8 bits (default float)")
    p.add_argument("--int8-last-layers", type=int, default=0, metavar="N",
                   help="onnx int4: keep the linears of the last N decoder layers at 8 bits")
    p.add_argument("--spec", help="judge spec to record in the manifest")
    p.set_defaults(run=_cmd_export)

    p = verbs.add_parser("verify", help="compare an artifact with its HF reference on your own videos")
    p.add_argument("artifact", help="artifact folder written by `edgejudge export`")
    p.add_argument("--reference", required=True, help="the base model folder (HF checkpoint)")
    p.add_argument("--adapter", help="the LoRA adapter, applied unmerged to the reference")
    p.add_argument("--video", action="append", required=True, help="one decision per video; repeatable")
    p.add_argument("--spec", help="judge spec (default: the one recorded in the artifact)")
    p.add_argument("--instruction", help="the instruction text, for specs that take one")
    p.add_argument("--device", default="cpu", help="where the torch models run: cpu or cuda")
    _add_video_options(p)
    p.set_defaults(run=_cmd_verify, sample=None)

    p = verbs.add_parser("judge", help="one decision of a judge on an artifact: a label, or a parsed answer")
    p.add_argument("artifact", help="ONNX artifact folder written by `edgejudge export`")
    p.add_argument("--spec", help="judge spec (default: the one recorded in the artifact)")
    p.add_argument("--video", action="append", help="a video of the decision; repeat in the spec's view order")
    p.add_argument("--view", action="append", help="NAME=VIDEO: a named view of the decision; repeatable")
    p.add_argument("--instruction", help="the instruction text, for specs that take one")
    p.add_argument("--caption", help="the caption text, for specs that take one")
    p.add_argument("--axis", action="append",
                   help="a rubric axis, for specs that take one; repeat for several (default: every axis of the rubric)")
    p.add_argument("--prompt-dir", help="the folder of the prompt files a spec reads (default: the artifact folder)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--gpu-mem-gb", type=float, help="cap on ONNX Runtime's CUDA memory")
    p.add_argument("--json", action="store_true", help="print one JSON object per decision (per axis)")
    p.add_argument("--stream", action="store_true",
                   help="pairwise judges (two --video): print each reply's reasoning to stderr as it is decoded")
    p.add_argument("--print-prompt", action="store_true",
                   help="print the prompt as the chat template renders it (before video expansion) and exit")
    _add_video_options(p)
    p.set_defaults(run=_cmd_judge, sample=None)

    p = verbs.add_parser("eval", help="compare judge results with human labels: metrics and an HTML report")
    p.add_argument("results", help="results JSONL (one object per job: id, ok, score or scores, optional digits)")
    p.add_argument("--labels", required=True, help="human labels CSV: id,score (or id,axis,score for multi-axis judges)")
    p.add_argument("--out", help="write a self-contained HTML report here")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object instead of the summary")
    p.set_defaults(run=_cmd_eval)

    p = verbs.add_parser("run", help="judge a file of jobs durably and resumably; keep the ones passing a filter")
    p.add_argument("artifact", help="artifact folder written by `edgejudge export`")
    p.add_argument("--spec", help="judge spec (default: the one recorded in the artifact)")
    p.add_argument("--input", required=True, help="jobs: .jsonl, .csv or .parquet with id, video and the spec's fields")
    p.add_argument("--out", required=True, help="results .jsonl, one line per finished job")
    p.add_argument("--resume", action="store_true", help="continue the run that wrote --out, skipping finished jobs")
    p.add_argument("--keep", help="also write the results passing a filter, e.g. 'score>=4', to <out minus .jsonl>.kept.jsonl")
    p.add_argument("--batch", type=int, default=8, help="jobs per call of the judge (default 8)")
    p.add_argument("--device", help="where the judge runs: cpu or cuda (default: the judge's own)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="spread the jobs over Ray workers (a cluster ADDRESS, or none: local / $RAY_ADDRESS)")
    p.add_argument("--num-gpus-per-worker", type=float, default=1, help="--ray: GPUs per judge worker (0: CPU)")
    p.add_argument("--workers", type=int, help="--ray: judge workers (default: one per --num-gpus-per-worker GPUs)")
    p.add_argument("--prompt-dir", help="the folder of the prompt files a spec reads (default: the artifact folder)")
    _add_video_options(p)
    p.set_defaults(run=_cmd_run, sample=None)

    p = verbs.add_parser("demo", help="the shipped demo judge on held-out clips: decisions, accuracy, latency (CPU)")
    p.add_argument("--clips", type=int, default=6, help="held-out clips per task (default 6)")
    p.add_argument("--cache", type=Path, help="where the exported artifacts are kept "
                   "(default $EDGEJUDGE_CACHE/demo, else ~/.cache/edgejudge/demo)")
    p.add_argument("--precision", choices=["fp16", "int4"], default="int4", help="the artifact that judges")
    p.add_argument("--json", action="store_true", help="one JSON object per clip, then a summary object")
    p.add_argument("--judge", type=Path, help="a judge folder with base/ and adapter/ (default: the shipped one)")
    p.set_defaults(run=_cmd_demo)

    p = verbs.add_parser("bench", help="time the seed workloads stage by stage on edgejudge and on the HF recipe")
    p.add_argument("--workload", default="all", help="W1, W2, W3, W4, a comma list, or all (default)")
    p.add_argument("--preset", default="full", help="full (each workload's real model), its preset name, or tiny")
    p.add_argument("--random-weights", action="store_true", help="full-size presets: time random weights of the real shapes")
    p.add_argument("--artifact", help="time your own artifact (ONNX or bnb) on its workload, at its own precision")
    p.add_argument("--reference", help="--artifact: its base model, for the HF baseline")
    p.add_argument("--adapter", help="--artifact: the LoRA adapter the baseline applies unmerged")
    p.add_argument("--precision", help="edgejudge setups: fp32, fp16, int4, nf4, a comma list, or none "
                   "(default fp16,int4,nf4 on a GPU, fp32 on the CPU)")
    p.add_argument("--baseline", help="hf, hf-nf4, a comma list, or none (default: each workload's seed recipes)")
    p.add_argument("--gpu-mem-gb", type=float, help="refuse, before loading, what is estimated over this; cap the rest")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is there)")
    p.add_argument("--runs", type=int, default=20, help="timed runs after warm-up (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--cache", help="keeps bases, adapters, artifacts and clips between calls "
                   "(default $EDGEJUDGE_CACHE/bench, else ~/.cache/edgejudge/bench)")
    p.add_argument("--tokenizers", help="folder holding <preset>/tokenizer.json (default: $EDGEJUDGE_TOKENIZERS, "
                   "../shared/models)")
    p.add_argument("--out", required=True, help="results.json (merged with an earlier one there), results.md, results.png")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON", help="only merge earlier runs' results.json into --out")
    p.set_defaults(run=_cmd_bench)

    p = verbs.add_parser("fixtures", help="build tiny random reference models, LoRA adapters and a demo clip")
    p.add_argument("--out", required=True, help="folder to write <family>/ and <family>-lora/ into")
    p.add_argument("--family", action="append", help="qwen2_5_vl | qwen3_vl | qwen3_5 (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_cmd_fixtures)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb == "inputs" and not args.print_prompt and not args.dump:
        parser.error("inputs needs --dump FILE.npz (or --print-prompt)")
    # bitsandbytes logs, when transformers imports it, that an optional CPU kernel from a hub is
    # not installed: noise for every torch-side verb
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return args.run(args)
    except InputError as e:
        print(f"edgejudge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
