"""The ONNX judge engine and the control-loop API on the tiny Qwen3-VL (fp32, CPU):

- batched candidate-label scoring (one prefill per view batch, one step for all labels) equals
  each label's own full forward (1e-5) and HF's forward (1e-4), with the same multi-view decision;
- views of one length run as one batch, others one after another, with the same scores;
- the vision-group cache: a sliding window re-encodes only its new groups, bit-identically;
- greedy answers equal HF `generate`, the digit distribution equals HF's softmax at the score
  position, and bad input is one InputError;
- the GPU memory cap refuses a request whose weights + KV cache estimate is over it, before any run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgejudge import Judge
from edgejudge.errors import InputError
from edgejudge.export.fixtures import tiny_model_dir
from edgejudge.export.onnx import export_onnx
from edgejudge.export.verify import reference_scorer
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.decoder import VisualRows
from edgejudge.runtime.engine import (StageTimer, VisionCache, cache_copies, check_gpu_memory, device_weight_bytes,
                                      label_positions, mean_nll)
from edgejudge.runtime.sessions import execution_providers, pin_host_memory
from edgejudge.runtime.video import read_video
from edgejudge.specs import JudgeSpec, get_spec

ROBOCASA = get_spec("robocasa-completion")
INSTRUCTION = "Place the red block in the box."
TEXT = ROBOCASA.user_text.format(instruction=INSTRUCTION)
# Labels of different token counts (1, 2, more): padding at the end of the batch is exercised.
LABELS = ("complete", "not complete", "not yet complete at all")
SCORE_SPEC = JudgeSpec(
    name="test-score", families=("qwen3_vl",), sample="none", answer="json_score", fields=("caption", "axis"),
    user_text="Caption: {caption}\nRate the {axis} of the video from 1 to 5. Answer in JSON.",
    score_prefix='{{"{axis}": ', max_new_tokens=8,
)


def frames(seed: int, count: int = 6, height: int = 64, width: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def test_mean_nll_equals_float64_log_softmax():
    """The float32 exp summed in float64 against scipy's float64 log-softmax, on a vocabulary of
    Qwen's size with logits far from zero (where a float32 sum would lose digits)."""
    from scipy.special import log_softmax

    logits = (np.random.default_rng(0).standard_normal((3, 151936)) * 4 + 30).astype(np.float32)
    ids = np.array([17, 151935, 0])
    reference = -log_softmax(logits.astype(np.float64), axis=-1)[np.arange(3), ids].mean()
    assert abs(mean_nll(logits, ids) - reference) < 1e-9 * abs(reference)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "artifact"
    return export_onnx(tiny_model_dir("qwen3_vl"), None, "fp32", out, judge_spec=ROBOCASA.name)


@pytest.fixture(scope="module")
def judge(artifact):
    return Judge.load(artifact)


@pytest.fixture(scope="module")
def hf():
    return reference_scorer(tiny_model_dir("qwen3_vl"), None)  # fp32, no adapter


def own_forward_scores(judge: Judge, clip, labels) -> list[float]:
    """Each label with its own full forward over prompt + label (no cache reuse, no batching)."""
    engine = judge.engine
    arrays = runtime_model.build_inputs(engine.model, [clip], TEXT)
    features, taps = engine.vision.encode(arrays["pixel_values_videos"], arrays["video_grid_thw"])
    scores = []
    for label in labels:
        label_ids = engine.model.prompter.encode(label)
        ids, positions = label_positions(arrays, label_ids)
        embeds, deepstack = engine.decoder.multimodal_embeds(ids, engine.model.video_token_id,
                                                             VisualRows.of(features, taps))
        hidden = engine.decoder.prefill(embeds, *engine.decoder.cos_sin(positions), deepstack)
        scores.append(mean_nll(engine.decoder.logits(hidden[:, arrays["input_ids"].shape[1] - 1:-1])[0], label_ids))
    return scores


def spy(monkeypatch, obj, name: str, record) -> list:
    """Wrap obj.name so each call appends record(*args) to the returned list."""
    calls, original = [], getattr(obj, name)

    def wrapped(*args, **kwargs):
        calls.append(record(*args))
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)
    return calls


