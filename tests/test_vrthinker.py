"""VR-Thinker's pairwise judge (`runtime/pairwise.py`) on the tiny Qwen2.5-VL, fp32 ONNX on the CPU:

- a multi-turn conversation with images gives HF's processor's input_ids, image_grid_thw and
  pixel_values (bit for bit) and HF's `get_rope_index` positions, in the pinned transformers and in
  4.57 (the release VR-Thinker was trained with), with frames picked by virtual index from videos
  of different lengths and sizes;
- the loop on one reused KV cache gives the tokens of HF re-running the whole conversation with
  `generate` every turn (the seed's way, `benchmarks/vrthinker.HFSeedSession`), with scripted
  replies (random weights never call the tool): the free-running tokens are equal, their logits
  and the logits over every appended stretch (replaced replies and new turns) within 1e-4;
- the cache grows by the new turn only, each image is encoded once, tool calls are read
  leniently, and bad input ends in a defined result or one InputError (CLI exit 2).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as tvf
import transformers
from transformers import AutoProcessor

from benchmarks.vrthinker import HFSeedSession
from edgejudge import Judge, cli
from edgejudge.errors import InputError
from edgejudge.export.fixtures import tiny_model_dir
from edgejudge.export.merge import load_base
from edgejudge.export.onnx import export_onnx
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.decoder import shape_of
from edgejudge.runtime.pairwise import (CachedSession, Conversation, FrameCall, Settings, TextStream, compare,
                                        parse_frame_call)
from edgejudge.runtime.preprocess import preprocess_video, smart_resize
from edgejudge.specs import SPECS, get_spec

# Our own prompt (the real one ships in the user's infer.py, which we never copy).
SYSTEM_PROMPT = ("You compare two generated videos. Think in <think></think>, call select_frames with "
                 "target_frames to see more, and finish with <Answer>TA=x, VQ=x, MQ=x, OA=x</Answer>.")
CAPTION = "A ball rolls off a table."
# The seed spec with small images (3x3 merged tokens each), short replies and four turns.
SPEC = dataclasses.replace(get_spec("vrthinker-pairwise"), max_new_tokens=6,
                           extra={"initial_frames": 4, "image_size": 84, "max_turns": 4, "max_picks": 12})
SETTINGS = Settings.from_spec(SPEC)


def call(picks, name: str = "select_frames") -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {{"target_frames": {json.dumps(picks)}}}}}</tool_call>'


def pair(seed: int = 0) -> list[np.ndarray]:
    """Two videos of different lengths and sizes."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((30, 64, 96, 3), (17, 80, 80, 3))]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("vrthinker") / "artifact"
    return export_onnx(tiny_model_dir("qwen2_5_vl"), None, "fp32", out, judge_spec="vrthinker-pairwise")


@pytest.fixture(scope="module")
def prompt_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompt")
    (folder / "infer.py").write_text(f"import os\nSYSTEM_PROMPT = {SYSTEM_PROMPT!r}\n")
    return folder


@pytest.fixture(scope="module")
def judge(artifact, prompt_dir):
    return Judge.load(artifact, spec=SPEC, prompt_dir=prompt_dir)


