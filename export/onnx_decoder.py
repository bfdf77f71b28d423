"""Qwen3-VL's text decoder as ONNX graphs built from ONNX Runtime's fused operators (not traced).

Written into one folder:

- `decoder.onnx` (+ `decoder.onnx.data`): the decoder layers and the final norm.
  Inputs: `inputs_embeds` (B, S, hidden), `cos`, `sin` (B, S, head_dim) (Qwen3-VL's interleaved
  M-RoPE tables, computed by the runtime from the 3D positions), `deepstack` (n_taps, B, S, hidden)
  (visual DeepStack features at the video-token positions, zeros elsewhere; added to the hidden
  states after decoder layer i for i < n_taps, as HF's `_deepstack_process`), `seqlens_k` (B,)
  int32 (total length - 1, GroupQueryAttention's convention), `total_sequence_length` () int32,
  and per layer `past_key_i`, `past_value_i` (B, kv_heads, past_len, head_dim).
  Outputs: `hidden` (B, S, hidden) after the final norm, `present_key_i`, `present_value_i`
  (B, kv_heads, past_len + S, head_dim).
  Ops: SimplifiedLayerNormalization (RMSNorm: input norm of layer 0, q_norm/k_norm over head_dim)
  and com.microsoft SkipSimplifiedLayerNormalization (residual add + the next RMSNorm, its
  4th output is the residual sum), MatMul for every linear (`_linear`, the single place where
  MatMulNBits goes later), explicit rotate-half rotary on q and k, com.microsoft
  GroupQueryAttention (do_rotary=0, causal, GQA), SwiGLU (Sigmoid * x * up).
- `lm_head.onnx`: `hidden` (B, K, hidden) -> `logits` (B, K, vocab), a Gemm with transB=1 against
  the (vocab, hidden) token-embedding table (tied embeddings). Its weight is not copied: the
  graph's external data points into `embed.npy` at the offset of the array data.
- `embed.npy`: the (vocab, hidden) float32 token-embedding table, for the runtime's lookup
  (memory-mapped, numpy only). An untied `lm_head.weight` goes to `lm_head.npy` instead.
- `decoder.npz`: what the runtime needs besides the graphs (rotary inverse frequencies, mrope
  section, sizes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgejudge.export.onnx_io import IR_VERSION, OPSET, save_onnx

MS_DOMAIN = "com.microsoft"
DECODER_NAME, LM_HEAD_NAME, EMBED_NAME, SIDECAR_NAME = "decoder.onnx", "lm_head.onnx", "embed.npy", "decoder.npz"


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class _Graph:
    """A tiny onnx.helper wrapper: unique names, initializers, nodes."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.numpy_helper.from_array(np.require(array, requirements="C"), name))
        return name

    def op(self, op_type: str, inputs, outputs=1, domain: str = "", name: str | None = None, **attrs):
        node_name = name or self.name(op_type)
        outs = [f"{node_name}/out{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs


def _linear(g: _Graph, x: str, weight: np.ndarray, name: str) -> str:
    """y = x @ weight.T for an HF (out, in) weight. THE single place to swap in MatMulNBits
    (com.microsoft, weight kept (N=out, K=in) blockwise-quantized) for the int4 export."""
    w = g.const(f"{name}.weight_t", weight.T.astype(np.float32))
    return g.op("MatMul", [x, w], name=name)


def _rms_norm(g: _Graph, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    w = g.const(f"{name}.weight", weight.astype(np.float32))
    return g.op("SimplifiedLayerNormalization", [x, w], name=name, axis=-1, epsilon=float(eps),
                stash_type=1)


def _skip_rms_norm(g: _Graph, x: str, skip: str, weight: np.ndarray, eps: float, name: str) -> tuple[str, str]:
    """(rms_norm(x + skip) * weight, x + skip)."""
    w = g.const(f"{name}.weight", weight.astype(np.float32))
    outs = [f"{name}/normed", "", "", f"{name}/sum"]
    g.op("SkipSimplifiedLayerNormalization", [x, skip, w], outs, domain=MS_DOMAIN, name=name, epsilon=float(eps))
    return outs[0], outs[3]


def _rotary(g: _Graph, x: str, cos4: str, sin4: str, heads_shape: str, flat_shape: str, half: str, name: str) -> str:
    """x (B, S, heads*D) -> rotate-half rotary with cos/sin (B, S, 1, D) -> (B, S, heads*D)."""
    x4 = g.op("Reshape", [x, heads_shape], name=f"{name}/to_heads")
    x1, x2 = g.op("Split", [x4, half], outputs=[f"{name}/x1", f"{name}/x2"], name=f"{name}/split", axis=-1)
    rot = g.op("Concat", [g.op("Neg", [x2], name=f"{name}/neg"), x1], name=f"{name}/rotate_half", axis=-1)
    y = g.op("Add", [g.op("Mul", [x4, cos4], name=f"{name}/mul_cos"),
                     g.op("Mul", [rot, sin4], name=f"{name}/mul_sin")], name=f"{name}/add")
    return g.op("Reshape", [y, flat_shape], name=f"{name}/flatten")


def _text_config(model):
    config = model.config
    return getattr(config, "text_config", config)


def build_decoder_graph(model):
    """The decoder ModelProto (weights as initializers) for an HF Qwen3VLForConditionalGeneration."""
    from onnx import TensorProto, helper

    tc = _text_config(model)
    lm = model.model.language_model
    hidden, heads, kv_heads = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads
    head_dim = getattr(tc, "head_dim", None) or hidden // heads
    n_layers, eps = tc.num_hidden_layers, float(tc.rms_norm_eps)
    n_taps = len(model.config.vision_config.deepstack_visual_indexes)
    if n_taps > n_layers:
        raise ValueError(f"{n_taps} DeepStack taps for {n_layers} decoder layers")

    g = _Graph()
    q_heads = g.const("shape.q_heads", np.array([0, 0, heads, head_dim], np.int64))
    kv_heads_shape = g.const("shape.kv_heads", np.array([0, 0, kv_heads, head_dim], np.int64))
    flat = g.const("shape.flat", np.array([0, 0, -1], np.int64))
    half = g.const("split.half", np.array([head_dim // 2, head_dim // 2], np.int64))
    axis2 = g.const("axes.2", np.array([2], np.int64))
    cos4 = g.op("Unsqueeze", ["cos", axis2], name="cos/unsqueeze")  # (B, S, 1, D): broadcasts over heads
    sin4 = g.op("Unsqueeze", ["sin", axis2], name="sin/unsqueeze")
    taps = [g.op("Gather", ["deepstack", g.const(f"tap.{i}", np.array(i, np.int64))], name=f"deepstack/{i}", axis=0)
            for i in range(n_taps)]

    residual = "inputs_embeds"
    layers = lm.layers
    x = _rms_norm(g, residual, _np(layers[0].input_layernorm.weight), eps, "layers.0.input_layernorm")
    for i, layer in enumerate(layers):
        p = f"layers.{i}"
        attn = layer.self_attn
        q = _linear(g, x, _np(attn.q_proj.weight), f"{p}.q_proj")
        k = _linear(g, x, _np(attn.k_proj.weight), f"{p}.k_proj")
        v = _linear(g, x, _np(attn.v_proj.weight), f"{p}.v_proj")
        for proj, bias in (("q", attn.q_proj.bias), ("k", attn.k_proj.bias), ("v", attn.v_proj.bias)):
            if bias is not None:
                raise NotImplementedError("attention_bias=True is not supported")
        # q_norm / k_norm: RMSNorm over head_dim of each head
        q = g.op("Reshape", [q, q_heads], name=f"{p}.q_norm/to_heads")
        q = _rms_norm(g, q, _np(attn.q_norm.weight), eps, f"{p}.q_norm")
        k = g.op("Reshape", [k, kv_heads_shape], name=f"{p}.k_norm/to_heads")
        k = _rms_norm(g, k, _np(attn.k_norm.weight), eps, f"{p}.k_norm")
        q = _rotary(g, q, cos4, sin4, q_heads, flat, half, f"{p}.q_rotary")
        k = _rotary(g, k, cos4, sin4, kv_heads_shape, flat, half, f"{p}.k_rotary")
        outs = [f"{p}.attn/out", f"present_key_{i}", f"present_value_{i}"]
        g.op("GroupQueryAttention", [q, k, v, f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length"],
             outs, domain=MS_DOMAIN, name=f"{p}.attn", num_heads=heads, kv_num_heads=kv_heads,
             scale=float(attn.scaling), do_rotary=0)
        o = _linear(g, outs[0], _np(attn.o_proj.weight), f"{p}.o_proj")
        x, residual = _skip_rms_norm(g, o, residual, _np(layer.post_attention_layernorm.weight), eps,
                                     f"{p}.post_attention_layernorm")
        mlp = layer.mlp
        if tc.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act {tc.hidden_act!r}")
        gate = _linear(g, x, _np(mlp.gate_proj.weight), f"{p}.mlp.gate_proj")
        up = _linear(g, x, _np(mlp.up_proj.weight), f"{p}.mlp.up_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{p}.mlp.sigmoid")], name=f"{p}.mlp.silu")
        y = _linear(g, g.op("Mul", [act, up], name=f"{p}.mlp.swiglu"), _np(mlp.down_proj.weight), f"{p}.mlp.down_proj")
        if i < n_taps:  # HF: hidden = (residual + mlp) ; hidden[visual] += deepstack[i]
            y = g.op("Add", [y, taps[i]], name=f"{p}.deepstack_add")
        if i + 1 < n_layers:
            x, residual = _skip_rms_norm(g, y, residual, _np(layers[i + 1].input_layernorm.weight), eps,
                                         f"layers.{i + 1}.input_layernorm")
        else:
            hidden_out, _ = _skip_rms_norm(g, y, residual, _np(lm.norm.weight), eps, "norm")
    g.op("Identity", [hidden_out], ["hidden"], name="hidden")

    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "seq", hidden]),
        helper.make_tensor_value_info("cos", f32, ["batch", "seq", head_dim]),
        helper.make_tensor_value_info("sin", f32, ["batch", "seq", head_dim]),
        helper.make_tensor_value_info("deepstack", f32, [n_taps, "batch", "seq", hidden]),
        helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", i32, []),
    ]
    outputs = [helper.make_tensor_value_info("hidden", f32, ["batch", "seq", hidden])]
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", f32, ["batch", kv_heads, "past_seq", head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", f32,
                                                         ["batch", kv_heads, "total_seq", head_dim]))
    graph = helper.make_graph(g.nodes, "qwen3_vl_text_decoder", inputs, outputs, initializer=g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="edgejudge")
    proto.ir_version = IR_VERSION
    return proto