@pytest.mark.parametrize("labels", [LABELS, LABELS[:2], ("complete", "not")],
                         ids=["two-multi-token-labels", "one-multi-token-label", "one-token-labels"])
def test_batched_labels_equal_own_forward(judge, monkeypatch, labels):
    """Whatever the labels' lengths (the cache copied per label of several tokens, the only one
    carried by the prefill, or none, both keeping no cache), the scores equal each label's own
    forward."""
    engine = judge.engine
    clips = [read_video(frames(1)), read_video(frames(2))]
    prompts = [engine.prompt([c], TEXT) for c in clips]
    prefills = spy(monkeypatch, engine.decoder, "prefill", lambda embeds, *_: tuple(embeds.shape()[:2]))
    steps = spy(monkeypatch, engine.decoder, "step", lambda embeds, *_: embeds.shape[:2])
    repeats = spy(monkeypatch, engine.decoder, "repeat_cache", lambda repeats: repeats)
    scores = engine.score_labels(prompts, labels)
    lengths = [len(engine.model.prompter.encode(label)) for label in labels]
    fed = sum(n > 1 for n in lengths)
    assert fed == {LABELS: 2, LABELS[:2]: 1}.get(labels, 0)
    assert lengths[0] == 1 and (labels != LABELS or max(lengths) > 2)  # padding, several label steps
    width, length = max(lengths) - 1, prompts[0].length
    if fed == 1:  # both views in one prefill, carrying the label
        assert prefills == [(2, length + width)] and steps == []
    else:  # all fed rows together, one step per label position
        assert prefills == [(2, length)] and steps == [(2 * fed, 1)] * width
    # a cache is kept only when label tokens are fed after the prefill, with no room left over
    assert engine.decoder.capacity == (length + width if fed > 1 else 0)
    assert repeats == ([fed] if fed > 1 else [])
    monkeypatch.undo()
    reference = np.array([own_forward_scores(judge, c, labels) for c in clips])
    diff = np.abs(scores - reference).max()
    print(f"batched vs own full forward: max |dNLL| {diff:.1e}")
    assert diff <= 1e-5


def test_prompt_text_side_is_kept_per_shape(judge):
    """Clips of the same shape, indices and rate share one prompt text side (the control loop's
    case); another instruction or frame count gets its own, equal to a fresh one."""
    engine = judge.engine
    first, second = (engine.prompt([read_video(frames(seed))], TEXT) for seed in (1, 2))
    assert first.arrays is second.arrays and first.clips is not second.clips
    other = engine.prompt([read_video(frames(1))], TEXT + " Now.")
    shorter = engine.prompt([read_video(frames(1, count=4))], TEXT)
    assert other.arrays is not first.arrays and shorter.length < first.length
    fresh = runtime_model.prompt_inputs(engine.model, shorter.clips, TEXT)
    assert all(np.array_equal(fresh[k], shorter.arrays[k]) for k in fresh)


def test_check_matches_hf(judge, hf):
    """Decision, final and per-view scores against HF's forward (per view, per label)."""
    views = {"right": frames(3), "left": frames(4)}
    decision = judge.check(INSTRUCTION, views, sample="none")
    model = judge.engine.model
    reference = {name: hf(model, runtime_model.build_inputs(model, [read_video(v)], TEXT), ROBOCASA.labels)
                 for name, v in views.items()}
    diff = max(abs(decision.views[v][label] - reference[v][label]) for v in views for label in ROBOCASA.labels)
    print(f"engine vs HF: max |dNLL| {diff:.1e}; decision {decision.label}")
    assert diff <= 1e-4
    mean = {label: np.mean([reference[v][label] for v in views]) for label in ROBOCASA.labels}
    assert decision.label == min(mean, key=mean.get)
    for label in ROBOCASA.labels:
        assert decision.scores[label] == pytest.approx(np.mean([decision.views[v][label] for v in views]), abs=1e-12)
    assert set(decision.timings_ms) == {"preprocess", "vision", "prefill", "scoring", "total"}
    assert decision.to_dict()["prediction"] == decision.label


