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
    optional: tuple[str, ...] = ()  # read when present (a .yaml file's keys)

    def read(self, folder: Path) -> dict[str, object]:
        path = Path(folder) / self.file
        if not path.is_file():
            raise InputError(f"{path}: prompt file not found (the judge reads its prompt from the user's files; "
                             "--prompt-dir names the folder that holds them)")
        if path.suffix == ".py":
            return read_python_constants(path, self.names)
        return read_yaml_keys(path, self.names, self.optional)


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


def read_yaml_keys(path: Path, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, object]:
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
    return {n: data[n] for n in names + optional if n in data}


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
    # How the prompt read from the user's files becomes (system, user text): a key of COMPOSERS.
    compose: str = ""
    extra: dict = field(default_factory=dict)


COMPLETION_TEXT = (
    "Instruction: {instruction}\n"
    "Question: At the final moment shown in the video, is the instruction already completed?\n"
    "Answer exactly one label: not complete or complete."
)

SPECS: dict[str, JudgeSpec] = {
    spec.name: spec
    for spec in (
        JudgeSpec(
            name="robocasa-completion",
            families=("qwen3_vl",),
            sample="uniform:64",
            answer="labels",
            fields=("instruction",),
            user_text=COMPLETION_TEXT,
            labels=("not complete", "complete"),
            views=("right", "left"),
        ),
        # The demo judge (`edgejudge demo`, trained by export/train_demo.py on the procedural
        # clips of edgejudge/synthclips.py): the RoboCasa question on one camera, and a gravity
        # score in the PhyGround answer format. These prompts are ours.
        JudgeSpec(
            name="demo-completion",
            families=("qwen3_vl",),
            sample="uniform:8",
            answer="labels",
            fields=("instruction",),
            user_text=COMPLETION_TEXT,
            labels=("not complete", "complete"),
            views=("front",),
        ),
        JudgeSpec(
            name="demo-gravity",
            families=("qwen3_vl",),
            sample="uniform:8",
            answer="json_score",
            fields=("caption",),
            user_text=(
                "Caption: {caption}\n"
                "Question: Does the ball move the way gravity and a solid floor allow? "
                "Rate it from 1 (impossible) to 5 (fully plausible).\n"
                'Answer in JSON: {{"gravity": N}}'
            ),
            max_new_tokens=16,
            score_prefix='{{"gravity": ',
        ),
        JudgeSpec(
            name="phyground",
            families=("qwen3_5",),
            sample="fps:2",
            answer="json_score",
            fields=("caption", "axis"),
            prompt_sources=(
                PromptSource("subq+human.yaml", ("system_prompt", "eval_prompts", "physical_template"),
                             optional=("sub_questions",)),
                PromptSource("infer.py", ("SUB_QUESTIONS", "CRITERIA")),
            ),
            compose="rubric_axis",
            max_new_tokens=64,
            score_prefix='{{"{axis}": ',
            extra={"max_pixels_hw": (360, 640)},
        ),
        JudgeSpec(
            name="cosmos-plausibility",
            families=("qwen2_5_vl",),
            sample="fps:16",
            answer="answer_tag",
            fields=(),
            prompt_sources=(PromptSource("prompt.yaml", ("system_prompt", "user_prompt")),),
            compose="system_user",
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
            compose="system_only",
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


# Prompt composition. A spec's user text is either its own `user_text` with {field} slots, or
# built from the texts read from the user's files (`read_prompts`) by one of COMPOSERS.
Prompts = dict[str, object]


def read_prompts(spec: JudgeSpec, folder: str | Path) -> Prompts:
    """Every text the spec's prompt sources name, read from `folder` (the user's model folder)."""
    values: Prompts = {}
    for source in spec.prompt_sources:
        values.update(source.read(Path(folder)))
    return values


def compose_prompt(spec: JudgeSpec, fields: dict[str, str], prompts: Prompts | None = None) -> tuple[str | None, str]:
    """(system prompt or None, user text) of one question, each of the spec's fields required."""
    unknown = sorted(set(fields) - set(spec.fields))
    if unknown:
        takes = ", ".join(spec.fields) if spec.fields else "no fields"
        raise InputError(f"spec {spec.name} takes {takes}; not {', '.join(unknown)}")
    missing = [f for f in spec.fields if not str(fields.get(f) or "").strip()]
    if missing:
        raise InputError(f"spec {spec.name} needs a non-empty {', '.join(missing)}")
    if spec.user_text:
        return None, spec.user_text.format(**fields)
    if prompts is None:
        files = ", ".join(source.file for source in spec.prompt_sources)
        raise InputError(f"spec {spec.name} builds its prompt from the user's files ({files}): "
                         "pass the folder that holds them (--prompt-dir)")
    return COMPOSERS[spec.compose](spec, prompts, fields)


def _system_user(spec: JudgeSpec, prompts: Prompts, fields: dict[str, str]) -> tuple[str, str]:
    """A prompt YAML's system and user prompts, used as written (Cosmos-Reason1's recipe)."""
    return _text(spec, prompts, "system_prompt"), _text(spec, prompts, "user_prompt")


def _system_only(spec: JudgeSpec, prompts: Prompts, fields: dict[str, str]) -> tuple[str, str]:
    """The user's system prompt; the user turns are built by the judge's own loop (VR-Thinker)."""
    return _text(spec, prompts, "SYSTEM_PROMPT"), ""


def _rubric_axis(spec: JudgeSpec, prompts: Prompts, fields: dict[str, str]) -> tuple[str, str]:
    """One axis of a PhyGround-style rubric, composed as its training code composes it.

    The YAML gives the system prompt, a template per general axis (`eval_prompts`) and one
    template for every physical law (`physical_template`); the Python file gives each axis's
    sub-questions (`SUB_QUESTIONS`) and each law's criterion (`CRITERIA`). The templates are
    `str.format` strings with {prompt} (the caption), {law}, {criteria}, {questions_block}
    ("q1: ..." lines) and {question_keys_str}.
    """
    axis, caption = fields["axis"], fields["caption"]
    templates, criteria = _mapping(spec, prompts, "eval_prompts"), _mapping(spec, prompts, "CRITERIA")
    if axis in templates:
        template = _text(spec, prompts, "eval_prompts", axis)
        fallback = f"Does the video satisfy the {axis} criterion?"
    elif axis in criteria:
        template = _text(spec, prompts, "physical_template")
        fallback = _text(spec, prompts, "CRITERIA", axis)
    else:
        raise InputError(f"spec {spec.name}: unknown axis {axis!r}; the prompt files define {', '.join(rubric_axes(spec, prompts))}")
    questions = _mapping(spec, prompts, "SUB_QUESTIONS").get(axis) or [fallback]
    questions = [q["question"] if isinstance(q, dict) else q for q in questions]
    keys = [f"q{i}" for i in range(1, len(questions) + 1)]
    lines = [f"{key}: {question}" for key, question in zip(keys, questions)]
    if (prompts.get("sub_questions") or {}).get("answer_format") == "answer":
        lines.append("Answer each with yes/no/uncertain.")
    values = {"prompt": caption, "law": axis, "criteria": criteria.get(axis, ""), "questions_block": "\n".join(lines),
              "question_keys_str": ", ".join(keys), "answers_block": ""}
    try:
        text = template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise InputError(f"spec {spec.name}: the template of axis {axis} does not format ({type(e).__name__}: {e})") from None
    return _text(spec, prompts, "system_prompt"), text


def rubric_axes(spec: JudgeSpec, prompts: Prompts) -> list[str]:
    """A rubric's axes in the prompt files' order: the general axes, then the physical laws."""
    return [*_mapping(spec, prompts, "eval_prompts"), *_mapping(spec, prompts, "CRITERIA")]


def _mapping(spec: JudgeSpec, prompts: Prompts, name: str) -> dict:
    value = prompts.get(name, {})
    if not isinstance(value, dict):
        raise InputError(f"spec {spec.name}: {name} in the prompt files must map names to texts, not a {type(value).__name__}")
    return value


def _text(spec: JudgeSpec, prompts: Prompts, name: str, key: str | None = None) -> str:
    value = prompts.get(name) if key is None else _mapping(spec, prompts, name).get(key)
    if not isinstance(value, str):
        where = name if key is None else f"{name}[{key!r}]"
        raise InputError(f"spec {spec.name}: {where} in the prompt files must be a text, not {type(value).__name__}")
    return value


COMPOSERS = {"system_user": _system_user, "system_only": _system_only, "rubric_axis": _rubric_axis}
