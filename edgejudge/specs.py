"""Judge specs: each seed judge as data, so the engine has no per-judge branches.

A spec says which model family it expects, how frames are sampled, where its prompt comes from,
and how its answer is read. Prompts that ship with a user's model or adapter are read from the
user's files (`PromptSource`), never copied here: Python constants through `ast.literal_eval`
of the named assignments (the file is never executed), or keys of a YAML file.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

from edgejudge.errors import InputError


@dataclass(frozen=True)
class PromptSource:
    """Where a judge's prompt texts live in the user's files.

    `file` is relative to the folder the user points at (`--prompt-dir`, default the model
    folder); `names` are the assignments (a .py file) or keys (a .yaml file) to read.
    """

    file: str
    names: tuple[str, ...]

    def read(self, folder: Path) -> dict[str, str]:
        path = Path(folder) / self.file
        if not path.is_file():
            raise InputError(f"{path}: prompt file not found (the judge reads its prompt from the user's files)")
        if path.suffix == ".py":
            values = read_python_constants(path, self.names)
        else:
            values = read_yaml_keys(path, self.names)
        return values


def read_python_constants(path: Path, names: tuple[str, ...]) -> dict[str, str]:
    """Values of top-level `NAME = <literal>` assignments, evaluated with ast.literal_eval.

    Only literals are accepted (strings, numbers, lists, dicts, and implicit string concatenation),
    so reading a user's infer.py never runs its code.
    """
    try:
        tree = ast.parse(Path(path).read_text(), filename=str(path))
    except SyntaxError as e:
        raise InputError(f"{path}: not valid Python ({e.msg}, line {e.lineno})") from None
    found: dict[str, object] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Name) and target.id in names and node.value is not None:
                try:
                    found[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    raise InputError(f"{path}: {target.id} is not a literal (line {node.lineno})") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise InputError(f"{path}: no top-level assignment of {', '.join(missing)}")
    return found


def read_yaml_keys(path: Path, names: tuple[str, ...]) -> dict[str, str]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of prompt names to texts")
    missing = [n for n in names if n not in data]
    if missing:
        raise InputError(f"{path}: no key {', '.join(missing)}")
    return {n: data[n] for n in names}


@dataclass(frozen=True)
class JudgeSpec:
    name: str
    families: tuple[str, ...]  # model_type values the judge is built on
    sample: str  # default frame policy: uniform:N, fps:F, virtual:N
    answer: str  # labels | json_score | answer_tag | pairwise_tags
    fields: tuple[str, ...]  # text fields a job provides (instruction, caption, ...)
    user_text: str = ""  # built-in user text with {field} slots, when the prompt is ours to define
    # Or: the prompt texts read from the user's files. The file and assignment/key names are the
    # defaults the seed judges ship with; `edgejudge judge` lets a user point elsewhere.
    prompt_sources: tuple[PromptSource, ...] = ()
    labels: tuple[str, ...] = ()  # candidate answers, for answer == "labels"
    views: tuple[str, ...] = ()  # named camera views of one decision
    max_new_tokens: int = 64
    # Integer-score judges: the answer text up to the score, with {field} slots. One forward on
    # prompt + this prefix gives the probabilities of the digits 1-5 at the score position.
    score_prefix: str = ""
    images: bool = False  # frames go in as images rather than as one video
    extra: dict = field(default_factory=dict)


SPECS: dict[str, JudgeSpec] = {
    spec.name: spec
    for spec in (
        JudgeSpec(
            name="robocasa-completion",
            families=("qwen3_vl",),
            sample="uniform:64",
            answer="labels",
            fields=("instruction",),
            user_text=(
                "Instruction: {instruction}\n"
                "Question: At the final moment shown in the video, is the instruction already completed?\n"
                "Answer exactly one label: not complete or complete."
            ),
            labels=("not complete", "complete"),
            views=("right", "left"),
        ),
        JudgeSpec(
            name="phyground",
            families=("qwen3_5",),
            sample="fps:2",
            answer="json_score",
            fields=("caption", "axis"),
            prompt_sources=(
                PromptSource("subq+human.yaml", ("system_prompt",)),
                PromptSource("infer.py", ("SUB_QUESTIONS", "CRITERIA")),
            ),
            max_new_tokens=64,
            score_prefix='{{"{axis}": ',
            extra={"max_pixels_hw": (360, 640)},
        ),
        JudgeSpec(
            name="cosmos-plausibility",
            families=("qwen2_5_vl",),
            sample="fps:16",
            answer="answer_tag",
            fields=("caption",),
            prompt_sources=(PromptSource("prompt.yaml", ("system_prompt", "user_prompt")),),
            max_new_tokens=4096,
            score_prefix="<answer>",
        ),
        JudgeSpec(
            name="vrthinker-pairwise",
            families=("qwen2_5_vl",),
            sample="virtual:128",
            answer="pairwise_tags",
            fields=("caption",),
            prompt_sources=(PromptSource("infer.py", ("SYSTEM_PROMPT",)),),
            max_new_tokens=2048,
            images=True,
            extra={"initial_frames": 4, "image_size": 448, "max_turns": 6, "max_picks": 12},
        ),
    )
}


def get_spec(name: str) -> JudgeSpec:
    if name not in SPECS:
        raise InputError(f"unknown judge spec {name!r}; known: {', '.join(SPECS)}")
    return SPECS[name]
