"""The control-loop API: load a judge once, then ask it about frames straight from the robot.

    judge = Judge.load("artifacts/robocasa-int4", device="cuda")
    decision = judge.check("Place the red block in the box.", views={"right": right, "left": left})
    decision.label, decision.scores, decision.views, decision.timings_ms

`check` is for candidate-label judges (lowest mean NLL per label token wins, averaged over the
views), `ask` for judges that answer in text (greedy, parsed by the spec's answer kind, plus the
probabilities of the scores 1-5 where the spec has a score prefix). Torch-free: ONNX artifacts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Union

import numpy as np

from edgejudge.errors import InputError
from edgejudge.manifest import MANIFEST_NAME, read_manifest
from edgejudge.runtime.engine import CACHE_GROUPS, DIGITS, Engine, Prompt, StageTimer
from edgejudge.runtime.model import frame_picker, read_config, sample_clip
from edgejudge.runtime.sessions import memory_errors
from edgejudge.runtime.video import Clip, read_video
from edgejudge.specs import JudgeSpec, Prompts, compose_prompt, get_spec, read_prompts

if TYPE_CHECKING:
    from typing import Callable

    from edgejudge.runtime.answers import ParsedAnswer
    from edgejudge.runtime.pairwise import Comparison

Frames = Union[np.ndarray, Clip]


def check_family(folder: Path, spec: JudgeSpec) -> None:
    """Refuse a spec built for another model family than the artifact's (or model folder's)."""
    manifest = read_manifest(folder) if (folder / MANIFEST_NAME).is_file() else None
    family = manifest.family if manifest else read_config(folder).get("model_type")
    if family not in spec.families:
        raise InputError(f"{folder} is a {family} model; spec {spec.name} needs {', '.join(spec.families)}")


@dataclass
class Decision:
    """A candidate-label decision: the label with the lowest score wins."""

    label: str
    scores: dict[str, float]  # mean over views of each label's NLL per token
    views: dict[str, dict[str, float]]  # per view: each label's NLL per token
    timings_ms: dict[str, float]  # preprocess, vision, prefill, scoring, total

    def to_dict(self) -> dict:
        return {"prediction": self.label, "scores": self.scores, "views": self.views, "timings_ms": self.timings_ms}


@dataclass
class Answer:
    """A generated answer: the raw text, what the spec's parser reads from it, and the scores'
    probabilities where the spec has a score prefix."""

    text: str  # decoded without special tokens
    token_ids: list[int]  # generated tokens, the EOS included when one was reached
    eos: bool  # False: the token budget ran out first
    parsed: ParsedAnswer
    distribution: dict[int, float] | None
    expected: float | None
    timings_ms: dict[str, float]

    def to_dict(self, key: str | None = None) -> dict:
        parsed = self.parsed
        return {"key": key if key is not None else parsed.key, "score": parsed.score, "scores": parsed.scores,
                "ok": parsed.ok, "reason": parsed.reason, "raw": self.text, "tokens": len(self.token_ids), "eos": self.eos,
                "distribution": self.distribution, "expected": self.expected, "timings_ms": self.timings_ms}


class Judge:
    """A judge spec on an ONNX artifact. Load once; `check` / `ask` per decision."""

    def __init__(self, engine: Engine, spec: JudgeSpec, prompts: Prompts | None = None):
        self.engine, self.spec, self.prompts = engine, spec, prompts

    @classmethod
    def load(cls, artifact_dir: str | Path, spec: str | JudgeSpec | None = None, device: str = "cpu",
             gpu_mem_gb: float | None = None, cache_groups: int = CACHE_GROUPS, hf: str | None = None,
             prompt_dir: str | Path | None = None, prefill_graph: bool | None = None) -> "Judge":
        """`spec`: a spec name, a JudgeSpec, or None for the one recorded in the artifact.
        `cache_groups`: how many 2-frame groups of vision outputs to keep (LRU, ONNX artifacts).
        `prompt_dir`: where the files of a spec whose prompts ship with the user's model are
        (default: the artifact folder); they are read here, so a missing one fails the load.
        `prefill_graph` (ONNX on CUDA): capture the candidate-label prefill as a CUDA graph, which
        keeps its activations on the device between decisions, as the vision session then keeps
        its arena (default: when no cap is set).

        ONNX artifacts run on ONNX Runtime (torch-free); bnb artifacts and plain HF model folders
        run on the torch backend (`edgejudge.torch_backend`, imported only then)."""
        folder = Path(artifact_dir)
        manifest = read_manifest(folder) if (folder / MANIFEST_NAME).is_file() else None
        if spec is None:
            if manifest is None or not manifest.judge_spec:
                raise InputError(f"{artifact_dir} records no judge spec: pass one")
            spec = manifest.judge_spec
        spec = get_spec(spec) if isinstance(spec, str) else spec
        check_family(folder, spec)
        prompts = read_prompts(spec, prompt_dir or folder) if spec.prompt_sources else None
        if manifest is not None and manifest.format == "onnx":
            return cls(Engine(folder, device, gpu_mem_gb, cache_groups, hf, prefill_graph=prefill_graph), spec, prompts)
        from edgejudge.torch_backend import TorchEngine

        return cls(TorchEngine(folder, device, gpu_mem_gb, hf), spec, prompts)

    def compose(self, fields: Mapping[str, str]) -> tuple[str | None, str]:
        """(system prompt or None, user text) of one question (`edgejudge.specs.compose_prompt`)."""
        return compose_prompt(self.spec, dict(fields), self.prompts)

    def _clip(self, frames: Frames, fps: float | None, sample: str | None) -> Clip:
        policy = sample or self.spec.sample
        if isinstance(frames, Clip):
            return sample_clip(self.engine.model, frames, policy)
        return read_video(frames, fps=fps, pick=frame_picker(self.engine.model, policy))

    def check(self, instruction: str, views: Mapping[str, Frames], fps: float | None = None,
              sample: str | None = None) -> Decision:
        """One decision of a candidate-label judge over its views. `views` maps each of the spec's
        view names to (T, H, W, 3) uint8 RGB frames or a Clip; `sample` overrides the spec's
        frame policy and `fps` gives the frames' rate (for the prompt's timestamps)."""
        start = time.perf_counter()
        spec = self.spec
        if spec.answer != "labels":
            raise InputError(f"spec {spec.name} answers in text ({spec.answer}): use ask()")
        if not isinstance(views, Mapping):
            raise InputError(f"views must map view names to frames, not a {type(views).__name__}")
        names = list(views)
        if not names or (spec.views and sorted(names) != sorted(spec.views)):
            expected = ", ".join(spec.views) if spec.views else "at least one"
            raise InputError(f"spec {spec.name} takes views {expected}; got {', '.join(names) or 'none'}")
        timer = StageTimer()
        with timer("preprocess"):
            system, text = self.compose({"instruction": instruction})
            prompts = [self.engine.prompt([self._clip(views[name], fps, sample)], text, system) for name in names]
        decision = self.decide([prompts], names, timer)[0]
        timer.ms["total"] = (time.perf_counter() - start) * 1e3
        return decision

    def decide(self, decisions: list[list[Prompt]], view_names: list[str],
               timer: StageTimer | None = None) -> list[Decision]:
        """Several decisions' view prompts scored in one engine call (prompts of one length share
        a batch, across decisions too): each decision is the mean over its views."""
        timer = timer or StageTimer()
        labels = self.spec.labels
        with memory_errors(self.engine.gpu_mem_gb):
            nll = self.engine.score_labels([p for views in decisions for p in views], labels, timer)
        out, start = [], 0
        for views in decisions:
            per_view, start = nll[start : start + len(views)], start + len(views)
            scores = per_view.mean(axis=0)
            out.append(Decision(
                label=labels[int(np.argmin(scores))],
                scores=dict(zip(labels, scores.tolist())),
                views={name: dict(zip(labels, row.tolist())) for name, row in zip(view_names, per_view)},
                timings_ms=timer.ms,
            ))
        return out

    def ask(self, video: Frames, fps: float | None = None, sample: str | None = None, system: str | None = None,
            **fields: str) -> Answer:
        """A generative judge's greedy answer about one video (up to the spec's max_new_tokens,
        stopping at EOS), parsed by the spec's answer kind."""
        return self.ask_many(video, [fields], fps, sample, system)[0]

    def ask_many(self, video: Frames, questions: list[Mapping[str, str]], fps: float | None = None,
                 sample: str | None = None, system: str | None = None) -> list[Answer]:
        """Several questions about one video (a rubric: one `fields` mapping per axis). The engine
        prefills what their prompts share (the system prompt and the video) once where it can
        (the torch backend; see `generate_many` of each engine) and answers them as one batch.
        `system` replaces the system prompt the spec composes."""
        from edgejudge.runtime.answers import parse_answer

        start = time.perf_counter()
        spec = self.spec
        if spec.answer == "labels":
            raise InputError(f"spec {spec.name} scores candidate labels: use check()")
        if not questions:
            raise InputError("ask_many needs at least one question")
        timer = StageTimer()
        with timer("preprocess"):
            composed = [self.compose(fields) for fields in questions]
            systems = {system if system is not None else composed_system for composed_system, _ in composed}
            if len(systems) > 1:
                raise InputError(f"spec {spec.name}: the questions of one ask_many must share their system prompt")
            texts = [text for _, text in composed]
            clip = self._clip(video, fps, sample)
        prefixes = [spec.score_prefix.format(**fields) for fields in questions] if spec.score_prefix else None
        with memory_errors(self.engine.gpu_mem_gb):
            results = self.engine.generate_many([clip], texts, spec.max_new_tokens, systems.pop(), prefixes, timer)
        timer.ms["total"] = (time.perf_counter() - start) * 1e3
        answers = []
        for tokens, probs in results:
            raw = self.engine.model.prompter.decode(tokens)
            answers.append(Answer(
                text=raw,
                token_ids=tokens,
                eos=tokens[-1] in self.engine.eos_ids,
                parsed=parse_answer(spec.answer, raw),
                distribution=None if probs is None else {int(d): float(p) for d, p in zip(DIGITS, probs)},
                expected=None if probs is None else float(np.dot(probs, np.arange(1, 6))),
                timings_ms=timer.ms,
            ))
        return answers

    def compare(self, video1: Frames | str, video2: Frames | str, caption: str, system: str | None = None,
                stream: Callable[[int, str], None] | None = None, reply: Callable[[int, str], str] | None = None
                ) -> Comparison:
        """A pairwise judge's verdict on two videos generated for `caption` (VR-Thinker): the
        multi-turn frame-selection loop of `edgejudge.runtime.pairwise` on one KV cache. Videos are
        frames, Clips or files; `system` replaces the system prompt read from the user's files;
        `stream(turn, text)` receives the reasoning as it is decoded; `reply(turn, text)` returns
        the text a reply is kept as (scripted turns)."""
        from edgejudge.runtime.pairwise import CachedSession, Settings, compare

        if self.spec.answer != "pairwise_tags":
            raise InputError(f"spec {self.spec.name} judges one video: use {'check' if self.spec.labels else 'ask'}()")
        if not isinstance(self.engine, Engine):
            raise InputError("compare() runs on ONNX artifacts")
        composed, _ = self.compose({"caption": caption})
        clips = [self._clip(video, None, "none") for video in (video1, video2)]
        with memory_errors(self.engine.gpu_mem_gb):
            return compare(CachedSession(self.engine), self.engine.model, [clip.frames for clip in clips], caption,
                           system if system is not None else composed, Settings.from_spec(self.spec), stream, reply)
