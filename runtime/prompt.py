"""Chat-template rendering and tokenization, as HF's processors do them, without transformers.

The template is the checkpoint's own (chat_template.json, chat_template.jinja or
tokenizer_config.json). It is rendered in a jinja2 sandbox configured like HF's
(trim_blocks, lstrip_blocks, loop controls, a `tojson` that does not escape HTML,
`raise_exception`, `strftime_now`), with the tokenizer's special tokens in scope.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from edgejudge.errors import InputError

PAD_TOKENS = ("<|video_pad|>", "<|image_pad|>")  # stand-ins the processor repeats once per vision token


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & for HTML, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """Accepts HF's `{% generation %}` block (used by some templates to mark assistant text) and
    renders its body unchanged; we never need the assistant-token mask it exists for."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def read_chat_template(model_dir: Path) -> str:
    """The checkpoint's chat template, from whichever file HF would take it."""
    model_dir = Path(model_dir)
    if (path := model_dir / "chat_template.jinja").is_file():
        return path.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file() and (template := json.loads(path.read_text()).get("chat_template")):
            return template
    raise InputError(f"{model_dir}: no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)")


class Prompter:
    """Renders conversations with the checkpoint's template and turns text into token ids."""

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise InputError(f"{model_dir}: no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.template_source = read_chat_template(model_dir)
        self.template = _environment().from_string(self.template_source)
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        # HF passes the tokenizer's special tokens (bos_token, eos_token, ...) to the template.
        self.special_tokens = {
            k: v for k in ("bos_token", "eos_token", "pad_token", "unk_token") if isinstance(v := config.get(k), str)
        }
        self.model_max_length = int(config.get("model_max_length") or 0) or None
        self._pad_ids = {t: i for t in PAD_TOKENS if (i := self.tokenizer.token_to_id(t)) is not None}
        self._pad_runs = re.compile("(" + ("|".join(f"(?:{re.escape(t)})+" for t in self._pad_ids) or "(?!)") + ")")

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **template_vars: Any) -> str:
        """The prompt text exactly as `apply_chat_template(..., tokenize=False)` returns it."""
        return self.template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
            **template_vars,
        )

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise InputError(f"the tokenizer has no token {token!r}")
        return token_id

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int64) as the HF processor's tokenizer call gives them (Qwen adds no BOS/EOS).

        A prompt holds thousands of pad tokens per video; runs of them are spliced in as ids and
        only the text between them goes through the tokenizer (4x faster for a 64-frame clip).
        Same ids as encoding the whole string: pads are added tokens, which the tokenizer splits
        out before anything else, so the text around them tokenizes the same either way.
        """
        return self.encode_many([text])[0]

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text, all their pieces in one batch (the tokenizer's threads share it)."""
        splits = [self._pad_runs.split(text) for text in texts]
        pieces = iter(self.tokenizer.encode_batch([p for parts in splits for p in parts[0::2]], add_special_tokens=False))
        out = []
        for parts in splits:
            ids = []
            for i, part in enumerate(parts):
                if i % 2:
                    token = part[: part.index("|>") + 2]
                    ids.append(np.full(len(part) // len(token), self._pad_ids[token], np.int64))
                else:
                    ids.append(np.asarray(next(pieces).ids, np.int64))
            out.append(np.concatenate(ids))
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def user_turn(num_videos: int, text: str, system: str | None = None) -> list[dict]:
    """One user message with the videos first and then the text, after an optional system message."""
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content = [{"type": "video"} for _ in range(num_videos)] + [{"type": "text", "text": text}]
    messages.append({"role": "user", "content": content})
    return messages
