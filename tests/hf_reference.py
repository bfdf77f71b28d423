"""Hugging Face reference ("oracle") for parity tests.

Builds exactly what a transformers model receives for one chat turn with videos:
the rendered prompt, the expanded input_ids, the video pixel patches, the grids,
(Qwen2.5-VL) second_per_grid_ts, and the 3D M-RoPE position ids / rope deltas that
the model's own ``get_rope_index`` computes at prefill.

Two entry points:

* ``hf_inputs(model_dir, videos, text, system=None)`` runs in this interpreter with
  whatever ``transformers`` it imports (the pinned version in the dev venv).
* ``hf_inputs_in(version_path, model_dir, videos, text, system=None)`` runs the same
  function in a subprocess with ``version_path`` prepended to ``PYTHONPATH``
  (e.g. ``/tmp/tf457`` or ``"/tmp/tf457:/tmp/tf457deps"``), so the outputs of an
  older/newer transformers can be compared with ours. Inputs and outputs travel as
  ``.npz`` files in a temporary directory; this module is the subprocess's script.

``videos`` is a list of dicts, one per video, in prompt order::

    {"frames": uint8 array (T, H, W, 3) RGB, already sampled,
     "indices": list[int],      # source frame index of each frame
     "fps": float,              # fps of the SOURCE video
     "total_frames": int}       # frame count of the SOURCE video

Behaviour pinned by this harness (see docs/hf-divergences.md for why each matters):

* frames go in as torch uint8 (T, 3, H, W) tensors (what HF's own decoders produce);
* ``do_sample_frames=False`` and one ``VideoMetadata(total_num_frames, fps,
  frames_indices)`` per video, so Qwen3-VL/Qwen3.5 timestamps and the 5.x
  Qwen2.5-VL ``second_per_grid_ts`` come from the real source indices/fps;
* Qwen2.5-VL also gets ``fps`` = the sampled frame rate
  ``len(indices) / total_frames * fps`` (what qwen-vl-utils passes; 4.57 derives
  ``second_per_grid_ts = 2 / fps`` from it, 5.x from the metadata, which gives the
  same number);
* ``cap_pixels_per_frame`` (5.17+): the class default is ``None`` which means
  "uncapped" (plus a warning); we pass ``False`` explicitly in that case, i.e. the
  version's default behaviour, silenced. Versions without the option get nothing.
* everything else (size/min/max pixels, mean/std, resample) comes from the
  processor files in ``model_dir``.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

__all__ = ["hf_inputs", "hf_inputs_in", "FAMILY_MODEL_CLASS"]

# model_type -> base model class that owns get_rope_index
FAMILY_MODEL_CLASS = {
    "qwen2_5_vl": "Qwen2_5_VLModel",
    "qwen3_vl": "Qwen3VLModel",
    "qwen3_5": "Qwen3_5Model",
}

_ROPE_MODEL_CACHE: dict = {}


def _model_type(model_dir: str) -> str:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)["model_type"]


def _build_messages(n_videos: int, text: str, system: str | None) -> list[dict]:
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content = [{"type": "video"} for _ in range(n_videos)]
    content.append({"type": "text", "text": text})
    messages.append({"role": "user", "content": content})
    return messages


def _rope_model(model_dir: str, model_type: str):
    """The family's base model built on the meta device (no weights, no memory)."""
    import torch
    import transformers

    key = (os.path.abspath(model_dir), transformers.__version__)
    if key not in _ROPE_MODEL_CACHE:
        cls_name = FAMILY_MODEL_CLASS[model_type]
        cls = getattr(transformers, cls_name, None)
        if cls is None:
            raise RuntimeError(f"transformers {transformers.__version__} has no {cls_name} (model_type {model_type})")
        config = transformers.AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = cls(config)
        model.eval()
        _ROPE_MODEL_CACHE[key] = model
    return _ROPE_MODEL_CACHE[key]


