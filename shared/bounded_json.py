"""Parse untrusted JSON within limits, and read a payload's top-level strings without parsing it.

A queue message comes from anyone who can write to the stream. `json.loads` recurses once per
nesting level and converts number literals of any length (quadratic time), so a few kilobytes can
hold a worker's batch; and a payload refused for such a limit must still say where to send the
refusal. Both needs live here, apart from the protocol's schema (`twinq.shared.protocol`).
"""

from __future__ import annotations

import json
import re
from json.decoder import scanstring
from typing import Any

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects parsed; a request needs 1 (its object). Checked
before parsing, so the limit does not depend on how deep the interpreter lets json recurse."""
MAX_NUMBER_DIGITS = 40
"""Longest number literal parsed (2**63 has 19 digits); Python refuses ints past 4,300 digits
anyway, and converting long ones costs quadratic time."""

class JsonLimitError(ValueError):
    """Well-formed JSON past a parser limit (nesting depth, number length). Unlike a syntax
    error, the request's id can still be read from the top level (see `top_level_strings`)."""


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise JsonLimitError(f"a number of {len(digits.lstrip('-'))} digits, over the limit of "
                             f"{MAX_NUMBER_DIGITS}")
    return int(digits)


def loads(raw: str) -> Any:
    """json.loads that fails with ValueError only: JsonLimitError for nesting past
    `MAX_JSON_DEPTH` and numbers past `MAX_NUMBER_DIGITS`, plain ValueError for bad syntax."""
    if _nests_deeper(raw, MAX_JSON_DEPTH):
        raise JsonLimitError(f"nested too deeply (over {MAX_JSON_DEPTH} levels)")
    try:
        return json.loads(raw, parse_int=_parse_int)
    except RecursionError as exc:  # a stack already deep; the check above is the real limit
        raise JsonLimitError("nested too deeply") from exc


_SPACE = re.compile(r"[ \t\n\r]*")
_SCALAR = re.compile(r"-?[0-9][0-9.eE+-]*|true|false|null|NaN|-?Infinity")
_STRUCTURE = re.compile(r'["\[\]{}]')


def _nests_deeper(raw: str, limit: int) -> bool:
    """Whether arrays and objects in `raw` nest deeper than `limit`, counted without recursion
    (brackets inside strings do not count). Bad syntax is left to the parser: False."""
    depth, pos = 0, 0
    while (match := _STRUCTURE.search(raw, pos)) is not None:
        pos = match.end()
        if match.group() == '"':
            try:
                pos = scanstring(raw, pos)[1]
            except ValueError:
                return False
        elif match.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _skip_value(raw: str, pos: int) -> int:
    """End of the JSON value at `pos`, found without recursion: strings are scanned, brackets
    counted, nothing inside a container is decoded."""
    if raw.startswith('"', pos):
        return scanstring(raw, pos + 1)[1]
    if not raw.startswith(("[", "{"), pos):
        match = _SCALAR.match(raw, pos)
        if match is None:
            raise ValueError(f"no JSON value at {pos}")
        return match.end()
    depth = 0
    while True:
        match = _STRUCTURE.search(raw, pos)
        if match is None:
            raise ValueError("unterminated array or object")
        pos = match.end()
        if match.group() == '"':
            pos = scanstring(raw, pos)[1]
            continue
        depth += 1 if match.group() in "[{" else -1
        if depth == 0:
            return pos


def _expect(raw: str, pos: int, token: str) -> int:
    pos = _SPACE.match(raw, pos).end()  # type: ignore[union-attr] - matches the empty string
    if not raw.startswith(token, pos):
        raise ValueError(f"expected {token!r} at {pos}")
    return _SPACE.match(raw, pos + 1).end()  # type: ignore[union-attr]


def top_level_strings(raw: str, names: tuple[str, ...]) -> dict[str, str]:
    """The string values of `names` among the members of the JSON object `raw`, read without
    decoding any other value: how a payload past a parser limit still tells where to reply.

    Raises:
        ValueError: `raw` does not start as a JSON object of members.
    """
    pos, found = _expect(raw, 0, "{"), {}
    if raw.startswith("}", pos):
        return found
    while True:
        if not raw.startswith('"', pos):
            raise ValueError(f"expected a member name at {pos}")
        name, pos = scanstring(raw, pos + 1)
        start = pos = _expect(raw, pos, ":")
        pos = _skip_value(raw, pos)
        if name in names and raw.startswith('"', start):
            found[name] = scanstring(raw, start + 1)[0]
        elif name in names:
            found.pop(name, None)  # as json.loads: the last member of a name wins
        pos = _SPACE.match(raw, pos).end()  # type: ignore[union-attr]
        if raw.startswith("}", pos):
            return found
        pos = _expect(raw, pos, ",")
