"""Qwen3-VL's text decoder as ONNX (fused ORT ops, KV cache, 3D M-RoPE, DeepStack) on the tiny
model, fp32 on the CPU, against HF: the prompt's last logits vs the full forward, and 16 greedy
tokens vs `generate`. The ONNX side is torch-free end to end: `build_inputs` -> the ONNX vision
encoder -> embed.npy lookup + scatter -> decoder.onnx -> lm_head.onnx."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from edgejudge.export.fixtures import tiny_model_dir
from edgejudge.export.onnx_decoder import export_decoder_onnx, load_model
from edgejudge.export.onnx_io import IR_VERSION, OPSET
from edgejudge.export.qwen3_vl import export_vision_onnx
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.decoder import TextDecoder, decode_position_ids, mrope_cos_sin
from edgejudge.runtime.video import read_video
from edgejudge.runtime.vision import VisionEncoder

TOL = 1e-4
TEXT = "Instruction: Place the red block in the box.\nIs it complete?"
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def tiny():
    model_dir = tiny_model_dir("qwen3_vl")
    return model_dir, load_model(model_dir)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    model_dir, model = tiny
    out = tmp_path_factory.mktemp("decoder")
    export_decoder_onnx(model_dir, out, model=model)
    vision = export_vision_onnx(model_dir, out / "vision.onnx", visual=model.model.visual)
    return out, TextDecoder(out), VisionEncoder(vision)


@pytest.fixture(scope="module")
def arrays(tiny):
    model = runtime_model.load(tiny[0])
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 96, 3), dtype=np.uint8)
    return runtime_model.build_inputs(model, [read_video(frames, fps=2.0)], TEXT)


def _hf_feed(model, arrays) -> dict:
    feed = {k: torch.from_numpy(arrays[k]) for k in ("input_ids", "attention_mask", "pixel_values_videos",
                                                       "video_grid_thw")}
    feed["mm_token_type_ids"] = (feed["input_ids"] == model.config.video_token_id).long() * 2
    return feed


def _onnx_prefill(decoder: TextDecoder, vision: VisionEncoder, arrays, video_token_id, visual=None):
    """Prompt hidden states; the visual features from the ONNX vision encoder, or `visual` = (features, taps)."""
    features, taps = visual if visual is not None else vision.encode(arrays["pixel_values_videos"],
                                                                     arrays["video_grid_thw"])
    embeds, deepstack = decoder.multimodal_embeds(arrays["input_ids"], video_token_id, features, taps)
    cos, sin = decoder.cos_sin(arrays["position_ids"])
    return decoder.prefill(embeds, cos, sin, deepstack)


def test_graph_uses_fused_ops(exported, tiny):
    out, decoder, _ = exported
    tc = tiny[1].config.text_config
    proto = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    assert proto.ir_version == IR_VERSION
    assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET
    ops = {n.op_type for n in proto.graph.node}
    assert "GroupQueryAttention" in ops
    assert {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"} <= ops
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == tc.num_hidden_layers and all(n.domain == "com.microsoft" for n in gqa)
    assert all(a.i == 0 for n in gqa for a in n.attribute if a.name == "do_rotary")
    assert not ops & {"Softmax", "LayerNormalization", "ReduceMean", "Pow", "Sqrt"}  # nothing unfused
    # no full-vocab tensor anywhere in the decoder: not among the weights, not among the outputs
    for init in proto.graph.initializer:
        assert tc.vocab_size not in init.dims, init.name
    assert [o.name for o in proto.graph.output][0] == "hidden"
    for o in proto.graph.output:
        assert tc.vocab_size not in [d.dim_value for d in o.type.tensor_type.shape.dim]
    names = [i.name for i in proto.graph.input]
    assert names[:6] == ["inputs_embeds", "cos", "sin", "deepstack", "seqlens_k", "total_sequence_length"]
    assert names[6:] == [f"past_{kind}_{i}" for i in range(tc.num_hidden_layers) for kind in ("key", "value")]
    assert (out / "decoder.onnx.data").is_file()
    head = onnx.load(str(out / "lm_head.onnx"), load_external_data=False)
    assert [o.name for o in head.graph.output] == ["logits"]


def test_cos_sin_match_hf(tiny, arrays):
    """The numpy M-RoPE tables against HF's rotary embedding: within a float32 ulp or two."""
    model = tiny[1]
    lm = model.model.language_model
    positions = arrays["position_ids"]
    with torch.no_grad():
        ref_cos, ref_sin = lm.rotary_emb(torch.zeros(1), torch.from_numpy(positions))
    sidecar = {"inv_freq": lm.rotary_emb.inv_freq.numpy(), "attention_scaling": 1.0,
               "mrope_section": model.config.text_config.rope_parameters["mrope_section"]}
    for config in (sidecar, model.config.to_dict()):  # from the export's tables, or from config.json
        cos, sin = mrope_cos_sin(positions, config)
        np.testing.assert_allclose(cos, ref_cos.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(sin, ref_sin.numpy(), rtol=0, atol=1e-6)
    # the layout actually interleaves: each axis drives some frequencies
    cos, _ = mrope_cos_sin(np.stack([np.zeros((1, 4)), np.ones((1, 4)), np.zeros((1, 4))]).astype(np.int64), sidecar)
    assert (cos[0, 0, 1] != 1) and (cos[0, 0, 0] == 1) and (cos[0, 0, 2] == 1)


def test_prefill_logits_match_hf(tiny, exported, arrays):
    model = tiny[1]
    _, decoder, vision = exported
    with torch.no_grad():
        ref = model(**_hf_feed(model, arrays)).logits[0, -1].numpy()
        hf_visual = model.model.get_video_features(torch.from_numpy(arrays["pixel_values_videos"]),
                                                   torch.from_numpy(arrays["video_grid_thw"]), return_dict=True)
    hf_features = torch.cat(list(hf_visual.pooler_output), 0).numpy()
    hf_taps = [t.numpy() for t in hf_visual.deepstack_features]
    diffs = {}
    for name, visual in (("onnx_vision", None), ("hf_vision", (hf_features, hf_taps))):
        hidden = _onnx_prefill(decoder, vision, arrays, model.config.video_token_id, visual)
        logits = decoder.logits(hidden[:, -1:])
        assert logits.shape == (1, 1, model.config.text_config.vocab_size) and logits.dtype == np.float32
        diffs[name] = float(np.abs(logits[0, -1] - ref).max())
    print(f"prompt of {arrays['input_ids'].shape[1]} tokens: last-position logits max abs diff "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs
    # DeepStack really matters here (a wrong tap placement would not be caught otherwise)
    hidden = _onnx_prefill(decoder, vision, arrays, model.config.video_token_id,
                           (hf_features, [np.zeros_like(t) for t in hf_taps]))
    assert np.abs(decoder.logits(hidden[:, -1:])[0, -1] - ref).max() > 1e-3


def test_greedy_decoding_matches_generate(tiny, exported, arrays):
    model = tiny[1]
    _, decoder, vision = exported
    with torch.no_grad():
        generated = model.generate(**_hf_feed(model, arrays), do_sample=False, max_new_tokens=NEW_TOKENS,
                                   output_logits=True, return_dict_in_generate=True)
    prompt_len = arrays["input_ids"].shape[1]
    ref_tokens = generated.sequences[0, prompt_len:].tolist()
    ref_logits = np.stack([step[0].numpy() for step in generated.logits])
    hidden = _onnx_prefill(decoder, vision, arrays, model.config.video_token_id)
    eos = model.generation_config.eos_token_id
    first = decoder.logits(hidden[:, -1:])[0, -1]
    tokens, logits = decoder.greedy(first, prompt_len, arrays["rope_deltas"], NEW_TOKENS, eos, return_logits=True)
    step_diffs = np.abs(np.stack(logits) - ref_logits).max(axis=1)
    print(f"greedy: hf {ref_tokens}\n        onnx {tokens}\n"
          f"        per-step logits max abs diff {step_diffs.max():.2e}")
    assert tokens == ref_tokens
    assert step_diffs.max() <= TOL  # the cached steps, not only their argmax, match HF
    assert decoder.past_length == prompt_len + len(tokens) - 1
    assert decoder.past[0][0].shape == (1, decoder.num_kv_heads, decoder.past_length, decoder.head_dim)
    # decoding positions matter: forgetting rope_deltas (text-only positions) is caught
    _onnx_prefill(decoder, vision, arrays, model.config.video_token_id)
    _, wrong = decoder.greedy(first, prompt_len, np.zeros((1, 1), np.int64), 2, eos, return_logits=True)
    assert np.abs(wrong[1] - ref_logits[1]).max() > 1e-3


def test_decode_positions():
    pos = decode_position_ids(10, 3, np.array([[-4]]))
    assert pos.shape == (3, 1, 3) and pos[:, 0].tolist() == [[6, 7, 8]] * 3


def test_decoder_runtime_imports_no_torch(exported, arrays):
    out = exported[0]
    code = (
        "import sys, numpy as np\n"
        "from edgejudge.runtime.decoder import TextDecoder, decode_position_ids\n"
        f"dec = TextDecoder({str(out)!r})\n"
        "ids = np.array([[1, 2, 3]])\n"
        "cos, sin = dec.cos_sin(decode_position_ids(0, 3, np.zeros((1, 1), np.int64)))\n"
        "h = dec.prefill(dec.embed(ids), cos, sin)\n"
        "assert dec.logits(h[:, -1:]).shape == (1, 1, dec.vocab_size)\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'onnx') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"the decoder runtime imported {proc.stdout.strip()}"


def test_cached_steps_match_full_forward(tiny, exported, arrays):
    """Varied continuation tokens (greedy on the random tiny model repeats one token), fed to the
    KV cache one at a time and then 3 at once, against HF's uncached forward over prompt + tokens."""
    model = tiny[1]
    _, decoder, vision = exported
    prompt_len = arrays["input_ids"].shape[1]
    extra = np.random.default_rng(1).integers(0, 1400, (1, 10), dtype=np.int64)  # below the special ids
    feed = _hf_feed(model, arrays)
    feed["input_ids"] = torch.cat([feed["input_ids"], torch.from_numpy(extra)], 1)
    feed["attention_mask"] = torch.ones_like(feed["input_ids"])
    feed["mm_token_type_ids"] = torch.cat([feed["mm_token_type_ids"], torch.zeros_like(torch.from_numpy(extra))], 1)
    with torch.no_grad():
        ref = model(**feed).logits[0, prompt_len:].numpy()
    _onnx_prefill(decoder, vision, arrays, model.config.video_token_id)
    ours = []
    for j in range(7):  # one token at a time
        cos, sin = decoder.cos_sin(decode_position_ids(prompt_len + j, 1, arrays["rope_deltas"]))
        ours.append(decoder.logits(decoder.step(decoder.embed(extra[:, j:j + 1]), cos, sin))[0, -1])
    cos, sin = decoder.cos_sin(decode_position_ids(prompt_len + 7, 3, arrays["rope_deltas"]))
    ours.extend(decoder.logits(decoder.step(decoder.embed(extra[:, 7:]), cos, sin))[0])  # 3 at once
    diff = float(np.abs(np.stack(ours) - ref).max())
    print(f"cached steps vs full forward: max abs diff {diff:.2e}")
    assert diff <= TOL
