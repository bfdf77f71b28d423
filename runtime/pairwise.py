"""VR-Thinker's pairwise comparison: a multi-turn frame-selection loop on one KV cache.

numpy + onnxruntime only (this ships to the robot). The judge compares two videos generated for
one prompt. It first sees `initial_frames` frames of each, reasons, and then either answers
`<Answer>TA=.., VQ=.., MQ=.., OA=..</Answer>` or calls the frame-selection tool:

    <tool_call>{"name": "select_frames", "arguments": {"target_frames": [12, 40, 97]}}</tool_call>

The frames it asks for come back from both videos, paired (video 1's frame, then video 2's, per
index), as images in the next user turn. At most `max_turns` replies of up to `max_new_tokens`.

- Frames are addressed by virtual indices 0..virtual-1 spread evenly over each video's own length
  (`video.virtual_indices`), so videos of different lengths share one index space. Each frame is
  an image of image_size x image_size (rounded to the merged patch by HF's smart_resize), whatever
  the videos' sizes.
- Tool calls are read leniently (whitespace anywhere, a missing closing tag). An index out of
  range is clamped, more than max_picks indices are cut to the first max_picks, and a call that
  cannot run (bad JSON, another tool, no index list) gets a user turn that says why. All of it is
  recorded in the turn's notes. A reply with a readable answer ends the comparison; otherwise a
  call is run; a reply with neither is the final (unreadable) answer.
- The user turns' wording is ours (FIRST_TURN, FRAMES_TURN, REFUSED_TURN); the system prompt is
  the user's (VR-Thinker's infer.py SYSTEM_PROMPT, read by `edgejudge.specs`).

The loop (`compare`) is written once, over a session that turns the conversation so far into the
next reply's tokens. The runtime's `CachedSession` keeps one KV cache for the whole comparison.
Every turn it renders the whole conversation with the chat template and tokenizes it: exactly
what re-running the conversation from scratch would feed the model. It compares that with the
tokens the cache holds and prefills only what follows the first difference, on top of the cache.
Usually that is the end of the last reply plus the new user turn. A reply that tokenizes
differently from the way it was generated, or one a `reply` hook replaced, sends the cache back
to the first difference; the turn records it as `dropped` tokens. Each image's vision features
are computed once per comparison (and come from the engine's vision cache after that).

The cache is allocated once, at the first turn, with room for the longest conversation the limits
allow (every turn a full reply and a call for max_picks frames), so later turns and decoding
write in place; for Qwen2.5-VL-7B at the seed spec's limits that is 46k tokens, 2.5 GiB in fp16,
checked against the GPU cap before anything runs. A conversation that outgrows it (a long
scripted reply) starts over in a cache twice the size.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from edgejudge.errors import InputError
from edgejudge.runtime.answers import ParsedAnswer, after_thinking, parse_answer
from edgejudge.runtime.decoder import VisualRows
from edgejudge.runtime.engine import Engine, StageTimer, eos_token_ids
from edgejudge.runtime.model import Model, image_prompt_inputs
from edgejudge.runtime.preprocess import smart_resize
from edgejudge.runtime.resize import resize_bicubic_antialias
from edgejudge.runtime.video import parse_sample, virtual_indices, virtual_uniform

if TYPE_CHECKING:
    from edgejudge.specs import JudgeSpec

TOOL_NAME = "select_frames"
TOOL_ARGUMENT = "target_frames"
ANSWER_KIND = "pairwise_tags"
DIMENSION_LABELS = {0: "tie", 1: "video 1", 2: "video 2"}

FIRST_TURN = ("Two videos were generated for the same prompt: {caption}\n"
              "Their frames are numbered 0 to {last} over each video's length. Here are frames {indices} "
              "of both, in pairs: video 1's frame, then video 2's.")
FRAMES_TURN = "Frames {indices} of both videos, in pairs: video 1's frame, then video 2's."
FRAME_LABEL = "\nFrame {index}:"
REFUSED_TURN = "The " + TOOL_NAME + " call did not run: {reason}. Call it again or give your answer."

_TOOL_CALL = re.compile(r"<\s*tool_call\s*>(.*?)(?:<\s*/\s*tool_call\s*>|$)", re.DOTALL)


@dataclass(frozen=True)
class Settings:
    """The loop's limits, from the judge spec (`sample` virtual:N and its `extra`)."""

    virtual: int  # frame indices 0..virtual-1 cover each video
    initial_frames: int  # the first look, evenly placed
    image_size: int  # each frame becomes an image_size x image_size image
    max_turns: int  # replies
    max_picks: int  # frame indices per call
    max_new_tokens: int  # per reply

    @classmethod
    def from_spec(cls, spec: JudgeSpec) -> "Settings":
        rule = parse_sample(spec.sample)
        if rule.kind != "virtual" or spec.answer != ANSWER_KIND:
            raise InputError(f"spec {spec.name} is not a pairwise judge (sample virtual:N, answer {ANSWER_KIND})")
        extra = spec.extra
        return cls(rule.n, int(extra["initial_frames"]), int(extra["image_size"]), int(extra["max_turns"]),
                   int(extra["max_picks"]), spec.max_new_tokens)


