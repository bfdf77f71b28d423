"""Bit-exact numpy port of the frame resize that HF's Qwen video processors run (no torch).

What HF does. Checked in transformers 5.17.0 and 4.57.6, with torchvision 0.29.1 and torch 2.15 on CPU:
- Qwen2VLVideoProcessor and Qwen3VLVideoProcessor (Qwen3.5 uses Qwen3-VL's) call
  `torchvision.transforms.v2.functional.resize(video, [h, w], interpolation=BICUBIC, antialias=True)`.
  `resample` is PILImageResampling.BICUBIC, mapped to InterpolationMode.BICUBIC.
- The video is still a uint8 tensor at that point: contiguous channels-first (B, T, 3, H, W). In
  4.57, Qwen3-VL first folds it to (B*T, 3, H, W). torchvision folds everything to (N, 3, H, W), so
  the two versions give the same bytes. Rescale/normalize come afterwards, on the uint8 result.
- torchvision returns the same tensor when (h, w) == (H, W). Otherwise, on CPU, torch resizes uint8
  natively (`_upsample_bicubic2d_aa`). On x86 with AVX2 or AVX-512 that is
  `upsample_avx_bilinear_bicubic_uint8`, otherwise `separable_upsample_generic_Nd_kernel_impl`. Both
  give the same bytes, and this module matches both:
  * Separable passes: the width pass first, rounded to uint8, then the height pass. A pass is skipped
    when its size is unchanged.
  * Per-axis weights in float64. scale = in/out and center = scale * (i + 0.5). The support is
    2 * max(scale, 1). Taps run over [trunc(center - support + 0.5), trunc(center + support + 0.5)),
    clipped to the image. The filter is Keys cubic with a = -0.5 (PIL's antialias kernel, not the
    -0.75 of non-antialiased bicubic), evaluated at (j - center + 0.5) / max(scale, 1). Weights are
    then normalized per output.
  * The weights become int16 with precision p: the largest p <= 22 with round(max_w * 2^p) < 2^15,
    rounding half away from zero.
  * out = clamp((2^(p-1) + sum(w_int * x)) >> p, 0, 255).
  OpenCV's INTER_CUBIC (a = -0.75, no antialias) is 30-120 levels off on random frames, so it
  is not used.

How: the integer sums are computed as banded float GEMMs through BLAS. The values are integers
times 2^-p, so the float sums are exact (see `_plan`). cv2.transpose turns the width pass into a
row pass.

Known torch quirk: for a 1x1 output from a larger, channels-first input, the AVX kernel hits an
internal assert (a torch bug). HF never asks for 1x1. Here such a call returns what torch's
generic kernel computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

__all__ = ["resize_bicubic_antialias"]

_A = -0.5  # Keys cubic coefficient torch uses for antialias=True (PIL-compatible)
_BLOCK = 8  # outputs per GEMM block: larger blocks waste flops on zeros, smaller ones cost calls
_GROUP_ELEMS = 1 << 19  # float elements gathered per GEMM batch: keeps the working set in cache


def _cubic(x: np.ndarray) -> np.ndarray:
    """torch's aa_filter for bicubic, written in the same operation order for the same float64 bits."""
    x = np.abs(x)
    near = ((_A + 2) * x - (_A + 3)) * x * x + 1
    far = ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=64)
