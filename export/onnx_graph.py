"""Building ONNX graphs by hand from HF modules, with ONNX Runtime's fused operators.

The decoder (`export/onnx_decoder.py`) and the families' vision towers (`export/qwen3_vl.py`,
`export/qwen2_5_vl.py`) are written node by node rather than traced: a trace spells each
LayerNorm + residual add, each GELU, each rotary and each attention as a chain of small ops, and
on the GPU every one of them is a kernel that reads and writes the whole activation. Here they are
single com.microsoft ops (SkipLayerNormalization, FastGelu, RotaryEmbedding, MultiHeadAttention,
GroupQueryAttention) that ONNX Runtime runs on both the CPU and CUDA providers.

The vision towers share one block structure (`vision_blocks`): norm1 -> attention -> norm2 ->
MLP with residual adds, where each residual add is fused with the norm that follows it and takes
the previous linear's bias, so a block's bias adds and norms are two kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from edgejudge.errors import InputError
from edgejudge.export.onnx_io import IR_VERSION, OPSET
from edgejudge.runtime.preprocess import VisionPreprocessing, normalize_table

MS_DOMAIN = "com.microsoft"


def as_numpy(t, dtype=np.float32) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(dtype, copy=False)


def tensor_type(dtype) -> int:
    from onnx import TensorProto

    return TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT


class Graph:
    """A tiny onnx.helper wrapper: unique names, initializers in one float type, nodes."""

    def __init__(self, dtype=np.float32):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.dtype = dtype
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.numpy_helper.from_array(np.require(array, requirements="C"), name))
        return name

    def weight(self, name: str, tensor) -> str:
        """A model weight (torch tensor) as an initializer in the graph's float type."""
        return self.const(name, as_numpy(tensor, self.dtype))

    def op(self, op_type: str, inputs, outputs=1, domain: str = "", name: str | None = None, **attrs):
        node_name = name or self.name(op_type)
        outs = [f"{node_name}/out{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def model(self, name: str, inputs, outputs, extra_inits=()):
        """The ModelProto of the nodes so far (opset `OPSET` + com.microsoft 1, IR `IR_VERSION`)."""
        helper = self.helper
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=list(extra_inits) + self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                                  producer_name="edgejudge")
        proto.ir_version = IR_VERSION
        return proto


def linear(g: Graph, x: str, module, name: str, bias: bool = True) -> str:
    """y = x @ W.T (+ b) for an HF nn.Linear. The MatMul keeps `name`, so the weight-only quantizer
    turns it into MatMulNBits and the int8-layer choice can address it by layer. `bias` False leaves
    the bias to the caller (a fused op that takes it)."""
    y = g.op("MatMul", [x, g.const(f"{name}.weight_t", as_numpy(module.weight, g.dtype).T)], name=name)
    if bias and module.bias is not None:
        y = g.op("Add", [y, g.weight(f"{name}.bias", module.bias)], name=f"{name}/bias")
    return y


def cast(g: Graph, x: str, dtype, name: str) -> str:
    """x in `dtype`; nothing when the graph's float type is float32 throughout."""
    if g.dtype == np.float32:
        return x
    return g.op("Cast", [x], name=name, to=tensor_type(dtype))


def _norm_params(g: Graph, module, name: str) -> tuple[list[str], float]:
    """[gamma(, beta)] of an HF LayerNorm or RMSNorm, and its epsilon."""
    params = [g.weight(f"{name}.weight", module.weight)]
    if getattr(module, "bias", None) is not None:
        params.append(g.weight(f"{name}.bias", module.bias))
    return params, float(getattr(module, "eps", None) or module.variance_epsilon)


def norm(g: Graph, x: str, module, name: str) -> str:
    """An HF LayerNorm (with bias) or RMSNorm over the last axis, computed in float32."""
    params, eps = _norm_params(g, module, name)
    op = "LayerNormalization" if len(params) == 2 else "SimplifiedLayerNormalization"
    return g.op(op, [x, *params], name=name, axis=-1, epsilon=eps, stash_type=1)


def skip_norm(g: Graph, x: str, stream: str, module, bias, name: str) -> tuple[str, str]:
    """(norm(stream + x + bias), stream + x + bias): a residual add fused with the norm after it;
    `bias` (a torch tensor or None) is the bias of the linear that produced `x`."""
    params, eps = _norm_params(g, module, name)
    inputs = [x, stream, *params]
    if bias is not None:
        inputs.append(g.weight(f"{name}.skip_bias", bias))
    op = "SkipLayerNormalization" if len(params) == 2 else "SkipSimplifiedLayerNormalization"
    outs = [f"{name}/normed", "", "", f"{name}/sum"]
    g.op(op, inputs, outs, domain=MS_DOMAIN, name=name, epsilon=eps)
    return outs[0], outs[3]


