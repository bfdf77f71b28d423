"""Which Hugging Face release's behaviour to reproduce.

HF releases disagree on details that change what a model sees (docs/hf-divergences.md lists
them). A checkpoint should be fed what it was trained with, so every family has a default release
line and the user can pick another (`--hf 5.17`).
"""


def parse_release(hf: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in hf.split("."))
    except ValueError:
        from edgejudge.errors import InputError

        raise InputError(f"--hf expects a transformers release like 4.57 or 5.17, got {hf!r}") from None


def hf_at_least(hf: str, release: str) -> bool:
    """Whether release `hf` is `release` or newer."""
    return parse_release(hf) >= parse_release(release)
