"""Live updates end to end: the delta (`twinq.worker.live`) and workers on a real Redis.

Each guarantee of issue #22 has its test here: an acknowledged upsert is visible to every
worker within 1 s; a restart replays from the watermark; a Redis restart with AOF loses
nothing; a delete takes effect before the next batch; the same update twice changes nothing;
bad updates are refused (error reply where asked, one dead letter) and the worker goes on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.worker.conftest import TEXTS, free_port, running_worker, sample, wait_until
from twinq.shared.protocol import Update, updates_stream
from twinq.shared.search import Hit
from twinq.worker.client import TwinqClient
from twinq.worker.live import LiveIndex

NEW_TEXT = "how do I export my data to a spreadsheet"


# ---------------------------------------------------------------- the delta alone


def _encode(texts: list[str]) -> np.ndarray:
    """A deterministic fake encoder: one unit vector per distinct first letter."""
    out = np.zeros((len(texts), 26), dtype=np.float32)
    for i, text in enumerate(texts):
        out[i, (ord(text[0].lower()) - 97) % 26] = 1.0
    return out


def _hit(doc_id: str, score: float, ids: list[str] | None = None) -> Hit:
    return Hit(id=doc_id, text=doc_id, recall_score=score, score=score, ids=ids or [doc_id])


def test_live_index_upsert_delete_supersede_and_merge() -> None:
    live = LiveIndex(26, None, snapshot_ids=["s1", "s2", "s3", "s4"])
    applied = live.apply([("1-0", Update("upsert", "n1", "apple")),
                          ("2-0", Update("upsert", "s1", "banana")),   # supersedes s1
                          ("3-0", Update("delete", "s2")),             # tombstone
                          ("4-0", Update("upsert", "n2", "cherry")),
                          ("5-0", Update("delete", "n2"))], _encode)
    assert applied == 5 and live.applied_id == "5-0"
    assert (live.rows, live.tombstones, live.hidden) == (2, 2, {"s1", "s2"})
    assert live.visible("n1") and live.visible("n2") is False and live.visible("s3") is None
    found = live.search(_encode(["apple", "banana"]), 5)
    assert [h.id for h in found[0]][:1] == ["n1"] and found[0][0].source == "live"
    assert found[1][0].id == "s1" and found[1][0].text == "banana"
    snapshot = [_hit("s1", 0.9), _hit("s2", 0.8), _hit("s3", 0.7, ["s3", "s2"]), _hit("s4", 0.1)]
    merged = live.merge(snapshot, found[0], 3)
    assert [(h.id, h.source) for h in merged] == [("n1", "live"), ("s3", "snapshot"),
                                                  ("s4", "snapshot")]
    assert merged[1].ids == ["s3"]  # the deleted twin id is dropped from the row's ids
    assert live.extra_k() == 2


def test_live_index_is_idempotent_by_stream_id_and_by_content() -> None:
    updates = [("1-0", Update("upsert", "a", "apple", {"x": 1})),
               ("1-1", Update("delete", "b")), ("2-0", Update("upsert", "c", "cherry"))]
    live = LiveIndex(26)
    live.apply(updates, _encode)
    before = (live.status(), [[(h.id, h.recall_score) for h in q]
                              for q in live.search(_encode(["apple", "cherry"]), 5)])
    assert live.apply(updates, _encode) == 0  # the same entries again: skipped
    assert live.apply([("3-0", Update("upsert", "a", "apple", {"x": 1}))], _encode) == 1
    after = (live.status(), [[(h.id, h.recall_score) for h in q]
                             for q in live.search(_encode(["apple", "cherry"]), 5)])
    assert before[1] == after[1] and before[0]["rows"] == after[0]["rows"]


def test_live_index_rebase_drops_entries_at_or_below_the_watermark() -> None:
    live = LiveIndex(26, "1-0", snapshot_ids=["s1"])
    live.apply([("1-0", Update("upsert", "old", "apple")),  # at the watermark: skipped
                ("2-0", Update("upsert", "a", "apple")), ("3-0", Update("delete", "s1")),
                ("4-0", Update("upsert", "b", "banana"))], _encode)
    assert live.rows == 2 and live.visible("old") is None
    assert live.rebase("3-0", ["s1", "a"]) == 2  # the new snapshot holds a, and lost s1
    assert (live.rows, live.tombstones, live.watermark, live.applied_id) == (1, 0, "3-0", "4-0")
    assert [h.id for h in live.search(_encode(["banana"]), 5)[0]] == ["b"]
    live.rebase("9-0", [])  # a snapshot newer than what was applied: read on from it
    assert (live.rows, live.applied_id) == (0, "9-0")


def test_live_index_compacts_dead_rows() -> None:
    live = LiveIndex(26)
    for n in range(600):
        live.apply([(f"{n + 1}-0", Update("upsert", f"id{n % 5}", "apple"))], _encode)
    assert live.rows == 5 and len(live._rows) < 300
    assert sorted(h.id for h in live.search(_encode(["apple"]), 10)[0]) == [f"id{i}" for i in range(5)]


def test_live_search_is_exact_over_random_vectors_with_dead_rows() -> None:
    """The half-precision first pass must not change the answer: the top k, and their scores,
    equal a float32 brute force over the rows still alive, through deletes and compactions."""
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    live = LiveIndex(32)
    stream = 0
    for start in range(0, 3000, 500):
        batch = [(f"{stream + i + 1}-0", Update("upsert", f"r{start + i}", f"t{start + i}"))
                 for i in range(500)]
        stream += 500
        live.apply(batch, lambda texts, s=start: vectors[s:s + len(texts)])
        gone = [(f"{stream + i + 1}-0", Update("delete", f"r{j}"))
                for i, j in enumerate(range(start, start + 500, 3))]
        stream += len(gone)
        live.apply(gone, lambda texts: np.zeros((0, 32), np.float32))
        alive = [j for j in range(start + 500) if (j % 500) % 3 != 0]
        queries = rng.standard_normal((4, 32)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        for query, hits in zip(queries, live.search(queries, 10)):
            exact = sorted(alive, key=lambda j: -float(vectors[j] @ query))[:10]
            assert [h.id for h in hits] == [f"r{j}" for j in exact]
            assert hits[0].score == pytest.approx(float(vectors[exact[0]] @ query), abs=1e-6)


# ---------------------------------------------------------------- workers


@pytest.fixture
def live_setup(quick_snapshot: Any, make_settings: Any) -> tuple[Path, Any]:
    root, _ = quick_snapshot(TEXTS)
    return root, make_settings(root)


def _ids(reply: dict[str, Any]) -> list[str]:
    assert reply["ok"], reply
    return [r["id"] for r in reply["results"]]


def test_acknowledged_upsert_is_visible_to_every_worker_within_a_second(
        live_setup: Any, tiny_bi_encoder: Any) -> None:
    _, settings = live_setup
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as w1, \
            running_worker(settings, bi_encoder=tiny_bi_encoder) as w2, \
            TwinqClient(settings=settings) as client:
        wait_until(lambda: w1.engine.live is not None and w2.engine.live is not None)
        client.ask("warm up", rerank=False, timeout_s=10)
        for n in range(3):
            entry_id = client.add(f"new-{n}", f"{NEW_TEXT} {n}", {"answer": f"a{n}"})
            acked = time.monotonic()
            wait_until(lambda: all(w.engine.live.visible(f"new-{n}") for w in (w1, w2)),
                       timeout_s=1.0, step_s=0.005)
            assert time.monotonic() - acked < 1.0
            assert all(w.engine.live.applied_id >= entry_id for w in (w1, w2))
        for _ in range(4):  # whichever worker answers, it answers with the new row
            reply = client.ask(f"{NEW_TEXT} 2", rerank=False, timeout_s=10)
            top = reply["results"][0]
            assert (top["id"], top["source"], top["metadata"]) == ("new-2", "live", {"answer": "a2"})
            assert {r["source"] for r in reply["results"][1:]} <= {"live", "snapshot"}


def test_delete_takes_effect_before_the_next_batch(live_setup: Any, tiny_bi_encoder: Any) -> None:
    _, settings = live_setup
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker, \
            TwinqClient(settings=settings) as client:
        wait_until(lambda: worker.engine.live is not None)
        assert _ids(client.ask(TEXTS[0], rerank=False))[0] == "q0"
        for n in range(1, 6):  # no wait between the acknowledged delete and the question
            client.delete(f"q{n - 1}")
            assert f"q{n - 1}" not in _ids(client.ask(TEXTS[n - 1], rerank=False, top_k=8))
        client.add("fresh", NEW_TEXT)
        assert _ids(client.ask(NEW_TEXT, rerank=False))[0] == "fresh"
        client.delete("fresh")
        assert "fresh" not in _ids(client.ask(NEW_TEXT, rerank=False, top_k=8))
        client.delete("never-existed")  # harmless, and logged
        assert _ids(client.ask(TEXTS[6], rerank=False))[0] == "q6"
        assert worker.engine.live.applied["unknown_delete"] == 1


def test_replacing_a_snapshot_question_hides_its_old_text(live_setup: Any,
                                                          tiny_bi_encoder: Any) -> None:
    _, settings = live_setup
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker, \
            TwinqClient(settings=settings) as client:
        wait_until(lambda: worker.engine.live is not None)
        client.add("q3", NEW_TEXT, {"v": 2})
        reply = client.ask(TEXTS[3], rerank=False, top_k=8)
        q3 = [r for r in reply["results"] if r["id"] == "q3"]
        assert len(q3) == 1 and q3[0]["text"] == NEW_TEXT and q3[0]["source"] == "live"


def test_same_update_twice_changes_nothing(live_setup: Any, tiny_bi_encoder: Any) -> None:
    _, settings = live_setup
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker, \
            TwinqClient(settings=settings) as client:
        wait_until(lambda: worker.engine.live is not None)
        client.add("dup", NEW_TEXT, {"answer": "x"})
        first = client.ask(NEW_TEXT, rerank=False, top_k=8)
        rows = worker.engine.live.rows
        client.add("dup", NEW_TEXT, {"answer": "x"})  # the same update, sent again
        second = client.ask(NEW_TEXT, rerank=False, top_k=8)
        assert worker.engine.live.rows == rows
        assert first["results"] == second["results"]


def test_worker_restart_replays_from_the_watermark(live_setup: Any, tiny_bi_encoder: Any) -> None:
    _, settings = live_setup
    with TwinqClient(settings=settings) as client:
        with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker:
            wait_until(lambda: worker.engine.live is not None)
            client.add("before", NEW_TEXT)
            wait_until(lambda: worker.engine.live.visible("before"))
        # While no worker runs: more updates.
        client.add("while-down", "where is my parcel right now")
        client.delete("q1")
        with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker:
            assert _ids(client.ask(NEW_TEXT, rerank=False))[0] == "before"
            assert _ids(client.ask("where is my parcel right now", rerank=False))[0] == "while-down"
            assert "q1" not in _ids(client.ask(TEXTS[1], rerank=False, top_k=8))
            assert worker.engine.live.status()["rows"] == 2


def test_bad_updates_are_refused_once_and_the_worker_goes_on(live_setup: Any,
                                                             tiny_bi_encoder: Any,
                                                             redis_client: Any) -> None:
    _, settings = live_setup
    stream = updates_stream(settings)
    bad = [{"op": "upsert", "id": "e1", "text": "", "reply_to": "twinq:reply:e1"},
           {"op": "upsert", "id": "e2", "text": "x" * 3000, "reply_to": "twinq:reply:e2"},
           {"op": "upsert", "id": "bad id!", "text": "t", "reply_to": "twinq:reply:e3"},
           {"op": "merge", "id": "e4", "text": "t", "reply_to": "twinq:reply:e4"},
           {"op": "upsert", "id": "e5", "text": "t", "metadata": [1], "reply_to": "twinq:reply:e5"},
           {"op": "upsert", "id": "e6", "text": "t", "metadata": "x"}]  # no reply key
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as w1, \
            running_worker(settings, bi_encoder=tiny_bi_encoder) as w2, \
            TwinqClient(settings=settings) as client:
        wait_until(lambda: w1.engine.live is not None and w2.engine.live is not None)
        for payload in bad:
            redis_client.xadd(stream, {"payload": json.dumps(payload)})
        redis_client.xadd(stream, {"payload": "{not json"})
        good = client.add("after", NEW_TEXT)
        wait_until(lambda: all(w.engine.live.applied_id == good for w in (w1, w2)))
        for key, code in (("e1", "bad_request"), ("e2", "too_large"), ("e4", "bad_request"),
                          ("e5", "bad_request")):
            popped = redis_client.blpop([f"twinq:reply:{key}"], timeout=5)
            assert popped is not None, key
            reply = json.loads(popped[1])
            assert (reply["ok"], reply["error"]["code"]) == (False, code)
            assert redis_client.llen(f"twinq:reply:{key}") == 0  # one reply, not one per worker
        assert redis_client.xlen(settings.dead_stream) == len(bad) + 1  # once each, not twice
        dead = redis_client.xrange(settings.dead_stream)
        assert {f[b"stream"].decode() for _, f in dead} == {stream}
        assert _ids(client.ask(NEW_TEXT, rerank=False))[0] == "after"
        refused = sum(sample(w.metrics, "twinq_updates_total", outcome="refused") for w in (w1, w2))
        assert refused == 2 * (len(bad) + 1)


def test_live_metrics_and_status_page(live_setup: Any, tiny_bi_encoder: Any) -> None:
    from twinq.worker.status import render_page, worker_status

    _, settings = live_setup
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker, \
            TwinqClient(settings=settings) as client:
        wait_until(lambda: worker.engine.live is not None)
        client.add("m1", NEW_TEXT)
        client.add("m2", "another new question")
        client.delete("q0")
        wait_until(lambda: sample(worker.metrics, "twinq_live_rows") == 2)
        wait_until(lambda: sample(worker.metrics, "twinq_updates_total", outcome="delete") == 1)
        assert sample(worker.metrics, "twinq_updates_total", outcome="upsert") == 2
        assert sample(worker.metrics, "twinq_update_lag_seconds") < 1.0
        assert sample(worker.metrics, "twinq_served_watermark_timestamp_seconds") == 0
        page = render_page(worker_status(worker))
        assert "Live updates" in page and "2 live rows, 1 deletes" in page


# ---------------------------------------------------------------- Redis restart with AOF


def _start_redis(port: int, folder: Path) -> subprocess.Popen:
    import redis

    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--appendonly", "yes", "--appendfsync", "always", "--save", "",
         "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    wait_until(lambda: _pings(client), timeout_s=10)
    client.close()
    return proc


def _pings(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_redis_restart_with_aof_loses_no_acknowledged_update(tmp_path: Path) -> None:
    import redis

    from twinq.shared.config import load_settings
    from twinq.shared.protocol import parse_update
    from twinq.shared.queue import UpdateLog

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    settings = load_settings(env={}, overrides={"redis_url": url})
    proc = _start_redis(port, tmp_path)
    try:
        with TwinqClient(settings=settings) as client:
            acked = [client.add(f"a{n}", f"question number {n}") for n in range(20)]
            acked.append(client.delete("a3"))
        admin = redis.Redis(port=port)
        try:
            admin.shutdown(nosave=True)  # no RDB: only the append-only file survives
        except redis.ConnectionError:
            pass
        proc.wait(timeout=10)
        proc = _start_redis(port, tmp_path)
        with redis.Redis(port=port) as back:
            entries = UpdateLog(back, updates_stream(settings)).read("0-0", 100)
        assert [e.entry_id for e in entries] == acked
        updates = [parse_update(e.fields, settings) for e in entries]
        assert (updates[-1].op, updates[-1].id) == ("delete", "a3")
        assert updates[5].text == "question number 5"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---------------------------------------------------------------- the command line and client


def test_add_and_delete_commands(make_settings: Any, redis_client: Any) -> None:
    import typer
    from typer.testing import CliRunner

    from tests.conftest import REDIS_URL
    from twinq.shared.errors import BadInput
    from twinq.shared.protocol import parse_update
    from twinq.worker.cli import add_command, delete_command

    settings = make_settings()
    cli = typer.Typer()
    cli.command("add")(add_command)
    cli.command("delete")(delete_command)
    env = {"TWINQ_STREAM": settings.stream, "TWINQ_REDIS_URL": REDIS_URL}
    runner = CliRunner()
    added = runner.invoke(cli, ["add", "--id", "faq-9", "--text", "How do I pay?",
                                "--metadata", '{"answer": "By card."}'], env=env)
    assert added.exit_code == 0, added.output
    deleted = runner.invoke(cli, ["delete", "faq-9"], env=env)
    assert deleted.exit_code == 0, deleted.output
    entries = redis_client.xrange(updates_stream(settings))
    assert [i.decode() for i, _ in entries] == [added.output.strip(), deleted.output.strip()]
    first = parse_update(entries[0][1], settings)
    assert (first.op, first.id, first.text, first.metadata) == ("upsert", "faq-9", "How do I pay?",
                                                                {"answer": "By card."})
    for args, words in ((["add", "--id", "a", "--text", "t", "--metadata", "[1]"], "JSON object"),
                        (["add", "--id", "a", "--text", "t", "--metadata", "{bad"], "not JSON"),
                        (["add", "--id", "a", "--text", "   "], "text is empty"),
                        (["add", "--id", "no spaces", "--text", "t"], "id must be"),
                        (["delete", "x" * 200], "id must be")):
        result = runner.invoke(cli, args, env=env)
        # BadInput: `twinq` (shared/cli.py) turns it into one line and exit code 2
        assert isinstance(result.exception, BadInput) and words in str(result.exception), args
    assert redis_client.xlen(updates_stream(settings)) == 2  # nothing bad was sent


# ---------------------------------------------------------------- snapshots with a watermark


def test_manifest_accepts_an_update_watermark_and_refuses_a_bad_one(quick_snapshot: Any) -> None:
    from twinq.shared import snapshot as snap
    from twinq.shared.errors import SnapshotCorrupt
    from twinq.shared.snapshot_schema import check_manifest

    root, version = quick_snapshot(TEXTS)
    manifest = snap.read_manifest_at(root, version)
    check_manifest({**manifest, "updates": {"watermark": "1700000000000-3", "applied": 5}},
                   version)
    for bad in ({"watermark": "yesterday"}, {"watermark": 17}, {}, "1-0"):
        with pytest.raises(SnapshotCorrupt, match="updates"):
            check_manifest({**manifest, "updates": bad}, version)


def test_worker_serving_a_watermarked_snapshot_reads_after_it(
        tmp_path: Path, make_settings: Any, tiny_bi_encoder: Any, tiny_bi_encoder_path: str,
        redis_client: Any) -> None:
    """Updates at or below the served snapshot's watermark are the snapshot's; the worker
    applies only the later ones, and drops delta entries a newer snapshot has folded in."""
    from tests.conftest import write_quick_snapshot
    from twinq.shared import snapshot as snap

    root = tmp_path / "root"
    settings = make_settings(root)
    stream = updates_stream(settings)
    old = redis_client.xadd(stream, {"payload": json.dumps(
        {"op": "upsert", "id": "folded", "text": NEW_TEXT})}).decode()
    version = write_quick_snapshot(root, TEXTS, tiny_bi_encoder, model_name=tiny_bi_encoder_path)
    manifest = snap.read_manifest_at(root, version)
    manifest["updates"] = {"watermark": old}
    snap.write_manifest(root, version, manifest)
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker, \
            TwinqClient(settings=settings) as client:
        wait_until(lambda: worker.engine.live is not None)
        client.add("later", "where is my parcel right now")
        wait_until(lambda: worker.engine.live.visible("later"))
        assert worker.engine.live.visible("folded") is None  # the snapshot's, not the delta's
        assert worker.engine.live.watermark == old
        wait_until(lambda: sample(worker.metrics, "twinq_served_watermark_timestamp_seconds")
                   == int(old.split("-")[0]) / 1000)
