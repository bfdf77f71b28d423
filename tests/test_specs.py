"""Judge specs are data; prompts shipped with a user's model are read, never executed."""

import pytest

from edgejudge.errors import InputError
from edgejudge.runtime.model import FAMILIES
from edgejudge.specs import SPECS, PromptSource, compose_prompt, get_spec, read_prompts, read_python_constants, rubric_axes


def test_seed_judges_are_specs():
    assert set(SPECS) == {"robocasa-completion", "phyground", "cosmos-plausibility", "vrthinker-pairwise",
                          "demo-completion", "demo-gravity"}
    for spec in SPECS.values():
        assert set(spec.families) <= set(FAMILIES)
        assert spec.sample.split(":")[0] in {"uniform", "fps", "virtual"}
        assert bool(spec.user_text) != bool(spec.prompt_sources), spec.name
        assert bool(spec.compose) == bool(spec.prompt_sources), spec.name
    robocasa = get_spec("robocasa-completion")
    assert robocasa.labels == ("not complete", "complete") and robocasa.views == ("right", "left")
    assert "{instruction}" in robocasa.user_text


def test_unknown_spec():
    with pytest.raises(InputError, match="unknown judge spec 'nope'"):
        get_spec("nope")


def test_python_constants_are_read_without_running_the_file(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "infer.py").write_text(
        "import os\n"
        f"open({str(marker)!r}, 'w').write('executed')\n"
        "SYSTEM_PROMPT = ('You compare two videos. '\n    'Answer with tags.')\n"
        "AXES: list = ['gravity', 'inertia']\n"
        "def main():\n    pass\n"
    )
    values = PromptSource("infer.py", ("SYSTEM_PROMPT", "AXES")).read(tmp_path)
    assert values == {"SYSTEM_PROMPT": "You compare two videos. Answer with tags.", "AXES": ["gravity", "inertia"]}
    assert not marker.exists()


def test_python_constants_errors(tmp_path):
    path = tmp_path / "infer.py"
    path.write_text("SYSTEM_PROMPT = build_prompt()\n")
    with pytest.raises(InputError, match="SYSTEM_PROMPT is not a literal"):
        read_python_constants(path, ("SYSTEM_PROMPT",))
    path.write_text("OTHER = 'x'\n")
    with pytest.raises(InputError, match="no top-level assignment of SYSTEM_PROMPT"):
        read_python_constants(path, ("SYSTEM_PROMPT",))
    path.write_text("SYSTEM_PROMPT = (\n")
    with pytest.raises(InputError, match="not valid Python"):
        read_python_constants(path, ("SYSTEM_PROMPT",))
    with pytest.raises(InputError, match="prompt file not found"):
        PromptSource("missing.py", ("X",)).read(tmp_path)


def test_yaml_prompts(tmp_path):
    (tmp_path / "prompt.yaml").write_text("system_prompt: You rate videos.\nuser_prompt: |\n  Rate {caption}.\n")
    values = PromptSource("prompt.yaml", ("system_prompt", "user_prompt")).read(tmp_path)
    assert values == {"system_prompt": "You rate videos.", "user_prompt": "Rate {caption}.\n"}
    (tmp_path / "bad.yaml").write_text("system_prompt: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        PromptSource("bad.yaml", ("system_prompt",)).read(tmp_path)
    (tmp_path / "partial.yaml").write_text("system_prompt: x\n")
    with pytest.raises(InputError, match="no key user_prompt"):
        PromptSource("partial.yaml", ("user_prompt",)).read(tmp_path)


def test_rubric_prompts_are_composed_from_the_users_files(rubric_dir):
    spec = get_spec("phyground")
    prompts = read_prompts(spec, rubric_dir)
    assert rubric_axes(spec, prompts) == ["SA", "gravity", "shadow"]
    system, text = compose_prompt(spec, {"caption": "A cup falls.", "axis": "SA"}, prompts)
    assert system == "You grade generated videos."
    assert text == ('Grade how well the video follows its caption (SA).\nCaption: "A cup falls."\nThink about:\n'
                    'q1: Is every object of the caption there?\nq2: Does the action happen?\n'
                    'Reply with JSON only, e.g. {"SA": 3}')
    _, text = compose_prompt(spec, {"caption": "A cup falls.", "axis": "gravity"}, prompts)
    assert text == ('Grade the law gravity.\nRule: Unsupported objects fall down.\nCaption: "A cup falls."\n'
                    'Think about (q1):\nq1: Do dropped things fall?\nReply with JSON only, e.g. {"gravity": 3}')
    _, text = compose_prompt(spec, {"caption": "A cup falls.", "axis": "shadow"}, prompts)
    assert "q1: Shadows follow their objects." in text  # a law without sub-questions asks its criterion


def test_rubric_composition_errors(rubric_dir):
    spec = get_spec("phyground")
    prompts = read_prompts(spec, rubric_dir)
    with pytest.raises(InputError, match="unknown axis 'mass'; the prompt files define SA, gravity, shadow"):
        compose_prompt(spec, {"caption": "x", "axis": "mass"}, prompts)
    with pytest.raises(InputError, match="needs a non-empty caption"):
        compose_prompt(spec, {"caption": " ", "axis": "SA"}, prompts)
    with pytest.raises(InputError, match=r"builds its prompt from the user's files \(subq\+human.yaml, infer.py\)"):
        compose_prompt(spec, {"caption": "x", "axis": "SA"})
    bad = dict(prompts, physical_template="Grade {law} of {unknown}.")
    with pytest.raises(InputError, match="template of axis gravity does not format"):
        compose_prompt(spec, {"caption": "x", "axis": "gravity"}, bad)
    with pytest.raises(InputError, match=r"CRITERIA in the prompt files must map names to texts"):
        compose_prompt(spec, {"caption": "x", "axis": "gravity"}, dict(prompts, CRITERIA=["gravity"]))


def test_plausibility_prompt_is_the_users_yaml_as_written(tmp_path):
    (tmp_path / "prompt.yaml").write_text("system_prompt: You rate physics.\nuser_prompt: 'Rate it {like this}: <answer>N</answer>'\n")
    spec = get_spec("cosmos-plausibility")
    prompts = read_prompts(spec, tmp_path)
    assert compose_prompt(spec, {}, prompts) == ("You rate physics.", "Rate it {like this}: <answer>N</answer>")
    with pytest.raises(InputError, match="takes no fields; not caption"):
        compose_prompt(spec, {"caption": "x"}, prompts)
    with pytest.raises(InputError, match=r"user_prompt in the prompt files must be a text"):
        compose_prompt(spec, {}, dict(prompts, user_prompt=None))
