"""Whole rubric on one video prefill (PhyGround-style, tiny Qwen3.5, fp32, CPU).

The system prompt and video are prefilled once (full-attention KV cache and the Gated DeltaNet
conv/recurrent states), then all 16 axes continue from it as one batch, in lockstep on a static
cache. Proven equal to running each axis alone: HF `generate` on that axis's own full prompt
gives the same greedy tokens (rows stopping at EOS at different steps), the same logits at every
step (1e-4), and the same digit distribution at the score position. Prompts are written here
(the real ones are user files).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgejudge.errors import InputError
from edgejudge.export.fixtures import tiny_model_dir
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.engine import DIGITS
from edgejudge.runtime.video import read_video
from edgejudge.torch_backend import TorchEngine, shared_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = "You grade generated videos for physical plausibility. Reply with one JSON object."
CAPTION = "A red rubber ball rolls off a wooden table, bounces twice on the tiles and stops."
# 16 axes of different lengths; "gravity" / "gravitational pull" share characters past the point
# where their tokens differ, so a character-level split would cut a token.
AXES = (
    "gravity", "gravitational pull", "momentum", "collision response", "friction on the floor", "elasticity",
    "object permanence", "shadow consistency", "rigid body shape", "fluid behaviour", "energy conservation",
    "support and balance", "material appearance over time", "motion continuity between frames",
    "contact timing", "scale and perspective",
)
MAX_NEW_TOKENS = 64


def axis_text(axis: str) -> str:
    return f"Caption: {CAPTION}\nAxis: {axis}\nHow plausible is the video on this axis, from 1 to 5?"


def score_prefix(axis: str) -> str:
    return f'{{"{axis}": '


@pytest.fixture(scope="module")
def engine():
    return TorchEngine(tiny_model_dir("qwen3_5"))


@pytest.fixture(scope="module")
def clip():
    frames = np.random.default_rng(5).integers(0, 256, (6, 64, 96, 3), dtype=np.uint8)
    return read_video(frames, fps=2.0)


def hf_generate(engine: TorchEngine, arrays: dict) -> tuple[list[int], list[torch.Tensor]]:
    """HF `generate` on one axis's own full prompt: greedy tokens and each step's logits."""
    ids = torch.from_numpy(arrays["input_ids"])
    eos = sorted(engine.eos_ids)
    out = engine.net.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids),
        pixel_values_videos=torch.from_numpy(arrays["pixel_values_videos"]),
        video_grid_thw=torch.from_numpy(arrays["video_grid_thw"]),
        mm_token_type_ids=(ids == engine.model.video_token_id).long() * 2,
        max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos[0],
        output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), [step[0].float() for step in out.logits]


def hf_digits(engine: TorchEngine, arrays: dict, prefix: str) -> np.ndarray:
    """Softmax over the digits 1-5 after the axis's full prompt + score prefix, one HF forward."""
    extra = engine.model.prompter.encode(prefix)
    ids = torch.from_numpy(np.concatenate([arrays["input_ids"][0], extra]))[None]
    with torch.no_grad():
        logits = engine.net(input_ids=ids, pixel_values_videos=torch.from_numpy(arrays["pixel_values_videos"]),
                            video_grid_thw=torch.from_numpy(arrays["video_grid_thw"]),
                            mm_token_type_ids=(ids == engine.model.video_token_id).long() * 2).logits[0, -1]
    chosen = logits[[int(engine.model.prompter.encode(d)[0]) for d in DIGITS]].double()
    return chosen.softmax(-1).numpy()


def test_split_is_on_a_shared_token_boundary(engine, clip):
    model = engine.model
    prompts = [runtime_model.prompt_inputs(model, [clip], axis_text(a), SYSTEM) for a in AXES]
    cut, suffixes = shared_prompt(prompts)
    for prompt, suffix in zip(prompts, suffixes):  # each prompt is exactly its own tokens, split
        np.testing.assert_array_equal(np.concatenate([prompts[0]["input_ids"][0, :cut], suffix]), prompt["input_ids"][0])
    assert len({len(s) for s in suffixes}) >= 5  # many suffix lengths: the grouping is exercised
    # The trap is real: "gravity" and "gravitational pull" share characters ("gravit") past their
    # last shared token, and cutting in character space would tokenize the prefix differently.
    a, b = (runtime_model.prompt_inputs(model, [clip], axis_text(x), SYSTEM) for x in ("gravity", "gravitational pull"))
    cut_ab, _ = shared_prompt([a, b])
    text_a, text_b = (model.prompter.decode(p["input_ids"][0].tolist(), skip_special_tokens=False) for p in (a, b))
    diverge = next(i for i, (x, y) in enumerate(zip(text_a, text_b)) if x != y)
    shared_text = model.prompter.decode(a["input_ids"][0, :cut_ab].tolist(), skip_special_tokens=False)
    assert text_a.startswith(shared_text) and len(shared_text) < diverge
    by_chars = model.prompter.encode(text_a[:diverge])
    assert not np.array_equal(by_chars, a["input_ids"][0, : len(by_chars)])


