"""The demo judge's training script: batching is exact, a few steps learn, what the vision tower
is taught is in the clips, and the shipped weights judge held-out clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from edgejudge import synthclips  # noqa: E402
from edgejudge.export import fixtures, train_demo  # noqa: E402
from edgejudge.export.merge import load_base  # noqa: E402
from edgejudge.runtime import model as runtime_model  # noqa: E402

DEMO_JUDGE = Path(train_demo.__file__).resolve().parents[1] / "edgejudge" / "demo_judge"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_torch_thread):
    """The cached tiny Qwen3-VL (the demo judge's layout at its smallest) and 4 clips per task."""
    model_dir = fixtures.tiny_model_dir("qwen3_vl")
    runtime = runtime_model.load(model_dir)
    sets = train_demo.make_clipsets(runtime, tmp_path_factory.mktemp("clips"), "train", 4)
    return model_dir, runtime, sets


def test_padded_batch_scores_each_example_as_if_alone(tiny):
    model_dir, runtime, sets = tiny
    model = load_base(model_dir)
    label_only = train_demo.Example(sets["completion"].arrays(2), runtime.prompter.encode("complete"))
    examples = [sets["completion"].example(1), sets["plausibility"].example(0), label_only]
    assert len({e.arrays["input_ids"].shape[1] + len(e.answer) for e in examples}) == 3  # really padded
    with torch.no_grad():
        batched = train_demo.answer_nll(model, train_demo.collate(examples, "cpu"), runtime.video_token_id)
        full = []  # the reference: HF's logits at every position of one example alone
        for e in examples:
            batch = train_demo.collate([e], "cpu")
            logp = train_demo.logits(model, batch, runtime.video_token_id, 0).log_softmax(-1)[0]
            start = e.arrays["input_ids"].shape[1] - 1
            full.append(-logp[start + np.arange(len(e.answer)), torch.from_numpy(e.answer)])
    for row, ref in zip(batched, full):
        np.testing.assert_allclose(row[: len(ref)].numpy(), ref.numpy(), atol=1e-5)
        assert not row[len(ref):].any()  # past its answer's end: no loss


def test_few_steps_reduce_the_loss(tiny):
    model_dir, runtime, sets = tiny
    torch.manual_seed(0)
    model = load_base(model_dir)
    vision = train_demo.train_vision(model, sets, steps=40, lr=5e-3, clips=2, seed=0, device="cpu", log_every=0)
    assert np.mean(vision[-3:]) < 0.8 * np.mean(vision[:3]), vision
    model.model.visual.requires_grad_(False)
    before = {n: p.clone() for n, p in model.model.visual.named_parameters()}
    losses = train_demo.train(model, train_demo.clip_batches(sets, 1, seed=0), steps=30, lr=5e-3, device="cpu",
                              video_token_id=runtime.video_token_id, log_every=0).mean(1)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    assert all(torch.equal(p, before[n]) for n, p in model.model.visual.named_parameters())  # frozen stays


def test_what_the_vision_tower_learns_is_in_the_clip():
    """Each violation has its own motion in some frame pair; plausible motion has none of them."""
    signs = {"hovering": ("stays high",), "reversing": ("rises high",), "through_floor": ("sinks",),
             "teleporting": ("gone", "vanishes", "appears")}
    records = [synthclips.make_clip("plausibility", 0, i)[1] for i in range(40)]
    for record in records:
        motions = train_demo.pair_motions(record["track"])
        assert len(motions) == train_demo.FRAMES_SEEN // 2 and set(motions) <= set(train_demo.MOTIONS), motions
        shown = {kind for kind, kind_signs in signs.items() if set(kind_signs) & set(motions)}
        assert record["kind"] in shown if record["kind"] != "plausible" else not shown, (record["kind"], motions)
    targets = train_demo.see_targets("plausibility", records)
    assert targets["motion"].shape == (40, train_demo.FRAMES_SEEN // 2)
    assert targets["score"].tolist() == [r["score"] - 1 for r in records]
    completion = [synthclips.make_clip("completion", 0, i)[1] for i in range(8)]
    outcome = train_demo.see_targets("completion", completion)["outcome"]
    assert [train_demo.OUTCOMES[k] for k in outcome] == [r["kind"] for r in completion]


def test_gravity_answers_are_read_by_the_runtime_parser():
    assert train_demo.gravity_score('{"gravity": 4}') == 4
    for text in ('{"gravity": 6}', '{"gravity": "4"}', '{"score": 4}', '{"gravity": 4', "[4]"):
        assert train_demo.gravity_score(text) is None


def test_shipped_demo_judge_judges_heldout_clips(tmp_path, one_torch_thread):
    """The committed base + adapter, loaded in HF, get held-out clips right; the adapter is
    trained (language tower and vision merger) and changes the scores."""
    from peft import PeftModel
    from safetensors import safe_open

    with safe_open(DEMO_JUDGE / "adapter" / "adapter_model.safetensors", "pt") as f:
        trained_b = [f.get_tensor(k).abs().max() > 0 for k in f.keys() if "lora_B" in k]
        assert any(".visual.merger." in k for k in f.keys()) and any(".language_model." in k for k in f.keys())
    assert all(trained_b)  # LoRA B starts at zero: every target has learned something
    runtime = runtime_model.load(DEMO_JUDGE / "base")
    sets = train_demo.make_clipsets(runtime, tmp_path, "heldout", 24)
    base = load_base(DEMO_JUDGE / "base")
    base_scores = train_demo.judge_completion(base, sets["completion"], 0, "cpu")
    judge = PeftModel.from_pretrained(base, DEMO_JUDGE / "adapter").eval()
    adapted = train_demo.judge_completion(judge, sets["completion"], 0, "cpu")
    assert max(abs(adapted[k] - base_scores[k]) for k in adapted) > 1e-3
    decided = []
    for i in range(len(sets["completion"].records)):
        scores = train_demo.judge_completion(judge, sets["completion"], i, "cpu")
        decided.append(min(scores, key=scores.get))
    right = [d == r["label"] for d, r in zip(decided, sets["completion"].records)]
    assert sum(right) >= 23, list(zip(decided, sets["completion"].records))
    scores = [train_demo.gravity_score(train_demo.greedy_answer(judge, sets["plausibility"], i, "cpu"))
              for i in range(20)]
    truth = [r["score"] for r in sets["plausibility"].records[:20]]
    assert all(s is not None and abs(s - t) <= 1 for s, t in zip(scores, truth)), list(zip(scores, truth))
    assert np.mean([s == t for s, t in zip(scores, truth)]) >= 0.9, list(zip(scores, truth))
