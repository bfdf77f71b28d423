"""Shared test setup: point the legacy-transformers parity tests at the side folders .ci/run
installs, when they exist in this checkout and the environment does not name others."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for env, folder in (("EDGEJUDGE_TF_LEGACY", "transformers-4.57.6"), ("EDGEJUDGE_TF_QWEN35", "transformers-5.2.0")):
    if not os.environ.get(env) and (ROOT / ".ci-cache" / folder).is_dir():
        os.environ[env] = str(ROOT / ".ci-cache" / folder)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny torch models are overhead-bound: one thread is faster, and far faster on a busy CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A rubric in the layout PhyGround's judge ships (our own wording): a YAML of templates and a
# Python file of sub-questions and criteria.
RUBRIC_YAML = """\
system_prompt: You grade generated videos.
sub_questions:
  answer_format: hint
eval_prompts:
  SA: |-
    Grade how well the video follows its caption (SA).
    Caption: "{prompt}"
    Think about:
    {questions_block}
    Reply with JSON only, e.g. {{"SA": 3}}
physical_template: |-
  Grade the law {law}.
  Rule: {criteria}
  Caption: "{prompt}"
  Think about ({question_keys_str}):
  {questions_block}
  Reply with JSON only, e.g. {{"{law}": 3}}
"""
RUBRIC_PY = """\
SUB_QUESTIONS = {
    "SA": ["Is every object of the caption there?", "Does the action happen?"],
    "gravity": [{"question": "Do dropped things fall?"}],
}
CRITERIA = {"gravity": "Unsupported objects fall down.", "shadow": "Shadows follow their objects."}
"""


@pytest.fixture
def rubric_dir(tmp_path):
    """A folder with the rubric's two prompt files."""
    (tmp_path / "subq+human.yaml").write_text(RUBRIC_YAML)
    (tmp_path / "infer.py").write_text(RUBRIC_PY)
    return tmp_path