def _int_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """torch's int16 weights for one axis: (xmin, xsize, weights (n_out, taps) int64, precision)."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = math.ceil(support) * 2 + 1
    center = scale * (np.arange(n_out) + 0.5)
    # astype(int64) truncates toward zero, like torch's static_cast.
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xsize = np.clip(np.minimum((center + support + 0.5).astype(np.int64), n_in) - xmin, 0, taps)
    j = np.arange(taps)
    valid = j[None, :] < xsize[:, None]
    pos = (j[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5
    w = np.where(valid, _cubic(pos * invscale), 0.0)
    total = np.zeros(n_out)
    for k in range(taps):  # left-to-right like torch; np.sum's pairwise order can change the last bit
        total += w[:, k]
    nz = total != 0.0
    w[nz] /= total[nz, None]
    w_max = max(float(w[nz].max(initial=0.0)), 0.0)
    prec = 0
    while prec < 22 and int(0.5 + w_max * (1 << (prec + 1))) < (1 << 15):
        prec += 1
    v = w * (1 << prec)
    wi = np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int64)
    return xmin, xsize, wi, prec


@dataclass(frozen=True)
class _Plan:
    """Banded GEMM form of one axis pass: block b maps input rows win[b] to the _BLOCK outputs
    starting at b * _BLOCK (numpy has no integer GEMM; float BLAS is exact on these integers).

    mats holds the int weights times 2^-p, so the GEMM gives N / 2^p for the integer sum N. The
    float sum is exact, in any BLAS summation order, when every partial sum fits the mantissa.
    float32 is chosen only when the weights' L1 norm proves that. With the pixel shift (p <= 16),
    `acc + bias` is exact below 256, and larger values clip to 255 anyway, because rounding is
    monotonic. So clip then truncate is torch's `>> p` followed by its clamp.
    """

    dtype: type
    shift: int  # subtracted from pixels before the GEMM; halves the worst-case partial sum
    bias: np.ndarray  # (n_out, 1): 2^(p-1) (torch's rounding term) plus shift * rowsum, times 2^-p
    win: np.ndarray  # (blocks, span) input rows per block
    mats: np.ndarray  # (blocks, _BLOCK, span) scaled weights


@lru_cache(maxsize=64)
def _plan(n_in: int, n_out: int) -> _Plan:
    """Weights as banded GEMM blocks, in the cheapest float type that is provably exact for them."""
    xmin, xsize, wi, prec = _int_weights(n_in, n_out)
    l1 = int(np.abs(wi).sum(axis=1).max())
    rowsum = wi.sum(axis=1)
    half = 1 << (prec - 1)  # torch's rounding term; prec >= 1 always
    if 255 * l1 + half < (1 << 24):  # every partial sum and the biased result fit float32's 24 bits
        dtype, shift = np.float32, 0
    elif prec <= 16 and 128 * l1 < (1 << 24) and 128 * int(np.abs(rowsum).max()) + half < (1 << 24):
        dtype, shift = np.float32, 128  # pixels in [-128, 127]: the case of ~2x-4x downscales
    else:
        dtype, shift = np.float64, 0  # exact for any torch weights (|sum| < 2^31 << 2^53)
    unit = 2.0**-prec
    bias = ((half + shift * rowsum) * unit).astype(dtype)[:, None]

    blocks = -(-n_out // _BLOCK)
    first = np.arange(blocks) * _BLOCK
    lo = np.minimum.reduceat(xmin, first)
    hi = np.maximum.reduceat(xmin + xsize, first)
    span = int((hi - lo).max())
    lo = np.minimum(lo, n_in - span)  # equal spans so one batched matmul covers all blocks
    win = lo[:, None] + np.arange(span)[None, :]
    mats = np.zeros((blocks, _BLOCK, span), dtype)
    out_idx = np.arange(n_out)
    blk, row = np.divmod(out_idx, _BLOCK)
    offset = xmin - lo[blk]
    for k in range(wi.shape[1]):
        sel = k < xsize
        mats[blk[sel], row[sel], offset[sel] + k] = wi[sel, k] * unit
    return _Plan(dtype, shift, bias, win, mats)


class _RowPass:
    """One axis pass over (n_in, m) uint8 rows -> (n_out, m) uint8; buffers are reused per frame."""

    def __init__(self, n_in: int, n_out: int, m: int) -> None:
        self.plan = p = _plan(n_in, n_out)
        self.n_out, self.m = n_out, m
        blocks, span = p.win.shape
        self.group = g = max(1, min(blocks, _GROUP_ELEMS // (span * m)))
        self.gathered = np.empty((g, span, m), np.uint8)
        self.xf = np.empty((g, span, m), p.dtype)
        self.acc = np.empty((g, _BLOCK, m), p.dtype)

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        p, g, m = self.plan, self.group, self.m
        for b0 in range(0, len(p.win), g):
            b1 = min(b0 + g, len(p.win))
            n = b1 - b0
            r0, r1 = b0 * _BLOCK, min(b1 * _BLOCK, self.n_out)
            gathered, xf = self.gathered[:n], self.xf[:n]
            np.take(x, p.win[b0:b1], axis=0, out=gathered, mode="clip")  # 'raise' would buffer out
            np.copyto(xf, gathered)
            if p.shift:
                np.subtract(xf, p.shift, out=xf)
            acc = np.matmul(p.mats[b0:b1], xf, out=self.acc[:n]).reshape(n * _BLOCK, m)[: r1 - r0]
            if p.shift:
                np.add(acc, p.bias[r0:r1], out=acc)
            else:  # constant bias: a scalar add is several times faster than a broadcast column
                np.add(acc, p.bias[0, 0], out=acc)
            np.clip(acc, 0, 255, out=acc)
            np.copyto(out[r0:r1], acc, casting="unsafe")  # truncation == floor on [0, 255]
        return out


def resize_bicubic_antialias(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (T, H, W, 3) uint8 RGB frames to (T, height, width, 3) uint8, bit-identical to HF.

    HF's Qwen video processors call torchvision's resize(BICUBIC, antialias=True) on the uint8
    tensor; this returns the same bytes. At the same size the input is returned as is (no copy),
    as torchvision does.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.dtype} {frames.shape}")
    height, width = int(height), int(width)
    t, h_in, w_in, c = frames.shape
    if (height, width) == (h_in, w_in):
        return frames
    if min(height, width, h_in, w_in) < 1:
        raise ValueError(f"cannot resize {h_in}x{w_in} frames to {height}x{width}")

    out = np.empty((t, height, width, c), np.uint8)
    wpass = _RowPass(w_in, width, h_in * c) if width != w_in else None
    hpass = _RowPass(h_in, height, width * c) if height != h_in else None
    if wpass is not None:
        xt = np.empty((w_in, h_in, c), np.uint8)
        wide = np.empty((width, h_in, c), np.uint8)
        mid = np.empty((h_in, width, c), np.uint8)
    for i in range(t):
        x = np.ascontiguousarray(frames[i])
        if wpass is not None:
            # Transposed, the width pass contracts rows, which BLAS and the row gather like.
            xt = cv2.transpose(x, dst=xt)
            wpass(xt.reshape(w_in, h_in * c), wide.reshape(width, h_in * c))
            dst = out[i] if hpass is None else mid
            x = cv2.transpose(wide, dst=dst)
            if not np.may_share_memory(x, dst):  # cv2 fills a matching dst in place; guard anyway
                dst[...] = x
                x = dst
        if hpass is not None:
            hpass(x.reshape(h_in, width * c), out[i].reshape(height, width * c))
    return out