def hf_inputs(model_dir: str, videos: list[dict], text: str, system: str | None = None) -> dict[str, np.ndarray]:
    """What transformers (the imported version) feeds the model for this prompt.

    Returns numpy arrays: ``input_ids`` (1, S) int64, ``attention_mask`` (1, S) int64,
    ``pixel_values_videos`` (N, C*2*p*p) float32, ``video_grid_thw`` (n, 3) int64,
    ``second_per_grid_ts`` (n,) float32 (Qwen2.5-VL only), ``position_ids`` (3, 1, S)
    int64, ``rope_deltas`` (1, 1) int64, ``mm_token_type_ids`` (1, S) int64 when the
    processor produces it, and 0-d str arrays ``prompt`` (rendered chat template,
    before placeholder expansion), ``transformers_version`` and ``processor_kwargs``
    (JSON of the extra processor kwargs used, metadata left out).
    """
    import torch
    import transformers
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    model_type = _model_type(model_dir)
    if model_type not in FAMILY_MODEL_CLASS:
        raise ValueError(f"unsupported model_type {model_type!r}")

    processor = AutoProcessor.from_pretrained(model_dir)
    messages = _build_messages(len(videos), text, system)
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    frames, metadata = [], []
    for v in videos:
        arr = np.asarray(v["frames"])
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (T, H, W, 3), got {arr.dtype} {arr.shape}")
        indices = [int(i) for i in v["indices"]]
        if len(indices) != arr.shape[0]:
            raise ValueError(f"{len(indices)} indices for {arr.shape[0]} frames")
        frames.append(torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous())
        metadata.append(
            VideoMetadata(
                total_num_frames=int(v["total_frames"]),
                fps=float(v["fps"]),
                frames_indices=indices,
                height=int(arr.shape[1]),
                width=int(arr.shape[2]),
            )
        )

    kwargs: dict = {"video_metadata": metadata, "do_sample_frames": False, "return_tensors": "pt"}
    if model_type == "qwen2_5_vl":
        sampled = [len(v["indices"]) / int(v["total_frames"]) * float(v["fps"]) for v in videos]
        # 4.57 reads a scalar or a per-video list; 5.x ignores it for second_per_grid_ts
        # (uses metadata.sampled_fps) and type-checks it as int | float.
        if len(set(sampled)) == 1:
            kwargs["fps"] = sampled[0]
        elif not hasattr(VideoMetadata, "sampled_fps"):
            kwargs["fps"] = sampled
    vp = processor.video_processor
    valid = getattr(vp, "valid_kwargs", None)
    if valid is not None and "cap_pixels_per_frame" in getattr(valid, "__annotations__", {}):
        if getattr(vp, "cap_pixels_per_frame", None) is None:
            kwargs["cap_pixels_per_frame"] = False

    out = processor(text=[prompt], videos=frames, **kwargs)

    input_ids = out["input_ids"].long()
    attention_mask = out["attention_mask"].long()
    video_grid_thw = out["video_grid_thw"].long()

    model = _rope_model(model_dir, model_type)
    params = inspect.signature(model.get_rope_index).parameters
    rope_kwargs = {"image_grid_thw": None, "video_grid_thw": video_grid_thw, "attention_mask": attention_mask}
    if "second_per_grid_ts" in params:
        rope_kwargs["second_per_grid_ts"] = out.get("second_per_grid_ts")
    if "mm_token_type_ids" in params:
        mm = out.get("mm_token_type_ids")
        if mm is None:  # build it like the processor does: 1 image, 2 video, 0 text
            mm = torch.zeros_like(input_ids)
            mm[input_ids == processor.image_token_id] = 1
            mm[input_ids == processor.video_token_id] = 2
        rope_kwargs["mm_token_type_ids"] = mm
    with torch.no_grad():
        position_ids, rope_deltas = model.get_rope_index(input_ids, **rope_kwargs)

    result = {
        "input_ids": input_ids.numpy().astype(np.int64),
        "attention_mask": attention_mask.numpy().astype(np.int64),
        "pixel_values_videos": out["pixel_values_videos"].float().numpy(),
        "video_grid_thw": video_grid_thw.numpy().astype(np.int64),
        "position_ids": position_ids.long().numpy(),
        "rope_deltas": torch.as_tensor(rope_deltas).long().reshape(-1, 1).numpy(),
        "prompt": np.array(prompt),
        "transformers_version": np.array(transformers.__version__),
        "processor_kwargs": np.array(
            json.dumps({k: v for k, v in kwargs.items() if k != "video_metadata"}, sort_keys=True)
        ),
    }
    if model_type == "qwen2_5_vl":
        result["second_per_grid_ts"] = torch.as_tensor(out["second_per_grid_ts"]).float().numpy()
    if out.get("mm_token_type_ids") is not None:
        result["mm_token_type_ids"] = torch.as_tensor(out["mm_token_type_ids"]).long().numpy()
    return result


# ---------------------------------------------------------------- subprocess runner


def _save_request(path: str, model_dir: str, videos: list[dict], text: str, system: str | None) -> None:
    arrays = {}
    meta = {"model_dir": os.path.abspath(model_dir), "text": text, "system": system, "videos": []}
    for i, v in enumerate(videos):
        arrays[f"frames_{i}"] = np.asarray(v["frames"])
        meta["videos"].append(
            {"indices": [int(x) for x in v["indices"]], "fps": float(v["fps"]), "total_frames": int(v["total_frames"])}
        )
    arrays["request"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


def _load_request(path: str):
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["request"]))
        videos = [dict(v, frames=z[f"frames_{i}"]) for i, v in enumerate(meta["videos"])]
    return meta["model_dir"], videos, meta["text"], meta["system"]


def hf_inputs_in(
    version_path: str | None,
    model_dir: str,
    videos: list[dict],
    text: str,
    system: str | None = None,
    timeout: float = 600,
) -> dict[str, np.ndarray]:
    """``hf_inputs`` in a fresh interpreter with ``version_path`` first on PYTHONPATH.

    ``version_path`` may hold several entries joined by ``os.pathsep`` (a transformers
    tree plus a folder of the dependencies it needs, e.g. huggingface_hub<1.0 and
    requests for 4.57.x). ``None`` runs the interpreter's own transformers.
    """
    env = dict(os.environ)
    parts = [p for p in (version_path or "").split(os.pathsep) if p]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="hfref_") as tmp:
        req, res = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        _save_request(req, model_dir, videos, text, system)
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), req, res],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not os.path.exists(res):
            raise RuntimeError(
                f"hf_reference subprocess failed (rc={proc.returncode}, PYTHONPATH={env.get('PYTHONPATH')}):\n"
                f"{proc.stderr[-4000:]}"
            )
        with np.load(res, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def _skip_dependency_pins() -> None:
    """Let an unpacked transformers tree import next to newer tokenizers/hub wheels.

    transformers refuses to import when e.g. tokenizers is a patch release above its
    pinned range; we only need its processors and rope code, so the pin check is
    replaced by an empty module before the package is imported.
    """
    import types

    stub = types.ModuleType("transformers.dependency_versions_check")
    stub.dep_version_check = lambda pkg, hint=None: None
    sys.modules.setdefault("transformers.dependency_versions_check", stub)


def _main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: hf_reference.py REQUEST.npz RESULT.npz", file=sys.stderr)
        return 2
    _skip_dependency_pins()
    model_dir, videos, text, system = _load_request(argv[0])
    result = hf_inputs(model_dir, videos, text, system)
    np.savez(argv[1], **result)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
