"""The text decoder of the Qwen-VL families as ONNX graphs built from ONNX Runtime's fused
operators (not traced). One builder serves Qwen3-VL and Qwen2.5-VL: it reads what a layer has from
the HF modules (q/k/v biases: Qwen2.5-VL; q_norm/k_norm: Qwen3-VL) and takes the two family facts
it cannot see there from the family files: the number of DeepStack taps (`export/qwen3_vl.py`,
`export/qwen2_5_vl.py`) and the M-RoPE frequency layout (`runtime/<family>.py`), which only the
runtime's cos/sin tables need (`decoder.npz`).

Float type: "fp32" or "fp16" for weights, activations and the KV cache. In fp16 graphs the
residual stream and the norms stay fp32 (`_residual_norm`), GroupQueryAttention's softmax runs in
fp32 inside the kernel, and logits leave the LM head as float32.

Written into one folder:

- `decoder.onnx` (+ `decoder.onnx.data`): the decoder layers and the final norm.
  Inputs: `inputs_embeds` (B, S, hidden), `cos`, `sin` (B, S, head_dim) (the family's M-RoPE
  tables, computed by the runtime from the 3D positions), for Qwen3-VL `deepstack` (n_taps, B, S, hidden)
  (visual DeepStack features at the video-token positions, zeros elsewhere; added to the hidden
  states after decoder layer i for i < n_taps, as HF's `_deepstack_process`), `seqlens_k` (B,)
  int32 (total length - 1, GroupQueryAttention's convention), `total_sequence_length` () int32,
  and per layer `past_key_i`, `past_value_i` (B, kv_heads, past_len, head_dim).
  Outputs: `hidden` (B, S, hidden) after the final norm, `present_key_i`, `present_value_i`
  (B, kv_heads, past_len + S, head_dim).
  Ops: SimplifiedLayerNormalization (RMSNorm: input norm of layer 0, Qwen3-VL's q_norm/k_norm over head_dim)
  and com.microsoft SkipSimplifiedLayerNormalization (residual add + the next RMSNorm, its
  4th output is the residual sum), MatMul for every linear (`_linear`, the single place where
  MatMulNBits goes in when quantizing), com.microsoft RotaryEmbedding on q and k (each token's
  own M-RoPE angles: `_rotary_table`), com.microsoft GroupQueryAttention (do_rotary=0, causal,
  GQA), SwiGLU (Sigmoid * x * up).
- `decoder_cuda.onnx` (`write_cuda_decoder`, written by `export/onnx.py` after quantization): the
  same graph and weights with the rotary inside GroupQueryAttention, which the runtime loads on
  CUDA only.
- `lm_head.onnx`: `hidden` (B, K, hidden) -> `logits` (B, K, vocab) float32, a Gemm with transB=1
  against the (vocab, hidden) table. Its weight is not copied: the graph's external data points
  into `embed.npy` (tied embeddings: Qwen3-VL-4B) or `lm_head.npy` (untied: Qwen2.5-VL-7B) at
  the offset of the array data. `export/onnx.py` may rewrite it as an int8 MatMulNBits head.
- `cache_rows.onnx`: `rows` (N,) int64 and per layer `key_i`, `value_i` (B, kv_heads, seq, head_dim)
  -> `key_i_rows`, `value_i_rows` (N, kv_heads, seq, head_dim), a Gather on axis 0 of every cache
  tensor: the runtime repeats a prefilled cache per candidate label on the device with it, where
  the cache lives, instead of copying it through the host.
- `splice.onnx` (`build_splice_graph`): the decoder's `inputs_embeds` (and DeepStack input)
  gathered from the prompt's text embeddings and the visual features on the device, where the
  vision encoder left them: the features never travel through the host.
- `embed.npy`: the (vocab, hidden) token-embedding table in the float type, for the runtime's
  lookup of text tokens (memory-mapped, numpy only).
- `decoder.npz`: what the runtime needs besides the graphs (rotary inverse frequencies, mrope
  section, sizes).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np

from edgejudge.export.onnx_graph import MS_DOMAIN, Graph, as_numpy, cast, linear, tensor_type
from edgejudge.export.onnx_io import save_onnx
from edgejudge.runtime.decoder import CUDA_DECODER_NAME

DECODER_NAME, LM_HEAD_NAME, EMBED_NAME, SIDECAR_NAME = "decoder.onnx", "lm_head.onnx", "embed.npy", "decoder.npz"
CACHE_ROWS_NAME, SPLICE_NAME = "cache_rows.onnx", "splice.onnx"
FLOAT_TYPES = {"fp32": np.float32, "fp16": np.float16}


def _rms_norm(g: Graph, x: str, weight, eps: float, name: str) -> str:
    return g.op("SimplifiedLayerNormalization", [x, g.weight(f"{name}.weight", weight)], name=name, axis=-1,
                epsilon=float(eps), stash_type=1)


def _residual_norm(g: Graph, x: str, residual: str | None, weight, eps: float, name: str) -> tuple[str, str]:
    """(rms_norm(x + residual) * weight in the graph's float type, x + residual in float32).

    The residual stream stays float32 in fp16 graphs: each layer's output is added to it in
    float32 and only the normed activations the linears read are fp16. HF's fp16 model rounds the
    stream to fp16 after every add, an error that grows with depth; a float32 stream removes it
    for one (S, hidden) float32 add per layer. `residual` None: the first norm, x is the stream.
    """
    x32 = cast(g, x, np.float32, f"{name}/x_fp32")
    weight32 = g.const(f"{name}.weight", as_numpy(weight, np.float32))
    if residual is None:
        normed = g.op("SimplifiedLayerNormalization", [x32, weight32], name=name, axis=-1, epsilon=float(eps),
                      stash_type=1)
        stream = x32
    else:
        outs = [f"{name}/normed", "", "", f"{name}/sum"]
        g.op("SkipSimplifiedLayerNormalization", [x32, residual, weight32], outs, domain=MS_DOMAIN, name=name,
             epsilon=float(eps))
        normed, stream = outs[0], outs[3]
    return cast(g, normed, g.dtype, f"{name}/to_float_type"), stream


def _head_norm(g: Graph, x: str, heads_shape: str, flat_shape: str, weight, eps: float, name: str) -> str:
    """RMSNorm over head_dim of each head of x (B, S, heads * D), back in (B, S, heads * D)."""
    normed = _rms_norm(g, g.op("Reshape", [x, heads_shape], name=f"{name}/to_heads"), weight, eps, name)
    return g.op("Reshape", [normed, flat_shape], name=f"{name}/flatten")


def _rotary_table(g: Graph, head_dim: int) -> tuple[str, str, str]:
    """(row index, cos table, sin table) for com.microsoft RotaryEmbedding from the graph inputs
    `cos`, `sin` (B, S, head_dim): every token of the batch is one row of the tables ((B * S,
    head_dim / 2), the first halves: the two halves are equal) and token (b, s) reads row b * S + s,
    so each token keeps its own M-RoPE angles. One fused rotary kernel per q and k then replaces
    the rotate-half chain (Split, Neg, Concat, two Mul, Add), and the table costs a few tiny ops a
    run. The row index is counted on the device (a float32 CumSum over ones, exact to 2**24
    tokens) from `cos` itself: no shape arithmetic on the host, so the graph stays capturable as a
    CUDA graph."""
    from onnx import TensorProto

    start, half, last, rows = (g.const(f"rotary.{n}", np.array(v, np.int64)) for n, v in
                               (("start", [0]), ("half", [head_dim // 2]), ("last", [-1]),
                                ("rows", [-1, head_dim // 2])))
    tables = [g.op("Reshape", [g.op("Slice", [t, start, half, last], name=f"{t}/half"), rows], name=f"{t}/table")
              for t in ("cos", "sin")]
    one = g.op("Slice", ["cos", start, g.const("rotary.one", np.array([1], np.int64)), last], name="rotary/one_column")
    zeros = g.op("Mul", [cast(g, one, np.float32, "rotary/fp32"), g.const("rotary.zero", np.zeros((), np.float32))],
                 name="rotary/zeros")
    ones = g.op("Add", [zeros, g.const("rotary.unit", np.ones((), np.float32))], name="rotary/ones")  # (B, S, 1)
    axis0, axis1 = (g.const(f"rotary.axis{a}", np.array(a, np.int64)) for a in (0, 1))
    within = g.op("CumSum", [ones, axis1], name="rotary/within_row", exclusive=1)  # s
    per_row = g.op("ReduceSum", [ones, g.const("rotary.axes1", np.array([1], np.int64))], name="rotary/row_length")
    before = g.op("CumSum", [per_row, axis0], name="rotary/rows_before", exclusive=1)  # b * S
    index = g.op("Add", [within, before], name="rotary/index")  # (B, S, 1)
    index = g.op("Squeeze", [index, g.const("rotary.axes2", np.array([2], np.int64))], name="rotary/index_2d")
    index = g.op("Cast", [index], name="rotary/index_int64", to=TensorProto.INT64)
    return index, tables[0], tables[1]


def _rotary(g: Graph, x: str, table: tuple[str, str, str], heads: int, name: str) -> str:
    """x (B, S, heads * D) -> HF's rotate-half rotary with each token's own angles (`_rotary_table`)."""
    index, cos, sin = table
    return g.op("RotaryEmbedding", [x, index, cos, sin], domain=MS_DOMAIN, name=name, num_heads=heads, interleaved=0)


def _text_config(model):
    config = model.config
    return getattr(config, "text_config", config)


def build_decoder_graph(model, deepstack_taps: int, float_type: str = "fp32"):
    """The decoder ModelProto (weights as initializers) for an HF Qwen-VL ForConditionalGeneration."""
    from onnx import TensorProto, helper

    tc = _text_config(model)
    lm = model.model.language_model
    hidden, heads, kv_heads = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads
    head_dim = getattr(tc, "head_dim", None) or hidden // heads
    n_layers, eps = tc.num_hidden_layers, float(tc.rms_norm_eps)
    if deepstack_taps > n_layers:
        raise ValueError(f"{deepstack_taps} DeepStack taps for {n_layers} decoder layers")
    if tc.hidden_act != "silu":
        raise NotImplementedError(f"hidden_act {tc.hidden_act!r}")

    g = Graph(FLOAT_TYPES[float_type])
    q_heads = g.const("shape.q_heads", np.array([0, 0, heads, head_dim], np.int64))
    kv_heads_shape = g.const("shape.kv_heads", np.array([0, 0, kv_heads, head_dim], np.int64))
    flat = g.const("shape.flat", np.array([0, 0, -1], np.int64))
    table = _rotary_table(g, head_dim)
    taps = [g.op("Gather", ["deepstack", g.const(f"tap.{i}", np.array(i, np.int64))], name=f"deepstack/{i}", axis=0)
            for i in range(deepstack_taps)]

    layers = lm.layers
    x, residual = _residual_norm(g, "inputs_embeds", None, layers[0].input_layernorm.weight, eps,
                                 "layers.0.input_layernorm")
    for i, layer in enumerate(layers):
        p = f"layers.{i}"
        attn = layer.self_attn
        q = linear(g, x, attn.q_proj, f"{p}.q_proj")
        k = linear(g, x, attn.k_proj, f"{p}.k_proj")
        v = linear(g, x, attn.v_proj, f"{p}.v_proj")
        if hasattr(attn, "q_norm"):  # Qwen3-VL: RMSNorm over head_dim of each head, before the rotary
            q = _head_norm(g, q, q_heads, flat, attn.q_norm.weight, eps, f"{p}.q_norm")
            k = _head_norm(g, k, kv_heads_shape, flat, attn.k_norm.weight, eps, f"{p}.k_norm")
        q = _rotary(g, q, table, heads, f"{p}.q_rotary")
        k = _rotary(g, k, table, kv_heads, f"{p}.k_rotary")
        outs = [f"{p}.attn/out", f"present_key_{i}", f"present_value_{i}"]
        g.op("GroupQueryAttention", [q, k, v, f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length"],
             outs, domain=MS_DOMAIN, name=f"{p}.attn", num_heads=heads, kv_num_heads=kv_heads,
             scale=float(attn.scaling), do_rotary=0)
        o = linear(g, outs[0], attn.o_proj, f"{p}.o_proj")
        x, residual = _residual_norm(g, o, residual, layer.post_attention_layernorm.weight, eps,
                                     f"{p}.post_attention_layernorm")
        mlp = layer.mlp
        gate = linear(g, x, mlp.gate_proj, f"{p}.mlp.gate_proj")
        up = linear(g, x, mlp.up_proj, f"{p}.mlp.up_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{p}.mlp.sigmoid")], name=f"{p}.mlp.silu")
        y = linear(g, g.op("Mul", [act, up], name=f"{p}.mlp.swiglu"), mlp.down_proj, f"{p}.mlp.down_proj")
        if i < deepstack_taps:  # HF: hidden = (residual + mlp) ; hidden[visual] += deepstack[i]
            y = g.op("Add", [y, taps[i]], name=f"{p}.deepstack_add")
        if i + 1 < n_layers:
            x, residual = _residual_norm(g, y, residual, layers[i + 1].input_layernorm.weight, eps,
                                         f"layers.{i + 1}.input_layernorm")
        else:
            hidden_out, _ = _residual_norm(g, y, residual, lm.norm.weight, eps, "norm")
    g.op("Identity", [hidden_out], ["hidden"], name="hidden")

    f, i32 = tensor_type(g.dtype), TensorProto.INT32
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", f, ["batch", "seq", hidden]),
        helper.make_tensor_value_info("cos", f, ["batch", "seq", head_dim]),
        helper.make_tensor_value_info("sin", f, ["batch", "seq", head_dim]),
    ]
    if deepstack_taps:
        inputs.append(helper.make_tensor_value_info("deepstack", f, [deepstack_taps, "batch", "seq", hidden]))
    inputs += [
        helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", i32, []),
    ]
    outputs = [helper.make_tensor_value_info("hidden", f, ["batch", "seq", hidden])]
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", f, ["batch", kv_heads, "past_seq", head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", f,
                                                         ["batch", kv_heads, "total_seq", head_dim]))
    return g.model(f"{model.config.model_type}_text_decoder", inputs, outputs)


def write_cuda_decoder(decoder_path: Path) -> Path:
    """`decoder_cuda.onnx` beside `decoder_path` (written, and quantized, first): the same layers and
    weights (its initializers point into the same .data file), with each layer's two
    RotaryEmbedding nodes folded into its GroupQueryAttention (`do_rotary`: the per-token tables
    as cos/sin caches, each token's row as its position id). On the H100 one layer's rotary and
    attention took 0.353 ms against 0.454 (W1's 2 x 1,830 tokens, benchmarks/fusions_cuda.py).

    CUDA only: ONNX Runtime's CPU GroupQueryAttention counts a prompt's positions from
    `seqlens_k` and ignores `position_ids`, which would give every row the first row's angles.
    GroupQueryAttention also wants a cos/sin cache of at least the cache's length, while the
    tables have one row per token of the run: rows of `past_key_0` (never read) pad them, device
    ops only, so the graph stays capturable as a CUDA graph."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(decoder_path), load_external_data=False)
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    past = next(i for i in graph.input if i.name == "past_key_0")
    half = past.type.tensor_type.shape.dim[3].dim_value // 2
    for name, array in (("starts", [0, 0, 0, 0]), ("ends", [1, 1, 2**62, half]), ("rows", [-1, half])):
        graph.initializer.append(numpy_helper.from_array(np.array(array, np.int64), f"cuda_rotary.{name}"))
    padding = helper.make_node("Slice", ["past_key_0", "cuda_rotary.starts", "cuda_rotary.ends"],
                               ["cuda_rotary/padding_4d"], name="cuda_rotary/padding_4d")
    graph.node.append(padding)
    graph.node.append(helper.make_node("Reshape", ["cuda_rotary/padding_4d", "cuda_rotary.rows"],
                                       ["cuda_rotary/padding"], name="cuda_rotary/padding"))
    folded, tables = set(), None
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        q, k = producer[node.input[0]], producer[node.input[1]]
        if q.op_type != "RotaryEmbedding" or k.op_type != "RotaryEmbedding" or q.input[1:] != k.input[1:]:
            raise ValueError(f"{decoder_path}: {node.name} does not read q and k from RotaryEmbedding on one table")
        index, cos, sin = q.input[1:]
        if tables is None:
            tables = [f"cuda_rotary/{table}" for table in ("cos", "sin")]
            for table, padded in zip((cos, sin), tables):
                graph.node.append(helper.make_node("Concat", [table, "cuda_rotary/padding"], [padded], name=padded,
                                                   axis=0))
        node.input[0], node.input[1] = q.input[0], k.input[0]
        node.input.extend([*tables, index])  # after q, k, v, past, seqlens_k, total_sequence_length
        next(a for a in node.attribute if a.name == "do_rotary").i = 1
        folded.update((q.name, k.name))
    kept = [node for node in graph.node if node.name not in folded]
    del graph.node[:]
    graph.node.extend(kept)
    out = decoder_path.with_name(CUDA_DECODER_NAME)
    onnx.save_model(proto, str(out))
    return out


def build_cache_rows_graph(num_layers: int, kv_heads: int, head_dim: int, dtype=np.float32):
    """`rows` (N,) int64 and every layer's `key_i`, `value_i` (B, kv_heads, seq, head_dim) ->
    `key_i_rows`, `value_i_rows` (N, kv_heads, seq, head_dim): cache row rows[n] becomes row n."""
    from onnx import TensorProto, helper

    f = tensor_type(dtype)
    g = Graph(dtype)
    inputs = [helper.make_tensor_value_info("rows", TensorProto.INT64, ["rows"])]
    outputs = []
    for i in range(num_layers):
        for kind in ("key", "value"):
            name = f"{kind}_{i}"
            g.op("Gather", [name, "rows"], [f"{name}_rows"], name=f"{name}/gather", axis=0)
            inputs.append(helper.make_tensor_value_info(name, f, ["batch", kv_heads, "seq", head_dim]))
            outputs.append(helper.make_tensor_value_info(f"{name}_rows", f, ["rows", kv_heads, "seq", head_dim]))
    return g.model("cache_rows", inputs, outputs)


def build_splice_graph(hidden: int, deepstack_taps: int, dtype=np.float32):
    """The decoder's inputs assembled where the visual features are (the device). Each position
    takes a row of `text` (T, hidden), the prompt's token embeddings, or, where `vision_mask`
    (B, S) is set, a row of `features` (R, hidden), the visual rows: `text_index`, `feature_index`
    (B, S) int64 say which -> `inputs_embeds` (B, S, hidden). With DeepStack also `taps` (R',
    hidden) and `tap_index` (n_taps, B, S) -> `deepstack` (n_taps, B, S, hidden), zeros off the
    mask. Gathers and selects only: exact."""
    from onnx import TensorProto, helper

    f = tensor_type(dtype)
    g = Graph(dtype)
    mask = g.op("Unsqueeze", ["vision_mask", g.const("axes.-1", np.array([-1], np.int64))], name="mask")
    g.op("Where", [mask, g.op("Gather", ["features", "feature_index"], name="visual", axis=0),
                   g.op("Gather", ["text", "text_index"], name="text_rows", axis=0)], ["inputs_embeds"],
         name="inputs_embeds")
    inputs = [helper.make_tensor_value_info("text", f, ["text_rows", hidden]),
              helper.make_tensor_value_info("features", f, ["feature_rows", hidden]),
              helper.make_tensor_value_info("vision_mask", TensorProto.BOOL, ["batch", "seq"]),
              helper.make_tensor_value_info("text_index", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("feature_index", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("inputs_embeds", f, ["batch", "seq", hidden])]
    if deepstack_taps:
        g.op("Where", [mask, g.op("Gather", ["taps", "tap_index"], name="tap_rows", axis=0),
                       g.const("zero", np.zeros((), dtype))], ["deepstack"], name="deepstack")
        inputs += [helper.make_tensor_value_info("taps", f, ["tap_rows", hidden]),
                   helper.make_tensor_value_info("tap_index", TensorProto.INT64, [deepstack_taps, "batch", "seq"])]
        outputs.append(helper.make_tensor_value_info("deepstack", f, [deepstack_taps, "batch", "seq", hidden]))
    return g.model("splice", inputs, outputs)


def _external_tensor(name: str, dtype, shape: tuple[int, ...], location: str, offset: int):
    """A TensorProto whose data is read from `location` at byte `offset` (raw, C order)."""
    from onnx import TensorProto

    tensor = TensorProto()
    tensor.name, tensor.data_type = name, tensor_type(dtype)
    tensor.dims.extend(shape)
    tensor.data_location = TensorProto.EXTERNAL
    length = int(np.prod(shape)) * np.dtype(dtype).itemsize
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _head_io(hidden: int, vocab: int, dtype):
    from onnx import TensorProto, helper

    return ([helper.make_tensor_value_info("hidden", tensor_type(dtype), ["batch", "k", hidden])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "k", vocab])])


def _head_model(g: Graph, name: str, hidden: int, vocab: int, extra_inits=()):
    return g.model(name, *_head_io(hidden, vocab, g.dtype), extra_inits)


def _to_float32_logits(g: Graph, logits: str) -> None:
    from onnx import TensorProto

    if g.dtype == np.float32:
        g.op("Identity", [logits], ["logits"], name="logits")
    else:
        g.op("Cast", [logits], ["logits"], name="logits", to=TensorProto.FLOAT)


def build_lm_head_graph(hidden: int, vocab: int, weight_location: str, offset: int, dtype=np.float32):
    """`hidden` (B, K, hidden) -> `logits` (B, K, vocab) float32 = hidden @ W.T, W (vocab, hidden) read
    from `weight_location` (raw, C order, `dtype`) at byte `offset`."""
    g = Graph(dtype)
    weight = _external_tensor("lm_head.weight", dtype, (vocab, hidden), weight_location, offset)
    rows = g.const("shape.rows", np.array([-1, hidden], np.int64))
    flat = g.op("Reshape", ["hidden", rows], name="to_rows")
    logits2d = g.op("Gemm", [flat, "lm_head.weight"], name="lm_head", transB=1)
    out_shape = g.op("Concat", [g.op("Slice", [g.op("Shape", ["hidden"], name="shape"),
                                               g.const("s0", np.array([0], np.int64)),
                                               g.const("s2", np.array([2], np.int64))], name="batch_k"),
                                g.const("vocab", np.array([vocab], np.int64))], name="out_shape", axis=0)
    _to_float32_logits(g, g.op("Reshape", [logits2d, out_shape], name="to_logits"))
    return _head_model(g, "lm_head", hidden, vocab, [weight])


def build_quantizable_lm_head_graph(weight: np.ndarray):
    """The LM head as one MatMul on a constant W.T (what the weight-only quantizer rewrites to
    MatMulNBits, for an int8 head): `hidden` (B, K, hidden) -> float32 `logits`."""
    vocab, hidden = weight.shape
    g = Graph(weight.dtype.type)
    logits = g.op("MatMul", ["hidden", g.const("lm_head.weight_t", np.ascontiguousarray(weight.T))], name="lm_head")
    _to_float32_logits(g, logits)
    return _head_model(g, "lm_head", hidden, vocab)


def _npy_data_offset(path: Path, dtype) -> int:
    array = np.load(path, mmap_mode="r")
    if array.dtype != dtype or not array.flags.c_contiguous:
        raise ValueError(f"{path}: expected a C-ordered {np.dtype(dtype).name} array")
    return int(array.offset)


def sidecar_arrays(model, deepstack_taps: int, mrope_interleaved: bool) -> dict[str, np.ndarray]:
    tc = _text_config(model)
    lm = model.model.language_model
    rope = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return {
        "inv_freq": as_numpy(lm.rotary_emb.inv_freq),
        "attention_scaling": np.float32(lm.rotary_emb.attention_scaling),
        "mrope_section": np.asarray(rope["mrope_section"], np.int64),
        "mrope_interleaved": np.bool_(mrope_interleaved),
        "hidden_size": np.int64(tc.hidden_size),
        "head_dim": np.int64(head_dim),
        "num_layers": np.int64(tc.num_hidden_layers),
        "num_kv_heads": np.int64(tc.num_key_value_heads),
        "num_deepstack": np.int64(deepstack_taps),
        "vocab_size": np.int64(tc.vocab_size),
    }


def head_weight(model):
    """The LM head's (vocab, hidden) weight, and whether it is the embedding table itself."""
    embed = model.model.language_model.embed_tokens.weight
    return model.lm_head.weight, model.lm_head.weight.data_ptr() == embed.data_ptr()


def export_decoder_onnx(model, out_dir: str | Path, family: ModuleType, float_type: str = "fp32") -> Path:
    """Write decoder.onnx (+ .data), lm_head.onnx, cache_rows.onnx, splice.onnx, embed.npy (and
    lm_head.npy if untied) and decoder.npz into `out_dir`. `family` is the export family module (its DeepStack taps)."""
    import onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = FLOAT_TYPES[float_type]
    tc = _text_config(model)
    taps = family.deepstack_taps(model.config)

    proto = build_decoder_graph(model, taps, float_type)
    save_onnx(proto, out_dir / DECODER_NAME, {"edgejudge.component": f"{model.config.model_type}.decoder",
                                              "edgejudge.text_config": json.dumps(tc.to_dict())})
    np.save(out_dir / EMBED_NAME, as_numpy(model.model.language_model.embed_tokens.weight, dtype))
    weight, tied = head_weight(model)
    head_file = EMBED_NAME if tied else "lm_head.npy"
    if not tied:
        np.save(out_dir / head_file, as_numpy(weight, dtype))
    vocab, hidden = weight.shape
    head_proto = build_lm_head_graph(hidden, vocab, head_file, _npy_data_offset(out_dir / head_file, dtype), dtype)
    onnx.save_model(head_proto, str(out_dir / LM_HEAD_NAME))
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    onnx.save_model(build_cache_rows_graph(tc.num_hidden_layers, tc.num_key_value_heads, head_dim, dtype),
                    str(out_dir / CACHE_ROWS_NAME))
    onnx.save_model(build_splice_graph(tc.hidden_size, taps, dtype), str(out_dir / SPLICE_NAME))
    from edgejudge.runtime.model import FAMILIES  # the runtime family owns the rotary layout

    np.savez(out_dir / SIDECAR_NAME,
             **sidecar_arrays(model, taps, FAMILIES[model.config.model_type].MROPE_INTERLEAVED))
    return out_dir / DECODER_NAME
