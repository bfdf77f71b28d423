"""Answer parsers: real-looking judge outputs in, a score or an explicit failure out (never a default)."""

import subprocess
import sys

import pytest

from edgejudge.errors import InputError
from edgejudge.runtime.answers import parse_answer

THINK = "<think>\nThe ball falls and bounces; {\"gravity\": 2} would be too harsh. Energy looks conserved.\n</think>\n\n"


@pytest.mark.parametrize("text, key, score", [
    ('{"gravity": 4}', "gravity", 4),
    ('{"gravity":1}', "gravity", 1),
    ('  {\n  "fluid_dynamics" : 5\n}\n', "fluid_dynamics", 5),
    ('```json\n{"gravity": 3}\n```', "gravity", 3),
    ('```\n{"collision": 2}\n```\n', "collision", 2),
    ('Sure! Here is my rating:\n```json\n{"momentum": 4}\n```\nThe motion is mostly plausible.', "momentum", 4),
    ('The score is {"gravity": 5}.', "gravity", 5),
    (THINK + '{"gravity": 4}', "gravity", 4),  # the draft inside <think> is ignored
    (THINK + '```json\n{"gravity": 1}\n```', "gravity", 1),
    # Chat templates that open <think> in the prompt: the output starts inside the reasoning.
    ('the object should accelerate downward...\n</think>\n{"gravity": 2}', "gravity", 2),
    ('<THINK>x</THINK>{"gravity": 3}', "gravity", 3),
    ('{"score with spaces": 3}', "score with spaces", 3),
    ('Rating {not json} then {"gravity": 2}', "gravity", 2),  # invalid braces before are skipped
])
def test_json_score_ok(text, key, score):
    parsed = parse_answer("json_score", text)
    assert parsed.ok, parsed.reason
    assert (parsed.key, parsed.score, parsed.raw, parsed.reason) == (key, score, text, None)


@pytest.mark.parametrize("text, reason", [
    ("", "no JSON object"),
    ("I think the video is plausible, 4 out of 5.", "no JSON object"),
    ("{'gravity': 4}", "single-quoted keys"),
    ("```python\n{'gravity': 4}\n```", "single-quoted keys"),
    ('{"gravity": 4', "no JSON object"),  # truncated by the token budget
    ('{"gravity": 0}', "outside 1..5"),
    ('{"gravity": 6}', "outside 1..5"),
    ('{"gravity": -3}', "outside 1..5"),
    ('{"gravity": 4.0}', "4.0, not an integer"),
    ('{"gravity": 4.5}', "not an integer"),
    ('{"gravity": "4"}', '"4", not an integer'),
    ('{"gravity": true}', "true, not an integer"),
    ('{"gravity": null}', "null, not an integer"),
    ('{"gravity": {"score": 4}}', "an object or array, not an integer"),
    ('{"gravity": [4]}', "not an integer"),
    ('{}', "0 keys"),
    ('{"gravity": 4, "collision": 3}', "2 keys"),
    ('{"gravity": 4, "gravity": 2}', "2 keys"),  # a repeated key is seen, not last-one-wins
    ('{"gravity": 4}\n{"gravity": 2}', "2 JSON objects"),
    ("<think>\nLet me look at the frames. The ball", "never closed"),
    ('<think>{"gravity": 4}', "never closed"),  # an answer inside unfinished reasoning is not an answer
    (THINK, "no JSON object"),  # only the draft inside <think>
])
def test_json_score_unparseable(text, reason):
    parsed = parse_answer("json_score", text)
    assert not parsed.ok
    assert parsed.score is None  # never a default
    assert reason in parsed.reason
    assert parsed.raw == text


def test_json_score_out_of_range_keeps_key():
    parsed = parse_answer("json_score", '{"gravity": 9}')
    assert (parsed.ok, parsed.key, parsed.score) == (False, "gravity", None)


@pytest.mark.parametrize("text, score", [
    ("<answer>4</answer>", 4),
    ("<answer> 1 </answer>", 1),
    ("<answer>\n5\n</answer>", 5),
    ("<think>\nThe liquid flows upward, violating gravity.\n</think>\n\n<answer>\n2\n</answer>", 2),
    ("<think>maybe <answer>5</answer>? no.</think><answer>3</answer>", 3),
    ("Based on the analysis, <ANSWER>4</ANSWER>", 4),
    ("reasoning without opener</think>\n<answer>1</answer>", 1),
])
def test_answer_tag_ok(text, score):
    parsed = parse_answer("answer_tag", text)
    assert parsed.ok, parsed.reason
    assert (parsed.score, parsed.raw, parsed.key) == (score, text, None)