@pytest.fixture(scope="module")
def hf(one_torch_thread):
    model_dir = tiny_model_dir("qwen2_5_vl")
    return load_base(model_dir, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(model_dir)


# -- inputs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size", [84, 448])
def test_conversation_inputs_match_hf(image_size):
    model = runtime_model.load(tiny_model_dir("qwen2_5_vl"))
    settings = dataclasses.replace(SETTINGS, image_size=image_size)
    size = smart_resize(image_size, image_size, model.vision)
    assert size == (image_size, image_size)
    videos = pair()
    conversation = Conversation(videos, CAPTION, SYSTEM_PROMPT, settings, size)
    conversation.reply("<think>Motion?</think>" + call([3, 64]))
    conversation.show([3, 64, 127])
    # each image: the frame the virtual index lands on in its own video, resized like torchvision
    for turn, picks in enumerate(conversation.shown):
        for j, index in enumerate(picks):
            for v, video in enumerate(videos):
                real = round(index * (len(video) - 1) / 127)
                expected = tvf.resize(torch.from_numpy(video[real]).permute(2, 0, 1), list(size),
                                      interpolation=tvf.InterpolationMode.BICUBIC, antialias=True)
                image = conversation.images[2 * (sum(map(len, conversation.shown[:turn])) + j) + v]
                assert np.array_equal(image, expected.permute(1, 2, 0).numpy())
    sizes = [image.shape[:2] for image in conversation.images]
    ours = runtime_model.image_prompt_inputs(model, conversation.messages, sizes)
    pixels = np.concatenate([preprocess_video(im[None], size, model.vision)[0] for im in conversation.images])

    processor = AutoProcessor.from_pretrained(model.path)
    prompt = processor.apply_chat_template(conversation.messages, tokenize=False, add_generation_prompt=True)
    ref = processor(text=[prompt], images=[torch.from_numpy(im).permute(2, 0, 1) for im in conversation.images],
                    return_tensors="pt")
    config = transformers.AutoConfig.from_pretrained(model.path)
    with torch.device("meta"):
        rope = transformers.Qwen2_5_VLModel(config)
    positions, deltas = rope.get_rope_index(ref["input_ids"], mm_token_type_ids=ref["mm_token_type_ids"],
                                            image_grid_thw=ref["image_grid_thw"],
                                            attention_mask=ref["attention_mask"])
    assert len(conversation.images) == 2 * (4 + 3)
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"].numpy())
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"].numpy())
    np.testing.assert_array_equal(pixels, ref["pixel_values"].numpy())
    np.testing.assert_array_equal(ours["position_ids"], positions.numpy())
    np.testing.assert_array_equal(ours["rope_deltas"], deltas.reshape(-1, 1).numpy())


# What HF gives for a conversation with images, run by another transformers release in a subprocess.
HF_IMAGES_SCRIPT = """
import json, sys, types
import numpy as np
stub = types.ModuleType("transformers.dependency_versions_check")
stub.dep_version_check = lambda *args, **kwargs: None
sys.modules["transformers.dependency_versions_check"] = stub  # the side folder's pins are not ours
import torch, transformers
model_dir, request, result = sys.argv[1:]
data = np.load(request)
processor = transformers.AutoProcessor.from_pretrained(model_dir)
prompt = processor.apply_chat_template(json.loads(str(data["messages"])), tokenize=False, add_generation_prompt=True)
out = processor(text=[prompt], images=[torch.from_numpy(im).permute(2, 0, 1) for im in data["images"]],
                return_tensors="pt")
with torch.device("meta"):
    rope = transformers.Qwen2_5_VLModel(transformers.AutoConfig.from_pretrained(model_dir))
positions, deltas = rope.get_rope_index(out["input_ids"], image_grid_thw=out["image_grid_thw"],
                                        attention_mask=out["attention_mask"])
np.savez(result, input_ids=out["input_ids"].numpy(), pixel_values=out["pixel_values"].numpy(),
         position_ids=positions.numpy(), rope_deltas=deltas.reshape(-1, 1).numpy(),
         version=np.array(transformers.__version__))
"""


def test_conversation_inputs_match_the_training_release(tmp_path):
    """VR-Thinker was trained with transformers 4.57: the same inputs there (the side folder .ci/run
    installs, as tests/test_inputs_parity.py uses it)."""
    side = os.environ.get("EDGEJUDGE_TF_LEGACY")
    if not side:
        if os.environ.get("CI"):
            pytest.fail("EDGEJUDGE_TF_LEGACY must point to a transformers 4.57 folder in CI")
        pytest.skip("EDGEJUDGE_TF_LEGACY not set: the transformers 4.57 side folder is not installed")
    model = runtime_model.load(tiny_model_dir("qwen2_5_vl"))
    conversation = Conversation(pair(), CAPTION, SYSTEM_PROMPT, SETTINGS, (84, 84))
    conversation.reply(call([3, 64]))
    conversation.show([3, 64, 127])
    np.savez(tmp_path / "request.npz", images=np.stack(conversation.images),
             messages=np.array(json.dumps(conversation.messages)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [side, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", HF_IMAGES_SCRIPT, str(model.path), str(tmp_path / "request.npz"),
                    str(tmp_path / "result.npz")], env=env, check=True, capture_output=True)
    ref = np.load(tmp_path / "result.npz")
    assert str(ref["version"]).startswith("4.57")
    ours = runtime_model.image_prompt_inputs(model, conversation.messages, [(84, 84)] * len(conversation.images))
    pixels = np.concatenate([preprocess_video(im[None], (84, 84), model.vision)[0] for im in conversation.images])
    np.testing.assert_array_equal(pixels, ref["pixel_values"])
    for key in ("input_ids", "position_ids", "rope_deltas"):
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)


# -- the loop against HF re-running the conversation --------------------------------------------------
SCRIPT = {
    1: lambda text: text + call([3, 64, 200]),  # the model's own text kept; 200 clamped to 127
    2: lambda text: "<think>Look again.</think>\n<tool_call>\n  "  # whitespace; 0 and 42 were shown already
                    '{"name": "select_frames",  "arguments": {"target_frames": [0, 42, 5]}}  \n</tool_call>',
    3: lambda text: '<tool_call>{"name": "select_frames", "arguments": {"target_frames": [1, 2</tool_call>',
}


def scripted(turn: int, text: str) -> str:
    return SCRIPT[turn](text) if turn in SCRIPT else text


@pytest.fixture(scope="module")
def runs(judge, hf, monkeypatch_module):
    """The scripted comparison through our cached session (recording the greedy logits and every
    multi-token run's logits with the cache length it started from) and through HF."""
    engine, decoder = judge.engine, judge.engine.decoder
    greedy_logits, appended = [], []
    greedy, step, prefill = decoder.greedy, decoder.step, decoder.prefill

    def record_greedy(*args, **kwargs):
        tokens, steps = greedy(*args, **kwargs, return_logits=True)
        greedy_logits.append(np.stack(steps))
        return tokens

    def recording(run):
        def wrapped(embeds, *args, **kwargs):
            start = decoder.past_length if run is step else 0
            hidden = run(embeds, *args, **kwargs)
            if shape_of(embeds)[1] > 1:
                appended.append((start, decoder.logits(hidden)[0]))
            return hidden
        return wrapped

    monkeypatch_module.setattr(decoder, "greedy", record_greedy)
    monkeypatch_module.setattr(decoder, "step", recording(step))
    monkeypatch_module.setattr(decoder, "prefill", recording(prefill))
    encoded = engine.groups_encoded
    session = CachedSession(engine)
    ours = compare(session, engine.model, pair(), CAPTION, SYSTEM_PROMPT, SETTINGS, reply=scripted)
    monkeypatch_module.undo()
    seed = HFSeedSession(*hf, record=True)
    theirs = compare(seed, engine.model, pair(), CAPTION, SYSTEM_PROMPT, SETTINGS, reply=scripted)
    return {"ours": ours, "theirs": theirs, "seed": seed, "session": session, "greedy_logits": greedy_logits,
            "appended": appended, "encoded": engine.groups_encoded - encoded}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_cached_loop_gives_hf_rerun_tokens(runs):
    ours, theirs = runs["ours"], runs["theirs"]
    assert len(ours.turns) == len(theirs.turns) == SETTINGS.max_turns
    for mine, seed in zip(ours.turns, theirs.turns):
        assert mine.tokens == seed.tokens, f"turn {mine.number}"
        assert mine.text == seed.text
    diffs = [np.abs(mine - turn["logits"]).max() for mine, turn in zip(runs["greedy_logits"], runs["seed"].turns)]
    print(f"greedy logits vs HF generate: max |d| per turn {[f'{d:.1e}' for d in diffs]}")
    assert max(diffs) <= 1e-4


def test_appended_stretches_match_hf_forward(runs, hf):
    """Each turn's run on top of the cache (the forced reply text, the new user turn with its
    images) against HF's forward over that turn's whole re-rendered conversation."""
    model = hf[0]
    appended, seed = runs["appended"], runs["seed"]
    assert len(appended) == len(seed.turns)
    diffs = []
    for (start, logits), turn in zip(appended, seed.turns):
        with torch.no_grad():
            reference = model(**turn["inputs"]).logits[0].numpy()
        assert start + len(logits) == len(reference)
        diffs.append(np.abs(logits - reference[start:]).max())
    print(f"appended stretches vs HF forward: max |d| per turn {[f'{d:.1e}' for d in diffs]}")
    assert max(diffs) <= 1e-4


def test_cache_grows_by_the_new_turn_only(runs):
    """Each turn keeps the earlier turns' tokens and as much of the last reply as HF's re-rendered
    conversation still holds, and runs the rest: its new user turn, images included."""
    ours, seed = runs["ours"], runs["seed"]
    ids = [turn["inputs"]["input_ids"][0].tolist() for turn in seed.turns]
    assert ours.turns[0].cache == {"kept": 0, "dropped": 0, "prefilled": len(ids[0])}
    for k, turn in enumerate(ours.turns[1:], 1):
        generated, start = ours.turns[k - 1].tokens[:-1], len(ids[k - 1])
        assert ids[k][:start] == ids[k - 1]
        same = next((i for i, (a, b) in enumerate(zip(generated, ids[k][start:])) if a != b), len(generated))
        assert turn.cache == {"kept": start + same, "dropped": len(generated) - same,
                              "prefilled": len(ids[k]) - start - same}
    # turns 2 and 3 were replaced by scripted text: their generated tokens are all dropped
    assert [t.cache["dropped"] for t in ours.turns[2:]] == [len(t.tokens) - 1 for t in ours.turns[1:3]]
    assert sum(t.cache["prefilled"] for t in ours.turns) < sum(map(len, ids)) / 2


def test_each_image_encoded_once(runs):
    ours, session = runs["ours"], runs["session"]
    videos = pair()
    assert ours.shown == [[0, 42, 85, 127], [3, 64, 127], [0, 42, 5]]  # turn 3's call was refused
    distinct = {(v, round(i * (len(video) - 1) / 127)) for picks in ours.shown for i in picks
                for v, video in enumerate(videos)}
    assert runs["encoded"] == len(distinct) < 2 * sum(map(len, ours.shown))
    assert len(session.features) == 2 * sum(map(len, ours.shown))


def test_turn_records(runs):
    turns = [t.to_dict() for t in runs["ours"].turns]
    assert turns[0]["requested"] == [3, 64, 200] and turns[0]["frames"] == [3, 64, 127]
    assert turns[0]["notes"] == ["indices [200] clamped to 0..127"]
    assert turns[1]["frames"] == [0, 42, 5] and turns[1]["notes"] == []
    assert turns[2]["frames"] == [] and turns[2]["notes"][0].startswith("the call is not valid JSON")
    assert turns[3]["requested"] is None  # the model's own last reply: no call, the final answer
    result = runs["ours"].to_dict()
    assert result["ok"] is False and result["reason"] == "no <Answer>...</Answer> tag"
    assert result["frames_requested"] == [[3, 64, 200], [0, 42, 5], None]
    assert result["videos"] == [{"frames": 30, "height": 64, "width": 96}, {"frames": 17, "height": 80, "width": 80}]
    assert set(result["timings_ms"]) == {"preprocess", "vision", "prefill", "decode", "total"}


# -- answers, turn limit, streaming ---------------------------------------------------------------
def test_answer_ends_the_comparison(judge):
    answer = "<think>Video 1 moves better.</think>\n<Answer>TA=1, VQ = 2, MQ=0, OA=1</Answer>"
    result = judge.compare(*pair(1), caption=CAPTION,
                           reply=lambda turn, text: call([10, 20]) if turn == 1 else answer)
    out = result.to_dict()
    assert out["ok"] and out["turns"] == 2 and out["scores"] == {"TA": 1, "VQ": 2, "MQ": 0, "OA": 1}
    assert out["labels"] == {"TA": "video 1", "VQ": "video 2", "MQ": "tie", "OA": "video 1"}
    assert out["frames_shown"] == [[0, 42, 85, 127], [10, 20]]
    assert out["tokens"] == sum(len(t.tokens) for t in result.turns)


def test_no_answer_within_the_turn_limit(judge):
    result = judge.compare(*pair(2), caption=CAPTION, reply=lambda turn, text: call([turn]))
    out = result.to_dict()
    assert out["ok"] is False and out["turns"] == SETTINGS.max_turns
    assert out["reason"] == "no answer within 4 turns: the last reply called select_frames again"
    assert len(out["frames_shown"]) == SETTINGS.max_turns  # the last call is not run


def test_stream_gives_each_reply_as_decoded(judge):
    pieces: dict[int, list[str]] = {}
    result = judge.compare(*pair(3), caption=CAPTION,
                           stream=lambda turn, text: pieces.setdefault(turn, []).append(text),
                           reply=lambda turn, text: text + call([7]) if turn == 1 else text)
    decode = judge.engine.model.prompter.decode
    assert sorted(pieces) == [t.number for t in result.turns]
    for turn in result.turns:
        assert "".join(pieces[turn.number]) == decode(turn.tokens).rstrip("\ufffd")


def test_text_stream_holds_back_partial_characters(judge):
    prompter = judge.engine.model.prompter
    text = "Ümlaut 漢字 and ✓ marks\nnext line 🎥"
    tokens = prompter.encode(text).tolist()
    assert len(tokens) > len(text.split())  # multi-byte characters span several tokens
    pieces = []
    stream = TextStream(prompter.decode, pieces.append)
    for token in tokens:
        stream(token)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# -- tool calls -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (call([1, 2]), FrameCall([1, 2], [1, 2])),
    ("<think>maybe <tool_call>x</tool_call></think>\n <tool_call>\n\t" + call([5])[11:], FrameCall([5], [5])),
    ('<tool_call>{"name": "select_frames", "arguments": {"target_frames": [9]}}', FrameCall([9], [9])),  # unclosed
    (call([-3, 130, 64]), FrameCall([-3, 130, 64], [0, 127, 64], ("indices [-3, 130] clamped to 0..127",))),
    (call(list(range(15))), FrameCall(list(range(15)), list(range(12)),
                                      ("15 indices, over the limit of 12: the first 12 ran",))),
    (call([1]) + call([2]), FrameCall([1], [1], ("2 tool calls in one reply: the first one ran",))),
    ("<tool_call>{'name': 'select_frames'}</tool_call>",
     FrameCall(None, [], (),
               "the call is not valid JSON (Expecting property name enclosed in double quotes, char 1)")),
    (call([1], name="zoom"), FrameCall(None, [], (), "there is no tool 'zoom', only select_frames")),
    ('<tool_call>{"name": "select_frames", "arguments": {"frames": [1]}}</tool_call>',
     FrameCall(None, [], (), 'the arguments must be {"target_frames": [frame indices]}')),
    (call([]), FrameCall(None, [], (), 'the arguments must be {"target_frames": [frame indices]}')),
    (call([1.5, "2"]), FrameCall([1.5, "2"], [], (), "frame indices must be integers")),
    (call([True]), FrameCall([True], [], (), "frame indices must be integers")),
])
def test_parse_frame_call(text, expected):
    assert parse_frame_call(text, 128, 12) == expected


