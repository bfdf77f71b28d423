"""Read a judge's decoded text into a score, or say exactly why it cannot be read.

An answer that does not parse is reported as unparseable with its raw text and a reason; it is
never replaced by a default score, because a default would silently enter rollout filtering and
evaluation as if the judge had said it.

Rules shared by every kind:
- Reasoning is not the answer: when the text has `</think>`, only what follows the last one is
  read (a draft answer inside the reasoning is ignored). This also covers chat templates that put
  the opening `<think>` in the prompt. A `<think>` that is never closed means the token budget ran
  out before the answer: unparseable.
- Scores are integers. `4.0`, `"4"` or `four` are unparseable ("not an integer"), and so is an
  integer outside the allowed range, with the value in the reason.

Kinds (`JudgeSpec.answer`):
- json_score: one JSON object with one key and an integer 1..5, e.g. `{"gravity": 4}`, anywhere in
  the text (code fences and prose around it are fine). Python dict syntax with single quotes
  (`{'gravity': 4}`) is NOT accepted: it is not JSON, and a judge trained to write JSON that
  writes something else has drifted; the reason names the quoting so the cause is visible.
  Two JSON objects are ambiguous and unparseable.
- answer_tag: `<answer>N</answer>`, N in 1..5; tags are case-insensitive, whitespace around N is
  fine, and there must be exactly one tag.
- pairwise_tags: `<Answer>TA=1, VQ=2, MQ=0, OA=1</Answer>`: the four dimensions, in any order,
  comma-separated, each 0 (tie), 1 (video 1 better) or 2 (video 2 better), each exactly once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from edgejudge.errors import InputError

SCORE_RANGE = range(1, 6)
PAIRWISE_DIMS = ("TA", "VQ", "MQ", "OA")
PAIRWISE_VALUES = (0, 1, 2)

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_INTEGER = re.compile(r"[+-]?\d+")
_PAIR = re.compile(r"([A-Za-z]+)\s*=\s*(\S+)")
_SINGLE_QUOTED_KEY = re.compile(r"\{\s*'[^']*'\s*:")


@dataclass(frozen=True)
class ParsedAnswer:
    ok: bool
    raw: str  # the decoded text exactly as the model wrote it
    score: int | None = None  # json_score, answer_tag
    key: str | None = None  # json_score: the object's key (the axis the judge answered)
    scores: dict[str, int] | None = None  # pairwise_tags: {"TA": 1, "VQ": 2, "MQ": 0, "OA": 1}
    reason: str | None = None  # why ok is False


def parse_answer(kind: str, text: str) -> ParsedAnswer:
    parsers = {"json_score": _parse_json_score, "answer_tag": _parse_answer_tag, "pairwise_tags": _parse_pairwise}
    if kind not in parsers:
        raise InputError(f"answer kind {kind!r} has no text parser; known: {', '.join(parsers)}")
    answer, reason = after_thinking(text)
    if reason:
        return ParsedAnswer(ok=False, raw=text, reason=reason)
    return parsers[kind](answer, text)


def after_thinking(text: str) -> tuple[str, str | None]:
    """The text after the reasoning, or a reason why there is none."""
    lowered = text.lower()
    end = lowered.rfind("</think>")
    if end >= 0:
        return text[end + len("</think>"):], None
    if "<think>" in lowered:
        return "", "<think> block never closed (the token budget ran out before the answer)"
    return text, None


def _read_int(value: str, allowed) -> tuple[int | None, str | None]:
    """An integer written as text, or why it is not a usable one."""
    value = value.strip()
    if not _INTEGER.fullmatch(value):
        return None, f"{value!r} is not an integer"
    number = int(value)
    if number not in allowed:
        return None, f"{number} is outside {min(allowed)}..{max(allowed)}"
    return number, None


def _json_objects(text: str) -> list[list[tuple[str, object]]]:
    """Every top-level JSON object in the text, each as its (key, value) pairs in order.

    Pairs rather than a dict so that a repeated key is seen instead of silently keeping the last.
    """
    decoder = json.JSONDecoder(object_pairs_hook=list)
    objects, pos = [], 0
    while (start := text.find("{", pos)) >= 0:
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        objects.append(obj)
        pos = end
    return objects


def _parse_json_score(answer: str, raw: str) -> ParsedAnswer:
    objects = _json_objects(answer)
    if not objects:
        if _SINGLE_QUOTED_KEY.search(answer):
            reason = "single-quoted keys (Python dict syntax) are not JSON"
        else:
            reason = "no JSON object in the answer"
        return ParsedAnswer(ok=False, raw=raw, reason=reason)
    if len(objects) > 1:
        return ParsedAnswer(ok=False, raw=raw, reason=f"{len(objects)} JSON objects in the answer, expected one")
    pairs = objects[0]
    if len(pairs) != 1:
        keys = ", ".join(repr(k) for k, _ in pairs) or "none"
        return ParsedAnswer(ok=False, raw=raw, reason=f"JSON object has {len(pairs)} keys ({keys}), expected one")
    key, value = pairs[0]
    # bool is an int in Python; JSON's true/false is not a score.
    if not isinstance(value, int) or isinstance(value, bool):
        shown = "an object or array" if isinstance(value, list) else json.dumps(value)
        return ParsedAnswer(ok=False, raw=raw, key=key, reason=f"value of {key!r} is {shown}, not an integer")
    if value not in SCORE_RANGE:
        return ParsedAnswer(ok=False, raw=raw, key=key, reason=f"value of {key!r} is {value}, outside 1..5")
    return ParsedAnswer(ok=True, raw=raw, score=value, key=key)


def _parse_answer_tag(answer: str, raw: str) -> ParsedAnswer:
    tags = _ANSWER_TAG.findall(answer)
    if len(tags) != 1:
        reason = "no <answer>...</answer> tag" if not tags else f"{len(tags)} <answer> tags, expected one"
        return ParsedAnswer(ok=False, raw=raw, reason=reason)
    score, reason = _read_int(tags[0], SCORE_RANGE)
    if reason:
        return ParsedAnswer(ok=False, raw=raw, reason=f"<answer>: {reason}")
    return ParsedAnswer(ok=True, raw=raw, score=score)


def _parse_pairwise(answer: str, raw: str) -> ParsedAnswer:
    tags = _ANSWER_TAG.findall(answer)
    if len(tags) != 1:
        reason = "no <Answer>...</Answer> tag" if not tags else f"{len(tags)} <Answer> tags, expected one"
        return ParsedAnswer(ok=False, raw=raw, reason=reason)
    scores: dict[str, int] = {}
    for part in tags[0].split(","):
        match = _PAIR.fullmatch(part.strip())
        if not match:
            return ParsedAnswer(ok=False, raw=raw, reason=f"{part.strip()!r} is not DIM=VALUE")
        dim, value = match.group(1).upper(), match.group(2)
        if dim not in PAIRWISE_DIMS:
            return ParsedAnswer(ok=False, raw=raw, reason=f"unknown dimension {dim!r}; expected {', '.join(PAIRWISE_DIMS)}")
        if dim in scores:
            return ParsedAnswer(ok=False, raw=raw, reason=f"dimension {dim} given twice")
        number, reason = _read_int(value, PAIRWISE_VALUES)
        if reason:
            return ParsedAnswer(ok=False, raw=raw, reason=f"{dim}: {reason}")
        scores[dim] = number
    missing = [d for d in PAIRWISE_DIMS if d not in scores]
    if missing:
        return ParsedAnswer(ok=False, raw=raw, reason=f"missing dimension {', '.join(missing)}")
    return ParsedAnswer(ok=True, raw=raw, scores={d: scores[d] for d in PAIRWISE_DIMS})