def patch_embed(g: Graph, proj, pp: VisionPreprocessing, name: str = "patch_embed") -> str:
    """HF's vision patch embedding (a Conv3d whose kernel equals its stride, so a linear) of the
    graph input `patches` (G, S, C*T*P*P): uint8 levels in the processor's patch order, normalized
    here by looking each one up in the checkpoint's `normalize_table` (flattened, each column's
    index offset by 256 x its channel). Uploading levels instead of float32 values is a quarter of
    the bytes (W1: 77 MB a decision), and the lookup is exact: the table cast once to the graph's
    float type holds the bits of each HF float32 value cast to it, as HF's fp16 model does."""
    from onnx import TensorProto

    patch_dim = proj.weight[0].numel()
    if pp.patch_dim != patch_dim:
        raise InputError(f"the preprocessor makes {pp.patch_dim}-value patches, the vision tower takes {patch_dim}")
    channel = np.arange(patch_dim) // (pp.temporal_patch_size * pp.patch_size**2)  # columns: channel, time, pixels
    index = g.op("Add", [g.op("Cast", ["patches"], name="patches/to_int32", to=TensorProto.INT32),
                         g.const(f"{name}.channel_offsets", (256 * channel).astype(np.int32))], name="patches/index")
    table = g.const(f"{name}.normalize_table", normalize_table(pp).astype(g.dtype).reshape(-1))
    pixels = g.op("Gather", [table, index], name="patches/normalize", axis=0)
    weight = as_numpy(proj.weight, g.dtype).reshape(proj.weight.shape[0], -1).T
    x = g.op("MatMul", [pixels, g.const(f"{name}.weight_t", weight)], name=name)
    if proj.bias is not None:
        x = g.op("Add", [x, g.weight(f"{name}.bias", proj.bias)], name=f"{name}/bias")
    return x


# ONNX Runtime's CUDA RotaryEmbedding runs one thread block per (token, head) with one thread per
# value of the head, and takes heads of at most 1,024 values.
ROTARY_MAX_WIDTH = 1024


def rotary_span(heads: int, head_dim: int) -> int:
    """How many attention heads one RotaryEmbedding head covers in the vision graphs: the most
    that divide `heads` in at most ROTARY_MAX_WIDTH values (Qwen3-VL: 16 of 64, Qwen2.5-VL: 8 of
    80). With 64-value heads the kernel's blocks are 64 threads, and W1's 12,544 patches x 16
    heads made 200,704 of them per rotary: 6.0 ms of a W1 decision's device time on the H100."""
    return max(n for n in range(1, heads + 1) if heads % n == 0 and n * head_dim <= ROTARY_MAX_WIDTH)


def interleaved_rows(heads: int, head_dim: int) -> np.ndarray:
    """The order of a q or k linear's output rows that puts each head's rotate-half pairs
    (j, j + head_dim / 2) side by side, at (2j, 2j + 1), heads kept in place."""
    half = head_dim // 2
    within = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)
    return (np.arange(heads)[:, None] * head_dim + within).reshape(-1)


