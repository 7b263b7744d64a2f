"""The snapshot lifecycle on both kinds of root: a local folder and a real S3 store (SeaweedFS).

Everything that works on a local root must work on a store root: build, publish, list,
rollback, gc, load (checksums), canary, incremental reuse, and the refusals. Each test runs
once per kind of root.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from twinq.shared import snapshot as snap
from twinq.shared.cli import main as twinq
from twinq.shared.errors import BadInput, SnapshotCorrupt, SnapshotInvalid, SnapshotNotFound
from twinq.shared.store import ObjectStore, PublishConflict, StoreError, open_store

TEXTS = [f"question {i} about {topic}" for i, topic in enumerate(["billing", "shipping", "login"] * 20)]


@pytest.fixture(params=["local", "s3"])
def any_root(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             ) -> str:
    """A fresh root of each kind; a store root downloads into a per-test cache."""
    monkeypatch.setenv("TWINQ_CACHE_DIR", str(tmp_path / "cache"))
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_root")


@pytest.fixture
def make_snapshot(any_root: str, snapshot_writer: Any):
    write = snapshot_writer(any_root)
    return lambda texts=TEXTS, **kwargs: write(texts, **kwargs)


def _flip_byte(root: str, key: str) -> None:
    store = open_store(root)
    data = bytearray(store.read_bytes(key) or b"")
    data[len(data) // 2] ^= 0xFF
    store.write_bytes(key, bytes(data))


def test_publish_list_rollback_and_load(any_root: str, make_snapshot) -> None:
    first = make_snapshot(shards=3)
    second = make_snapshot(TEXTS[:30])
    assert snap.current_version(any_root) == second
    infos = {i.version: i for i in snap.list_versions(any_root)}
    assert infos[second].published and infos[first].complete and infos[first].rows == len(TEXTS)
    assert snap.load_snapshot(any_root).rows == 30
    assert snap.rollback(any_root) == first
    loaded = snap.load_snapshot(any_root)
    assert (loaded.version, loaded.rows, len(loaded.shards)) == (first, len(TEXTS), 3)
    assert loaded.shards[0].index.ntotal == loaded.shards[0].table.num_rows
    with pytest.raises(SnapshotNotFound):
        snap.rollback(any_root)


def test_a_corrupt_shard_is_refused_by_load_and_publish(any_root: str, make_snapshot) -> None:
    good = make_snapshot()
    bad = make_snapshot(publish=False)
    _flip_byte(any_root, f"{snap.version_key(bad)}/shard-00001.faiss")
    with pytest.raises(SnapshotInvalid, match="checksum"):
        snap.load_snapshot(any_root, bad)
    with pytest.raises(SnapshotInvalid, match="checksum"):
        snap.publish(any_root, bad)
    assert snap.current_version(any_root) == good  # the old version keeps serving


def test_current_naming_an_absent_version_is_refused(any_root: str, make_snapshot) -> None:
    make_snapshot()
    open_store(any_root).write_bytes(snap.CURRENT, b"20990101T000000Z\n")
    with pytest.raises(SnapshotNotFound, match="20990101T000000Z"):
        snap.load_snapshot(any_root)


def test_gc_removes_abandoned_builds_and_old_versions_only(any_root: str, make_snapshot) -> None:
    v1 = make_snapshot()
    v2 = make_snapshot()
    snap.publish(any_root, v1)
    store = open_store(any_root)
    store.write_bytes(f"{snap.version_key('20200101T000000Z')}/shard-00000.faiss", b"half")
    snap.mark_building(any_root, "20200102T000000Z")  # this process is alive: it must survive
    removed = snap.gc(any_root, keep=1)
    assert sorted(removed) == ["20200101T000000Z"]  # v2 is the newest complete one: kept
    assert {i.version for i in snap.list_versions(any_root)} == {v1, v2, "20200102T000000Z"}
    assert not store.list(snap.version_key("20200101T000000Z"))


def test_two_publishers_from_the_same_current_cannot_both_win(any_root: str, make_snapshot
                                                              ) -> None:
    base = make_snapshot()
    a, b = make_snapshot(publish=False), make_snapshot(publish=False)
    store = open_store(any_root)
    expected = store.read_bytes(snap.CURRENT)
    store.swap_bytes(snap.CURRENT, f"{a}\n".encode(), expected)
    with pytest.raises(PublishConflict):
        store.swap_bytes(snap.CURRENT, f"{b}\n".encode(), expected)
    assert snap.current_version(any_root) == a != base


def test_racing_publishes_leave_a_consistent_current(any_root: str, make_snapshot) -> None:
    versions = [make_snapshot(publish=False) for _ in range(4)]
    barrier = threading.Barrier(len(versions))
    outcomes: dict[str, str] = {}

    def publish(version: str) -> None:
        barrier.wait()
        try:
            snap.publish(any_root, version, verify=False)
            outcomes[version] = "won"
        except PublishConflict as exc:
            assert version in str(exc) and "unpublished" in str(exc)
            outcomes[version] = "lost"

    threads = [threading.Thread(target=publish, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [v for v, outcome in outcomes.items() if outcome == "won"]
    assert len(outcomes) == 4 and winners
    assert snap.current_version(any_root) in winners


def test_the_lease_path_serialises_publishers(s3_root: str) -> None:
    """Stores without If-Match (GCS through gcsfs) publish under a create-only lease."""
    store = open_store(s3_root)
    assert isinstance(store, ObjectStore)
    store.protocol = "lease-only"  # same server, the other code path
    store.swap_bytes("CURRENT", b"a\n", None)
    with pytest.raises(PublishConflict):
        store.swap_bytes("CURRENT", b"b\n", None)
    store.write_bytes("CURRENT.publish-lease", json.dumps({"at": 9e18}).encode())  # held
    with pytest.raises(PublishConflict, match="another publisher"):
        store.swap_bytes("CURRENT", b"c\n", b"a\n")
    store.write_bytes("CURRENT.publish-lease", json.dumps({"at": 0}).encode())  # stale
    store.swap_bytes("CURRENT", b"c\n", b"a\n")
    assert store.read_bytes("CURRENT") == b"c\n" and not store.exists("CURRENT.publish-lease")


def _corpus(path: Path, rows: int, prefix: str = "") -> str:
    lines = [json.dumps({"id": f"q{i}", "text": f"{prefix}question number {i} about refunds"})
             for i in range(rows)]
    lines.append('{"id": "bad", "text": ""}')  # a reject
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.slow
def test_build_incremental_reuse_and_canary(any_root: str, tmp_path: Path,
                                            tiny_bi_encoder_path: str) -> None:
    from twinq.pipelines.index import BuildOptions, build_snapshot

    corpus = _corpus(tmp_path / "c.jsonl", 40)
    first = build_snapshot(BuildOptions(corpus=[corpus], root=any_root, shards=2,
                                        model=tiny_bi_encoder_path, publish=True, canary=20))
    assert first.manifest["validation"]["passed"] and first.manifest["corpus"]["rows_rejected"] == 1
    rejects = open_store(any_root).read_bytes(f"{snap.version_key(first.version)}/{snap.REJECTS}")
    assert rejects is not None and b'"line": 41' in rejects
    second = build_snapshot(BuildOptions(corpus=[corpus], root=any_root, shards=2,
                                         model=tiny_bi_encoder_path, publish=True, canary=20))
    corpus_info = second.manifest["corpus"]
    assert corpus_info["rows_reused"] == 40 and corpus_info["rows_embedded"] == 0
    assert corpus_info["reused_from"] == first.version
    assert snap.current_version(any_root) == second.version
    assert not open_store(any_root).list(f"{snap.version_key(second.version)}/entries")


@pytest.mark.slow
def test_a_failed_build_publishes_nothing(any_root: str, tmp_path: Path, make_snapshot,
                                          tiny_bi_encoder_path: str) -> None:
    from twinq.pipelines.index import BuildOptions, build_snapshot

    served = make_snapshot()
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"id": "x", "text": ""}\n')
    with pytest.raises(BadInput, match="empty corpus"):
        build_snapshot(BuildOptions(corpus=[str(empty)], root=any_root, shards=1,
                                    model=tiny_bi_encoder_path, publish=True))
    assert snap.current_version(any_root) == served
    assert [i.version for i in snap.list_versions(any_root)] == [served]


@pytest.mark.slow
def test_a_corpus_in_the_store_is_globbed_and_read(s3_root: str, tmp_path: Path,
                                                   tiny_bi_encoder_path: str) -> None:
    from twinq.pipelines.index import BuildOptions, build_snapshot

    store = open_store(s3_root)
    for name, rows in (("a.jsonl", 5), ("b.jsonl", 7)):
        store.put_file(Path(_corpus(tmp_path / name, rows, prefix=name)), f"corpus/{name}")
    result = build_snapshot(BuildOptions(corpus=[f"{s3_root}/corpus/*.jsonl"],
                                         root=tmp_path / "root", shards=1,
                                         model=tiny_bi_encoder_path, canary=0))
    assert result.manifest["corpus"]["sources"] == [f"{s3_root}/corpus/a.jsonl",
                                                    f"{s3_root}/corpus/b.jsonl"]
    corpus = result.manifest["corpus"]  # b's q0..q4 reuse a's ids with another text: rejected
    assert (corpus["rows_read"], corpus["rows_indexed"], corpus["rows_duplicate_id"]) == (14, 7, 5)
    with pytest.raises(BadInput, match="corpus file not found"):
        build_snapshot(BuildOptions(corpus=[f"{s3_root}/corpus/*.csv"], root=tmp_path / "r2",
                                    model=tiny_bi_encoder_path))


def test_build_refuses_a_missing_bucket_before_any_work(s3_root: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    corpus = _corpus(tmp_path / "c.jsonl", 3)
    code = twinq(["index", "build", "--corpus", corpus, "--root", "s3://no-such-bucket-x/p"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "no-such-bucket-x" in err and "does not exist" in err


def test_build_refuses_denied_credentials(s3_root: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    corpus = _corpus(tmp_path / "c.jsonl", 3)
    code = twinq(["index", "build", "--corpus", corpus, "--root", s3_root])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and s3_root.split("/")[2] in err


def test_build_refuses_an_unreachable_store(tmp_path: Path, unreachable_store: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    corpus = _corpus(tmp_path / "c.jsonl", 3)
    code = twinq(["index", "build", "--corpus", corpus, "--root", "s3://bucket/p"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "unreachable" in err


def test_index_commands_on_either_root(any_root: str, make_snapshot,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    first, second = make_snapshot(), make_snapshot()
    assert twinq(["index", "list", "--root", any_root]) == 0
    listing = capsys.readouterr().out
    assert first in listing and second in listing
    assert twinq(["index", "rollback", "--root", any_root]) == 0
    assert snap.current_version(any_root) == first
    assert twinq(["index", "publish", second, "--root", any_root]) == 0
    capsys.readouterr()
    assert twinq(["search", "question 3 about login", "--root", any_root, "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["snapshot"] == second and len(reply["results"]) == 10


def test_store_errors_are_one_line_bad_input() -> None:
    with pytest.raises(StoreError, match="expected s3://bucket"):
        open_store("s3://")
    assert issubclass(StoreError, BadInput) and issubclass(SnapshotCorrupt, BadInput)