def test_rubric_equals_each_axis_alone(engine, clip, monkeypatch):
    model = engine.model
    texts = [axis_text(a) for a in AXES]
    prefix, suffixes = engine.prefill_shared([clip], texts, SYSTEM)
    # The random tiny model never emits its real EOS: add a token it does emit, the one that
    # spreads the rows' stop steps most, so rows stop at EOS at different steps.
    first = engine.decode(prefix, suffixes, 32)  # the prefix is reused below: decode works on copies

    def stop_steps(token: int) -> list[int]:
        return [t.index(token) + 1 if token in t else MAX_NEW_TOKENS for t in first]

    stop_token = max(sorted({tok for t in first for tok in t}),
                     key=lambda tok: (len(set(stop_steps(tok))), -sum(stop_steps(tok))))
    monkeypatch.setattr(engine, "eos_ids", engine.eos_ids | {stop_token})
    step_logits = [[] for _ in AXES]
    tokens = engine.decode(prefix, suffixes, MAX_NEW_TOKENS, step_logits)

    # generate_many runs the same rows, plus one score read per axis in the same batch: the
    # prefix once, one forward of the feeds' common length, then one token a row per step.
    calls = []
    hidden = engine._hidden
    monkeypatch.setattr(engine, "_hidden", lambda cache, ids, *a, **k: calls.append(
        tuple((ids if ids is not None else k["embeds"]).shape[:2])) or hidden(cache, ids, *a, **k))
    results = engine.generate_many([clip], texts, MAX_NEW_TOKENS, SYSTEM, [score_prefix(a) for a in AXES])
    assert [t for t, _ in results] == tokens

    worst_logit, worst_digit = 0.0, 0.0
    for text, axis, row_tokens, row_logits, (_, row_digits) in zip(texts, AXES, tokens, step_logits, results):
        arrays = runtime_model.build_inputs(model, [clip], text, SYSTEM)
        ref_tokens, ref_logits = hf_generate(engine, arrays)
        assert row_tokens == ref_tokens, axis
        worst_logit = max(worst_logit, max((a - b).abs().max().item() for a, b in zip(row_logits, ref_logits)))
        worst_digit = max(worst_digit, np.abs(row_digits - hf_digits(engine, arrays, score_prefix(axis))).max())
    steps = sorted({len(t) for t in tokens})
    print(f"16 axes vs each alone: max |dlogit| {worst_logit:.1e}, max |dp(digit)| {worst_digit:.1e}, stops {steps}")
    assert worst_logit <= 1e-4 and worst_digit <= 1e-5
    assert len(steps) >= 3 and steps[0] < MAX_NEW_TOKENS  # rows stopped at EOS at different steps

    feeds = [len(s) for s in suffixes] + [len(s) + len(model.prompter.encode(score_prefix(a)))
                                          for s, a in zip(suffixes, AXES)]
    # the position each row reads its last logits at: its last token's, or its score's
    last_read = max(*(n + len(t) - 1 for n, t in zip(feeds, tokens)), *feeds[len(AXES):])
    rows = 2 * len(AXES)
    # an axis and its score read start alike: the common forward runs once per distinct start
    heads = len({tuple(s[: min(feeds)]) for s in suffixes})
    assert heads == len(AXES)
    assert calls == [(1, prefix.length), (heads, min(feeds))] + [(rows, 1)] * (last_read - min(feeds))

    # A second request of the same shape reuses the rows (their buffers, on CUDA their graphs),
    # overwritten by the new prefix.
    kept = engine.rows
    again = engine.generate_many([clip], texts, MAX_NEW_TOKENS, SYSTEM, [score_prefix(a) for a in AXES])
    assert engine.rows is kept
    assert [t for t, _ in again] == tokens
    np.testing.assert_array_equal(np.array([d for _, d in again]), np.array([d for _, d in results]))


