"""Bad input, fuzzed with hypothesis: queue messages at a live worker and at the parser, and
malformed corpus rows through the readers and one real index build.

Live: every hostile message goes through the real stream to a running worker (an in-process
consumer thread on a private redis-server), with a good request every few messages. Each one
gets a structured error reply, or a dead-letter entry when it has no usable reply address;
the good ones are answered; nothing is written outside the reply prefix; the worker logs no
loop error. CI runs a few hundred messages; `make reliability` runs over 2,000.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from twinq.shared import constants as C
from twinq.shared.config import Settings
from twinq.shared.corpus import CorpusRow, Rejected, iter_records
from twinq.shared.errors import BadInput, ProtocolError
from twinq.shared.protocol import (PAYLOAD_FIELD, REQUEST_FIELDS, encode_reply, error_reply,
                                   parse_request, reply_address)
from twinq.shared.queue import Outgoing, Written, parse_marker, push_replies
from twinq.shared.text import normalize_text
from tests.conftest import write_quick_snapshot
from tests.reliability.conftest import TEXTS, make_settings
from tests.reliability.fuzz_messages import (PREFIX, Message, Template, bad_messages,
                                             good_message)
from tests.reliability.harness import wait_until, xadd_many
from tests.worker.conftest import running_worker, sample, wait_reply

SUITE = "fuzz"
SETTINGS = Settings()
GOOD_EVERY = 5
"""A good request goes in before every GOOD_EVERY-th hostile message."""
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
FUZZ = settings(deadline=None, database=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture,
    HealthCheck.large_base_example])


class _Errors(logging.Handler):
    """Collects ERROR records of the worker loggers (a loop error, a refused command)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class LiveWorker:
    settings: Settings
    consumer: Any
    client: Any
    errors: _Errors
    ids: Iterator[int] = field(default_factory=itertools.count)
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    dead_seen: dict[str, str] = field(default_factory=dict)
    last_dead: str = "0-0"
    fuzzed: int = 0
    good: int = 0
    internal_expected: int = 0
    """Requests a test made fail on purpose (outcome `internal`)."""

    def next_id(self) -> str:
        return f"fz-{self.run}-{next(self.ids)}"

    def dead_ids(self) -> set[str]:
        """Entry ids (in the request stream) of everything dead-lettered so far."""
        for entry_id, fields in self.client.xrange(self.settings.dead_stream,
                                                   min=f"({self.last_dead}"):
            self.last_dead = entry_id.decode()
            self.dead_seen[fields[b"entry_id"].decode()] = fields[b"reason"].decode()
        return set(self.dead_seen)

    def send(self, templates: list[Template]) -> list[tuple[Message, str]]:
        """Render, interleave good requests, prepare Redis, XADD all; (message, entry id)."""
        messages: list[Message] = []
        for i, template in enumerate(templates):
            if i % GOOD_EVERY == 0:
                messages.append(good_message(self.next_id()))
            message = template.render(self.next_id())
            if message.expect != "skip":
                messages.append(message)
        messages.append(good_message(self.next_id()))
        for m in messages:
            if m.setup:
                m.setup(self.client)
        return list(zip(messages, xadd_many(self.client, self.settings.stream,
                                            [m.fields for m in messages])))

    def check(self, sent: list[tuple[Message, str]]) -> None:
        for m, _ in sent:
            if m.expect not in ("reply", "ok"):
                continue
            reply = wait_reply(self.client, m.reply_key, 60)
            assert reply["id"] == m.request_id, (m.kind, reply)
            if m.expect == "ok":
                assert reply["ok"] and reply["results"], (m.kind, reply)
            else:
                assert not reply["ok"] and reply["error"]["code"] in m.codes, (m.kind, reply)
                assert reply["error"]["message"]
        dead = {entry_id: m for m, entry_id in sent if m.expect == "dead"}
        wait_until(lambda: self.dead_ids() >= set(dead), 60,
                   what=f"dead letters of {[m.kind for m in dead.values()]}")
        for entry_id, m in dead.items():
            assert self.dead_seen[entry_id], m.kind
            if m.request_id:  # dead-lettered, so not answered anywhere
                assert self.client.llen(PREFIX + m.request_id) == 0, m.kind
        for m, _ in sent:
            for key in m.untouched:
                kind = self.client.type(key)
                assert kind in (b"none", b"hash"), (m.kind, key, kind)
                if kind == b"hash":
                    assert self.client.hgetall(key) == {b"owner": b"someone else"}, m.kind
        assert not self.errors.records, [r.getMessage() for r in self.errors.records][:3]
        self.fuzzed += sum(m.kind != "good" for m, _ in sent)
        self.good += sum(m.kind == "good" for m, _ in sent)


