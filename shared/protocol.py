"""The queue protocol: request and reply schemas, error codes and the stream encoding.

A request is one stream entry with a single field, `payload`, holding a JSON object, so that
anyone can drive twinq with `redis-cli` alone:

    XADD twinq:queries * payload '{"id":"a1","query":"how do I reset my password"}'
    BLPOP twinq:reply:a1 10

Only `id` and `query` are required. Everything else the worker fills from its settings. Parsing
is strict (unknown fields, wrong types and out-of-range values are refused with `bad_request`),
because a silently ignored typo such as `topk` would give an answer to a different question.

Example:
    >>> from twinq.shared.config import Settings
    >>> req = parse_request({b"payload": b'{"id": "a1", "query": "reset password"}'}, Settings())
    >>> (req.reply_to, req.top_k)
    ('twinq:reply:a1', 10)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any, NamedTuple, get_args

from twinq.shared import constants as C
from twinq.shared.bounded_json import JsonLimitError, loads, top_level_strings
from twinq.shared.config import FusionMethod
from twinq.shared.errors import ProtocolError
from twinq.shared.text import normalize_text

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from redis import Redis

    from twinq.shared.config import Settings
    from twinq.shared.search import Hit

PAYLOAD_FIELD = "payload"
"""The one stream field of a request; it holds the JSON object."""

ID_MAX_CHARS = 128
_ID = re.compile(r"[A-Za-z0-9._:-]{1,%d}" % ID_MAX_CHARS)
"""Matched with `fullmatch`: `$` would let a trailing newline through."""
REPLY_TO_MAX_CHARS = 256
PAYLOAD_OVERHEAD_BYTES = 8192
"""Room for the JSON around the query (id, reply_to and the knobs, each possibly escaped)."""
PAYLOAD_BYTES_PER_CHAR = 12
"""The most bytes one query character can take in a payload: an astral character written as a
`\\ud83d\\ude00` escape pair, as Python's default `json.dumps` does. The query limit counts
characters after decoding; this cap on raw bytes only stops a huge message before any JSON work,
so it must never refuse a query that is within `max_query_chars` however it is encoded."""
ADDRESS_PARSE_MAX_BYTES = 1 << 20
"""A refused payload up to this size is still parsed to find where to send the error reply;
past it the entry is dead-lettered unparsed."""

REQUEST_FIELDS = ("id", "query", "top_k", "recall_k", "rerank", "reply_to", "rerank_depth",
                  "fusion", "fusion_weight", "min_probability", "submitted_ms")
STAGES = ("queue", "embed", "search", "rerank", "total")


class ErrorCode(str, Enum):
    """Why a request got an error reply (architecture.md section 4)."""

    #: The request does not follow the protocol; resending it unchanged fails again.
    BAD_REQUEST = "bad_request"
    #: The query (or the whole payload) is longer than the worker accepts.
    TOO_LARGE = "too_large"
    #: The queue is too deep, or the request waited too long in it; retry later.
    OVERLOADED = "overloaded"
    #: The worker has no snapshot to search yet; retry later.
    NOT_READY = "not_ready"
    #: The worker failed on this request (after its retries); see the message.
    INTERNAL = "internal"


RETRYABLE = {ErrorCode.OVERLOADED: True, ErrorCode.NOT_READY: True, ErrorCode.BAD_REQUEST: False,
             ErrorCode.TOO_LARGE: False, ErrorCode.INTERNAL: False}
"""Default `retryable` flag per code: only conditions of the service, not of the request."""


@dataclass(frozen=True)
class QueryRequest:
    """A parsed, validated request. Knobs left as None take the worker's defaults."""

    id: str
    """Client-chosen id (a UUID from the client library); also the idempotency key."""
    query: str
    """The question, normalised (NFKC, whitespace collapsed)."""
    top_k: int
    recall_k: int
    rerank: bool
    reply_to: str
    """Reply list key; always under the settings' `reply_prefix`."""
    rerank_depth: int | None = None
    fusion: str | None = None
    fusion_weight: float | None = None
    min_probability: float | None = None
    """If set, the reply carries `no_twin`: true when no hit's duplicate probability reaches it."""
    submitted_ms: int | None = None
    """Client wall-clock time of submission, epoch milliseconds; kept for tracing (dead letters,
    client-side latency). The worker times the queue wait from the stream entry id instead,
    which is Redis' own clock and cannot be skewed by a client."""

    def to_payload(self) -> dict[str, Any]:
        """The JSON object of this request, without the knobs left at None."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_fields(self) -> dict[str, str]:
        """The stream fields for `XADD`."""
        return encode_request(self.to_payload())

    def digest(self) -> str:
        """What this request asks, as a sha256: every field after validation and defaults,
        except `submitted_ms` (a resend stamped later asks the same). Stored in the done
        marker, so that an identical redelivery is recognised and a different request reusing
        the id is not mistaken for one."""
        asked = {k: v for k, v in self.to_payload().items() if k != "submitted_ms"}
        return sha256_hex(json.dumps(asked, sort_keys=True).encode())

    @classmethod
    def from_fields(cls, fields: Mapping[bytes | str, bytes | str], settings: Settings
                    ) -> QueryRequest:
        """Parse stream fields; see `parse_request`."""
        return parse_request(fields, settings)


def sha256_hex(data: bytes | str) -> str:
    """Hex sha256 of `data`; a str is encoded as UTF-8, lone surrogates included."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def entry_digest(fields: Mapping[bytes | str, bytes | str]) -> str:
    """The digest of an entry that did not parse into a request: its raw payload's sha256,
    so that a redelivery of the same bytes is recognised (see `QueryRequest.digest`)."""
    return sha256_hex(_field(fields, PAYLOAD_FIELD) or b"")