def test_rows_sharing_a_start_in_any_order(engine, clip):
    """Rows whose feeds start alike share the common forward whatever their order (here a score
    read before its own axis): tokens and logits after each feed equal each feed run alone."""
    texts = [axis_text(a) for a in AXES[:2]]
    prefix, (first, second) = engine.prefill_shared([clip], texts, SYSTEM)
    forced = np.concatenate([first, engine.model.prompter.encode(score_prefix(AXES[0]))])
    feeds, budgets = [forced, first, second], [0, 6, 6]
    fed: list = []
    tokens = engine.decode(prefix, feeds, budgets, fed=fed)
    for feed, budget, row_tokens, row_fed in zip(feeds, budgets, tokens, fed):
        alone_fed: list = []
        assert engine.decode(prefix, [feed], budget, fed=alone_fed) == [row_tokens]
        torch.testing.assert_close(row_fed, alone_fed[0], atol=1e-5, rtol=0)


def test_kept_rows_serve_a_shorter_request(engine, clip):
    """Rows kept from a longer video serve a shorter one with the same texts (same rows, same
    common length): its prefix is loaded over the old one and the slots past it stay masked.
    The answers equal those on rows built for the shorter video."""
    texts, prefixes = [axis_text(a) for a in AXES[:4]], [score_prefix(a) for a in AXES[:4]]
    short = read_video(clip.frames[:2], fps=2.0)
    engine.rows = None
    fresh = engine.generate_many([short], texts, 12, SYSTEM, prefixes)
    fresh_length = engine.rows.length
    engine.generate_many([read_video(np.concatenate([clip.frames] * 12), fps=2.0)], texts, 12, SYSTEM, prefixes)
    kept = engine.rows
    assert kept.length > fresh_length  # the longer video needed longer rows
    reused = engine.generate_many([short], texts, 12, SYSTEM, prefixes)
    assert engine.rows is kept
    assert [t for t, _ in reused] == [t for t, _ in fresh]
    np.testing.assert_allclose(np.array([d for _, d in reused]), np.array([d for _, d in fresh]), atol=1e-7)


def test_duplicate_and_single_texts(engine, clip):
    """A text asked twice keeps a one-token suffix; one text alone equals `generate`."""
    text = axis_text("gravity")
    twice = engine.generate_many([clip], [text, text], 12, SYSTEM, score_prefixes=[score_prefix("gravity")] * 2)
    alone = engine.generate(engine.prompt([clip], text, SYSTEM), 12, score_prefix("gravity"))
    for tokens, digits in twice:
        assert tokens == alone[0]
        np.testing.assert_allclose(digits, alone[1], atol=1e-6)
    with pytest.raises(InputError, match="no texts"):
        engine.generate_many([clip], [], 12, SYSTEM)


def test_judge_answers_the_rubric_of_the_users_files(clip, rubric_dir, tmp_path, capsys):
    """`Judge.load(..., prompt_dir=)` composes every axis from the user's prompt files; the
    whole rubric in one `ask_many` answers each axis as its own prompt alone would, and the
    CLI's default is the whole rubric."""
    from edgejudge.cli import main
    from edgejudge.judge import Judge
    from edgejudge.specs import rubric_axes

    judge = Judge.load(tiny_model_dir("qwen3_5"), "phyground", prompt_dir=rubric_dir)
    axes = rubric_axes(judge.spec, judge.prompts)
    answers = judge.ask_many(clip, [{"caption": CAPTION, "axis": a} for a in axes])
    sampled = runtime_model.sample_clip(judge.engine.model, clip, judge.spec.sample)
    for axis, answer in zip(axes, answers):
        system, text = judge.compose({"caption": CAPTION, "axis": axis})
        assert system == "You grade generated videos." and (axis in text and CAPTION in text)
        tokens, digits = judge.engine.generate(judge.engine.prompt([sampled], text, system), judge.spec.max_new_tokens,
                                               score_prefix(axis))
        assert answer.token_ids == tokens, axis
        np.testing.assert_allclose(list(answer.distribution.values()), digits, atol=1e-5)

    video = tmp_path / "clip.npy"
    np.save(video, clip.frames)
    args = ["judge", str(tiny_model_dir("qwen3_5")), "--spec", "phyground", "--prompt-dir", str(rubric_dir),
            "--caption", CAPTION, "--video", str(video), "--fps", "2", "--json"]
    assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["key"] for line in lines] == axes
    assert [line["raw"] for line in lines] == [a.text for a in answers]
    assert main(args[:-1] + ["--axis", "gravity", "--print-prompt"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("<|im_start|>system\nYou grade generated videos.") and "Rule: Unsupported objects fall down." in printed
    assert main(args[:4] + ["--caption", CAPTION, "--video", str(video)]) == 2  # no prompt files in the model folder
    assert "subq+human.yaml: prompt file not found" in capsys.readouterr().err
