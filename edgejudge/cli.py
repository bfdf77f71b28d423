"""`edgejudge` command line: one verb per job.

Bad input (a missing file, a corrupt video, an over-long prompt) ends with one line on stderr and
exit code 2; anything else that fails is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
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
             "default fps:2 (verify: the judge spec's policy)",
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
    clips = [runtime_model.sample_clip(model, read_video(v, fps=_array_fps(v, args.fps)), args.sample)
             for v in args.video]
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
    import logging
    import warnings

    # bitsandbytes logs, on import, that an optional CPU kernel from a hub is not installed.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
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
                          block_size=args.block_size, symmetric=not args.asymmetric)
    print(f"{out}: {args.format} {args.precision} artifact")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import json
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
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
    clips = [runtime_model.sample_clip(model, read_video(v, fps=_array_fps(v, args.fps)), args.sample or spec.sample)
             for v in args.video]
    reports = verify(model, Path(args.reference), Path(args.adapter) if args.adapter else None,
                     spec, clips, spec.user_text.format(**fields), device=args.device)
    for video, report in zip(args.video, reports):
        print(json.dumps({"video": video, **report}))
    agreement = sum(r["agree"] for r in reports) / len(reports)
    print(json.dumps({"videos": len(reports), "decision_agreement": agreement,
                      "max_abs_nll_diff": max(r["max_abs_nll_diff"] for r in reports)}))
    return 0


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
                   help="onnx: ONNX Runtime graphs (Qwen3-VL, fp32 so far); bnb: bitsandbytes safetensors")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4", "nf4"], required=True,
                   help="onnx: fp32, int8 or int4 (decoder weights); bnb: nf4 or int8")
    p.add_argument("--out", required=True, help="artifact folder to write (must be empty or absent)")
    p.add_argument("--device", default="cpu", help="bnb: where to merge and quantize, cpu or cuda")
    p.add_argument("--block-size", type=int, default=128, help="onnx int8/int4: weights per quantization block")
    p.add_argument("--asymmetric", action="store_true", help="onnx int8/int4: zero points (default symmetric)")
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
    try:
        return args.run(args)
    except InputError as e:
        print(f"edgejudge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