@pytest.mark.parametrize("text", ["no call here", "<think>" + call([1]), "<Answer>TA=1</Answer>"])
def test_no_frame_call(text):
    assert parse_frame_call(text, 128, 12) is None


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_input(judge, artifact, prompt_dir):
    short = np.zeros((3, 32, 32, 3), np.uint8)
    cases = [
        (lambda: judge.compare(pair()[0], short, caption=CAPTION),
         "video 2 has 3 frame\\(s\\); the pairwise judge's first look takes 4 distinct frames"),
        (lambda: judge.compare(*pair(), caption="  "), "needs a non-empty caption"),
        (lambda: judge.compare(pair()[0], np.zeros((8, 32, 32), np.uint8), caption=CAPTION), "expected shape"),
        (lambda: Judge.load(artifact, spec=SPEC, prompt_dir=prompt_dir / "missing"), "prompt file not found"),
        (lambda: Settings.from_spec(get_spec("robocasa-completion")), "is not a pairwise judge"),
        (lambda: Judge(judge.engine, get_spec("cosmos-plausibility")).compare(*pair(), caption=CAPTION),
         "judges one video: use ask"),
    ]
    for run, message in cases:
        with pytest.raises(InputError, match=message):
            run()


def test_cache_capacity_is_checked_up_front(judge, monkeypatch):
    """The first turn allocates room for the longest conversation the limits allow (a reply of
    max_new_tokens per turn, max_picks frames per call), once; over a GPU cap is an InputError
    before any vision or decoder run."""
    engine = judge.engine
    runs = []
    monkeypatch.setattr(engine.vision, "run_into", lambda *a: runs.append(1))
    monkeypatch.setattr(engine, "gpu_mem_gb", engine.weight_bytes / 2**30 * 1.0001)
    with pytest.raises(InputError, match=r"KV cache .* for 1 x \d+ tokens\) is over"):
        judge.compare(*pair(4), caption=CAPTION)
    assert runs == []