# -- tool calls -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrameCall:
    """A reply's select_frames call: the frames to show, or why it cannot run."""

    requested: list | None  # the index list as the model wrote it (None: no list could be read)
    frames: list[int]  # the virtual indices to show; empty when the call cannot run
    notes: tuple[str, ...] = ()  # what was clamped, cut or ignored
    error: str | None = None  # why the call cannot run


def parse_frame_call(text: str, virtual: int, max_picks: int) -> FrameCall | None:
    """The reply's select_frames call, or None when it makes none. Only text after the reasoning
    counts (`answers.after_thinking`): a call drafted inside an unclosed <think> is no call."""
    body, unfinished = after_thinking(text)
    calls = [] if unfinished else _TOOL_CALL.findall(body)
    if not calls:
        return None
    notes = (f"{len(calls)} tool calls in one reply: the first one ran",) if len(calls) > 1 else ()
    try:  # the first JSON value inside the tags; text after it (a missing closing tag) is ignored
        call, _ = json.JSONDecoder().raw_decode(calls[0].strip())
    except json.JSONDecodeError as e:
        return FrameCall(None, [], notes, f"the call is not valid JSON ({e.msg}, char {e.pos})")
    name = call.get("name") if isinstance(call, dict) else None
    if name != TOOL_NAME:
        return FrameCall(None, [], notes, f"there is no tool {name!r}, only {TOOL_NAME}")
    arguments = call.get("arguments")
    picks = arguments.get(TOOL_ARGUMENT) if isinstance(arguments, dict) else None
    if not isinstance(picks, list) or not picks:
        return FrameCall(None, [], notes, f'the arguments must be {{"{TOOL_ARGUMENT}": [frame indices]}}')
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in picks):
        return FrameCall(picks, [], notes, "frame indices must be integers")
    outside = [p for p in picks if not 0 <= p < virtual]
    if outside:
        notes += (f"indices {outside} clamped to 0..{virtual - 1}",)
    frames = [min(max(p, 0), virtual - 1) for p in picks]
    if len(frames) > max_picks:
        notes += (f"{len(frames)} indices, over the limit of {max_picks}: the first {max_picks} ran",)
    return FrameCall(picks, frames[:max_picks], notes)


# -- the conversation -------------------------------------------------------------------------------
def frames_message(picks: list[int], header: str | None = None) -> dict:
    """A user turn showing frames `picks` of both videos: the header (FRAMES_TURN by default), then
    per index its label and the two images."""
    content = [{"type": "text", "text": header or FRAMES_TURN.format(indices=_listed(picks))}]
    for index in picks:
        content += [{"type": "text", "text": FRAME_LABEL.format(index=index)}, {"type": "image"}, {"type": "image"}]
    return {"role": "user", "content": content}


def _listed(picks: list[int]) -> str:
    return ", ".join(str(p) for p in picks)


class Conversation:
    """The messages of one comparison and the images they show, in order."""

    def __init__(self, videos: list[np.ndarray], caption: str, system: str | None, settings: Settings,
                 size: tuple[int, int]):
        self.videos, self.settings, self.size = videos, settings, size
        self.messages: list[dict] = []
        if system is not None:
            self.messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        self.images: list[np.ndarray] = []
        self.shown: list[list[int]] = []  # the virtual indices of each user turn that showed frames
        picks = virtual_uniform(settings.virtual, settings.initial_frames).tolist()
        self.show(picks, FIRST_TURN.format(caption=caption, last=settings.virtual - 1, indices=_listed(picks)))

    def show(self, picks: list[int], header: str | None = None) -> None:
        self.messages.append(frames_message(picks, header))
        height, width = self.size
        for index in picks:
            for video in self.videos:
                real = int(virtual_indices(len(video), self.settings.virtual, [index])[0])
                self.images.append(resize_bicubic_antialias(video[real:real + 1], height, width)[0])
        self.shown.append(picks)

    def refuse(self, reason: str) -> None:
        text = REFUSED_TURN.format(reason=reason)
        self.messages.append({"role": "user", "content": [{"type": "text", "text": text}]})

    def reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def longest(self) -> tuple[list[dict], list[tuple[int, int]]]:
        """The messages and image sizes of the longest conversation this one can grow into, with
        empty replies: every turn left calls for max_picks frames of the longest label."""
        s = self.settings
        turns = s.max_turns - sum(m["role"] == "assistant" for m in self.messages) - 1
        grown = [{"role": "assistant", "content": ""}, frames_message([s.virtual - 1] * s.max_picks)]
        sizes = [image.shape[:2] for image in self.images] + [self.size] * (2 * s.max_picks * turns)
        return self.messages + grown * turns, sizes


