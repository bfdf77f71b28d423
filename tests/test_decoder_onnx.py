"""The text decoder as ONNX (fused ORT ops, KV cache, 3D M-RoPE, Qwen3-VL's DeepStack) on the tiny
models of both Qwen-VL families, fp32 on the CPU, against HF: the prompt's last logits vs the full
forward, and 16 greedy tokens vs `generate`. The ONNX side is torch-free end to end:
`build_inputs` -> the ONNX vision encoder -> embed.npy lookup + scatter -> decoder.onnx ->
lm_head.onnx. The KV cache stays in OrtValues (IO binding, written in place when the prefill gave
room): repeat_cache (cache_rows.onnx) and snapshot/restore are checked against full forwards."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from edgejudge.errors import InputError
from edgejudge.export.fixtures import sharpened, tiny_model_dir
from edgejudge.export.merge import load_base
from edgejudge.export.onnx import FAMILIES
from edgejudge.export.onnx_decoder import export_decoder_onnx
from edgejudge.export.onnx_io import IR_VERSION, OPSET
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.decoder import TextDecoder, VisualRows, decode_position_ids, mrope_cos_sin
from edgejudge.runtime.video import read_video
from edgejudge.runtime.vision import load_vision_encoder

TOL = 1e-4
TEXT = "Instruction: Place the red block in the box.\nIs it complete?"
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def tiny(request):
    model_dir = tiny_model_dir(request.param)
    return model_dir, load_base(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    model_dir, model = tiny
    family = model.config.model_type
    out = tmp_path_factory.mktemp(f"decoder-{family}")
    export_decoder_onnx(model, out, FAMILIES[family])
    vision = FAMILIES[family].export_vision_onnx(model_dir, out / "vision.onnx", visual=model.model.visual)
    return out, TextDecoder(out), load_vision_encoder(vision, family)


@pytest.fixture(scope="module")
def arrays(tiny):
    model = runtime_model.load(tiny[0])
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 96, 3), dtype=np.uint8)
    return runtime_model.build_inputs(model, [read_video(frames, fps=2.0)], TEXT)


def _hf_feed(model, arrays) -> dict:
    feed = {k: torch.from_numpy(arrays[k]) for k in ("input_ids", "attention_mask", "pixel_values_videos",
                                                       "video_grid_thw")}
    feed["mm_token_type_ids"] = (feed["input_ids"] == model.config.video_token_id).long() * 2
    if "second_per_grid_ts" in arrays:  # Qwen2.5-VL's temporal positions
        feed["second_per_grid_ts"] = torch.from_numpy(arrays["second_per_grid_ts"])
    return feed


def _onnx_prefill(decoder: TextDecoder, vision, arrays, video_token_id, visual=None, **options):
    """Prompt hidden states; the visual features from the ONNX vision encoder, or `visual` = (features, taps).
    `options`: prefill's capacity / on_device."""
    features, taps = visual if visual is not None else vision.encode(arrays["pixel_values_videos"],
                                                                     arrays["video_grid_thw"])
    embeds, deepstack = decoder.multimodal_embeds(arrays["input_ids"], video_token_id, VisualRows.of(features, taps))
    cos, sin = decoder.cos_sin(arrays["position_ids"])
    return decoder.prefill(embeds, cos, sin, deepstack, **options)


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
    rotary = [n for n in proto.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(rotary) == 2 * tc.num_hidden_layers and not ops & {"Split", "Neg", "Concat"}  # no rotate-half chain
    assert not ops & {"Softmax", "LayerNormalization", "ReduceMean", "Pow", "Sqrt"}  # nothing unfused
    # no full-vocab tensor anywhere in the decoder: not among the weights, not among the outputs
    for init in proto.graph.initializer:
        assert tc.vocab_size not in init.dims, init.name
    assert [o.name for o in proto.graph.output][0] == "hidden"
    for o in proto.graph.output:
        assert tc.vocab_size not in [d.dim_value for d in o.type.tensor_type.shape.dim]
    names = [i.name for i in proto.graph.input]
    taps = ["deepstack"] if decoder.num_deepstack else []
    assert decoder.num_deepstack == (3 if tiny[1].config.model_type == "qwen3_vl" else 0)
    fixed = ["inputs_embeds", "cos", "sin", *taps, "seqlens_k", "total_sequence_length"]
    assert names[:len(fixed)] == fixed
    assert names[len(fixed):] == [f"past_{kind}_{i}" for i in range(tc.num_hidden_layers) for kind in ("key", "value")]
    assert (out / "decoder.onnx.data").is_file()
    head = onnx.load(str(out / "lm_head.onnx"), load_external_data=False)
    assert [o.name for o in head.graph.output] == ["logits"]
    rows = onnx.load(str(out / "cache_rows.onnx"))
    assert {n.op_type for n in rows.graph.node} == {"Gather"} and len(rows.graph.node) == 2 * tc.num_hidden_layers
    assert [i.name for i in rows.graph.input] == ["rows"] + [
        f"{kind}_{i}" for i in range(tc.num_hidden_layers) for kind in ("key", "value")]


def test_splice_gathers_hf_inputs(exported, tiny):
    """splice.onnx builds HF's inputs_embeds (masked_scatter of the features over the token
    embeddings) and the DeepStack input (taps at the vision positions, zeros elsewhere) bit for
    bit, from tables whose rows come in any order; it is made of Gather and Where only."""
    out, decoder, _ = exported
    assert {n.op_type for n in onnx.load(str(out / "splice.onnx")).graph.node} <= {"Gather", "Where", "Unsqueeze"}
    rng = np.random.default_rng(5)
    vid = int(tiny[1].config.video_token_id)
    ids = rng.integers(0, 100, (2, 12))
    ids[0, 3:7] = ids[1, 2:6] = vid
    hidden, taps = decoder.hidden_size, decoder.num_deepstack
    features = rng.standard_normal((8, hidden)).astype(np.float32)
    tap_values = rng.standard_normal((taps, 8, hidden)).astype(np.float32)
    order = rng.permutation(8)  # the table holds row k of the features at order[k], with spare rows
    table = np.zeros((10, hidden), np.float32)
    table[order] = features
    tap_table = np.zeros((taps, 10, hidden), np.float32)
    tap_table[:, order] = tap_values
    visual = VisualRows(table, order, tap_table.reshape(taps * 10, hidden) if taps else None,
                        (np.arange(taps)[:, None] * 10 + order) if taps else None)
    embeds, deepstack = decoder.multimodal_embeds(ids, vid, visual)
    with torch.no_grad():
        reference = tiny[1].model.language_model.embed_tokens(torch.from_numpy(ids)).numpy()
    mask = ids == vid
    reference[mask] = features
    assert np.array_equal(embeds.numpy(), reference)
    if taps:
        expected = np.zeros((taps, *ids.shape, hidden), np.float32)
        expected[:, mask] = tap_values
        assert np.array_equal(deepstack.numpy(), expected)
    else:
        assert deepstack is None
    with pytest.raises(InputError, match="8 vision tokens but 7 visual features"):
        decoder.multimodal_embeds(ids, vid, VisualRows(table, order[:7]))


def test_cos_sin_match_hf(tiny, arrays):
    """The numpy M-RoPE tables against HF's rotary embedding: within a float32 ulp or two."""
    model = tiny[1]
    lm = model.model.language_model
    positions = arrays["position_ids"]
    with torch.no_grad():
        ref_cos, ref_sin = lm.rotary_emb(torch.zeros(1), torch.from_numpy(positions))
    interleaved = model.config.model_type == "qwen3_vl"
    section = model.config.text_config.rope_parameters["mrope_section"]
    sidecar = {"inv_freq": lm.rotary_emb.inv_freq.numpy(), "attention_scaling": 1.0, "mrope_section": section,
               "mrope_interleaved": interleaved}
    for config in (sidecar, model.config.to_dict()):  # from the export's tables, or from config.json
        cos, sin = mrope_cos_sin(positions, config)
        np.testing.assert_allclose(cos, ref_cos.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(sin, ref_sin.numpy(), rtol=0, atol=1e-6)
    # the layout is the family's: which frequencies does the height axis drive?
    _, sin = mrope_cos_sin(np.stack([np.zeros((1, 4)), np.ones((1, 4)), np.zeros((1, 4))]).astype(np.int64), sidecar)
    half = len(sidecar["inv_freq"])
    height = np.flatnonzero(sin[0, 0, :half] != 0).tolist()
    expected = (list(range(1, min(3 * section[1], half), 3)) if interleaved
                else list(range(section[0], min(section[0] + section[1], half))))
    assert height == expected


def test_prefill_logits_match_hf(tiny, exported, arrays):
    model = tiny[1]
    _, decoder, vision = exported
    with torch.no_grad():
        ref = model(**_hf_feed(model, arrays)).logits[0, -1].numpy()
        hf_visual = model.model.get_video_features(torch.from_numpy(arrays["pixel_values_videos"]),
                                                   torch.from_numpy(arrays["video_grid_thw"]), return_dict=True)
    pooled = hf_visual.pooler_output
    hf_features = (torch.cat(list(pooled), 0) if isinstance(pooled, (list, tuple)) else pooled).numpy()
    hf_taps = [t.numpy() for t in getattr(hf_visual, "deepstack_features", None) or []]
    diffs = {}
    for name, visual in (("onnx_vision", None), ("hf_vision", (hf_features, hf_taps))):
        hidden = _onnx_prefill(decoder, vision, arrays, model.config.video_token_id, visual)
        logits = decoder.logits(hidden[:, -1:])
        assert logits.shape == (1, 1, model.config.text_config.vocab_size) and logits.dtype == np.float32
        diffs[name] = float(np.abs(logits[0, -1] - ref).max())
    print(f"prompt of {arrays['input_ids'].shape[1]} tokens: last-position logits max abs diff "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs
    if not hf_taps:
        return
    # DeepStack really matters here (a wrong tap placement would not be caught otherwise)
    hidden = _onnx_prefill(decoder, vision, arrays, model.config.video_token_id,
                           (hf_features, [np.zeros_like(t) for t in hf_taps]))
    assert np.abs(decoder.logits(hidden[:, -1:])[0, -1] - ref).max() > 1e-3


def test_prefill_logits_match_hf_with_biases_and_norms(tiny, arrays, tmp_path):
    """The tiny checkpoints' biases are zero and their norms one (HF's init), as are those of the
    full-size random models the GPU checks use; real checkpoints' are not (Qwen2.5-VL's q/k/v
    biases). The same check with every bias and norm weight drawn at random, which must matter."""
    model_dir, base = tiny
    model = sharpened(base, seed=2, matrices=False)
    family = model.config.model_type
    export_decoder_onnx(model, tmp_path, FAMILIES[family])
    vision = load_vision_encoder(FAMILIES[family].export_vision_onnx(model_dir, tmp_path / "vision.onnx",
                                                                     visual=model.model.visual), family)
    decoder = TextDecoder(tmp_path)
    with torch.no_grad():
        ref = model(**_hf_feed(model, arrays)).logits[0, -1].numpy()
        unchanged = base(**_hf_feed(base, arrays)).logits[0, -1].numpy()
    hidden = _onnx_prefill(decoder, vision, arrays, model.config.video_token_id)
    diff = float(np.abs(decoder.logits(hidden[:, -1:])[0, -1] - ref).max())
    assert np.abs(ref - unchanged).max() > 1e-2
    assert diff <= TOL, diff


def test_greedy_decoding_matches_generate(tiny, exported, arrays):
    model = tiny[1]
    _, decoder, vision = exported
    with torch.no_grad():
        generated = model.generate(**_hf_feed(model, arrays), do_sample=False, max_new_tokens=NEW_TOKENS,
                                   output_logits=True, return_dict_in_generate=True)
    prompt_len = arrays["input_ids"].shape[1]
    ref_tokens = generated.sequences[0, prompt_len:].tolist()
    ref_logits = np.stack([step[0].numpy() for step in generated.logits])
    eos = model.generation_config.eos_token_id
    penalty = model.generation_config.repetition_penalty or 1.0  # Qwen2.5-VL ships 1.05: greedy applies it
    # room for every token: the fixed step writes in place (valid length in seqlens_k, whatever the
    # slack); no room: each step gets new exactly-sized buffers
    for capacity in (prompt_len + NEW_TOKENS - 1, prompt_len + NEW_TOKENS + 40, None):
        hidden = _onnx_prefill(decoder, vision, arrays, model.config.video_token_id, capacity=capacity, on_device=True)
        first = decoder.logits(hidden, slice(-1, None))[0, -1]
        buffer = decoder.past[0][0].data_ptr()
        tokens, logits = decoder.greedy(first, prompt_len, arrays["rope_deltas"], NEW_TOKENS, eos, return_logits=True,
                                        repetition_penalty=penalty, context_ids=arrays["input_ids"])
        step_diffs = np.abs(np.stack(logits) - ref_logits).max(axis=1)
        print(f"greedy (capacity {capacity}): hf {ref_tokens}\n        onnx {tokens}\n"
              f"        per-step logits max abs diff {step_diffs.max():.2e}")
        assert tokens == ref_tokens
        assert step_diffs.max() <= TOL  # the cached steps, not only their argmax, match HF
        assert decoder.past_length == prompt_len + len(tokens) - 1
        assert decoder.cache_shape() == (1, decoder.num_kv_heads, decoder.past_length, decoder.head_dim)
        assert (decoder.past[0][0].data_ptr() == buffer) == (capacity is not None)  # in place only with room
        assert decoder.capacity == (capacity or decoder.past_length)
    # a new request of the same shape reuses the buffers and the bound step (a CUDA graph on CUDA)
    capacity, bound = prompt_len + NEW_TOKENS - 1, []
    for _ in range(2):
        hidden = _onnx_prefill(decoder, vision, arrays, model.config.video_token_id, capacity=capacity, on_device=True)
        tokens = decoder.greedy(decoder.logits(hidden, slice(-1, None))[0, -1], prompt_len, arrays["rope_deltas"],
                                NEW_TOKENS, eos, repetition_penalty=penalty, context_ids=arrays["input_ids"])
        assert tokens == ref_tokens
        bound.append((decoder.past[0][0].data_ptr(), decoder.fixed[1]))
    assert bound[0][0] == bound[1][0] and bound[0][1] is bound[1][1]
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


def _text_prefill(decoder: TextDecoder, ids: np.ndarray, capacity: int | None = None):
    """Text-only prompt rows (positions = index on all three axes) on the device."""
    cos, sin = decoder.cos_sin(decode_position_ids(0, ids.shape[1], np.zeros((1, 1), np.int64), len(ids)))
    return decoder.prefill(decoder.embed(ids), cos, sin, capacity=capacity, on_device=True)


def _text_step(decoder: TextDecoder, ids: np.ndarray, start: int) -> np.ndarray:
    cos, sin = decoder.cos_sin(decode_position_ids(start, ids.shape[1], np.zeros((1, 1), np.int64), len(ids)))
    return decoder.logits(decoder.step(decoder.embed(ids), cos, sin, on_device=True))


def _full_forward_logits(decoder: TextDecoder, ids: np.ndarray) -> np.ndarray:
    """Logits at every position of an uncached forward (numpy hidden states, the host path)."""
    cos, sin = decoder.cos_sin(decode_position_ids(0, ids.shape[1], np.zeros((1, 1), np.int64), len(ids)))
    return decoder.logits(decoder.prefill(decoder.embed(ids), cos, sin))


def test_batch_rows_keep_their_own_positions(exported):
    """Rows of one prefill at different M-RoPE positions (text positions, and video-like ones whose
    three axes differ) each equal their own prefill alone: every token reads its own row of the
    rotary tables."""
    decoder = exported[1]
    ids = np.random.default_rng(4).integers(0, 1400, (2, 11))
    index = np.arange(11)
    positions = np.stack([np.stack([index, index, index]), np.stack([index // 4, index % 4 // 2, index % 2])], axis=1)

    def last_logits(rows: np.ndarray, row_positions: np.ndarray) -> np.ndarray:
        cos, sin = decoder.cos_sin(row_positions)
        return decoder.logits(decoder.prefill(decoder.embed(rows), cos, sin))[:, -1]

    together = last_logits(ids, positions)
    alone = np.concatenate([last_logits(ids[r:r + 1], positions[:, r:r + 1]) for r in range(2)])
    assert np.abs(last_logits(ids[1:], positions[:, :1]) - alone[1]).max() > 1e-3  # the positions matter
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)


def test_repeat_cache_on_device(exported):
    """Two prompts prefilled together, their cache repeated 3x by cache_rows.onnx on the device
    (row r -> rows 3r..3r+2), six different next tokens: each row equals the full forward of its
    own prompt + token, and the prefill's cache is left as it was (repeat writes new buffers)."""
    decoder = exported[1]
    rng = np.random.default_rng(2)
    prompts, nexts = rng.integers(0, 1400, (2, 12)), rng.integers(0, 1400, (6, 1))
    reference = _full_forward_logits(decoder, np.concatenate([np.repeat(prompts, 3, axis=0), nexts], axis=1))[:, -1]
    tiled = _full_forward_logits(decoder, np.concatenate([np.tile(prompts, (3, 1)), nexts], axis=1))[:, -1]
    assert np.abs(tiled - reference).max() > 1e-3  # a wrong row order would be caught
    _text_prefill(decoder, prompts, capacity=13)
    before = decoder.snapshot()
    decoder.repeat_cache(3)
    assert decoder.cache_shape() == (6, decoder.num_kv_heads, 12, decoder.head_dim) and decoder.capacity == 13
    assert decoder.past[0][0].device_name() == decoder.device  # an OrtValue on the session's device
    assert decoder.past[0][0].data_ptr() != before.past[0][0].data_ptr()
    ours = _text_step(decoder, nexts, 12)[:, 0]
    diff = float(np.abs(ours - reference).max())
    print(f"repeated cache step vs full forward: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    decoder.restore(before)  # the un-repeated cache is intact
    assert decoder.cache_shape() == (2, decoder.num_kv_heads, 12, decoder.head_dim)
    np.testing.assert_allclose(_text_step(decoder, nexts[::3], 12)[:, 0], reference[::3], rtol=0, atol=1e-5)


def test_prefill_without_capacity_allocates_its_cache(exported):
    """Without a capacity the prefill's run allocates the cache itself, exactly the prompt's rows,
    and a later step still extends it (by new buffers); the cache-row session opens only when a
    cache is first repeated."""
    decoder = TextDecoder(exported[0])
    assert decoder.cache_rows is None
    prompt = np.random.default_rng(3).integers(0, 1400, (2, 9))
    _text_prefill(decoder, prompt)
    assert decoder.capacity == 9 and decoder.cache_shape() == (2, decoder.num_kv_heads, 9, decoder.head_dim)
    nexts = np.array([[5], [7]])
    reference = _full_forward_logits(decoder, np.concatenate([prompt, nexts], axis=1))[:, -1]
    _text_prefill(decoder, prompt)
    np.testing.assert_allclose(_text_step(decoder, nexts, 9)[:, 0], reference, rtol=0, atol=1e-5)
    assert decoder.capacity == 10
    decoder.repeat_cache(2)
    assert decoder.cache_rows is not None and decoder.cache_shape()[0] == 4


def test_prefill_keeping_no_cache(exported):
    """A prefill whose layers share one pair of KV buffers gives every position's logits of the
    ordinary prefill (each layer's attention reads its own keys before the next layer writes), and
    leaves no cache to step on."""
    decoder = TextDecoder(exported[0])
    ids = np.random.default_rng(5).integers(0, 1400, (2, 10))
    cos, sin = decoder.cos_sin(decode_position_ids(0, ids.shape[1], np.zeros((1, 1), np.int64), len(ids)))
    reference = decoder.logits(decoder.prefill(decoder.embed(ids), cos, sin))
    shared = decoder.logits(decoder.prefill(decoder.embed(ids), cos, sin, keep_cache=False))
    np.testing.assert_allclose(shared, reference, rtol=0, atol=1e-6)
    assert not decoder.past and decoder.cache_shape()[0] == 0
    with pytest.raises(InputError, match="before prefill"):
        decoder.step(decoder.embed(ids[:, :1]), cos[:, :1], sin[:, :1])
    with pytest.raises(InputError, match="takes no capacity"):
        decoder.prefill(decoder.embed(ids), cos, sin, capacity=12, keep_cache=False)


def test_prefill_keeping_no_cache_is_bound_per_shape(exported):
    """That prefill runs bound buffers (`fixed_prefill`), kept while the shape repeats: a second
    prompt of the same shape, with new embeddings and new rotary tables, gets its own logits (not
    the first one's), and another shape binds anew. Inputs already in the bound buffers (where
    the splice writes them) are not copied."""
    decoder = TextDecoder(exported[0])
    rng = np.random.default_rng(6)

    def both(ids, start):
        cos, sin = decoder.cos_sin(decode_position_ids(start, ids.shape[1], np.zeros((1, 1), np.int64), len(ids)))
        reference = decoder.logits(decoder.prefill(decoder.embed(ids), cos, sin))
        return decoder.logits(decoder.prefill(decoder.embed(ids), cos, sin, keep_cache=False)), reference

    first = decoder.fixed_prefill(2, 10)
    for ids, start in ((rng.integers(0, 1400, (2, 10)), 0), (rng.integers(0, 1400, (2, 10)), 3)):
        shared, reference = both(ids, start)
        np.testing.assert_allclose(shared, reference, rtol=0, atol=1e-6)
        assert decoder.uncached is first
    shared, reference = both(rng.integers(0, 1400, (1, 7)), 0)
    np.testing.assert_allclose(shared, reference, rtol=0, atol=1e-6)
    assert decoder.uncached is not first and decoder.uncached.key == (1, 7)
    buffers = decoder.uncached.inputs
    buffers["inputs_embeds"].update_inplace(decoder.embed(np.full((1, 7), 3)))
    kept = decoder.logits(decoder.prefill(buffers["inputs_embeds"], *decoder.uncached.tables, keep_cache=False))
    cos, sin = decoder.uncached.tables
    np.testing.assert_allclose(kept, decoder.logits(decoder.prefill(decoder.embed(np.full((1, 7), 3)), cos, sin)),
                               rtol=0, atol=1e-6)


def test_cuda_decoder_folds_the_rotary_into_attention(exported, monkeypatch):
    """decoder_cuda.onnx has no RotaryEmbedding left: every GroupQueryAttention rotates q and k
    itself on the per-token tables (padded to the cache's length), and the weights stay in
    decoder.onnx.data. On the CPU it can run only a one-row prompt (ONNX Runtime's CPU kernel
    counts a prompt's positions from 0, which are then the token rows): there its hidden states
    are the decoder's."""
    from edgejudge.export.onnx_decoder import write_cuda_decoder
    from edgejudge.runtime import decoder as decoder_module

    out, decoder, _ = exported
    path = write_cuda_decoder(out / "decoder.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    attention = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert "RotaryEmbedding" not in {n.op_type for n in proto.graph.node}
    assert len(attention) == decoder.num_layers
    for node in attention:
        assert node.input[7:] == ["cuda_rotary/cos", "cuda_rotary/sin", attention[0].input[9]]
        assert next(a.i for a in node.attribute if a.name == "do_rotary") == 1
    stored = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert stored == {"decoder.onnx.data"} and path.stat().st_size < 2**20
    monkeypatch.setattr(decoder_module, "DECODER_NAME", path.name)  # the CPU session on it
    folded = TextDecoder(out)
    ids = np.random.default_rng(8).integers(0, 1400, (1, 12))
    cos, sin = decoder.cos_sin(decode_position_ids(0, ids.shape[1], np.zeros((1, 1), np.int64)))
    for capacity in (None, 20):  # the cache just the prompt, and a cache of room beyond it
        np.testing.assert_allclose(folded.logits(folded.prefill(folded.embed(ids), cos, sin, capacity=capacity)),
                                   decoder.logits(decoder.prefill(decoder.embed(ids), cos, sin, capacity=capacity)),
                                   rtol=0, atol=1e-5)


def test_snapshot_restore(exported):
    """A 3-token step (the score-prefix pattern) written in place, then restore: steps on the
    restored cache equal a full forward that never saw those 3 tokens, written over the detour's
    rows in the same buffer. Running past the room a prefill gave is refused."""
    decoder = exported[1]
    rng = np.random.default_rng(3)
    prompt, detour, path = rng.integers(0, 1400, (1, 10)), rng.integers(0, 1400, (1, 3)), rng.integers(0, 1400, (1, 3))
    detour_reference = _full_forward_logits(decoder, np.concatenate([prompt, detour], axis=1))[:, 10:]
    path_reference = _full_forward_logits(decoder, np.concatenate([prompt, path], axis=1))[:, 10:]
    _text_prefill(decoder, prompt, capacity=13)
    buffer = decoder.past[0][0].data_ptr()
    saved = decoder.snapshot()
    assert np.abs(_text_step(decoder, detour, 10) - detour_reference).max() <= 1e-5
    decoder.restore(saved)
    assert decoder.cache_shape() == (1, decoder.num_kv_heads, 10, decoder.head_dim)
    ours = np.concatenate([_text_step(decoder, path[:, j:j + 1], 10 + j) for j in range(3)], axis=1)
    assert decoder.past[0][0].data_ptr() == buffer
    diff = float(np.abs(ours - path_reference).max())
    print(f"steps after restore vs full forward: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    _text_prefill(decoder, prompt, capacity=12)
    _text_step(decoder, path[:, :1], 10)
    with pytest.raises(InputError, match="2 tokens after 11 do not fit the KV cache of 12"):
        _text_step(decoder, path[:, 1:], 11)


def test_non_finite_logits_are_refused(exported):
    """NaN hidden states (a float type that overflowed, a device run gone wrong) give NaN logits:
    they are refused, on the host path and on the device path, rather than scored or decoded."""
    decoder = exported[1]
    hidden = np.full((1, 2, decoder.hidden_size), np.nan, np.float32)
    with pytest.raises(InputError, match="non-finite logits"):
        decoder.logits(hidden)
    import onnxruntime as ort

    on_device = ort.OrtValue.ortvalue_from_numpy(hidden.astype(decoder.dtype), decoder.device, decoder.device_id)
    with pytest.raises(InputError, match="non-finite logits"):
        decoder.logits(on_device, slice(-1, None))
    assert np.isfinite(decoder.logits(np.zeros_like(hidden))).all()