def test_views_of_different_lengths(judge, monkeypatch):
    views = {"right": frames(5, count=6), "left": frames(6, count=4)}
    prefills = spy(monkeypatch, judge.engine.decoder, "prefill", lambda embeds, *_: embeds.shape()[0])
    decision = judge.check(INSTRUCTION, views, sample="none")
    assert prefills == [1, 1]
    monkeypatch.undo()
    for name, v in views.items():
        reference = own_forward_scores(judge, read_video(v), ROBOCASA.labels)
        assert np.abs(np.array(list(decision.views[name].values())) - reference).max() <= 1e-5


def test_vision_cache_sliding_window(artifact, monkeypatch):
    """A robot stream: each step appends 2 frames and drops 2. The cached judge encodes only the
    new group per view (uploaded as uint8 levels), and gives the uncached judge's features and
    scores bit for bit, and those of HF's float pixel values."""
    cached, uncached = Judge.load(artifact, cache_groups=64), Judge.load(artifact, cache_groups=0)
    stream = {"right": frames(7, count=14), "left": frames(8, count=14)}
    rows = spy(monkeypatch, cached.engine.vision, "run_into", lambda patches, *_: (patches.shape[0], patches.dtype))
    for step, start in enumerate(range(0, 7, 2)):
        window = {name: f[start:start + 8] for name, f in stream.items()}
        a = cached.check(INSTRUCTION, window, sample="none")
        b = uncached.check(INSTRUCTION, window, sample="none")
        assert a.views == b.views and a.scores == b.scores
        assert rows[-1] == (8 if step == 0 else 2, np.uint8)  # 4 groups per view, then 1 new group per view
    assert len(rows) == 4 and cached.engine.groups_encoded == 8 + 3 * 2
    assert uncached.engine.groups_encoded == 4 * 8
    # the cached features are what the whole clip's encoding gives, bit for bit
    engine = cached.engine
    clip = read_video(stream["left"][6:14])
    cached_features, cached_taps = engine.decoder.visual_arrays(engine.visual([engine.prompt([clip], TEXT)],
                                                                              StageTimer())[0])
    assert len(rows) == 4  # all from the cache: no new vision run
    arrays = runtime_model.build_inputs(engine.model, [clip], TEXT)
    features, taps = engine.vision.encode(arrays["pixel_values_videos"], arrays["video_grid_thw"])
    assert np.array_equal(cached_features, features) and np.array_equal(cached_taps, np.stack(taps))


def test_vision_cache_is_bounded(artifact):
    small = Judge.load(artifact, cache_groups=3)
    views = {"right": frames(9, count=8), "left": frames(10, count=8)}
    full = Judge.load(artifact, cache_groups=0).check(INSTRUCTION, views, sample="none")
    assert small.check(INSTRUCTION, views, sample="none").views == full.views  # 8 groups needed, 3 kept
    assert len(small.engine.cache.entries) == 3


def test_vision_store_ring_claims():
    """New groups take the rows after the last claimed, from row 0 at the end of the store, and
    drop what was there; rows a call reads are never given to its new groups."""
    cache = VisionCache(max_groups=8)
    cache.reset([], 10)
    assert cache.claim(4, []) == 0
    cache.put("a", (0, 4))
    assert cache.claim(4, [(0, 4)]) == 4
    cache.put("b", (4, 4))
    assert cache.claim(4, [(0, 4)]) is None  # 8 + 4 > 10: from row 0, over "a", which the call reads
    assert cache.claim(4, [(4, 4)]) == 0 and list(cache.entries) == ["b"]  # "a" overwritten
    assert cache.claim(11, []) is None  # more than the store holds


def test_vision_store_wraps_onto_read_rows(artifact, monkeypatch):
    """A call whose new group would overwrite a group it reads from the store encodes all its
    groups again: its features are still the full recomputation's, bit for bit."""
    engine = Judge.load(artifact, cache_groups=2).engine  # a store of 2 groups
    first, other = frames(11, count=4), frames(12, count=2)
    rows = spy(monkeypatch, engine.vision, "run_into", lambda patches, *_: patches.shape[0])
    engine.visual([engine.prompt([read_video(first)], TEXT)], StageTimer())  # groups A, B on rows 0, 1
    clip = read_video(np.concatenate([other, first[:2]]))  # groups C (new), A (cached on row 0)
    visual = engine.visual([engine.prompt([clip], TEXT)], StageTimer())[0]
    assert rows == [2, 2]  # C's rows would have been A's: both encoded again
    arrays = runtime_model.build_inputs(engine.model, [clip], TEXT)
    features, taps = engine.vision.encode(arrays["pixel_values_videos"], arrays["video_grid_thw"])
    cached_features, cached_taps = engine.decoder.visual_arrays(visual)
    assert np.array_equal(cached_features, features) and np.array_equal(cached_taps, np.stack(taps))


