"""Parse untrusted JSON within limits, read a payload's top-level strings without parsing it,
and write JSON text that is always valid UTF-8.

A queue message comes from anyone who can write to the stream. `json.loads` recurses once per
nesting level and converts number literals of any length (quadratic time), so a few kilobytes can
hold a worker's batch; and a payload refused for such a limit must still say where to send the
refusal. JSON escapes such as "\\ud800" decode to lone surrogates, which UTF-8 (and so Redis)
cannot carry; text that goes back out must be made encodable. These needs live here, apart from
the protocol's schema (`twinq.shared.protocol`).
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


class PayloadError(ValueError):
    """An untrusted payload that is not a JSON object within limits; the message names why,
    and `too_large` says it was refused for its size alone."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def read_object(raw: bytes | str, max_bytes: int) -> dict[str, Any]:
    """The JSON object of an untrusted payload of at most `max_bytes` (UTF-8 bytes or text).

    Raises:
        PayloadError: too long, not UTF-8, past a parser limit, bad syntax, or not an object.
    """
    if len(raw) > max_bytes:
        raise PayloadError(f"payload is {len(raw)} bytes, over the limit of {max_bytes}",
                           too_large=True)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"payload is not valid UTF-8 (byte {exc.start})") from exc
    try:
        payload = loads(raw)
    except JsonLimitError as exc:
        raise PayloadError(f"payload is refused: {exc}") from exc
    except ValueError as exc:
        raise PayloadError(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise PayloadError(f"payload must be a JSON object, not {type(payload).__name__}")
    return payload


def read_members(raw: bytes | str, names: tuple[str, ...], max_bytes: int
                 ) -> dict[str, Any] | None:
    """Best effort: the JSON object of `raw`, or, when it is well-formed but past a parser
    limit, its top-level string members `names` (`top_level_strings`). None when `raw` is
    longer than `max_bytes`, is not an object, or has bad syntax (nothing in it is
    trustworthy). Bad UTF-8 bytes are replaced: ids are ASCII, so a stray byte elsewhere
    cannot hide one."""
    if len(raw) > max_bytes:
        return None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        try:
            payload = loads(text)
        except JsonLimitError:
            payload = top_level_strings(text, names)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def encodable(text: str) -> bool:
    """Whether `text` encodes as UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def safe_text(text: str) -> str:
    """`text` with lone surrogates written as `\\ud800`, so that it always encodes as UTF-8."""
    return text if encodable(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def dumps_utf8(obj: Any) -> str:
    """Compact JSON that keeps non-ASCII text as is, with ASCII escapes only when a lone
    surrogate would make it unencodable."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text if encodable(text) else json.dumps(obj, separators=(",", ":"))