@pytest.mark.parametrize("text, reason", [
    ("4", "no <answer>"),
    ("The answer is 4.", "no <answer>"),
    ("<answer>4", "no <answer>"),  # unclosed: cut by the token budget
    ("<answer></answer>", "'' is not an integer"),
    ("<answer>four</answer>", "'four' is not an integer"),
    ("<answer>4.5</answer>", "'4.5' is not an integer"),
    ("<answer>4/5</answer>", "not an integer"),
    ("<answer>0</answer>", "0 is outside 1..5"),
    ("<answer>6</answer>", "6 is outside 1..5"),
    ("<answer>-1</answer>", "-1 is outside 1..5"),
    ("<answer>3</answer> or <answer>4</answer>", "2 <answer> tags"),
    ("<think>\nThe video shows <answer>4</answer>", "never closed"),
])
def test_answer_tag_unparseable(text, reason):
    parsed = parse_answer("answer_tag", text)
    assert not parsed.ok and parsed.score is None
    assert reason in parsed.reason
    assert parsed.raw == text


@pytest.mark.parametrize("text, scores", [
    ("<Answer>TA=1, VQ=2, MQ=0, OA=1</Answer>", {"TA": 1, "VQ": 2, "MQ": 0, "OA": 1}),
    ("<Answer>TA=1,VQ=2,MQ=0,OA=1</Answer>", {"TA": 1, "VQ": 2, "MQ": 0, "OA": 1}),
    ("<Answer> OA = 2 , MQ=1,  TA =0,VQ= 2 </Answer>", {"TA": 0, "VQ": 2, "MQ": 1, "OA": 2}),
    ("<Answer>\nTA=2,\nVQ=2,\nMQ=2,\nOA=2\n</Answer>", {"TA": 2, "VQ": 2, "MQ": 2, "OA": 2}),
    ("<think>Video 1 follows the prompt better. Motion: video 2.</think>\n"
     "<Answer>TA=1, VQ=0, MQ=2, OA=1</Answer>", {"TA": 1, "VQ": 0, "MQ": 2, "OA": 1}),
    ("<answer>ta=1, vq=1, mq=1, oa=1</answer>", {"TA": 1, "VQ": 1, "MQ": 1, "OA": 1}),
])
def test_pairwise_ok(text, scores):
    parsed = parse_answer("pairwise_tags", text)
    assert parsed.ok, parsed.reason
    assert parsed.scores == scores and parsed.score is None
    assert list(parsed.scores) == ["TA", "VQ", "MQ", "OA"]  # a fixed order, whatever the model wrote


@pytest.mark.parametrize("text, reason", [
    ("TA=1, VQ=2, MQ=0, OA=1", "no <Answer>"),
    ("<Answer>TA=1, VQ=2, MQ=0</Answer>", "missing dimension OA"),
    ("<Answer>TA=1, VQ=2</Answer>", "missing dimension MQ, OA"),
    ("<Answer>TA=1, VQ=2, MQ=0, OA=3</Answer>", "OA: 3 is outside 0..2"),
    ("<Answer>TA=-1, VQ=2, MQ=0, OA=1</Answer>", "TA: -1 is outside 0..2"),
    ("<Answer>TA=1, VQ=2, MQ=0, OA=video1</Answer>", "OA: 'video1' is not an integer"),
    ("<Answer>TA=1, VQ=2, MQ=0, OA=1, XX=1</Answer>", "unknown dimension 'XX'"),
    ("<Answer>TA=1, TA=2, VQ=2, MQ=0, OA=1</Answer>", "TA given twice"),
    ("<Answer>TA=1 VQ=2 MQ=0 OA=1</Answer>", "is not DIM=VALUE"),
    ("<Answer>TA:1, VQ:2, MQ:0, OA:1</Answer>", "is not DIM=VALUE"),
    ("<Answer>TA=1, VQ=2, MQ=0, OA=1</Answer><Answer>TA=2, VQ=2, MQ=0, OA=1</Answer>", "2 <Answer> tags"),
    ("<think>comparing the two videos", "never closed"),
])
def test_pairwise_unparseable(text, reason):
    parsed = parse_answer("pairwise_tags", text)
    assert not parsed.ok and parsed.scores is None
    assert reason in parsed.reason
    assert parsed.raw == text


def test_unknown_kind_is_input_error():
    with pytest.raises(InputError, match="labels"):
        parse_answer("labels", "complete")


def test_answers_import_no_training_stack():
    code = ("import sys, edgejudge.runtime.answers\n"
            "print(','.join(m for m in ('torch', 'transformers', 'scipy', 'sklearn') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""