# -- the CLI ----------------------------------------------------------------------------------------
@pytest.fixture
def small_spec(monkeypatch):
    monkeypatch.setitem(SPECS, "vrthinker-pairwise", SPEC)


def test_cli_compare(artifact, prompt_dir, tmp_path, capsys, small_spec):
    paths = []
    for i, video in enumerate(pair(5)):
        paths.append(tmp_path / f"v{i}.npy")
        np.save(paths[-1], video)
    argv = ["judge", str(artifact), "--video", str(paths[0]), "--video", str(paths[1]), "--caption", CAPTION,
            "--prompt-dir", str(prompt_dir), "--stream"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    keys = {"ok", "reason", "scores", "labels", "turns", "frames_requested", "frames_shown", "timings_ms"}
    assert keys <= set(result)
    assert result["turns"] == 1 and result["ok"] is False  # random weights: no call, no answer
    assert err.startswith("[turn 1]\n")
    np.save(paths[1], np.zeros((2, 32, 32, 3), np.uint8))
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().count("\n") == 0 and "video 2 has 2 frame(s)" in err
    assert cli.main(argv[:4] + argv[6:]) == 2
    assert "compares two videos" in capsys.readouterr().err


def test_runtime_pairwise_is_torch_free():
    code = ("import sys\nimport edgejudge.runtime.pairwise\n"
            "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""


def test_outgrown_cache_starts_over(judge, hf):
    """A reply longer than the cache was planned for (a scripted wall of text): the next turn
    starts over in a larger cache, and still gives HF's tokens."""
    long_reply = "<think>" + "the ball moves " * 400 + "</think>" + call([5])
    script = {1: long_reply, 2: "<Answer>TA=0, VQ=0, MQ=0, OA=0</Answer>"}
    planned = []

    def reply(turn: int, text: str) -> str:
        planned.append(judge.engine.decoder.capacity)
        return script.get(turn, text)

    ours = compare(CachedSession(judge.engine), judge.engine.model, pair(6), CAPTION, SYSTEM_PROMPT, SETTINGS,
                   reply=reply)
    seed = HFSeedSession(*hf, record=True)
    theirs = compare(seed, judge.engine.model, pair(6), CAPTION, SYSTEM_PROMPT, SETTINGS, reply=reply)
    length = seed.turns[1]["inputs"]["input_ids"].shape[1]
    assert length + SETTINGS.max_new_tokens - 1 > planned[0]
    assert ours.turns[1].cache == {"kept": 0, "dropped": len(ours.turns[0].tokens) - 1 + seed.turns[0]["inputs"]
                                   ["input_ids"].shape[1], "prefilled": length}
    assert judge.engine.decoder.capacity == max(length + SETTINGS.max_new_tokens - 1, 2 * planned[0])
    assert [t.tokens for t in ours.turns] == [t.tokens for t in theirs.turns] and ours.parsed.ok