@pytest.fixture(scope="module")
def scorer(artifact):
    return Judge.load(artifact, spec=SCORE_SPEC)


def hf_feed(ids: np.ndarray, arrays: dict, video_token_id: int) -> dict:
    ids = torch.from_numpy(ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values_videos": torch.from_numpy(arrays["pixel_values_videos"]),
            "video_grid_thw": torch.from_numpy(arrays["video_grid_thw"]),
            "mm_token_type_ids": (ids == video_token_id).long() * 2}


def test_ask_matches_hf_generate_and_digit_softmax(scorer, hf):
    fields = {"caption": "A ball falls off a table.", "axis": "gravity"}
    video = frames(11, count=4)
    answer = scorer.ask(video, **fields)
    model = scorer.engine.model
    arrays = runtime_model.build_inputs(model, [read_video(video)], SCORE_SPEC.user_text.format(**fields))
    prompt_len = arrays["input_ids"].shape[1]
    with torch.no_grad():
        generated = hf.model.generate(**hf_feed(arrays["input_ids"], arrays, model.video_token_id), do_sample=False,
                                      max_new_tokens=SCORE_SPEC.max_new_tokens)
        prefix = model.prompter.encode('{"gravity": ')
        ids = np.concatenate([arrays["input_ids"], prefix[None]], axis=1)
        logits = hf.model(**hf_feed(ids, arrays, model.video_token_id)).logits[0, -1].double()
    assert answer.token_ids == generated[0, prompt_len:].tolist()
    assert answer.text == model.prompter.decode(answer.token_ids)
    digits = [int(model.prompter.encode(d)[0]) for d in "12345"]
    reference = torch.softmax(logits[digits], 0).numpy()
    ours = np.array([answer.distribution[d] for d in range(1, 6)])
    print(f"digit distribution {np.round(ours, 4).tolist()}, max |dp| vs HF {np.abs(ours - reference).max():.1e}")
    assert np.abs(ours - reference).max() <= 1e-5
    assert answer.expected == pytest.approx(float(ours @ np.arange(1, 6)), abs=1e-12)
    assert set(answer.timings_ms) == {"preprocess", "vision", "prefill", "distribution", "decode", "total"}


def test_ask_parses_with_the_spec_answer_kind(scorer):
    from edgejudge.runtime.answers import parse_answer

    answer = scorer.ask(frames(12, count=4), caption="A cup slides.", axis="friction")
    assert answer.parsed == parse_answer(SCORE_SPEC.answer, answer.text)
    assert answer.to_dict(key="friction")["key"] == "friction"


def test_ask_stops_at_eos(scorer, monkeypatch):
    video = frames(13, count=4)
    first = scorer.ask(video, caption="A ball rolls.", axis="inertia").token_ids[0]
    monkeypatch.setattr(scorer.engine, "eos_ids", {first})
    answer = scorer.ask(video, caption="A ball rolls.", axis="inertia")
    assert answer.token_ids == [first] and answer.eos


def test_ask_with_the_users_prompt_yaml(artifact, scorer, tmp_path):
    """A spec whose prompt ships with the user's model (Cosmos-style prompt.yaml, our wording):
    the system and user prompts are read at load, and the answer is the one for that prompt."""
    from dataclasses import replace

    (tmp_path / "prompt.yaml").write_text("system_prompt: You rate physics in videos.\n"
                                          "user_prompt: Is the motion plausible? Answer <answer>N</answer>, N in 1..5.\n")
    spec = replace(get_spec("cosmos-plausibility"), families=("qwen3_vl",), sample="none", max_new_tokens=6)
    judge = Judge.load(artifact, spec=spec, prompt_dir=tmp_path)
    video = frames(14, count=4)
    answer = judge.ask(video)
    engine = judge.engine
    prompt = engine.prompt([read_video(video)], "Is the motion plausible? Answer <answer>N</answer>, N in 1..5.",
                           "You rate physics in videos.")
    tokens, digits = engine.generate(prompt, 6, "<answer>")
    assert answer.token_ids == tokens and list(answer.distribution.values()) == digits.tolist()
    rendered = engine.model.prompter.decode(prompt.arrays["input_ids"][0].tolist(), skip_special_tokens=False)
    assert rendered.startswith("<|im_start|>system\nYou rate physics in videos.<|im_end|>")
    with pytest.raises(InputError, match="prompt.yaml: prompt file not found"):
        Judge.load(artifact, spec=spec)