def build_lm_head_graph(hidden: int, vocab: int, weight_location: str, offset: int):
    """`hidden` (B, K, hidden) -> `logits` (B, K, vocab) = hidden @ W.T, W (vocab, hidden) read from
    `weight_location` (raw float32, C order) at byte `offset`."""
    from onnx import TensorProto, helper

    weight = TensorProto()
    weight.name, weight.data_type = "lm_head.weight", TensorProto.FLOAT
    weight.dims.extend([vocab, hidden])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", weight_location), ("offset", str(offset)), ("length", str(vocab * hidden * 4))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    g = _Graph()
    rows = g.const("shape.rows", np.array([-1, hidden], np.int64))
    flat = g.op("Reshape", ["hidden", rows], name="to_rows")
    logits2d = g.op("Gemm", [flat, "lm_head.weight"], name="lm_head", transB=1)  # MatMulNBits later
    out_shape = g.op("Concat", [g.op("Slice", [g.op("Shape", ["hidden"], name="shape"),
                                               g.const("s0", np.array([0], np.int64)),
                                               g.const("s2", np.array([2], np.int64))], name="batch_k"),
                                g.const("vocab", np.array([vocab], np.int64))], name="out_shape", axis=0)
    g.op("Reshape", [logits2d, out_shape], ["logits"], name="to_logits")
    graph = helper.make_graph(
        g.nodes, "qwen3_vl_lm_head",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "k", hidden])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "k", vocab])],
        initializer=[weight] + g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgejudge")
    proto.ir_version = IR_VERSION
    return proto


