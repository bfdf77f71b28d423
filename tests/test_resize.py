"""runtime/resize.py must give the exact bytes that HF's Qwen video processors feed onward.

HF (transformers 4.57.6 and 5.17.0) calls torchvision.transforms.v2.functional.resize on a
contiguous uint8 (B, T, 3, H, W) tensor, with BICUBIC and antialias=True. `hf_resize` does the same.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as tvF

from edgejudge.runtime.resize import _plan, resize_bicubic_antialias

RESIZE_PY = Path(__file__).resolve().parents[1] / "runtime" / "resize.py"


def hf_resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """The call HF makes, on (T, H, W, 3) uint8 frames; returns (T, height, width, 3) uint8."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()[None]
    out = tvF.resize(video, [height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    return out[0].permute(0, 2, 3, 1).numpy()


def random_frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def gradient_frames(t: int, h: int, w: int) -> np.ndarray:
    """Smooth content: ramps and a slow wave, where rounding ties and overshoot behave differently."""
    y = np.linspace(0.0, 1.0, h)[:, None]
    x = np.linspace(0.0, 1.0, w)[None, :]
    frames = []
    for k in range(t):
        r = 255.0 * x * np.ones_like(y)
        g = 255.0 * y * np.ones_like(x)
        b = 127.5 * (1.0 + np.sin(6.0 * x + 4.0 * y + k))
        frames.append(np.stack([r, g, b], axis=-1))
    return np.clip(np.round(np.stack(frames)), 0, 255).astype(np.uint8)


def assert_same(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert int(diff.max(initial=0)) == 0, f"max abs diff {int(diff.max())} at {np.argwhere(diff)[:5].tolist()}"


SIZE_PAIRS = [
    ((101, 333), (112, 336)),
    ((90, 120), (84, 112)),
    ((360, 640), (364, 644)),  # Qwen2.5-VL, 360p landscape
    ((640, 360), (644, 364)),  # portrait
    ((360, 640), (352, 640)),  # Qwen3-VL, 360p: height pass only
    ((224, 224), (336, 336)),  # Qwen2.5-VL default min_pixels upsamples 224^2
    ((720, 1280), (360, 640)),  # 2x downscale: the float32 path with pixel shift
    ((1280, 720), (560, 308)),  # portrait downscale
    ((720, 1280), (560, 1008)),
    ((17, 5), (28, 28)),
    ((1, 1), (28, 28)),
    ((1, 1), (1, 9)),
    ((28, 28), (1, 6)),
    ((3, 2000), (30, 7)),  # ~285x downscale: the float64 path
    ((48, 64), (48, 32)),  # width pass only
]


@pytest.mark.parametrize(("src", "dst"), SIZE_PAIRS, ids=[f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in SIZE_PAIRS])
def test_matches_torchvision(src, dst):
    (h, w), (height, width) = src, dst
    for frames in (random_frames(2, h, w, seed=h * 7 + w), gradient_frames(2, h, w)):
        assert_same(resize_bicubic_antialias(frames, height, width), hf_resize(frames, height, width))


def test_identity_is_the_input_like_torchvision():
    frames = random_frames(64, 224, 224)
    out = resize_bicubic_antialias(frames, 224, 224)
    assert out is frames
    assert_same(out, hf_resize(frames, 224, 224))


def test_one_axis_sweep():
    """All pairs 1..40 plus random large ones, per axis (width pass on 2-row frames, height pass on 2-column)."""
    rng = np.random.default_rng(1)
    pairs = [(a, b) for a in range(1, 41) for b in range(1, 41)]
    pairs += [tuple(int(v) for v in rng.integers(41, 2500, 2)) for _ in range(60)]
    for n_in, n_out in pairs:
        row = rng.integers(0, 256, (1, 2, n_in, 3), dtype=np.uint8)
        col = np.ascontiguousarray(row.transpose(0, 2, 1, 3))
        assert_same(resize_bicubic_antialias(row, 2, n_out), hf_resize(row, 2, n_out))
        assert_same(resize_bicubic_antialias(col, n_out, 2), hf_resize(col, n_out, 2))


def test_exactness_paths_are_covered():
    """The three float set-ups of `_plan` (each proven exact) all appear in the cases above."""
    kinds = {(_plan(a, b).dtype, _plan(a, b).shift) for a, b in ((640, 644), (1280, 640), (2000, 7))}
    assert kinds == {(np.float32, 0), (np.float32, 128), (np.float64, 0)}


def test_one_by_one_output():
    # HF's channels-first call trips an internal assert in torch's AVX kernel for 1x1 outputs, so
    # compare with the same kernel fed channels-last (same math; the generic kernel is checked below).
    frames = random_frames(2, 28, 28)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)  # channels-last memory
    ref = torch.nn.functional.interpolate(video, size=(1, 1), mode="bicubic", antialias=True, align_corners=False)
    assert_same(resize_bicubic_antialias(frames, 1, 1), ref.permute(0, 2, 3, 1).numpy())


def test_matches_generic_cpu_kernel():
    """torch without AVX (its generic separable kernel) must agree too, 1x1 output included.

    Runs torch alone (torchvision's uint8 CPU resize is exactly this interpolate call) to stay quick.
    """
    code = (
        "import numpy as np, torch\n"
        "from edgejudge.runtime.resize import resize_bicubic_antialias\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
        "rng = np.random.default_rng(0)\n"
        "bad = []\n"
        "for (h, w), (hh, ww) in [((101, 333), (112, 336)), ((360, 640), (180, 320)), ((17, 5), (28, 28)),\n"
        "                         ((28, 28), (1, 1)), ((3, 2000), (30, 7))]:\n"
        "    f = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)\n"
        "    t = torch.from_numpy(f).permute(0, 3, 1, 2).contiguous()\n"
        "    ref = torch.nn.functional.interpolate(t, size=(hh, ww), mode='bicubic', align_corners=False,\n"
        "                                          antialias=True).permute(0, 2, 3, 1).numpy()\n"
        "    if not np.array_equal(resize_bicubic_antialias(f, hh, ww), ref):\n"
        "        bad.append(((h, w), (hh, ww)))\n"
        "print(bad)\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_non_contiguous_input():
    frames = random_frames(3, 90, 160)
    bgr_view = frames[..., ::-1]  # e.g. OpenCV BGR decoded, flipped to RGB without a copy
    assert_same(resize_bicubic_antialias(bgr_view, 84, 112), hf_resize(np.ascontiguousarray(bgr_view), 84, 112))


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        resize_bicubic_antialias(np.zeros((1, 8, 8, 3), np.float32), 4, 4)
    with pytest.raises(ValueError):
        resize_bicubic_antialias(np.zeros((8, 8, 3), np.uint8), 4, 4)
    with pytest.raises(ValueError):
        resize_bicubic_antialias(np.zeros((1, 8, 8, 3), np.uint8), 0, 4)


def test_resize_module_does_not_import_torch():
    tree = ast.parse(RESIZE_PY.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"torch", "torchvision", "transformers"}, imported
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('resize_under_test', {str(RESIZE_PY)!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "import numpy as np\n"
        "mod.resize_bicubic_antialias(np.zeros((1, 9, 7, 3), np.uint8), 5, 11)\n"
        "print(','.join(m for m in ('torch', 'torchvision', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""