def test_bad_input(artifact, judge, scorer):
    views = {"right": frames(1), "left": frames(2)}
    cases = [
        (lambda: judge.check(INSTRUCTION, {"right": frames(1)}), "takes views right, left"),
        (lambda: judge.check(INSTRUCTION, {"right": frames(1), "top": frames(2)}), "takes views right, left"),
        (lambda: judge.check(INSTRUCTION, [frames(1), frames(2)]), "views must map view names to frames"),
        (lambda: judge.check("  ", views), "needs a non-empty instruction"),
        (lambda: judge.check(INSTRUCTION, {"right": [frames(1)[0], frames(2, width=64)[0]], "left": frames(2)}),
         "all frames must have the same size"),
        (lambda: judge.engine.score_labels([judge.engine.prompt([read_video(frames(1))], TEXT)], ("complete", "")),
         "label '' tokenizes to nothing"),
        (lambda: judge.ask(frames(1), caption="x"), "use check"),
        (lambda: scorer.check(INSTRUCTION, views), "use ask"),
        (lambda: scorer.ask(frames(1), caption="x"), "needs a non-empty axis"),
        (lambda: scorer.ask(frames(1), caption="x", axis="y", mood="z"), "not mood"),
        (lambda: Judge.load(artifact, spec="phyground"), "is a qwen3_vl model; spec phyground needs qwen3_5"),
        (lambda: Judge.load(artifact, device="tpu"), "expected cpu, cuda or cuda:N"),
        (lambda: Judge.load(artifact, gpu_mem_gb=4), "applies to device 'cuda' only"),
        (lambda: Judge.load(artifact, cache_groups=-1), "max_groups >= 0"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()


def test_gpu_memory_cap(artifact, monkeypatch):
    """The estimate: the graphs' files + the float head's table, plus layers * 2 * rows * kv_heads *
    tokens * head_dim * itemsize for the request; a cap under it refuses before any run. (The cap
    itself needs device cuda; on the CPU the engine's attribute is set directly.)"""
    files = {p.name: p.stat().st_size for p in artifact.iterdir()}
    weights = device_weight_bytes(artifact)
    assert weights == sum(size for name, size in files.items() if name.endswith((".onnx", ".onnx.data"))) \
        + files["embed.npy"]  # the tiny Qwen3-VL ties its head to the embeddings
    engine = Judge.load(artifact).engine
    decoder = engine.decoder
    layer_bytes = 2 * 3 * decoder.num_kv_heads * 100 * decoder.head_dim * 4  # keys + values, 3 x 100 tokens, fp32
    assert decoder.kv_cache_bytes(3, 100) == decoder.num_layers * layer_bytes
    prompts = [engine.prompt([read_video(frames(1))], TEXT), engine.prompt([read_video(frames(2))], TEXT)]
    label_ids = [engine.model.prompter.encode(label) for label in LABELS]
    width = max(len(ids) for ids in label_ids) - 1
    rows = 2 * (1 + cache_copies(label_ids))  # the prefill's cache and its copies
    kv = decoder.kv_cache_bytes(rows, prompts[0].length + width)
    runs = spy(monkeypatch, engine.vision, "run_into", lambda *_: 1)
    engine.gpu_mem_gb = (weights + kv // 2) / 2**30
    with pytest.raises(InputError, match=rf"estimated {(weights + kv) / 2**30:.3g} GiB on the GPU .* KV cache "
                                         rf"{kv / 2**30:.3g} GiB for {rows} x {prompts[0].length + width} tokens\) is over"):
        engine.score_labels(prompts, LABELS)
    assert runs == []  # refused up front
    engine.gpu_mem_gb = (weights + kv) / 2**30 * 1.01
    assert engine.score_labels(prompts, LABELS).shape == (2, len(LABELS))
    with pytest.raises(InputError, match=r"weights .* GiB \+ KV cache 0 GiB\) is over the 0.0001 GiB cap"):
        check_gpu_memory(1e-4, weights)  # what Engine() checks before loading a session


def test_out_of_memory_is_one_line(judge, monkeypatch):
    """ORT's arena refusing an allocation (over the cap) reaches the caller as an InputError of one
    line; other runtime errors pass through unchanged."""
    message = ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
               "MatMulNBits node.\nFailed to allocate memory for requested buffer of size 52428800\nStacktrace:")

    def fail(*_):
        raise RuntimeError(message)

    monkeypatch.setattr(judge.engine, "score_labels", fail)
    monkeypatch.setattr(judge.engine, "gpu_mem_gb", 16.0)
    f = frames(1)
    with pytest.raises(InputError, match=r"^the request ran out of the 16 GiB cap: Failed to allocate memory "
                                         r"for requested buffer of size 52428800$"):
        judge.check("Open the drawer.", {"right": f, "left": f}, sample="none")
    monkeypatch.setattr(judge.engine, "score_labels", lambda *_: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="^other$"):
        judge.check("Open the drawer.", {"right": f, "left": f}, sample="none")


def test_cuda_providers():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers = execution_providers("cuda:1", gpu_mem_gb=2)
        assert providers == [("CUDAExecutionProvider", {"device_id": 1, "arena_extend_strategy": "kSameAsRequested",
                                                        "gpu_mem_limit": 2 * 2**30}), "CPUExecutionProvider"]
    else:
        with pytest.raises(InputError, match="needs onnxruntime-gpu"):
            execution_providers("cuda")


class FakeCudaRuntime:
    """Records page-locking calls; `refuse` makes cudaHostRegister fail as CUDA does."""

    def __init__(self, refuse: bool = False):
        self.refuse, self.calls = refuse, []

    def cudaHostRegister(self, address, size, flags):
        self.calls.append(("register", address, size, flags))
        return 1 if self.refuse else 0

    def cudaHostUnregister(self, address):
        self.calls.append(("unregister", address))
        return 0

    def cudaGetLastError(self):
        self.calls.append(("clear",))
        return 0


def test_pinned_host_memory_lives_with_its_array():
    import gc

    cuda = FakeCudaRuntime()
    array = np.empty((3, 1000), np.uint8)
    address = array.ctypes.data
    assert pin_host_memory(array, cuda)
    assert cuda.calls == [("register", address, 3000, 1)]
    assert not pin_host_memory(array[1:], cuda)  # a view: its base owns the memory
    view = array[:2]
    del array
    gc.collect()
    assert cuda.calls[-1][0] == "register"  # the view keeps the memory alive, and pinned
    del view
    gc.collect()
    assert cuda.calls[-1] == ("unregister", address)

    refused = FakeCudaRuntime(refuse=True)
    array = np.empty(10, np.uint8)
    assert not pin_host_memory(array, refused)
    del array
    gc.collect()
    assert [call[0] for call in refused.calls] == ["register", "clear"]  # nothing to unregister


def test_judge_runs_without_torch(artifact):
    code = (
        "import sys, numpy as np\n"
        "from edgejudge import Judge\n"
        f"judge = Judge.load({str(artifact)!r})\n"
        "f = np.zeros((4, 64, 64, 3), np.uint8)\n"
        "print(judge.check('Open the drawer.', {'right': f, 'left': f}, sample='none').label)\n"
        "print(','.join(m for m in ('torch', 'transformers', 'peft', 'onnx') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    label, imported = proc.stdout.splitlines()
    assert label in ROBOCASA.labels and imported == ""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_frame_workers_in_a_forked_child():
    """The frame-preparation threads are per process: a child forked after the parent used them
    gets a pool of its own that runs (an inherited pool would have no threads and hang)."""
    from edgejudge.runtime.engine import _workers

    parent = _workers()
    assert list(parent.map(abs, [-1, -2])) == [1, 2]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        try:
            ok = _workers() is not parent and _workers().submit(abs, -3).result(timeout=10) == 3
        except Exception:
            ok = False
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1" and status == 0