def _npy_data_offset(path: Path) -> int:
    array = np.load(path, mmap_mode="r")
    if array.dtype != np.float32 or not array.flags.c_contiguous:
        raise ValueError(f"{path}: expected a C-ordered float32 array")
    return int(array.offset)


def sidecar_arrays(model) -> dict[str, np.ndarray]:
    tc = _text_config(model)
    lm = model.model.language_model
    rope = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return {
        "inv_freq": _np(lm.rotary_emb.inv_freq),
        "attention_scaling": np.float32(lm.rotary_emb.attention_scaling),
        "mrope_section": np.asarray(rope.get("mrope_section", [24, 20, 20]), np.int64),
        "hidden_size": np.int64(tc.hidden_size),
        "head_dim": np.int64(head_dim),
        "num_layers": np.int64(tc.num_hidden_layers),
        "num_kv_heads": np.int64(tc.num_key_value_heads),
        "num_deepstack": np.int64(len(model.config.vision_config.deepstack_visual_indexes)),
        "vocab_size": np.int64(tc.vocab_size),
    }


def load_model(model_dir: str | Path):
    import torch

    from edgejudge.export.merge import load_base

    model = load_base(Path(model_dir), dtype=torch.float32)
    if model.config.model_type != "qwen3_vl":
        raise ValueError(f"{model_dir}: a {model.config.model_type!r} model, not qwen3_vl")
    return model.eval()


def export_decoder_onnx(model_dir: str | Path | None, out_dir: str | Path, model=None) -> Path:
    """Write decoder.onnx (+ .data), lm_head.onnx, embed.npy and decoder.npz into `out_dir` (fp32)."""
    import onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = load_model(model_dir)
    tc = _text_config(model)

    proto = build_decoder_graph(model)
    save_onnx(proto, out_dir / DECODER_NAME,
              {"edgejudge.component": "qwen3_vl.decoder", "edgejudge.text_config": json.dumps(tc.to_dict())})

    embed = _np(model.model.language_model.embed_tokens.weight)
    np.save(out_dir / EMBED_NAME, embed)
    head_file = EMBED_NAME
    head = model.lm_head.weight
    if not (tc.tie_word_embeddings or model.config.tie_word_embeddings) or head.data_ptr() != \
            model.model.language_model.embed_tokens.weight.data_ptr():
        head_file = "lm_head.npy"
        np.save(out_dir / head_file, _np(head))
    head_proto = build_lm_head_graph(embed.shape[1], embed.shape[0], head_file, _npy_data_offset(out_dir / head_file))
    onnx.save_model(head_proto, str(out_dir / LM_HEAD_NAME))
    np.savez(out_dir / SIDECAR_NAME, **sidecar_arrays(model))
    return out_dir / DECODER_NAME
