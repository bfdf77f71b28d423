"""The torch backend (bnb artifacts and HF model folders) on the tiny models, CPU:

- branching a prefilled cache copies every state kind, the Gated DeltaNet's included;
- the prompt prefill that decoding starts from (one-row static cache, video features put in the
  embeddings) equals HF's own forward, and the vision tower with its inputs precomputed equals
  the tower as HF runs it, bit for bit;
- batched label scoring (views batched, all labels on one cache) equals each label's own forward;
- through `Judge`, the same decisions, label NLLs, greedy tokens and digit distribution as the
  ONNX engine on the same weights;
- a bnb nf4 artifact runs through the same API with scores close to the fp32 reference;
- the memory estimate matches what is allocated, and a cap that cannot fit is refused.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgejudge.errors import InputError
from edgejudge.export.bnb import export_bnb
from edgejudge.export.fixtures import tiny_model_dir
from edgejudge.export.onnx import export_onnx
from edgejudge.export.verify import TorchScorer
from edgejudge.judge import Judge
from edgejudge.manifest import Manifest, write_manifest
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.video import read_video
from edgejudge.specs import JudgeSpec, get_spec
from edgejudge.torch_backend import TorchEngine, cache_bytes, grouped_sdpa, select_rows, weight_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROBOCASA = get_spec("robocasa-completion")
INSTRUCTION = "Place the red block in the box."
TEXT = ROBOCASA.user_text.format(instruction=INSTRUCTION)
LABELS = ("complete", "not complete", "not yet complete at all")  # 1, 2 and more tokens: padding exercised
SCORE_SPEC = JudgeSpec(
    name="test-score", families=("qwen3_vl",), sample="none", answer="json_score", fields=("caption", "axis"),
    user_text="Caption: {caption}\nRate the {axis} of the video from 1 to 5. Answer in JSON.",
    score_prefix='{{"{axis}": ', max_new_tokens=8,
)


def frames(seed: int, count: int = 4, height: int = 64, width: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def engines():
    return {family: TorchEngine(tiny_model_dir(family)) for family in ("qwen3_vl", "qwen3_5")}


def cache_states(cache) -> list[torch.Tensor]:
    """Every tensor a cache holds: keys/values, conv and recurrent states."""
    out = []
    for layer in cache.layers:
        out += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None and t.numel()]
        for name in ("conv_states", "recurrent_states"):
            out += [t for t in getattr(layer, name, {}).values() if t is not None]
    return out


def test_grouped_sdpa_equals_repeated_keys():
    """Query heads grouped as rows of their key head give HF's sdpa with repeated keys, for a
    step and for several tokens, under a mask that hides slots past each token's own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    for tokens in (1, 5):
        query = torch.randn(3, 8, tokens, 16, generator=gen)
        key, value = (torch.randn(3, 2, 20, 16, generator=gen) for _ in range(2))
        seen = 11  # slots 0..seen-1 hold earlier tokens; the new ones go after them
        allowed = torch.arange(20)[None, :] <= seen + torch.arange(tokens)[:, None]
        mask = torch.zeros(1, 1, tokens, 20).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        ours, _ = grouped_sdpa(module, query, key, value, mask, scaling=0.25)
        hf, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
        assert ours.shape == hf.shape == (3, tokens, 8, 16)
        torch.testing.assert_close(ours, hf, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_pixel_levels_normalized_on_device_equal_host_pixels(engines, family):
    """The uint8 patch rows the torch backend uploads, looked up in the normalization table, are
    the float pixel values the processor computes on the host, bit for bit."""
    engine = engines[family]
    clip = read_video(frames(3, count=4, height=70, width=100))
    host = runtime_model.build_inputs(engine.model, [clip], "x")
    levels = engine._levels([clip], host["video_grid_thw"])
    assert levels.dtype == np.uint8 and levels.shape == host["pixel_values_videos"].shape
    looked_up = engine.pixel_values({"pixel_levels_videos": levels})
    assert torch.equal(looked_up, engine.pixel_values(host))


def test_branching_copies_linear_attention_states(engines):
    engine = engines["qwen3_5"]
    prefix = engine.prefill([engine.prompt([read_video(frames(1))], TEXT).arrays])
    before = [t.clone() for t in cache_states(prefix.cache)]
    kinds = {type(layer).__name__ for layer in prefix.cache.layers}
    assert kinds == {"LinearAttentionLayer", "DynamicLayer"}
    branch = select_rows(prefix.cache, torch.tensor([0, 0, 0]))
    for source, copy in zip(before, cache_states(branch)):
        assert copy.shape[0] == 3 and all(torch.equal(row, source[0]) for row in copy)
    # Decoding on the branch updates its conv/recurrent states in place; the prefix keeps its own.
    ids = torch.tensor([[5], [6], [7]])
    engine._hidden(branch, ids, engine._positions(torch.full((3,), prefix.length), 1, prefix.rope_deltas[[0, 0, 0]]))
    assert all(torch.equal(a, b) for a, b in zip(before, cache_states(prefix.cache)))
    assert not all(torch.equal(a, b[:1]) for a, b in zip(before, cache_states(branch)))


@pytest.mark.parametrize("family", ["qwen3_5", "qwen2_5_vl"])
def test_prompt_prefill_equals_hf_forward(engines, family):
    """`prefill_one` (the video features put in the embeddings by index, the language model on
    a one-row static cache emptied for each prompt) leaves the cache and logits of HF's own
    forward (DynamicCache); its vision inputs computed ahead give the tower's features bit for
    bit; the rows of one prompt length serve the next prompt of that length."""
    engine = engines.get(family) or TorchEngine(tiny_model_dir(family))
    engine.prompt_rows = None
    clips = [read_video(frames(seed, count)) for seed, count in ((1, 4), (2, 4), (3, 6))]
    prompts = [engine.prompt([clip], TEXT).arrays for clip in clips]
    assert prompts[0]["input_ids"].shape == prompts[1]["input_ids"].shape != prompts[2]["input_ids"].shape
    kept = []
    for arrays in prompts:
        ours, hf = engine.prefill_one(arrays), engine.prefill([arrays])
        kept.append(engine.prompt_rows)
        torch.testing.assert_close(ours.last_logits, hf.last_logits, atol=1e-5, rtol=0)
        ours_states, hf_states = cache_states(ours.cache), cache_states(hf.cache)
        assert [t.shape for t in ours_states] == [t.shape for t in hf_states]
        for a, b in zip(ours_states, hf_states):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        grid = torch.from_numpy(arrays["video_grid_thw"])
        tower = engine.net.model.get_video_features(engine.pixel_values(arrays), grid, return_dict=True)
        assert torch.equal(engine.video_features(arrays), torch.cat(tower.pooler_output))
    assert kept[0] is kept[1] and kept[2] is not kept[1] and kept[2].length == prompts[2]["input_ids"].shape[1]


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_batched_labels_equal_own_forward(engines, family, monkeypatch):
    """Views of one length share one prefill, all (view, label) pairs one padded batch; views of
    another length run on their own. Each equals the label's own full forward over prompt + label."""
    engine = engines[family]
    clips = [read_video(frames(2)), read_video(frames(3)), read_video(frames(4, count=6))]
    prompts = [engine.prompt([c], TEXT) for c in clips]
    prefills = []
    prefill = engine.prefill
    monkeypatch.setattr(engine, "prefill", lambda arrays: prefills.append(len(arrays)) or prefill(arrays))
    scores = engine.score_labels(prompts, LABELS)
    monkeypatch.undo()
    assert prefills == [2, 1]
    reference = TorchScorer(engine.net)
    expected = np.array([[reference(engine.model, p.arrays, LABELS)[label] for label in LABELS] for p in prompts])
    print(f"{family}: batched vs own forward, max |dNLL| {np.abs(scores - expected).max():.1e}")
    assert np.abs(scores - expected).max() <= 1e-5


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "artifact"
    return export_onnx(tiny_model_dir("qwen3_vl"), None, "fp32", out, judge_spec=ROBOCASA.name)


def test_judge_same_results_as_onnx(engines, onnx_artifact):
    torch_judge, onnx_judge = Judge(engines["qwen3_vl"], ROBOCASA), Judge.load(onnx_artifact)
    views = {"right": frames(5), "left": frames(6)}
    a = torch_judge.check(INSTRUCTION, views, sample="none")
    b = onnx_judge.check(INSTRUCTION, views, sample="none")
    diff = max(abs(a.views[v][label] - b.views[v][label]) for v in views for label in ROBOCASA.labels)
    print(f"torch vs ONNX check: max |dNLL| {diff:.1e}, decision {a.label}")
    assert a.label == b.label and diff <= 1e-4
    assert {"preprocess", "prefill", "scoring", "total"} <= set(a.timings_ms)

    torch_judge.spec = onnx_judge.spec = SCORE_SPEC
    fields = {"caption": "A ball falls off a table.", "axis": "gravity"}
    a, b = torch_judge.ask(frames(7), **fields), onnx_judge.ask(frames(7), **fields)
    assert a.token_ids == b.token_ids and a.text == b.text and a.parsed == b.parsed
    dp = max(abs(a.distribution[d] - b.distribution[d]) for d in range(1, 6))
    print(f"torch vs ONNX ask: same {len(a.token_ids)} tokens, max |dp(digit)| {dp:.1e}")
    assert dp <= 1e-5 and a.expected == pytest.approx(b.expected, abs=1e-5)


def test_bnb_nf4_artifact(engines, tmp_path):
    base = tiny_model_dir("qwen3_5")
    artifact = export_bnb(base, None, "nf4", tmp_path / "nf4")
    engine = TorchEngine(artifact)
    assert type(engine.net.model.language_model.layers[-1].mlp.down_proj).__name__ == "Linear4bit"
    clips = [read_video(frames(8)), read_video(frames(9))]
    nf4 = engine.score_labels([engine.prompt([c], TEXT) for c in clips], LABELS)
    reference = engines["qwen3_5"]
    fp32 = reference.score_labels([reference.prompt([c], TEXT) for c in clips], LABELS)
    print(f"nf4 vs fp32 label NLLs: max |d| {np.abs(nf4 - fp32).max():.3f}")
    assert 0 < np.abs(nf4 - fp32).max() < 0.1
    texts = ["Caption: a cup slides.\nAxis: friction", "Caption: a cup slides.\nAxis: inertia of the cup"]
    answers = engine.generate_many([clips[0]], texts, 6, score_prefixes=['{"friction": ', '{"inertia": '])
    for tokens, digits in answers:
        assert 1 <= len(tokens) <= 6 and digits.shape == (5,) and digits.sum() == pytest.approx(1.0)


def test_memory_estimate_and_cap(engines, tmp_path):
    for family, engine in engines.items():
        loaded = sum(p.numel() * p.element_size() for p in engine.net.parameters())  # tied weights once
        assert weight_bytes(tiny_model_dir(family), 4) == loaded
        prefix = engine.prefill([engine.prompt([read_video(frames(10))], TEXT).arrays])
        allocated = sum(t.numel() * t.element_size() for t in cache_states(prefix.cache))
        assert cache_bytes(engine.text_config, 1, prefix.length, 4) == allocated, family

    engine = engines["qwen3_5"]
    engine.rows = engine.prompt_rows = None  # nothing kept from earlier requests: they would count
    prompt = engine.prompt([read_video(frames(11))], TEXT)
    need = (engine.weights_bytes + cache_bytes(engine.text_config, 1, prompt.length, 4)) * 1.2
    engine.cap_bytes = int(need) + 1  # what gpu_mem_gb sets on CUDA; CPU takes no GPU cap
    try:
        engine.score_labels([prompt], ("complete",))  # fits: prompt alone
        with pytest.raises(InputError, match=r"2 x \d+ tokens need about .* over the GPU memory cap"):
            engine.score_labels([prompt, prompt], ("complete",))  # two views do not
    finally:
        engine.cap_bytes = None
    with pytest.raises(InputError, match="applies to device 'cuda' only"):
        TorchEngine(tiny_model_dir("qwen3_5"), gpu_mem_gb=4)


def test_refusals(tmp_path):
    base = tiny_model_dir("qwen3_vl")
    onnx_like = tmp_path / "onnx-like"
    shutil.copytree(base, onnx_like)
    model = runtime_model.load(base)
    write_manifest(onnx_like, Manifest(family="qwen3_vl", format="onnx", precision="fp32",
                                       preprocessing=model.vision.to_dict(), special_tokens={},
                                       chat_template=model.prompter.template_source))
    pickles = tmp_path / "pickles"
    shutil.copytree(base, pickles, ignore=shutil.ignore_patterns("*.safetensors*"))
    (pickles / "pytorch_model.bin").write_bytes(b"\0")
    cases = [
        (lambda: TorchEngine(onnx_like), "is a onnx artifact; the torch backend runs bnb artifacts"),
        (lambda: TorchEngine(pickles), "pickle files are never loaded"),
        (lambda: TorchEngine(base, device="tpu"), "expected cpu, cuda or cuda:N"),
        (lambda: TorchEngine(tmp_path / "missing"), "no such model directory"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()


def test_backend_needs_no_training_stack():
    """The torch backend loads and answers without peft or edgejudge.export ever imported."""
    code = (
        "import sys, numpy as np, torch\n"
        "from edgejudge.torch_backend import TorchEngine\n"
        "torch.set_num_threads(1)\n"
        "from edgejudge.runtime.video import read_video\n"
        f"engine = TorchEngine({str(tiny_model_dir('qwen3_5'))!r})\n"
        "f = np.zeros((4, 64, 64, 3), np.uint8)\n"
        "print(len(engine.generate(engine.prompt([read_video(f)], 'Is it complete?'), 2)[0]))\n"
        "print(','.join(m for m in ('peft', 'edgejudge.export') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["2", ""]


def test_judge_load_dispatches_by_format(tmp_path):
    """A plain HF folder (no manifest) and a bnb artifact load on the torch backend, an ONNX
    artifact on ONNX Runtime; a family the spec does not take is refused before any weight loads."""
    assert isinstance(Judge.load(tiny_model_dir("qwen3_vl"), spec=ROBOCASA.name).engine, TorchEngine)
    with pytest.raises(InputError, match="records no judge spec"):
        Judge.load(tiny_model_dir("qwen3_vl"))
    with pytest.raises(InputError, match="is a qwen3_5 model; spec robocasa-completion needs qwen3_vl"):
        Judge.load(tiny_model_dir("qwen3_5"), spec=ROBOCASA.name)


def test_ask_many_equals_each_question_alone(engines):
    """`Judge.ask_many` (a rubric: one prefill of what the prompts share) against `ask` per question."""
    judge = Judge(engines["qwen3_5"], JudgeSpec(**{**SCORE_SPEC.__dict__, "families": ("qwen3_5",)}))
    questions = [{"caption": "A ball falls off a table.", "axis": axis} for axis in ("gravity", "inertia", "shadow")]
    together = judge.ask_many(frames(8), questions)
    alone = [judge.ask(frames(8), **q) for q in questions]
    assert [a.token_ids for a in together] == [a.token_ids for a in alone]
    dp = max(abs(a.distribution[d] - b.distribution[d]) for a, b in zip(together, alone) for d in range(1, 6))
    assert dp <= 1e-5