def vision_attention(g: Graph, x: str, attn, heads: int, rotary: tuple[str, str, str], name: str,
                     attention_bias: str | None = None) -> tuple[str, object]:
    """A Qwen vision attention (fused `qkv`, `proj`) over each group (batch row) of `x` (G, S,
    hidden): `proj`'s output without its bias, and that bias (the next skip_norm adds it).

    q, k and v are three linears on the rows of HF's fused `qkv` weight: a Split of one fused
    output copies all of it, and on the H100 the three GEMMs (with their bias adds) took 0.15 ms
    against 0.21 for the fused GEMM and the Split (fp16, W1's 41 groups of 196 patches).

    The 2D rotary runs in the graph's float type on tables in that type; `rotary` = (start
    position, cos, sin) from `vision_rotary`. HF's fp16 tower casts q and k to float32 for the
    rotary and back: in fp16 graphs those were four Cast kernels a block, 2.3 ms of a W1
    decision's device time on the H100 (2026-11-23), for a difference of about one fp16 rounding in
    q and k (the tables' own rounding to fp16). The rotary takes `rotary_span` heads at a time:
    q's and k's rows are reordered inside each head so that HF's rotate-half pairs are adjacent
    (`interleaved_rows`), rotated as interleaved pairs against tables repeated once per head. The
    same order in q and k leaves every attention score a sum of the same products.

    v's bias is added after `proj` (as `proj.weight @ bias`): a softmax row sums to 1, so a
    bias on every value comes out of the attention unchanged. MultiHeadAttention computes the
    softmax in float32; `attention_bias` (1, 1, S, S) in the graph's float type masks keys
    (Qwen2.5-VL's windows)."""
    import torch

    hidden = attn.qkv.in_features
    head_dim = hidden // heads
    weight, bias = attn.qkv.weight, attn.qkv.bias
    order = torch.from_numpy(interleaved_rows(heads, head_dim))
    rows = [order, hidden + order, torch.arange(2 * hidden, 3 * hidden)]  # q, k reordered; v as it is
    q, k, v = (linear(g, x, SimpleNamespace(weight=weight[r], bias=None if bias is None or part == "v" else bias[r]),
                      f"{name}.{part}") for part, r in zip("qkv", rows))
    start, cos, sin = rotary
    span = rotary_span(heads, head_dim)
    rotated = [g.op("RotaryEmbedding", [t, start, cos, sin], domain=MS_DOMAIN, name=f"{name}.{part}_rotary",
                    num_heads=heads // span, interleaved=1) for part, t in (("q", q), ("k", k))]
    inputs = [*rotated, v] + (["", "", attention_bias] if attention_bias else [])
    out = g.op("MultiHeadAttention", inputs, domain=MS_DOMAIN, name=f"{name}.mha", num_heads=heads,
               scale=float(attn.scaling))
    proj = attn.proj
    out_bias = proj.bias
    if bias is not None:  # in float64, then rounded once to the graph's type
        v_bias = bias[2 * hidden:].double()
        out_bias = proj.weight.double() @ v_bias + (0 if proj.bias is None else proj.bias.double())
    return linear(g, out, proj, f"{name}.proj", bias=False), out_bias


def vision_rotary(g: Graph, heads: int, head_dim: int) -> tuple[str, str, str]:
    """(start position 0, cos, sin) for `vision_attention` from the graph inputs `cos`, `sin` (S,
    head_dim): the tables' first halves (HF's two halves are equal), repeated for the
    `rotary_span` heads one rotary head covers."""
    starts, ends, axes = (g.const(f"rotary.{n}", np.array([v], np.int64)) for n, v in
                          (("start", 0), ("half", head_dim // 2), ("axis", 1)))
    repeats = g.const("rotary.repeats", np.array([1, rotary_span(heads, head_dim)], np.int64))
    tables = [g.op("Tile", [g.op("Slice", [t, starts, ends, axes], name=f"{t}/half"), repeats], name=f"{t}/per_head")
              for t in ("cos", "sin")]
    return g.const("rotary.position", np.zeros(1, np.int64)), tables[0], tables[1]


def vision_blocks(g: Graph, x: str, blocks, final_norm, heads: int, rotary: tuple[str, str, str],
                  mlp: Callable[[Graph, str, object, str], tuple[str, object]],
                  attention_bias: Callable[[int], str | None] = lambda layer: None) -> tuple[str, list[str]]:
    """Run `blocks` (HF vision blocks: norm1, attn, norm2, mlp) on the stream `x` (G, S, hidden).

    `mlp(g, normed, block, name)` returns the MLP's output without its last bias, and that bias.
    Returns `final_norm`(stream after the last block) and the stream after each block."""
    normed = norm(g, x, blocks[0].norm1, "blocks.0.norm1")
    stream, after = x, []
    for i, block in enumerate(blocks):
        p = f"blocks.{i}"
        attn, attn_bias = vision_attention(g, normed, block.attn, heads, rotary, f"{p}.attn", attention_bias(i))
        normed, stream = skip_norm(g, attn, stream, block.norm2, attn_bias, f"{p}.norm2")
        out, out_bias = mlp(g, normed, block, f"{p}.mlp")
        last = i + 1 == len(blocks)
        normed, stream = skip_norm(g, out, stream, final_norm if last else blocks[i + 1].norm1, out_bias,
                                   "final_norm" if last else f"blocks.{i + 1}.norm1")
        after.append(stream)
    return normed, after


def merged_rows(g: Graph, x: str, hidden: int, merge: int, name: str) -> str:
    """(G, S, hidden) -> (G, S / merge^2, merge^2 * hidden): each merged unit's rows side by side
    (the processor orders a unit's patches consecutively)."""
    shape = g.const(f"{name}.shape", np.array([0, -1, hidden * merge * merge], np.int64))
    return g.op("Reshape", [x, shape], name=name)


def merger_mlp(g: Graph, x: str, fc1, fc2, name: str) -> str:
    """fc2(GELU(fc1(x))) with the exact (erf) GELU, as the Qwen patch mergers' nn.GELU()."""
    h = g.op("BiasGelu", [linear(g, x, fc1, f"{name}.fc1", bias=False), g.weight(f"{name}.fc1.bias", fc1.bias)],
             domain=MS_DOMAIN, name=f"{name}.gelu")
    return linear(g, h, fc2, f"{name}.fc2")
