"""Candidate operator fusions for W1's graphs, each timed against what the graphs run now, on a GPU.

    python benchmarks/fusions_cuda.py [--device cuda]

One-node-or-few ONNX graphs at W1's full shapes (fp16, random inputs), each run on ONNX Runtime's
CUDA provider with its inputs and outputs bound on the device; printed: the mean of 30 session runs
after 3 warm-ups (a run's fixed cost included), and the largest difference from the current form.

- vision attention, 41 and 64 groups of 196 patches, 16 heads of 64: two RotaryEmbedding +
  MultiHeadAttention, against the rotary over the 16 heads at once (one 1,024-value rotary head,
  interleaved pairs, q/k columns reordered: what the vision graphs run since 2026-11-23, thirteenth
  session) and GroupQueryAttention with `causal=0` and `do_rotary` (without and with its present
  key/value outputs);
- decoder attention, 2 x 1,830 and 1 x 1,830 tokens, 32 query and 8 key/value heads of 128: the
  q/k RMSNorms, two RotaryEmbedding on the per-token M-RoPE table and GroupQueryAttention, against
  GroupQueryAttention's own rotary (`do_rotary`, the table as `cos_cache`, the token index as
  `position_ids`), and with its q/k norm inputs too;
- MatMulNBits at the decoder's and the vision tower's shapes: a separate bias Add against its bias
  input, and the CUTLASS fpA_intB path (session option `ep.cuda.fpa_intb_gemm`, then the
  `ORT_FPA_INTB_GEMM` environment variable).
numpy, onnx and onnxruntime-gpu (its weight-only quantizer writes the MatMulNBits); the export
package's graph helpers import torch.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgejudge.export.onnx_graph import interleaved_rows

MS = "com.microsoft"
F16 = TensorProto.FLOAT16
REPS, WARMUP = 30, 3
rng = np.random.default_rng(0)


def value(name: str, shape, elem=F16):
    return helper.make_tensor_value_info(name, elem, shape)


def model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "fusion", inputs, outputs, initializer=list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    proto.ir_version = 10
    return proto


def normal16(*shape) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.5).astype(np.float16)


class Bench:
    def __init__(self, device: str):
        self.device = device
        self.providers = ([("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"] if device == "cuda"
                          else ["CPUExecutionProvider"])

    def time(self, proto: onnx.ModelProto, feed: dict, outputs: list[str], config: dict | None = None):
        """(mean ms of a run, outputs as numpy) with inputs and outputs bound on the device."""
        options = ort.SessionOptions()
        for key, setting in (config or {}).items():
            options.add_session_config_entry(key, setting)
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=self.providers)
        binding = session.io_binding()
        held = {k: ort.OrtValue.ortvalue_from_numpy(v, self.device, 0) for k, v in feed.items()}
        for name, ortvalue in held.items():
            binding.bind_ortvalue_input(name, ortvalue)
        for name in outputs:
            binding.bind_output(name, self.device, 0)
        for _ in range(WARMUP):
            session.run_with_iobinding(binding)
        start = time.perf_counter()
        for _ in range(REPS):
            session.run_with_iobinding(binding)
        return (time.perf_counter() - start) / REPS * 1e3, [o.numpy() for o in binding.get_outputs()]


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())


def vision_attention(bench: Bench, groups: int) -> None:
    seq, heads, dim = 196, 16, 64
    angles = rng.uniform(0, 10, (seq, dim // 2))
    feed = {"q": normal16(groups, seq, heads * dim), "k": normal16(groups, seq, heads * dim),
            "v": normal16(groups, seq, heads * dim),
            "cos": np.cos(angles).astype(np.float16), "sin": np.sin(angles).astype(np.float16)}
    inputs = [value(n, ["G", "S", heads * dim]) for n in "qkv"] + [value(n, ["S", dim // 2]) for n in ("cos", "sin")]
    out = value("out", ["G", "S", heads * dim])
    current = model([helper.make_node("RotaryEmbedding", [x, "pos", "cos", "sin"], [f"{x}r"], domain=MS,
                                      num_heads=heads, interleaved=0) for x in "qk"]
                    + [helper.make_node("MultiHeadAttention", ["qr", "kr", "v"], ["out"], domain=MS, num_heads=heads,
                                        scale=0.125)],
                    inputs, [out], [helper.make_tensor("pos", TensorProto.INT64, [1], [0])])
    ms, (reference,) = bench.time(current, feed, ["out"])
    print(f"vision {groups} groups: RotaryEmbedding x2 + MultiHeadAttention {ms:.3f} ms", flush=True)
    # the rotary over all 16 heads at once: q and k columns in interleaved pair order inside each
    # head (onnx_graph.interleaved_rows), the tables repeated per head; v and the output unchanged
    order = interleaved_rows(heads, dim)
    wide = {**feed, "q": np.ascontiguousarray(feed["q"][..., order]), "k": np.ascontiguousarray(feed["k"][..., order]),
            "cos": np.tile(feed["cos"], (1, heads)), "sin": np.tile(feed["sin"], (1, heads))}
    spanned = model([helper.make_node("RotaryEmbedding", [x, "pos", "cos", "sin"], [f"{x}r"], domain=MS,
                                      num_heads=1, interleaved=1) for x in "qk"]
                    + [helper.make_node("MultiHeadAttention", ["qr", "kr", "v"], ["out"], domain=MS, num_heads=heads,
                                        scale=0.125)],
                    inputs[:3] + [value(n, ["S", heads * dim // 2]) for n in ("cos", "sin")], [out],
                    [helper.make_tensor("pos", TensorProto.INT64, [1], [0])])
    ms, (result,) = bench.time(spanned, wide, ["out"])
    print(f"  one 1,024-value rotary head (interleaved, reordered q/k): {ms:.3f} ms, "
          f"max |d| {max_diff(result, reference):.3g}", flush=True)
    for name, proto, inputs_of in (("64-value heads", current, feed), ("one 1,024-value head", spanned, wide)):
        rotary_only = model([proto.graph.node[0]], [value("q", ["G", "S", heads * dim]), proto.graph.input[3],
                                                    proto.graph.input[4]], [value("qr", ["G", "S", heads * dim])],
                            [helper.make_tensor("pos", TensorProto.INT64, [1], [0])])
        ms, _ = bench.time(rotary_only, {n: inputs_of[n] for n in ("q", "cos", "sin")}, ["qr"])
        print(f"  RotaryEmbedding alone, {name}: {ms:.3f} ms", flush=True)
    lengths = {"seqlens_k": np.full(groups, seq - 1, np.int32), "total": np.array(seq, np.int32)}
    for present in (False, True):
        outs = ["out", "present_key", "present_value"] if present else ["out", "", ""]
        fused = model([helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total", "cos", "sin"],
                                        outs, domain=MS, num_heads=heads, kv_num_heads=heads, scale=0.125,
                                        do_rotary=1, causal=0)],
                      inputs + [value("seqlens_k", ["G"], TensorProto.INT32), value("total", [], TensorProto.INT32)],
                      [out] + ([value("present_key", None), value("present_value", None)] if present else []))
        try:
            ms, results = bench.time(fused, {**feed, **lengths}, [o for o in outs if o])
            print(f"  GroupQueryAttention causal=0 do_rotary, present outputs {present}: {ms:.3f} ms, "
                  f"max |d| {max_diff(results[0], reference):.3g}", flush=True)
        except Exception as e:  # noqa: BLE001 - a provider refusing the form is a result
            print(f"  GroupQueryAttention causal=0 do_rotary, present outputs {present}: failed: {str(e)[:200]}")


def decoder_attention(bench: Bench, batch: int, seq: int = 1830) -> None:
    heads, kv_heads, dim, eps = 32, 8, 128, 1e-6
    angles = rng.uniform(0, 50, (batch * seq, dim // 2))
    feed = {"q": normal16(batch, seq, heads * dim), "k": normal16(batch, seq, kv_heads * dim),
            "v": normal16(batch, seq, kv_heads * dim),
            "cos": np.cos(angles).astype(np.float16), "sin": np.sin(angles).astype(np.float16),
            "index": np.arange(batch * seq, dtype=np.int64).reshape(batch, seq),
            "seqlens_k": np.full(batch, seq - 1, np.int32), "total": np.array(seq, np.int32)}
    weights = [numpy_helper.from_array((1 + 0.1 * rng.standard_normal(dim)).astype(np.float16), n) for n in ("qw", "kw")]
    shapes = [numpy_helper.from_array(np.array(s, np.int64), n) for n, s in
              (("q_heads", [0, 0, heads, dim]), ("kv_heads", [0, 0, kv_heads, dim]), ("flat", [0, 0, -1]))]
    inputs = [value("q", ["B", "S", heads * dim]), value("k", ["B", "S", kv_heads * dim]),
              value("v", ["B", "S", kv_heads * dim]), value("cos", ["R", dim // 2]), value("sin", ["R", dim // 2]),
              value("index", ["B", "S"], TensorProto.INT64), value("seqlens_k", ["B"], TensorProto.INT32),
              value("total", [], TensorProto.INT32)]
    outputs = [value("out", ["B", "S", heads * dim]), value("present_key", None), value("present_value", None)]
    norms = []
    for x, shape, weight in (("q", "q_heads", "qw"), ("k", "kv_heads", "kw")):
        norms += [helper.make_node("Reshape", [x, shape], [f"{x}4"]),
                  helper.make_node("SimplifiedLayerNormalization", [f"{x}4", weight], [f"{x}n4"], axis=-1, epsilon=eps,
                                   stash_type=1),
                  helper.make_node("Reshape", [f"{x}n4", "flat"], [f"{x}n"])]
    gqa_outputs = ["out", "present_key", "present_value"]
    current = model(norms + [
        helper.make_node("RotaryEmbedding", ["qn", "index", "cos", "sin"], ["qr"], domain=MS, num_heads=heads, interleaved=0),
        helper.make_node("RotaryEmbedding", ["kn", "index", "cos", "sin"], ["kr"], domain=MS, num_heads=kv_heads,
                         interleaved=0),
        helper.make_node("GroupQueryAttention", ["qr", "kr", "v", "", "", "seqlens_k", "total"], gqa_outputs, domain=MS,
                         num_heads=heads, kv_num_heads=kv_heads, scale=dim ** -0.5, do_rotary=0)],
        inputs, outputs, weights + shapes)
    ms, reference = bench.time(current, feed, gqa_outputs)
    print(f"decoder {batch} x {seq}: q/k RMSNorm + RotaryEmbedding x2 + GroupQueryAttention {ms:.3f} ms", flush=True)
    rotary_inputs = ["seqlens_k", "total", "cos", "sin", "index"]
    attributes = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": dim ** -0.5, "do_rotary": 1}
    forms = {"rotary": (norms + [helper.make_node("GroupQueryAttention", ["qn", "kn", "v", "", "", *rotary_inputs],
                                                  gqa_outputs, domain=MS, **attributes)]),
             "rotary and q/k norms": [helper.make_node("GroupQueryAttention",
                                                       ["q", "k", "v", "", "", *rotary_inputs, "", "", "", "", "qw", "kw"],
                                                       gqa_outputs, domain=MS, q_norm_epsilon=eps, k_norm_epsilon=eps,
                                                       **attributes)]}
    for name, nodes in forms.items():
        try:
            ms, results = bench.time(model(nodes, inputs, outputs, weights + shapes), feed, gqa_outputs)
            print(f"  GroupQueryAttention's own {name}: {ms:.3f} ms, max |d| output {max_diff(results[0], reference[0]):.3g}"
                  f" key {max_diff(results[1], reference[1]):.3g} value {max_diff(results[2], reference[2]):.3g}", flush=True)
        except Exception as e:  # noqa: BLE001 - a provider refusing the form is a result
            print(f"  GroupQueryAttention's own {name}: failed: {str(e)[:200]}", flush=True)


def matmul_nbits(bench: Bench, rows: int, k: int, n: int, bits: int, bias: bool) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer

    nodes = [helper.make_node("MatMul", ["x", "w"], ["product" if bias else "y"])]
    if bias:
        nodes.append(helper.make_node("Add", ["product", "b"], ["y"]))
    proto = model(nodes, [value("x", ["M", k])], [value("y", ["M", n])],
                  [numpy_helper.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float16), "w"),
                   numpy_helper.from_array(normal16(n), "b")])
    quantizer = matmul_nbits_quantizer.MatMulNBitsQuantizer(proto, bits=bits, block_size=128, is_symmetric=True)
    quantizer.process()
    quantized = quantizer.model.model
    feed = {"x": normal16(rows, k)}
    ms, (reference,) = bench.time(quantized, feed, ["y"])
    line = f"MatMulNBits int{bits} {rows} x {k} -> {n}{' + Add' if bias else ''}: {ms:.3f} ms"
    if bias:  # the Add's bias as MatMulNBits input 5
        fused = onnx.ModelProto()
        fused.CopyFrom(quantized)
        matmul = next(node for node in fused.graph.node if node.op_type == "MatMulNBits")
        fused.graph.node.remove(next(node for node in fused.graph.node if node.op_type == "Add"))
        matmul.input.extend([""] * (5 - len(matmul.input)) + ["b"])
        matmul.output[0] = "y"
        ms, (result,) = bench.time(fused, feed, ["y"])
        line += f"; bias input {ms:.3f} ms (max |d| {max_diff(result, reference):.3g})"
    ms, (result,) = bench.time(quantized, feed, ["y"], {"ep.cuda.fpa_intb_gemm": "1"})
    line += f"; ep.cuda.fpa_intb_gemm {ms:.3f} ms (max |d| {max_diff(result, reference):.3g})"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    args = parser.parse_args()
    bench = Bench(args.device)
    print("onnxruntime", ort.__version__, flush=True)
    for groups in (41, 64):
        vision_attention(bench, groups)
    for batch in (2, 1):
        decoder_attention(bench, batch)
    shapes = ((3660, 2560, 9728, 4, False), (3660, 9728, 2560, 4, False), (3660, 2560, 4096, 4, False),
              (8036, 1024, 1024, 8, True), (8036, 1024, 4096, 8, True))
    for shape in shapes:
        matmul_nbits(bench, *shape)
    os.environ["ORT_FPA_INTB_GEMM"] = "1"  # read when a session builds its kernels
    print("with ORT_FPA_INTB_GEMM=1:", flush=True)
    for shape in shapes[:2] + ((8036, 1024, 1024, 8, False),):
        matmul_nbits(bench, *shape)


if __name__ == "__main__":
    main()
