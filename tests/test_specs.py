"""Judge specs are data; prompts shipped with a user's model are read, never executed."""

import pytest

from edgejudge.errors import InputError
from edgejudge.runtime.model import FAMILIES
from edgejudge.specs import SPECS, PromptSource, get_spec, read_python_constants


def test_seed_judges_are_specs():
    assert set(SPECS) == {"robocasa-completion", "phyground", "cosmos-plausibility", "vrthinker-pairwise"}
    for spec in SPECS.values():
        assert set(spec.families) <= set(FAMILIES)
        assert spec.sample.split(":")[0] in {"uniform", "fps", "virtual"}
        assert bool(spec.user_text) != bool(spec.prompt_sources), spec.name
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