def encode_request(payload: Mapping[str, Any]) -> dict[str, str]:
    """Stream fields for a request payload: `{"payload": "<json>"}`."""
    return {PAYLOAD_FIELD: json.dumps(payload, ensure_ascii=False, separators=(",", ":"))}


def _field(fields: Mapping[bytes | str, bytes | str], name: str) -> bytes | str | None:
    return fields.get(name.encode()) if name.encode() in fields else fields.get(name)


def _bad(message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> ProtocolError:
    return ProtocolError(code, safe_text(message))


def safe_text(text: str) -> str:
    """`text` with lone surrogates (which JSON escapes such as "\\ud800" produce) written as
    `\\ud800`, so that it can always be encoded as UTF-8 and sent to Redis."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def payload_limit(settings: Settings) -> int:
    """Bytes past which a payload is refused as `too_large` unparsed (see
    `PAYLOAD_BYTES_PER_CHAR`)."""
    return settings.max_query_chars * PAYLOAD_BYTES_PER_CHAR + PAYLOAD_OVERHEAD_BYTES


def decode_payload(fields: Mapping[bytes | str, bytes | str], settings: Settings) -> dict[str, Any]:
    """The JSON object of a stream entry, or ProtocolError saying what is wrong with it."""
    names = (k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k) for k in fields)
    extra = sorted(name for name in names if name != PAYLOAD_FIELD)
    if extra:
        raise _bad(f"unknown stream field(s): {', '.join(extra)} (only {PAYLOAD_FIELD!r})")
    raw = _field(fields, PAYLOAD_FIELD)
    if raw is None:
        raise _bad(f"missing stream field {PAYLOAD_FIELD!r}")
    limit = payload_limit(settings)
    if len(raw) > limit:
        raise _bad(f"payload is {len(raw)} bytes, over the limit of {limit}", ErrorCode.TOO_LARGE)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad(f"payload is not valid UTF-8 (byte {exc.start})") from exc
    try:
        payload = loads(raw)
    except JsonLimitError as exc:
        raise _bad(f"payload is refused: {exc}") from exc
    except ValueError as exc:
        raise _bad(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise _bad(f"payload must be a JSON object, not {type(payload).__name__}")
    return payload


def _int(payload: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise _bad(f"{name} must be in {low}..{high}, got {value}")
    return value


def _fraction(payload: dict[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{name} must be a number, not {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise _bad(f"{name} must be in 0..1, got {value}")
    return float(value)


def _request_id(payload: dict[str, Any]) -> str:
    value = payload.get("id")
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise _bad(f"id must be 1..{ID_MAX_CHARS} characters of [A-Za-z0-9._:-], got {value!r:.80}")
    return value


def _reply_to(payload: dict[str, Any], request_id: str, settings: Settings) -> str:
    value = payload.get("reply_to")
    if value is None:
        return settings.reply_prefix + request_id
    if not isinstance(value, str):
        raise _bad(f"reply_to must be a string, not {type(value).__name__}")
    if not value.startswith(settings.reply_prefix) or len(value) == len(settings.reply_prefix):
        raise _bad(f"reply_to must start with {settings.reply_prefix!r}")
    if len(value) > REPLY_TO_MAX_CHARS:
        raise _bad(f"reply_to is longer than {REPLY_TO_MAX_CHARS} characters")
    if not _encodable(value):
        raise _bad("reply_to is not valid Unicode (lone surrogate)")
    return value


def _query(payload: dict[str, Any], settings: Settings) -> str:
    value = payload.get("query")
    if value is None:
        raise _bad("query is required")
    if not isinstance(value, str):
        raise _bad(f"query must be a string, not {type(value).__name__}")
    query = normalize_text(value)
    if not query:
        raise _bad("query is empty")
    if not _encodable(query):
        raise _bad("query is not valid Unicode (lone surrogate)")
    if len(query) > settings.max_query_chars:
        raise _bad(f"query is {len(query)} characters, over the limit of "
                   f"{settings.max_query_chars}", ErrorCode.TOO_LARGE)
    return query


def parse_request(fields: Mapping[bytes | str, bytes | str], settings: Settings) -> QueryRequest:
    """Validate one stream entry and fill the worker's defaults.

    Args:
        fields: The entry's fields as read from Redis (bytes or str keys and values).
        settings: The worker's settings: prefix, limits and defaults.

    Returns:
        The request, with `recall_k` defaulting to at least `top_k`.

    Raises:
        ProtocolError: with code `bad_request` or `too_large` and a message naming the problem.
    """
    payload = decode_payload(fields, settings)
    unknown = sorted(set(payload) - set(REQUEST_FIELDS))
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(unknown)}")
    request_id = _request_id(payload)
    reply_to = _reply_to(payload, request_id, settings)
    query = _query(payload, settings)
    top_k = _int(payload, "top_k", 1, C.MAX_TOP_K)
    recall_k = _int(payload, "recall_k", 1, C.MAX_RECALL_K)
    if top_k is not None and recall_k is not None and top_k > recall_k:
        raise _bad(f"top_k ({top_k}) must not exceed recall_k ({recall_k})")
    top_k = settings.top_k if top_k is None else top_k
    recall_k = max(settings.recall_k, top_k) if recall_k is None else recall_k
    top_k = min(top_k, recall_k)
    rerank = payload.get("rerank", True)
    if not isinstance(rerank, bool):
        raise _bad(f"rerank must be true or false, not {type(rerank).__name__}")
    fusion = payload.get("fusion")
    if fusion is not None and fusion not in get_args(FusionMethod):
        raise _bad(f"fusion must be one of {', '.join(get_args(FusionMethod))}, got {fusion!r:.40}")
    min_probability = _fraction(payload, "min_probability")
    if min_probability is not None and not rerank:
        raise _bad("min_probability needs rerank: probabilities come from the reranker")
    return QueryRequest(
        id=request_id, query=query, top_k=top_k, recall_k=recall_k, rerank=rerank,
        reply_to=reply_to, rerank_depth=_int(payload, "rerank_depth", 0, C.MAX_RECALL_K),
        fusion=fusion, fusion_weight=_fraction(payload, "fusion_weight"),
        min_probability=min_probability,
        submitted_ms=_int(payload, "submitted_ms", 0, 2**63 - 1),
    )


def reply_address(fields: Mapping[bytes | str, bytes | str], settings: Settings
                  ) -> tuple[str, str] | None:
    """Best-effort (request id, reply key) of an entry that failed to parse, or None.

    A refused `reply_to` is replaced by the default key under the prefix, so that a request can
    never make the worker write outside `reply_prefix`. A well-formed payload past a parser
    limit (deep nesting, a huge number) is answered too: its top-level `id` and `reply_to` are
    read without decoding the rest. Bad syntax has no trustworthy id and gets no address.
    """
    raw = _field(fields, PAYLOAD_FIELD)
    if raw is None or len(raw) > ADDRESS_PARSE_MAX_BYTES:
        return None
    if isinstance(raw, bytes):  # ids are ASCII, so a stray bad byte elsewhere cannot hide one
        raw = raw.decode("utf-8", "replace")
    try:
        try:
            payload = loads(raw)
        except JsonLimitError:
            payload = top_level_strings(raw, ("id", "reply_to"))
        if not isinstance(payload, dict):
            return None
        request_id = _request_id(payload)
    except (ValueError, ProtocolError):
        return None
    try:
        return request_id, _reply_to(payload, request_id, settings)
    except ProtocolError:
        return request_id, settings.reply_prefix + request_id


@dataclass(frozen=True)
class ErrorReply:
    """The `error` object of a failed reply."""

    request_id: str
    code: ErrorCode
    message: str
    retryable: bool
    worker_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"code": ErrorCode(self.code).value, "message": self.message,
                "retryable": self.retryable}


def _reply(request_id: str, *, ok: bool, results: list[dict[str, Any]], snapshot: str | None,
           models: dict[str, Any] | None, timings_ms: dict[str, float] | None,
           error: dict[str, Any] | None, worker_id: str, no_twin: bool | None,
           min_probability: float | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "id": request_id, "ok": ok, "results": results, "snapshot": snapshot, "models": models,
        "timings_ms": timings_ms, "error": error, "worker": worker_id,
    }
    if no_twin is not None:
        reply["no_twin"] = no_twin
        reply["min_probability"] = min_probability
    return reply


def models_info(bi_encoder: str, cross_encoder: str | None, backend: str) -> dict[str, Any]:
    """The reply's `models` object."""
    return {"bi_encoder": bi_encoder, "cross_encoder": cross_encoder, "backend": backend}


def ok_reply(request: QueryRequest, hits: list[Hit], *, snapshot: str, models: dict[str, Any],
             timings_ms: dict[str, float], worker_id: str, no_twin: bool | None = None,
             min_probability: float | None = None) -> dict[str, Any]:
    """A successful reply: hits ranked from 1, and the twin decision when one was made.

    Args:
        request: The request answered.
        hits: Final hits, best first, already cut to `top_k`.
        snapshot: The snapshot version that answered.
        models: From `models_info`.
        timings_ms: Milliseconds per stage; missing stages are reported as 0.
        worker_id: The answering worker.
        no_twin: True when the top hit's duplicate probability is below `min_probability`;
            None when no decision was made (no reranking, or a reranker without a decision
            model). Required when the request set `min_probability`.
        min_probability: The threshold applied, reported beside `no_twin`.
    """
    if request.min_probability is not None and no_twin is None:
        raise ValueError("no_twin is required when the request sets min_probability")
    return _reply(request.id, ok=True, results=[h.to_dict(i + 1) for i, h in enumerate(hits)],
                  snapshot=snapshot, models=models, timings_ms=full_timings(timings_ms), error=None,
                  worker_id=worker_id, no_twin=no_twin, min_probability=min_probability)


def error_reply(request_id: str, code: ErrorCode, message: str, retryable: bool | None = None,
                worker_id: str = "", *, snapshot: str | None = None) -> dict[str, Any]:
    """A failed reply; `retryable` defaults to the code's usual value (see `RETRYABLE`)."""
    code = ErrorCode(code)
    retry = RETRYABLE[code] if retryable is None else retryable
    error = ErrorReply(request_id, code, message, retry, worker_id)
    return _reply(request_id, ok=False, results=[], snapshot=snapshot, models=None,
                  timings_ms=None, error=error.to_dict(), worker_id=worker_id, no_twin=None)


def full_timings(timings_ms: Mapping[str, float]) -> dict[str, float]:
    """Every stage of `STAGES`, rounded to microseconds; absent stages are 0."""
    return {stage: round(float(timings_ms.get(stage, 0.0)), 3) for stage in STAGES}


def encode_reply(reply: Mapping[str, Any]) -> str:
    """The JSON text pushed onto the reply list; ASCII escapes only where a lone surrogate
    would make it unencodable (Redis takes UTF-8)."""
    text = json.dumps(reply, ensure_ascii=False, separators=(",", ":"))
    return text if _encodable(text) else json.dumps(reply, separators=(",", ":"))


def decode_reply(raw: bytes | str) -> dict[str, Any]:
    """Parse a reply popped from the reply list."""
    return json.loads(raw)


ID_CONFLICT_MESSAGE = ("id already answered for a different request; send the new request "
                       "with a new id")


def conflict_reply(request_id: str, worker_id: str) -> dict[str, Any]:
    """The answer to a request that reuses the id of a different, already answered request."""
    return error_reply(request_id, ErrorCode.BAD_REQUEST, ID_CONFLICT_MESSAGE, worker_id=worker_id)


class Written(IntEnum):
    """What `push_replies` did with one reply (None: the reply key is not a list; nothing
    written). DUPLICATE and PUSHED compare equal to False and True."""

    #: The same request (same digest) was answered already; nothing written.
    DUPLICATE = 0
    #: Pushed, and the request marked answered when the reply is final.
    PUSHED = 1
    #: The id was answered for a different request; nothing written: answer `conflict_reply`.
    CONFLICT = 2


class Outgoing(NamedTuple):
    """One reply for `push_replies`; a plain (request id, reply key, reply) triple also works."""

    request_id: str
    reply_to: str
    reply: dict[str, Any]
    digest: str = "0"
    """`QueryRequest.digest()` or `entry_digest()` of what was answered. The default makes
    every reply of an id the same request: at most one is written."""
    mark: bool = True
    """False pushes without marking the id answered nor checking for a conflict (for
    `conflict_reply` itself)."""


def marker_mode(reply: Mapping[str, Any]) -> str:
    """How a reply marks its id (`twinq:done:<id>`, the idempotency marker).

    ok       an answer: a later request under the id is a duplicate if identical (same
             digest), else a conflict (`conflict_reply`).
    error    a final refusal (`retryable` false): identical again is a duplicate; a different
             request under the id (the corrected one) is answered, and replaces the marker.
    none     a retryable error (`overloaded`, `not_ready`): nothing is marked, so a retry with
             the same id is answered.
    """
    if reply.get("ok"):
        return "ok"
    error = reply.get("error") or {}
    return "none" if error.get("retryable") else "error"


_MARKER = re.compile(r"([A-Za-z]+):([0-9a-f]+):")
"""`<mode>:<digest>:<worker id>`, the value of a done marker; anything else (a marker written
before digests were kept) counts as an answered request of unknown digest."""


def parse_marker(value: bytes | str | None) -> tuple[str, str] | None:
    """(mode, digest) of a done marker's value; None when absent; ("legacy", "") when it has
    no digest (see `_MARKER`)."""
    if value is None:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    match = _MARKER.match(text)
    return (match.group(1), match.group(2)) if match else ("legacy", "")


_REPLY_ONCE = """
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'none' and kind ~= 'list' then
  return -1
end
local mode, digest = ARGV[5], ARGV[6]
local old = redis.call('GET', KEYS[1])
if old then
  local old_mode, old_digest = string.match(old, '^(%a+):(%x+):')
  if not old_mode or old_digest == digest then
    return 0
  end
  if old_mode == 'ok' and mode ~= 'none' then
    return 2
  end
end
if mode ~= 'none' then
  redis.call('SET', KEYS[1], mode .. ':' .. digest .. ':' .. ARGV[4], 'EX', ARGV[2])
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""
"""KEYS: done marker, reply list. ARGV: reply JSON, done TTL s, reply TTL s, worker id, marker
mode (`marker_mode`, or none), request digest. One script, so that checking and marking the id
and pushing its reply cannot be split, and two workers racing on a redelivered request cannot
both reply. RPUSH, so that BLPOP takes replies in the order written (a conflict error never
overtakes the first request's answer). A reply key that already holds another type (a request
naming someone's hash) is left alone and nothing is marked: Lua does not roll back, so a
failing push after the SET would mark the request answered, reply-less."""


def push_replies(client: Redis, replies: Sequence[tuple[Any, ...]], *, reply_ttl_s: int,
                 worker_id: str) -> list[Written | None]:
    """Write replies at most once per request: RPUSH + EXPIRE, guarded by `twinq:done:<id>`.

    Args:
        client: A Redis client.
        replies: `Outgoing` replies, or (request id, reply key, reply) triples.
        reply_ttl_s: Seconds the reply list lives.
        worker_id: Stored in the done marker, to trace who answered.

    Returns:
        Per reply, a `Written`, or None if the reply key holds something other than a list
        (nothing was written).
    """
    if not replies:
        return []
    script = client.register_script(_REPLY_ONCE)
    pipe = client.pipeline(transaction=False)
    for item in (Outgoing(*r) for r in replies):
        mode = marker_mode(item.reply) if item.mark else "none"
        script(keys=[C.DONE_PREFIX + item.request_id, item.reply_to],
               args=[encode_reply(item.reply), C.DONE_TTL_S, reply_ttl_s, worker_id, mode,
                     item.digest], client=pipe)
    return [None if n == -1 else Written(n) for n in pipe.execute()]