@pytest.fixture(scope="module")
def live_worker(module_redis: Any, tmp_path_factory: pytest.TempPathFactory,
                rel_bi_encoder: Any, rel_cross_encoder: Any,
                tiny_bi_encoder_path: str) -> Iterator[LiveWorker]:
    root = tmp_path_factory.mktemp("fuzz-root")
    write_quick_snapshot(root, TEXTS, rel_bi_encoder, model_name=tiny_bi_encoder_path)
    settings_ = make_settings(module_redis.url, root, visibility_timeout_ms=60_000)
    errors = _Errors()
    loggers = [logging.getLogger(name) for name in ("twinq.worker.consumer", "twinq.worker.engine",
                                                    "twinq.worker.served")]
    for logger in loggers:
        logger.addHandler(errors)
    try:
        with running_worker(settings_, bi_encoder=rel_bi_encoder,
                            cross_encoder=rel_cross_encoder) as consumer:
            live = LiveWorker(settings_, consumer, module_redis.client(), errors)
            yield live
            assert sample(consumer.metrics, "twinq_requests_total",
                          outcome="internal") == live.internal_expected
    finally:
        for logger in loggers:
            logger.removeHandler(errors)


def _fuzz_live(live: LiveWorker, examples: int) -> None:
    # No shrinking: each step would wait out the reply timeouts; the failing batch is printed.
    @settings(FUZZ, max_examples=examples, phases=[Phase.generate])
    @given(st.lists(bad_messages(), min_size=8, max_size=30))
    def run(templates: list[Template]) -> None:
        live.check(live.send(templates))

    run()


def test_live_worker_refuses_fuzzed_messages_and_keeps_answering(live_worker: LiveWorker,
                                                                 summary: Any) -> None:
    before = live_worker.fuzzed
    _fuzz_live(live_worker, 50)
    fuzzed = live_worker.fuzzed - before
    summary.add(SUITE, messages_fuzzed=fuzzed)
    print(f"\nfuzz (live, CI): {fuzzed} hostile messages, {live_worker.good} good answered")
    assert fuzzed >= 300


@pytest.mark.reliability
def test_live_worker_refuses_2000_fuzzed_messages_and_keeps_answering(
        live_worker: LiveWorker, summary: Any) -> None:
    before = live_worker.fuzzed
    _fuzz_live(live_worker, 250)
    fuzzed = live_worker.fuzzed - before
    summary.add(SUITE, messages_fuzzed=fuzzed)
    print(f"\nfuzz (live, full): {fuzzed} hostile messages, {live_worker.good} good answered")
    assert fuzzed >= 3000