# -- sessions ---------------------------------------------------------------------------------------
class Session(Protocol):
    def generate(self, conversation: Conversation, max_new_tokens: int, on_token: Callable[[int], None] | None,
                 timer: StageTimer) -> tuple[list[int], dict]:
        """The next reply's greedy tokens (an EOS included when reached) and the turn's cache figures."""


class CachedSession:
    """The runtime's session: one KV cache for the whole comparison (see the module docstring)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.cached = np.zeros(0, np.int64)  # the tokens the KV cache holds
        self.features: list[np.ndarray] = []  # per image of the conversation, its vision features

    def generate(self, conversation: Conversation, max_new_tokens: int, on_token: Callable[[int], None] | None,
                 timer: StageTimer) -> tuple[list[int], dict]:
        engine, decoder, model = self.engine, self.engine.decoder, self.engine.model
        image_token_id = int(model.config["image_token_id"])
        with timer("preprocess"):
            arrays = image_prompt_inputs(model, conversation.messages, [im.shape[:2] for im in conversation.images])
        ids = arrays["input_ids"][0]
        # keep the cached tokens up to the first difference, and run at least the last token
        limit = min(len(self.cached), len(ids) - 1)
        differ = np.flatnonzero(self.cached[:limit] != ids[:limit])
        keep = int(differ[0]) if len(differ) else limit
        need = len(ids) + max_new_tokens - 1  # the last token generated is never fed back
        capacity = decoder.capacity
        if not len(self.cached):  # the first turn: room for the longest conversation
            capacity = max(need, self._longest(conversation, max_new_tokens))
        elif need > capacity:  # longer than planned (a long scripted reply): start over in a larger cache
            keep, capacity = 0, max(need, 2 * capacity)
        if not keep:
            engine.check_memory(1, capacity)
        new = conversation.images[len(self.features):]
        if new:
            visual = engine.encode_frames([[(image[None], image.shape[:2])] for image in new], timer)
            self.features += [decoder.visual_arrays(rows)[0] for rows in visual]
        with timer("prefill"):
            image_tokens = ids == image_token_id
            features = self._features(int(image_tokens[:keep].sum()), int(image_tokens[keep:].sum()))
            embeds, _ = decoder.multimodal_embeds(ids[None, keep:], image_token_id, VisualRows.of(features))
            cos, sin = decoder.cos_sin(arrays["position_ids"][:, :, keep:])
            if keep:
                decoder.truncate(keep)
                hidden = decoder.step(embeds, cos, sin, on_device=True)
            else:
                hidden = decoder.prefill(embeds, cos, sin, capacity=capacity, on_device=True)
            first = decoder.logits(hidden, slice(-1, None))[0, -1]
        with timer("decode"):
            tokens = decoder.greedy(first, len(ids), arrays["rope_deltas"], max_new_tokens, sorted(engine.eos_ids),
                                    repetition_penalty=engine.repetition_penalty, context_ids=ids, on_token=on_token)
        stats = {"kept": keep, "dropped": len(self.cached) - keep, "prefilled": len(ids) - keep}
        self.cached = np.concatenate([ids, np.asarray(tokens[:-1], np.int64)])
        return tokens, stats

    def _longest(self, conversation: Conversation, max_new_tokens: int) -> int:
        """Tokens the cache can come to hold: the longest conversation this one can grow into,
        with a full reply in every turn. Allocated once, so later turns append in place."""
        messages, sizes = conversation.longest()
        turns = conversation.settings.max_turns - sum(m["role"] == "assistant" for m in conversation.messages)
        tokens = image_prompt_inputs(self.engine.model, messages, sizes)["input_ids"].shape[1]
        return tokens + turns * max_new_tokens

    def _features(self, start: int, count: int) -> np.ndarray:
        """The vision features of image tokens start .. start+count of the conversation."""
        pieces, offset = [], 0
        for features in self.features:
            lo, hi = max(start - offset, 0), min(start + count - offset, len(features))
            if lo < hi:
                pieces.append(features[lo:hi])
            offset += len(features)
        return np.concatenate(pieces) if pieces else np.zeros((0, self.engine.decoder.hidden_size), np.float32)


# -- the loop ---------------------------------------------------------------------------------------
class TextStream:
    """Turns tokens into text pieces as they come: the text of the newest tokens is decoded in a
    short window, and a token that ends inside a multi-byte character waits for the rest."""

    def __init__(self, decode: Callable[[list[int]], str], emit: Callable[[str], None]):
        self.decode, self.emit = decode, emit
        self.tokens: list[int] = []
        self.prefix = self.read = 0  # the window's start, and where the text shown so far ends

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        shown = self.decode(self.tokens[self.prefix:self.read])
        text = self.decode(self.tokens[self.prefix:])
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            self.emit(text[len(shown):])
            self.prefix, self.read = self.read, len(self.tokens)


@dataclass
class Turn:
    """One reply: its tokens, the text kept in the conversation, and the call it made."""

    number: int
    tokens: list[int]
    eos: bool  # False: the token budget ran out first
    text: str  # the reply as the conversation keeps it (a `reply` hook's text, if it gave one)
    call: FrameCall | None
    cache: dict  # the session's figures: kept, dropped and prefilled tokens

    def to_dict(self) -> dict:
        call = self.call or FrameCall(None, [])
        return {"turn": self.number, "tokens": len(self.tokens), "eos": self.eos, "requested": call.requested,
                "frames": call.frames, "notes": [*call.notes, *([call.error] if call.error else [])], **self.cache}


@dataclass
class Comparison:
    """A pairwise judgment: the parsed answer, every turn, and where the time went."""

    parsed: ParsedAnswer
    turns: list[Turn]
    shown: list[list[int]]  # the virtual indices each user turn showed (the first look first)
    videos: list[dict]  # per video: its frame count and size
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        scores = self.parsed.scores
        return {
            "ok": self.parsed.ok, "reason": self.parsed.reason, "scores": scores,
            "labels": {dim: DIMENSION_LABELS[value] for dim, value in scores.items()} if scores else None,
            "turns": len(self.turns), "frames_requested": [t.call.requested for t in self.turns if t.call],
            "frames_shown": self.shown, "tokens": sum(len(t.tokens) for t in self.turns),
            "raw": self.parsed.raw, "videos": self.videos, "timings_ms": self.timings_ms,
            "turn_details": [t.to_dict() for t in self.turns],
        }


def compare(session: Session, model: Model, videos: list[np.ndarray], caption: str, system: str | None,
            settings: Settings, stream: Callable[[int, str], None] | None = None,
            reply: Callable[[int, str], str] | None = None) -> Comparison:
    """Compare two videos ((T, H, W, 3) uint8 RGB frames each) generated for `caption`.

    `stream(turn, text)` receives each reply's text as it is decoded. `reply(turn, text)` returns
    the text the conversation keeps for a reply (scripted turns in tests and benchmarks; by
    default the model's own)."""
    start = time.perf_counter()
    if len(videos) != 2:
        raise InputError(f"a pairwise judge compares two videos, not {len(videos)}")
    for number, video in enumerate(videos, 1):
        if len(video) < settings.initial_frames:
            raise InputError(f"video {number} has {len(video)} frame(s); the pairwise judge's first look takes "
                             f"{settings.initial_frames} distinct frames of each video")
    timer = StageTimer()
    eos_ids = eos_token_ids(model)
    size = smart_resize(settings.image_size, settings.image_size, model.vision)
    conversation = Conversation(videos, caption, system, settings, size)
    turns: list[Turn] = []
    for number in range(1, settings.max_turns + 1):
        on_token = TextStream(model.prompter.decode, partial(stream, number)) if stream else None
        tokens, cache = session.generate(conversation, settings.max_new_tokens, on_token, timer)
        text = model.prompter.decode(tokens)
        if reply is not None:
            text = reply(number, text)
        conversation.reply(text)
        parsed = parse_answer(ANSWER_KIND, text)
        call = None if parsed.ok else parse_frame_call(text, settings.virtual, settings.max_picks)
        turns.append(Turn(number, tokens, tokens[-1] in eos_ids, text, call, cache))
        if call is None:
            break
        if number == settings.max_turns:
            parsed = ParsedAnswer(ok=False, raw=text, reason=f"no answer within {settings.max_turns} turns: "
                                                             f"the last reply called {TOOL_NAME} again")
            break
        if call.error:
            conversation.refuse(call.error)
        else:
            conversation.show(call.frames)
    timer.ms["total"] = (time.perf_counter() - start) * 1e3
    return Comparison(parsed, turns, conversation.shown,
                      [{"frames": len(v), "height": v.shape[1], "width": v.shape[2]} for v in videos], timer.ms)
