"""Prompter.encode splices pad runs in as ids; the result must equal encoding the whole string."""

import pytest

from edgejudge.export.fixtures import tiny_model_dir
from edgejudge.runtime.prompt import Prompter

TEXTS = [
    "",
    "Instruction: Place the red block in the box.",
    "<|video_pad|>",
    "<|im_start|>user\n<0.5 seconds><|vision_start|>" + "<|video_pad|>" * 50 + "<|vision_end|>text<|im_end|>",
    "a<|video_pad|><|video_pad|>b<|image_pad|><|image_pad|><|video_pad|> c",
    "<|video_pad|x not a token |> ünïcode 12345",
]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_encode_equals_whole_string(family):
    prompter = Prompter(tiny_model_dir(family))
    for text in TEXTS:
        assert prompter.encode(text).tolist() == prompter.tokenizer.encode(text).ids, text
