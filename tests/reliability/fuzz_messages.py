"""Hypothesis strategies of hostile queue messages, each with the outcome the protocol promises.

A strategy draws a `Template`; `Template.render(request_id)` gives the stream fields and the
expectation, so that every fuzzed message carries an id unique to the run (ids are idempotency
keys: two messages sharing one would be answered once). Expectations follow the queue protocol
(the README's "Concepts" and `twinq.shared.queue`'s guarantees), written here independently of
`twinq.shared.protocol`:

    reply  an error reply (`ok` false, a code from `codes`) on `reply_key`
    dead   no usable reply address: a dead-letter entry, nothing else
    ok     a valid request after all (a good one, or control characters inside a real query)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from twinq.shared import constants as C
from twinq.shared.protocol import REQUEST_FIELDS
from twinq.shared.text import normalize_text

PREFIX = C.REPLY_PREFIX
BAD = ("bad_request",)
LARGE = ("too_large",)
ADDRESS_LIMIT = 1 << 20
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
GOOD_QUERY = "how do I reset my password"


@dataclass
class Message:
    kind: str
    fields: dict[bytes, bytes]
    expect: str
    request_id: str | None = None
    reply_key: str | None = None
    codes: tuple[str, ...] = ()
    untouched: list[str] = field(default_factory=list)
    """Keys a worker must not write to (a hostile reply_to); checked after the reply."""
    setup: Callable[[Any], None] | None = None
    """Prepares Redis before the message is sent (e.g. creates the hash it names)."""


@dataclass
class Template:
    kind: str
    make: Callable[[str], Message]

    def render(self, request_id: str) -> Message:
        return self.make(request_id)


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()  # ensure_ascii: lone surrogates travel as \\udxxx escapes


def _fields(payload: bytes) -> dict[bytes, bytes]:
    return {b"payload": payload}


def _reply(kind: str, obj: dict[str, Any], rid: str, codes: tuple[str, ...] = BAD,
           key: str | None = None, **extra: Any) -> Message:
    return Message(kind, _fields(_json(obj)), "reply", rid, key or PREFIX + rid, codes, **extra)


def oracle_address(raw: bytes) -> str | None:
    """The request id a worker can reply to for `raw`, or None (kept independent of
    `twinq.shared.protocol.reply_address`): a JSON object up to 1 MiB with a well-formed string id,
    however deep it nests or long its numbers are (the worker refuses those, but answers)."""
    if len(raw) > ADDRESS_LIMIT:
        return None
    try:
        obj = json.loads(raw.decode("utf-8", "replace"), parse_int=len)
    except (ValueError, RecursionError):
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and _ID.fullmatch(rid) else None


_SURROGATES = st.characters(categories=["Cs"])
_ANY_TEXT = st.text(st.one_of(st.characters(), _SURROGATES), max_size=20)
_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                          st.floats(allow_nan=True, allow_infinity=True), _ANY_TEXT)
_JSON = st.recursive(_JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_ANY_TEXT, inner, max_size=3)), max_leaves=6)
_NOT_NONE = _JSON.filter(lambda v: v is not None)


def _not_int(value: Any) -> bool:
    return value is not None and (isinstance(value, bool) or not isinstance(value, int))


def _bad_int(low: int, high: int) -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1),
                     st.sampled_from([-1, 0, 10**6, 2**63, -2**63, 10**30]).filter(
                         lambda v: not low <= v <= high),
                     _JSON.filter(_not_int))


def _bad_fraction() -> st.SearchStrategy[Any]:
    return st.one_of(st.floats().filter(lambda f: not 0.0 <= f <= 1.0),
                     st.sampled_from([float("nan"), float("inf"), -0.5, 2, "0.5", True]),
                     _NOT_NONE.filter(lambda v: isinstance(v, (str, list, dict, bool))))


BAD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "query": _JSON.filter(lambda v: not isinstance(v, str)),
    "top_k": _bad_int(1, C.MAX_TOP_K),
    "recall_k": _bad_int(1, C.MAX_RECALL_K),
    "rerank_depth": _bad_int(0, C.MAX_RECALL_K),
    "submitted_ms": _bad_int(0, 2**63 - 1),
    "rerank": _NOT_NONE.filter(lambda v: not isinstance(v, bool)),
    "collapse": _NOT_NONE.filter(lambda v: not isinstance(v, bool)),
    "fusion": _NOT_NONE.filter(lambda v: v not in ("none", "zscore", "rrf")),
    "fusion_weight": _bad_fraction(),
    "min_probability": _bad_fraction(),
    "reply_to": _NOT_NONE.filter(lambda v: not isinstance(v, str)),
}


@st.composite
def wrong_type(draw: Any) -> Template:
    name = draw(st.sampled_from(sorted(BAD_VALUES)))
    value = draw(BAD_VALUES[name])
    return Template(f"wrong_type:{name}",
                    lambda rid: _reply(f"wrong_type:{name}",
                                       {"id": rid, "query": GOOD_QUERY, name: value}, rid))


@st.composite
def top_k_over_recall_k(draw: Any) -> Template:
    recall_k = draw(st.integers(1, C.MAX_TOP_K - 1))
    top_k = draw(st.integers(recall_k + 1, C.MAX_TOP_K))
    return Template("top_k>recall_k", lambda rid: _reply(
        "top_k>recall_k", {"id": rid, "query": GOOD_QUERY, "top_k": top_k,
                           "recall_k": recall_k}, rid))


@st.composite
def unknown_field(draw: Any) -> Template:
    name = draw(st.one_of(_ANY_TEXT, st.sampled_from(["topk", "Query", "ID", "k", ""])).filter(
        lambda n: n not in REQUEST_FIELDS))
    value = draw(_JSON)
    return Template("unknown_field", lambda rid: _reply(
        "unknown_field", {"id": rid, "query": GOOD_QUERY, name: value}, rid))


@st.composite
def missing_query(draw: Any) -> Template:
    extra = draw(st.sampled_from([{}, {"top_k": 3}, {"query": None}]))
    return Template("missing_query", lambda rid: _reply("missing_query", {"id": rid, **extra}, rid))


@st.composite
def empty_query(draw: Any) -> Template:
    blank = st.characters(categories=["Cc", "Zs", "Zl", "Zp"])
    query = draw(st.text(blank, max_size=40).filter(lambda q: normalize_text(q) == ""))
    return Template("empty_query", lambda rid: _reply(
        "empty_query", {"id": rid, "query": query}, rid))


@st.composite
def control_characters(draw: Any) -> Template:
    """Control characters inside a real question: cleaned to spaces, then answered."""
    noise = draw(st.text(st.characters(categories=["Cc"]), min_size=1, max_size=5))
    query = f"reset{noise}my password{noise}"

    def make(rid: str) -> Message:
        return Message("control_characters", _fields(_json({"id": rid, "query": query})), "ok",
                       rid, PREFIX + rid)

    return Template("control_characters", make)


@st.composite
def surrogate_query(draw: Any) -> Template:
    query = draw(_SURROGATES) + " password"  # one: a high and a low one would make a pair
    return Template("surrogate_query", lambda rid: _reply(
        "surrogate_query", {"id": rid, "query": query}, rid))


@st.composite
def huge_query(draw: Any) -> Template:
    """Over the query limit, over the payload limit, and past the size a worker still parses
    to find the reply address (that one is dead-lettered)."""
    size = draw(st.sampled_from([C.MAX_QUERY_CHARS + 1, 5_000, 50_000, 1_000_000, 1_100_000]))
    char = draw(st.sampled_from(["a", "é", "語"]))

    def make(rid: str) -> Message:
        payload = _json({"id": rid, "query": (char * size)}) if char == "a" else json.dumps(
            {"id": rid, "query": char * size}, ensure_ascii=False).encode()
        if len(payload) > ADDRESS_LIMIT:
            return Message("huge_query", _fields(payload), "dead", rid)
        return Message("huge_query", _fields(payload), "reply", rid, PREFIX + rid, LARGE)

    return Template("huge_query", make)


@st.composite
def non_utf8(draw: Any) -> Template:
    junk = draw(st.binary(max_size=30))
    junk = bytes(b for b in junk if b >= 0x20 and b not in (0x22, 0x5C)) + b"\xff\xfe"

    def make(rid: str) -> Message:
        payload = b'{"id":"' + rid.encode() + b'","query":"' + junk + b'"}'
        return Message("non_utf8", _fields(payload), "reply", rid, PREFIX + rid, BAD)

    return Template("non_utf8", make)


@st.composite
def invalid_json(draw: Any) -> Template:
    shape = draw(st.sampled_from(["truncated", "trailing", "single_quotes", "empty"]))
    cut = draw(st.integers(1, 30))

    def make(rid: str) -> Message:
        text = json.dumps({"id": rid, "query": GOOD_QUERY})
        payload = {"truncated": text[:-min(cut, len(text) - 1)],
                   "trailing": text + "}x",
                   "single_quotes": text.replace('"', "'"),
                   "empty": ""}[shape].encode()
        return Message(f"invalid_json:{shape}", _fields(payload), "dead", rid)

    return Template("invalid_json", make)


@st.composite
def past_parser_limits(draw: Any) -> Template:
    """Well-formed JSON past a parser limit: nesting (33 to 1,500 levels, or 100,000, which is
    also over the payload size) or a number of 41 to 6,000 digits, before or after the id, in
    a known field or an unknown one. Refused, and answered: the id is at the top level."""
    limit = draw(st.sampled_from(["depth", "huge_depth", "digits"]))
    size = {"depth": st.integers(33, 1_500), "huge_depth": st.just(100_000),
            "digits": st.integers(41, 6_000)}[limit]
    n = draw(size)
    bracket = draw(st.sampled_from(["[]", "{}"]))
    value = ("9" * n if limit == "digits" else
             "[" * n + "]" * n if bracket == "[]" else '{"a":' * n + "1" + "}" * n)
    where = draw(st.sampled_from(["top_k", "first", "last"]))

    def make(rid: str) -> Message:
        head = json.dumps({"id": rid, "query": GOOD_QUERY})[1:-1]
        body = {"top_k": f'{{{head}, "top_k": {value}}}', "first": f'{{"x": {value}, {head}}}',
                "last": f'{{{head}, "x": {value}}}'}[where]
        return Message(f"limit:{limit}", _fields(body.encode()), "reply", rid, PREFIX + rid,
                       LARGE if limit == "huge_depth" else BAD)

    return Template("past_parser_limits", make)


@st.composite
def escaped_astral(draw: Any) -> Template:
    """Astral characters sent as \\u escape pairs (12 bytes each, Python's default
    json.dumps): answered up to `MAX_QUERY_CHARS` characters, `too_large` past it."""
    n = draw(st.sampled_from([1, 100, 1_100, C.MAX_QUERY_CHARS - 10, C.MAX_QUERY_CHARS + 1]))
    char = draw(st.sampled_from(["\U0001F600", "\U0001D400", "\U00020000"]))
    query = f"reset my password {char * n}"[:C.MAX_QUERY_CHARS + (n > C.MAX_QUERY_CHARS)]

    def make(rid: str) -> Message:
        payload = _json({"id": rid, "query": query})
        if len(normalize_text(query)) > C.MAX_QUERY_CHARS:
            return Message("escaped_astral", _fields(payload), "reply", rid, PREFIX + rid, LARGE)
        return Message("escaped_astral", _fields(payload), "ok", rid, PREFIX + rid)

    return Template("escaped_astral", make)


@st.composite
def not_an_object(draw: Any) -> Template:
    value = draw(_JSON.filter(lambda v: not isinstance(v, dict)))
    wrap = draw(st.booleans())  # an array holding the id has no address either
    return Template("not_an_object", lambda rid: Message(
        "not_an_object", _fields(_json([{"id": rid}, value]) if wrap else _json(value)),
        "dead"))


@st.composite
def bad_id(draw: Any) -> Template:
    value = draw(st.one_of(
        _JSON.filter(lambda v: not (isinstance(v, str) and _ID.fullmatch(v))),
        st.sampled_from(["", "a b", "x" * 129, "ünïcode", "id\n", "../x", "*"])))
    return Template("bad_id", lambda rid: Message(
        "bad_id", _fields(_json({"id": value, "query": GOOD_QUERY, "note": rid})), "dead"))


@st.composite
def stream_fields(draw: Any) -> Template:
    """Stream-level shapes: an extra field beside payload (refused, replied), no payload field
    at all, or an empty entry value (both dead-lettered)."""
    shape = draw(st.sampled_from(["extra", "missing", "empty"]))
    extra_name = draw(st.binary(min_size=1, max_size=10).filter(lambda b: b != b"payload"))

    def make(rid: str) -> Message:
        good = _json({"id": rid, "query": GOOD_QUERY})
        if shape == "extra":
            return Message("stream:extra", {b"payload": good, extra_name: b"1"}, "reply", rid,
                           PREFIX + rid, BAD)
        if shape == "missing":
            return Message("stream:missing", {extra_name: good}, "dead", rid)
        return Message("stream:empty", {b"payload": b""}, "dead", rid)

    return Template("stream_fields", make)


@st.composite
def hostile_reply_to(draw: Any) -> Template:
    """reply_to outside the prefix, the prefix itself, too long, or under the prefix but
    naming an existing hash: nothing may be written there."""
    shape = draw(st.sampled_from(["outside", "queries", "bare_prefix", "too_long", "hash",
                                  "hash_and_bad", "surrogate"]))

    def make(rid: str) -> Message:
        if shape in ("hash", "hash_and_bad"):
            key = f"{PREFIX}hash-{rid}"
            body = {"id": rid, "query": GOOD_QUERY if shape == "hash" else "", "reply_to": key}

            def setup(client: Any) -> None:
                client.hset(key, mapping={"owner": "someone else"})

            return Message(f"reply_to:{shape}", _fields(_json(body)), "dead", rid,
                           untouched=[key], setup=setup)
        key = {"outside": f"other:key:{rid}", "queries": f"twinq:queries:{rid}",
               "bare_prefix": PREFIX, "too_long": PREFIX + "x" * 300,
               "surrogate": PREFIX + "\ud800" + rid}[shape]
        untouched = [] if shape == "surrogate" else [key]
        return _reply(f"reply_to:{shape}", {"id": rid, "query": GOOD_QUERY, "reply_to": key},
                      rid, untouched=untouched)

    return Template("hostile_reply_to", make)


@st.composite
def garbage(draw: Any) -> Template:
    """Arbitrary bytes; the oracle decides whether it has an address (practically never)."""
    raw = draw(st.binary(max_size=200))
    rid = oracle_address(raw)
    expect = "skip" if rid else "dead"
    return Template("garbage", lambda _rid: Message("garbage", _fields(raw), expect))


def bad_messages() -> st.SearchStrategy[Template]:
    """One hostile message of any kind."""
    return st.one_of(wrong_type(), top_k_over_recall_k(), unknown_field(), missing_query(),
                     empty_query(), control_characters(), surrogate_query(), huge_query(),
                     non_utf8(), invalid_json(), past_parser_limits(), escaped_astral(),
                     not_an_object(), bad_id(), stream_fields(), hostile_reply_to(), garbage())


def good_message(rid: str) -> Message:
    return Message("good", _fields(_json({"id": rid, "query": GOOD_QUERY, "top_k": 3})), "ok",
                   rid, PREFIX + rid)
