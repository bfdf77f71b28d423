"""JSON Lines read the same way everywhere: each object with the place it came from, for errors
that name the line."""

from __future__ import annotations

import json
from typing import Iterable, Iterator

from edgejudge.errors import InputError


def json_objects(lines: Iterable[str], name: str) -> Iterator[tuple[str, int, dict]]:
    """(`<name> line N`, N, object) for each non-blank line; a line that is not a JSON object is
    an InputError naming it."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, number, row
