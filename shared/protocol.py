"""The queue protocol: request and reply schemas, error codes, validation; no Redis here.

A request is one stream entry with a single field, `payload`, holding a JSON object, so that
anyone can drive twinq with `redis-cli` alone (`twinq.shared.queue` moves the messages):

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
from enum import Enum
from typing import TYPE_CHECKING, Any

from twinq.shared import constants as C
from twinq.shared.bounded_json import (PayloadError, dumps_utf8, encodable, read_members,
                                       read_object, safe_text)
from twinq.shared.fusion import fusion_methods
from twinq.shared.errors import ProtocolError
from twinq.shared.text import normalize_text

if TYPE_CHECKING:
    from collections.abc import Mapping

    from twinq.shared.config import Settings
    from twinq.shared.search import Hit

PAYLOAD_FIELD = "payload"
"""The one stream field of a request; it holds the JSON object."""

ID_MAX_CHARS = 128
_ID = re.compile(r"[A-Za-z0-9._:-]{1,%d}" % ID_MAX_CHARS)  # fullmatch: `$` lets "\n" through
REPLY_TO_MAX_CHARS = 256
PAYLOAD_OVERHEAD_BYTES = 8192
"""Room for the JSON around the query (id, reply_to and the knobs, each possibly escaped)."""
PAYLOAD_BYTES_PER_CHAR = 12
"""The most bytes a query character takes in a payload (an astral character as the escape pair
`\\ud83d\\ude00`). The raw-byte cap only stops a huge message before any JSON work; it must
never refuse a query within `max_query_chars` (counted after decoding), however encoded."""
ADDRESS_PARSE_MAX_BYTES = 1 << 20
"""A refused payload up to this size is still parsed to find where to send the error reply."""

REQUEST_FIELDS = ("id", "query", "top_k", "recall_k", "rerank", "reply_to", "rerank_depth",
                  "fusion", "fusion_weight", "min_probability", "collapse", "adaptive",
                  "submitted_ms")
STAGES = ("queue", "embed", "search", "rerank", "total")


class ErrorCode(str, Enum):
    """Why a request got an error reply (the README's "Queue protocol")."""

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
    """If set, the reply carries `no_twin`: true when the top hit's duplicate probability is
    below it (the decision is the top hit's; see `ok_reply`)."""
    collapse: bool | None = None
    """Keep one hit per duplicate cluster, the others as its `also_asked`; None: the worker's
    `collapse_clusters` (see `twinq.shared.collapse`)."""
    adaptive: bool | None = None
    """Rerank only the candidates that could still become the top hit (the reranker's rule);
    false reranks at full depth; None: the worker's `adaptive_rerank` (see
    `twinq.shared.adaptive_depth`)."""
    submitted_ms: int | None = None
    """Client wall-clock time of submission, epoch ms, for tracing. The worker times the queue
    wait from the stream entry id instead: the server's clock, which no client can skew."""

    def to_payload(self) -> dict[str, Any]:
        """The JSON object of this request, without the knobs left at None."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_fields(self) -> dict[str, str]:
        """The stream fields for `XADD`; `parse_request` reads them back."""
        return encode_request(self.to_payload())

    def digest(self) -> str:
        """What this request asks, as a sha256 of every field but `submitted_ms` (a resend
        stamped later asks the same): the done marker keeps it, so that an identical
        redelivery is recognised and a different request reusing the id is not."""
        asked = {k: v for k, v in self.to_payload().items() if k != "submitted_ms"}
        return sha256_hex(json.dumps(asked, sort_keys=True).encode())


def sha256_hex(data: bytes | str) -> str:
    """Hex sha256 of `data`; a str is encoded as UTF-8, lone surrogates included."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def encode_request(payload: Mapping[str, Any]) -> dict[str, str]:
    """Stream fields for a request payload: `{"payload": "<json>"}`."""
    return {PAYLOAD_FIELD: json.dumps(payload, ensure_ascii=False, separators=(",", ":"))}


def _field(fields: Mapping[bytes | str, bytes | str], name: str) -> bytes | str | None:
    return fields.get(name.encode()) if name.encode() in fields else fields.get(name)


def _bad(message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> ProtocolError:
    return ProtocolError(code, safe_text(message))


def payload_limit(settings: Settings) -> int:
    """Bytes past which a payload is refused as `too_large` unparsed."""
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
    try:
        return read_object(raw, payload_limit(settings))
    except PayloadError as exc:
        raise _bad(str(exc), ErrorCode.TOO_LARGE if exc.too_large else ErrorCode.BAD_REQUEST
                   ) from exc


def _number(payload: dict[str, Any], name: str, low: int, high: int, *, whole: bool = True
            ) -> Any:
    """The field `name` when it is a number in low..high (an int when `whole`), or None."""
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        kind = "an integer" if whole else "a number"
        raise _bad(f"{name} must be {kind}, not {type(value).__name__}")
    if not low <= value <= high:
        raise _bad(f"{name} must be in {low}..{high}, got {value}")
    return value if whole else float(value)


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
    if not encodable(value):
        raise _bad("reply_to is not valid Unicode (lone surrogate)")
    return value


def _query(payload: dict[str, Any], settings: Settings) -> str:
    return _clean_text(payload, "query", settings, "")


def _clean_text(payload: dict[str, Any], name: str, settings: Settings, required_for: str
                ) -> str:
    """The text field `name` (a query, an upsert's text): present, a string, not empty once
    cleaned, valid Unicode, and within `max_query_chars`; one rule for both."""
    value = payload.get(name)
    if value is None:
        raise _bad(f"{name} is required{required_for}")
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string, not {type(value).__name__}")
    text = normalize_text(value)
    if not text:
        raise _bad(f"{name} is empty")
    if not encodable(text):
        raise _bad(f"{name} is not valid Unicode (lone surrogate)")
    if len(text) > settings.max_query_chars:
        raise _bad(f"{name} is {len(text)} characters, over the limit of "
                   f"{settings.max_query_chars}", ErrorCode.TOO_LARGE)
    return text


def parse_request(fields: Mapping[bytes | str, bytes | str], settings: Settings) -> QueryRequest:
    """Validate one stream entry (bytes or str keys and values) and fill the defaults of
    `settings`; `recall_k` defaults to at least `top_k`.

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
    top_k = _number(payload, "top_k", 1, C.MAX_TOP_K)
    recall_k = _number(payload, "recall_k", 1, C.MAX_RECALL_K)
    if top_k is not None and recall_k is not None and top_k > recall_k:
        raise _bad(f"top_k ({top_k}) must not exceed recall_k ({recall_k})")
    top_k = settings.top_k if top_k is None else top_k
    recall_k = max(settings.recall_k, top_k) if recall_k is None else recall_k
    top_k = min(top_k, recall_k)
    rerank = payload.get("rerank", True)
    if not isinstance(rerank, bool):
        raise _bad(f"rerank must be true or false, not {type(rerank).__name__}")
    fusion = payload.get("fusion")
    if fusion is not None and fusion not in fusion_methods():
        raise _bad(f"fusion must be one of {', '.join(fusion_methods())}, got {fusion!r:.40}")
    min_probability = _number(payload, "min_probability", 0, 1, whole=False)
    if min_probability is not None and not rerank:
        raise _bad("min_probability needs rerank: probabilities come from the reranker")
    collapse = payload.get("collapse")
    if collapse is not None and not isinstance(collapse, bool):
        raise _bad(f"collapse must be true or false, not {type(collapse).__name__}")
    adaptive = payload.get("adaptive")
    if adaptive is not None and not isinstance(adaptive, bool):
        raise _bad(f"adaptive must be true or false, not {type(adaptive).__name__}")
    return QueryRequest(
        id=request_id, query=query, top_k=top_k, recall_k=recall_k, rerank=rerank,
        reply_to=reply_to, rerank_depth=_number(payload, "rerank_depth", 0, C.MAX_RECALL_K),
        fusion=fusion, fusion_weight=_number(payload, "fusion_weight", 0, 1, whole=False),
        min_probability=min_probability, collapse=collapse, adaptive=adaptive,
        submitted_ms=_number(payload, "submitted_ms", 0, 2**63 - 1))


def reply_address(fields: Mapping[bytes | str, bytes | str], settings: Settings
                  ) -> tuple[str, str] | None:
    """Best-effort (request id, reply key) of an entry that failed to parse, or None.

    A refused `reply_to` is replaced by the default key under the prefix, so that a request can
    never make the worker write outside `reply_prefix`. A well-formed payload past a parser
    limit (deep nesting, a huge number) is answered too (see `bounded_json.read_members`).
    Bad syntax has no trustworthy id and gets no address.
    """
    raw = _field(fields, PAYLOAD_FIELD)
    payload = None if raw is None else read_members(raw, ("id", "reply_to"),
                                                    ADDRESS_PARSE_MAX_BYTES)
    if payload is None:
        return None
    try:
        request_id = _request_id(payload)
    except ProtocolError:
        return None
    try:
        return request_id, _reply_to(payload, request_id, settings)
    except ProtocolError:
        return request_id, settings.reply_prefix + request_id


def _reply(request_id: str, worker_id: str, *, ok: bool, results: list[dict[str, Any]],
           snapshot: str | None, models: dict[str, Any] | None = None,
           timings_ms: dict[str, float] | None = None, error: dict[str, Any] | None = None,
           no_twin: bool | None = None, min_probability: float | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "id": request_id, "ok": ok, "results": results, "snapshot": snapshot, "models": models,
        "timings_ms": timings_ms, "error": error, "worker": worker_id}
    if no_twin is not None:
        reply.update(no_twin=no_twin, min_probability=min_probability)
    return reply


def models_info(bi_encoder: str, cross_encoder: str | None, backend: str,
                cross_encoder_backend: str | None = None) -> dict[str, Any]:
    """The reply's `models` object: the models' names and the concrete backends they run in.

    Args:
        bi_encoder: The bi-encoder's stable name.
        cross_encoder: The reranker's, or None when reranking is off.
        backend: The bi-encoder's concrete backend (the snapshot's: "onnx", "onnx-fp32",
            "torch", ...), never "auto".
        cross_encoder_backend: The reranker's; defaults to `backend`.

    Returns:
        `{"bi_encoder", "cross_encoder", "backend", "backends"}`: `backends` maps each model to
        its backend (the cross-encoder's None without one); `backend` is that one name when
        they agree, else "<bi-encoder's>+<cross-encoder's>" (for a one-word status line).
    """
    ce_backend = (cross_encoder_backend or backend) if cross_encoder else None
    summary = backend if ce_backend in (None, backend) else f"{backend}+{ce_backend}"
    return {"bi_encoder": bi_encoder, "cross_encoder": cross_encoder, "backend": summary,
            "backends": {"bi_encoder": backend, "cross_encoder": ce_backend}}


def ok_reply(request: QueryRequest, hits: list[Hit], *, snapshot: str, models: dict[str, Any],
             timings_ms: dict[str, float], worker_id: str, no_twin: bool | None = None,
             min_probability: float | None = None) -> dict[str, Any]:
    """A successful reply: `hits` (best first, cut to `top_k`) ranked from 1 (a hit that
    collapsed others of its duplicate cluster lists them as `also_asked`), the snapshot
    version and `models_info` that answered, milliseconds per stage (missing ones 0), and the
    twin decision when one was made: `no_twin` true when the top hit's duplicate probability is
    below `min_probability` (reported beside it); None when nothing was decided (no reranking,
    or a reranker without a decision model), which a request setting `min_probability` forbids.
    """
    if request.min_probability is not None and no_twin is None:
        raise ValueError("no_twin is required when the request sets min_probability")
    return _reply(request.id, worker_id, ok=True, snapshot=snapshot, models=models,
                  results=[h.to_dict(i + 1) for i, h in enumerate(hits)],
                  timings_ms=full_timings(timings_ms), no_twin=no_twin,
                  min_probability=min_probability)


def error_reply(request_id: str, code: ErrorCode, message: str, retryable: bool | None = None,
                worker_id: str = "", *, snapshot: str | None = None) -> dict[str, Any]:
    """A failed reply; `retryable` defaults to the code's usual value (see `RETRYABLE`)."""
    code = ErrorCode(code)
    error = {"code": code.value, "message": message,
             "retryable": RETRYABLE[code] if retryable is None else retryable}
    return _reply(request_id, worker_id, ok=False, results=[], snapshot=snapshot, error=error)


def full_timings(timings_ms: Mapping[str, float]) -> dict[str, float]:
    """Every stage of `STAGES`, rounded to microseconds; absent stages are 0."""
    return {stage: round(float(timings_ms.get(stage, 0.0)), 3) for stage in STAGES}


def encode_reply(reply: Mapping[str, Any]) -> str:
    """The JSON text pushed onto the reply list (see `bounded_json.dumps_utf8`: Redis takes
    UTF-8, and a reply may quote a lone surrogate)."""
    return dumps_utf8(reply)


def decode_reply(raw: bytes | str) -> dict[str, Any]:
    """Parse a reply popped from the reply list."""
    return json.loads(raw)



# --- live updates (twinq:updates) ------------------------------------------------------------
#
# An update is one entry of the update stream (see `updates_stream`), with the same single
# `payload` field as a request:
#
#     XADD twinq:updates * payload '{"op":"upsert","id":"faq-17","text":"how do I ...","metadata":{"answer":"..."}}'
#     XADD twinq:updates * payload '{"op":"delete","id":"faq-17"}'
#
# `op` is `upsert` or `delete`; `id` follows the request id's rule; an upsert's `text` is
# cleaned and limited like a query (`max_query_chars`); `metadata` (optional, upserts only) is
# a JSON object. A delete carries only `op` and `id`. `reply_to` (optional, under
# `reply_prefix`) asks for an error reply if a worker refuses the update; nothing is replied
# to an update that applies. Every worker reads the whole stream (no consumer group).

UPDATE_OPS = ("upsert", "delete")
UPDATE_FIELDS = ("op", "id", "text", "metadata", "reply_to", "submitted_ms")
UPDATES_SUFFIX = "updates"
"""The update stream sits beside the query stream: `twinq:queries` -> `twinq:updates`."""


def updates_stream(settings: Settings) -> str:
    """The update stream's name: the query stream's with its last `:` part replaced by
    `updates` (`twinq:queries` -> `twinq:updates`; a stream without `:` gets `:updates`)."""
    head, sep, _ = settings.stream.rpartition(":")
    return f"{head}:{UPDATES_SUFFIX}" if sep else f"{settings.stream}:{UPDATES_SUFFIX}"


@dataclass(frozen=True)
class Update:
    """A parsed, validated update. `text` is None for a delete; `metadata` {} when absent."""

    op: str
    id: str
    text: str | None = None
    metadata: dict[str, Any] | None = None
    reply_to: str | None = None
    submitted_ms: int | None = None

    def to_payload(self) -> dict[str, Any]:
        """The JSON object of this update, without the fields left at None."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_fields(self) -> dict[str, str]:
        """The stream fields for `XADD`; `parse_update` reads them back."""
        return encode_request(self.to_payload())


def parse_update(fields: Mapping[bytes | str, bytes | str], settings: Settings) -> Update:
    """Validate one update-stream entry, as `parse_request` validates a request.

    Raises:
        ProtocolError: `bad_request` (unknown op or field, bad id, empty text, metadata that is
            not a JSON object, text or metadata on a delete) or `too_large` (text past
            `max_query_chars`, payload past `payload_limit`), naming the problem.
    """
    payload = decode_payload(fields, settings)
    unknown = sorted(set(payload) - set(UPDATE_FIELDS))
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(unknown)}")
    op = payload.get("op")
    if op not in UPDATE_OPS:
        raise _bad(f"op must be one of {', '.join(UPDATE_OPS)}, got {op!r:.40}")
    update_id = _request_id(payload)
    reply_to = (_reply_to(payload, update_id, settings) if payload.get("reply_to") is not None
                else None)
    submitted_ms = _number(payload, "submitted_ms", 0, 2**63 - 1)
    if op == "delete":
        extra = [k for k in ("text", "metadata") if payload.get(k) is not None]
        if extra:
            raise _bad(f"a delete takes only op and id, not {', '.join(extra)}")
        return Update("delete", update_id, reply_to=reply_to, submitted_ms=submitted_ms)
    text = _clean_text(payload, "text", settings, " for an upsert")
    metadata = payload.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise _bad(f"metadata must be a JSON object, not {type(metadata).__name__}")
    if not encodable(json.dumps(metadata, ensure_ascii=False)):
        raise _bad("metadata is not valid Unicode (lone surrogate)")
    return Update("upsert", update_id, text, metadata, reply_to, submitted_ms)


def update_reply_address(fields: Mapping[bytes | str, bytes | str], settings: Settings
                         ) -> tuple[str, str] | None:
    """(update id, reply key) of a refused update that names a usable `reply_to`, else None:
    an update is answered only where it asks to be."""
    raw = _field(fields, PAYLOAD_FIELD)
    payload = None if raw is None else read_members(raw, ("id", "reply_to"),
                                                    ADDRESS_PARSE_MAX_BYTES)
    if payload is None or payload.get("reply_to") is None:
        return None
    try:
        update_id = _request_id(payload)
        return update_id, _reply_to(payload, update_id, settings)
    except ProtocolError:
        return None