def test_live_worker_dead_letters_unparseable_entry_without_holding_its_batch(
        live_worker: LiveWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parser bug (any exception but ProtocolError) costs one dead letter, not the batch."""
    import twinq.worker.consumer as consumer_module

    real = consumer_module.parse_request

    def flaky(fields: Any, settings_: Settings) -> Any:
        if b"explode" in fields.get(b"payload", b""):
            raise RuntimeError("parser bug")
        return real(fields, settings_)

    monkeypatch.setattr(consumer_module, "parse_request", flaky)
    live_worker.internal_expected += 1
    poison = Message("poison", {b"payload": json.dumps(
        {"id": live_worker.next_id(), "query": "explode"}).encode()}, "dead")
    live_worker.errors.records.clear()
    sent = live_worker.send([Template("poison", lambda _rid: poison)])
    sent_ok = [(m, i) for m, i in sent if m.kind == "good"]
    for m, _ in sent_ok:
        assert wait_reply(live_worker.client, m.reply_key, 30)["ok"]  # not held 60 s
    entry_id = next(i for m, i in sent if m.kind == "poison")
    wait_until(lambda: entry_id in live_worker.dead_ids(), 30, what="poison dead-lettered")
    assert "unparseable" in live_worker.dead_seen[entry_id]
    assert [r.getMessage() for r in live_worker.errors.records] == [
        f"[{live_worker.consumer.worker_id}] cannot parse entry {entry_id}"]
    live_worker.errors.records.clear()


# --- parse_request, property by property -------------------------------------------------

_FIELD_NAMES = st.one_of(st.sampled_from([PAYLOAD_FIELD, PAYLOAD_FIELD.encode(), "query", b"id"]),
                         st.binary(max_size=10), st.text(max_size=10))
_PAYLOADS = st.one_of(st.binary(max_size=300), st.text(max_size=300),
                      st.dictionaries(st.sampled_from([*REQUEST_FIELDS, "extra"]),
                                      st.one_of(st.none(), st.booleans(), st.integers(),
                                                st.floats(), st.text(max_size=30)),
                                      max_size=8).map(lambda d: json.dumps(d).encode()))


def _check_parsed(fields: Any) -> str:
    """parse_request and reply_address on any fields: ProtocolError or a valid request; an
    address, if any, is under the prefix. Returns "ok" or the error code."""
    address = reply_address(fields, SETTINGS)
    if address is not None:
        rid, key = address
        assert _ID.fullmatch(rid) and key.startswith(PREFIX) and len(key) > len(PREFIX)
        key.encode("utf-8")
    try:
        request = parse_request(fields, SETTINGS)
    except ProtocolError as exc:
        assert exc.code in ("bad_request", "too_large")
        encode_reply(error_reply("x", exc.code, exc.message)).encode("utf-8")
        return exc.code
    assert _ID.fullmatch(request.id) and address == (request.id, request.reply_to)
    assert request.reply_to.startswith(PREFIX) and len(request.reply_to) <= 256
    assert 1 <= request.top_k <= min(request.recall_k, C.MAX_TOP_K)
    assert request.recall_k <= C.MAX_RECALL_K
    assert request.query and request.query == normalize_text(request.query)
    assert len(request.query) <= SETTINGS.max_query_chars
    request.query.encode("utf-8")
    assert parse_request(request.to_fields(), SETTINGS) == request
    return "ok"


_UNIT = {"count": 0}


def _unit_examples(examples: int) -> None:
    @settings(FUZZ, max_examples=examples)
    @given(template=bad_messages())
    def hostile(template: Template) -> None:
        message = template.render("unit-1")
        outcome = _check_parsed(message.fields)
        if message.expect == "dead" and not message.kind.startswith("reply_to:hash"):
            assert reply_address(message.fields, SETTINGS) is None, message.kind
        if message.expect == "reply":
            assert outcome in message.codes, (message.kind, outcome)
        _UNIT["count"] += 1

    @settings(FUZZ, max_examples=examples)
    @given(st.dictionaries(_FIELD_NAMES, _PAYLOADS, max_size=3))
    def arbitrary(fields: dict[Any, Any]) -> None:
        _check_parsed(fields)
        _UNIT["count"] += 1

    hostile()
    arbitrary()


def test_parse_request_raises_only_protocol_error(summary: Any) -> None:
    before = _UNIT["count"]
    _unit_examples(400)
    summary.add(SUITE, messages_fuzzed=_UNIT["count"] - before)


@pytest.mark.reliability
def test_parse_request_raises_only_protocol_error_at_length(summary: Any) -> None:
    before = _UNIT["count"]
    _unit_examples(3000)
    summary.add(SUITE, messages_fuzzed=_UNIT["count"] - before)


@given(st.integers(1, C.MAX_TOP_K), st.integers(0, 400), st.booleans(),
       st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=200).filter(
           lambda q: normalize_text(q) != ""))
@settings(FUZZ, max_examples=200)
def test_parse_request_accepts_every_valid_request(top_k: int, extra: int, rerank: bool,
                                                   query: str) -> None:
    recall_k = min(C.MAX_RECALL_K, top_k + extra)
    fields = {b"payload": json.dumps({"id": "v-1", "query": query, "top_k": top_k,
                                      "recall_k": recall_k, "rerank": rerank},
                                     ensure_ascii=False).encode()}
    request = parse_request(fields, SETTINGS)
    assert (request.top_k, request.recall_k, request.rerank) == (top_k, recall_k, rerank)
    assert request.query == normalize_text(query) and request.reply_to == PREFIX + "v-1"


# --- request ids: any sequence of replies under one id follows the documented rule ---------

_KINDS = {"ok": "ok", "refused": "error", "retryable": "none"}


def _reply_of(kind: str, rid: str) -> dict[str, Any]:
    if kind == "ok":
        return {"id": rid, "ok": True, "results": [], "error": None}
    code = "bad_request" if kind == "refused" else "not_ready"
    return error_reply(rid, code, f"{kind} reply")


@settings(FUZZ, max_examples=150)
@given(st.lists(st.tuples(st.sampled_from(["0a", "0b", "0c"]), st.sampled_from(sorted(_KINDS))),
                min_size=1, max_size=8))
def test_push_replies_follows_the_id_rule_for_any_sequence(module_redis: Any,
                                                          steps: list[tuple[str, str]]) -> None:
    """Model: an answered id (ok) takes the same request again as a duplicate and any other
    as a conflict; a final refusal (error) takes the same again as a duplicate and lets a
    different one through (which replaces it); a retryable error marks nothing. Whatever is
    pushed comes out of the list in the order pushed."""
    client = module_redis.client()
    rid = f"seq-{uuid.uuid4().hex[:10]}"
    marker: tuple[str, str] | None = None
    pushed: list[str] = []
    for digest, kind in steps:
        mode = _KINDS[kind]
        if marker is not None and marker[1] == digest:
            expected = Written.DUPLICATE
        elif marker is not None and marker[0] == "ok" and mode != "none":
            expected = Written.CONFLICT
        else:
            expected = Written.PUSHED
            pushed.append(kind)
            marker = (mode, digest) if mode != "none" else marker
        [written] = push_replies(client, [Outgoing(rid, PREFIX + rid, _reply_of(kind, rid),
                                                   digest)], reply_ttl_s=60, worker_id="w")
        assert written is expected, (steps, digest, kind)
    listed = [json.loads(r)["error"] for r in client.lrange(PREFIX + rid, 0, -1)]
    assert [e["message"].split()[0] if e else "ok" for e in listed] == pushed
    assert parse_marker(client.get(C.DONE_PREFIX + rid)) == marker


# --- corpus rows ---------------------------------------------------------------------------

_WORDS = st.text(st.characters(categories=["L", "N"], exclude_characters="\x00"),
                 min_size=1, max_size=12)


@st.composite
def good_rows(draw: Any, min_size: int = 3) -> list[tuple[str, str]]:
    words = draw(st.lists(_WORDS, min_size=min_size, max_size=25))
    punct = draw(st.sampled_from(["", ",", ", \"quoted\"", "?", " — ü"]))
    return [(f"g{i}", f"question {i} {w}{punct}") for i, w in enumerate(words)]


_BAD_JSONL = st.one_of(
    st.sampled_from(["{broken", "{'id': 1}", "[1, 2", '{"id": "x", "text": "y"} trailing',
                     '{"id": "x" "text": "y"}']),
    st.builds(json.dumps, st.one_of(st.lists(st.integers(), max_size=3), st.integers(),
                                    st.text(max_size=10), st.none(), st.booleans())),
    st.builds(lambda t: json.dumps({"text": t}), _WORDS),                     # no id
    st.builds(lambda i: json.dumps({"id": i, "text": "fine text"}),
              st.one_of(st.just(""), st.just("   "), st.floats(), st.booleans(),
                        st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))),
    st.builds(lambda t: json.dumps({"id": "b", "text": t}),                   # text not a string
              st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2),
                        st.booleans(), st.dictionaries(st.text(max_size=3), st.integers()))),
    st.builds(lambda t: json.dumps({"id": "c"}), st.just(0)),                 # no text
)
_BAD_CSV = st.one_of(
    st.builds(lambda n: ",".join(["x"] * n), st.sampled_from([1, 3, 4, 7])),  # field count
    st.builds(lambda t: f",{t}", _WORDS),                                     # empty id
    st.builds(lambda t: f"   ,{t}", _WORDS),                                  # blank id
)


def _interleave(draw: Any, good: list[Any], bad: list[Any]) -> list[tuple[bool, Any]]:
    """Good and bad rows in a drawn order, a good row first: a JSONL file's columns are read
    from its first object (see test_iter_records_jsonl_first_row_lacking_id_is_one_reject)."""
    rows = [(True, g) for g in good[1:]] + [(False, b) for b in bad]
    return [(True, good[0]), *draw(st.permutations(rows))]


def _write(path: Path, fmt: str, rows: list[tuple[bool, Any]]) -> None:
    if fmt == "jsonl":
        path.write_text("".join((json.dumps({"id": r[0], "text": r[1]}) if good else r) + "\n"
                                for good, r in rows), encoding="utf-8")
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["id", "text"])
        for good, r in rows:
            if good:
                writer.writerow(r)
            else:
                out.write(r + "\n")
        path.write_text(out.getvalue(), encoding="utf-8")
    else:
        ids, texts = [r[0] for _, r in rows], [r[1] for _, r in rows]
        pq.write_table(pa.table({"id": pa.array(ids, pa.string()),
                                 "text": pa.array(texts, pa.string())}), path)


_BAD_PARQUET = st.one_of(st.tuples(st.none(), _WORDS), st.tuples(st.just(""), _WORDS),
                         st.tuples(st.just("  "), _WORDS), st.tuples(st.just("p"), st.none()))
_BAD = {"jsonl": _BAD_JSONL, "csv": _BAD_CSV, "parquet": _BAD_PARQUET}


@st.composite
def corpus_file(draw: Any, fmt: str) -> tuple[list[tuple[bool, Any]], int, list[str]]:
    rows = _interleave(draw, draw(good_rows()), draw(st.lists(_BAD[fmt], min_size=1,
                                                               max_size=15)))
    return rows, sum(not good for good, _ in rows), [r[0] for good, r in rows if good]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_iter_records_rejects_fuzzed_rows_and_keeps_good_ones(fmt: str, tmp_path: Path,
                                                              summary: Any) -> None:
    counted = {"rows": 0}

    @settings(FUZZ, max_examples=40)
    @given(corpus_file(fmt))
    def run(drawn: tuple[list[tuple[bool, Any]], int, list[str]]) -> None:
        rows, n_bad, good_ids = drawn
        path = tmp_path / f"corpus.{fmt}"
        _write(path, fmt, rows)
        records = list(iter_records(str(path), "id", "text"))
        kept = [r for r in records if isinstance(r, CorpusRow)]
        rejected = [r for r in records if isinstance(r, Rejected)]
        assert [r.id for r in kept] == good_ids
        assert len(rejected) == n_bad, [r.reason for r in rejected]
        assert all(r.reason for r in rejected)
        counted["rows"] += len(records)

    run()
    summary.add(SUITE, corpus_rows_fuzzed=counted["rows"])


@st.composite
def mixed_corpus(draw: Any) -> dict[str, Any]:
    """A JSONL, a CSV and a Parquet file; good rows with distinct texts, bad rows, and rows
    whose text is blank (rejected after cleaning)."""
    files = {}
    n_good = n_bad = 0
    for fmt in ("jsonl", "csv", "parquet"):
        good = [(f"{fmt}-{i}", f"{fmt} {t}") for i, t in draw(good_rows(min_size=10))]
        blank = [(f"{fmt}-blank-{i}", " \t ") for i in range(draw(st.integers(1, 3)))]
        bad = draw(st.lists(_BAD[fmt], min_size=3, max_size=10))
        files[fmt] = _interleave(draw, good + blank, bad)
        n_good += len(good)
        n_bad += len(bad) + len(blank)
    return {"files": files, "good": n_good, "bad": n_bad}


def test_build_snapshot_indexes_good_rows_of_fuzzed_corpus(tmp_path: Path,
                                                          tiny_bi_encoder_path: str,
                                                          summary: Any) -> None:
    from twinq.pipelines.index import BuildOptions, build_snapshot
    from twinq.shared import snapshot as snap

    @settings(FUZZ, max_examples=1)
    @given(mixed_corpus())
    def run(corpus: dict[str, Any]) -> None:
        paths = []
        for fmt, rows in corpus["files"].items():
            path = tmp_path / f"mixed.{fmt}"
            _write(path, fmt, rows)
            paths.append(str(path))
        root = tmp_path / f"root-{uuid.uuid4().hex[:6]}"
        result = build_snapshot(BuildOptions(corpus=paths, root=root, shards=2,
                                             model=tiny_bi_encoder_path, publish=True,
                                             canary=50, id_field="id", text_field="text"))
        counts = result.manifest["corpus"]
        total = corpus["good"] + corpus["bad"]
        assert (counts["rows_read"], counts["rows_rejected"], counts["rows_indexed"]) == (
            total, corpus["bad"], corpus["good"])
        rejects = (result.path / snap.REJECTS).read_text().splitlines()
        assert len(rejects) == corpus["bad"]
        assert snap.load_snapshot(root).rows == corpus["good"]
        summary.add(SUITE, corpus_rows_fuzzed=total)
        print(f"\nfuzzed build: {total} rows, {corpus['bad']} rejected, "
              f"{corpus['good']} indexed")

    run()


def test_iter_records_rejects_deeply_nested_jsonl_row(tmp_path: Path) -> None:
    """Readers never crash on a bad row: deep nesting is one reject, not a failed file."""
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"id": "1", "text": "fine"}) + "\n" + "[" * 5000 + "]" * 5000
                    + "\n" + json.dumps({"id": "2", "text": "also fine"}) + "\n")
    records = list(iter_records(str(path)))
    assert [type(r).__name__ for r in records] == ["CorpusRow", "Rejected", "CorpusRow"]



def test_iter_records_jsonl_first_row_lacking_id_is_one_reject(tmp_path: Path) -> None:
    path = tmp_path / "first-bad.jsonl"
    path.write_text(json.dumps({"text": "no id here"}) + "\n"
                    + json.dumps({"id": "1", "text": "fine"}) + "\n")
    records = list(iter_records(str(path), "id", "text"))
    assert [type(r).__name__ for r in records] == ["Rejected", "CorpusRow"]
