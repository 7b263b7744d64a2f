"""Corrupt files under a snapshot root: CURRENT, HISTORY, BUILDING, manifests and shard files.

Whatever the bytes, a reader gets the published version, nothing, or one of twinq's own errors
with a one-line message; never another exception, and never a manifest that is accepted and
then breaks a consumer (`/metrics` turns `created_at` into an age at every scrape).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from twinq.shared import snapshot as snap
from twinq.shared.cli import main as twinq
from twinq.shared.config import load_settings
from twinq.shared.errors import BadInput, SnapshotCorrupt, SnapshotInvalid
from twinq.shared.snapshot_schema import check_manifest
from twinq.shared.store import open_store

VERSION = "20260101T000000Z"
TEXTS = [f"question {i} about {topic}" for i, topic in enumerate(["billing", "login"] * 6)]
PROPERTY = settings(deadline=None, database=None, max_examples=300,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8)
"""Any JSON value, NaN and infinities included (Python's json writes and reads them)."""


def good_manifest() -> dict[str, Any]:
    """A manifest as a build writes it, one shard of three rows."""
    return {
        "format_version": 1, "version": VERSION, "created_at": "2026-01-01T00:00:00+00:00",
        "model": {"name": "tiny", "dimension": 32, "normalized": True, "max_seq_length": 64,
                  "backend": "torch"},
        "corpus": {"sources": ["c.jsonl"], "rows_read": 4, "rows_rejected": 1, "rows_indexed": 3,
                   "ids_indexed": 3, "rows_reused": 0, "rows_embedded": 3, "reused_from": None,
                   "fingerprint": "ab" * 16},
        "shards": [{"name": "shard-00000", "rows": 3, "index_file": "shard-00000.faiss",
                    "data_file": "shard-00000.parquet", "faiss_factory": "Flat",
                    "factory_reason": "small", "search_params": "",
                    "sha256": {"index": "0" * 64, "data": "f" * 64}}],
        "build": {"runner": "DirectRunner", "beam_args": [], "stages_s": {"pipeline": 1.5}},
        "validation": {"asked": 3, "passed": True},
    }


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a manifest, containers included."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found += _paths(child, prefix + (i,))
    return found


PATHS = _paths(good_manifest())


def _mutate(manifest: dict[str, Any], path: tuple, value: Any, delete: bool) -> dict[str, Any]:
    out = copy.deepcopy(manifest)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


def assert_one_line(exc: BaseException) -> None:
    message = str(exc)
    assert message and "\n" not in message and len(message) < 300, message


def write_folder(tmp_path: Path, data: bytes) -> Path:
    folder = tmp_path / "snapshots" / VERSION
    folder.mkdir(parents=True, exist_ok=True)
    (folder / snap.MANIFEST).write_bytes(data)
    return folder


def test_the_template_manifest_is_valid() -> None:
    assert check_manifest(good_manifest(), VERSION) == good_manifest()


@PROPERTY
@given(path=st.sampled_from(PATHS), value=JSON, delete=st.booleans())
# Found by this test: a build stage named "\n" put a line break into the error.
@example(path=("build", "stages_s"), value={"\n": None}, delete=False)
def test_any_value_in_any_manifest_field_is_accepted_sanely_or_refused_in_one_line(
        tmp_path: Path, path: tuple, value: Any, delete: bool) -> None:
    manifest = _mutate(good_manifest(), path, value, delete)
    folder = write_folder(tmp_path, json.dumps(manifest).encode())
    try:
        read = snap.read_manifest(folder)
    except SnapshotCorrupt as exc:
        assert_one_line(exc)
        return
    # Accepted: every use a reader makes of it works (the age gauge, `index list`, counts).
    loaded = snap.Snapshot(VERSION, folder, read, [])
    assert snap.age_seconds(loaded) >= 0.0
    assert [i.rows for i in snap.list_versions(tmp_path)] == [read["corpus"]["rows_indexed"]]
    assert isinstance(read["model"]["dimension"], int) and read["shards"]


@PROPERTY
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_as_a_manifest_are_refused_in_one_line(tmp_path: Path, data: bytes) -> None:
    folder = write_folder(tmp_path, data)
    with pytest.raises(SnapshotCorrupt) as caught:
        snap.read_manifest(folder)
    assert_one_line(caught.value)


@pytest.mark.parametrize("value,message", [
    ("yesterday", "not an ISO 8601 time"),
    ("2026-01-01T00:00:00", "without a UTC offset"),
    ("0001-01-01T00:00:00+14:00", "outside 2000"),
    ("9999-12-31T23:59:59+00:00", "outside 2000"),
    (1767225600, "must be a string"),
])
def test_nonsense_created_at_is_refused(tmp_path: Path, value: Any, message: str) -> None:
    folder = write_folder(tmp_path, json.dumps({**good_manifest(), "created_at": value}).encode())
    with pytest.raises(SnapshotCorrupt, match=message):
        snap.read_manifest(folder)


@pytest.mark.parametrize("path,value,message", [
    (("corpus", "rows_indexed"), 10**30, "outside 0.."),
    (("corpus", "rows_indexed"), 4, "its shards list 3 rows"),
    (("corpus", "rows_read"), -1, "outside 0.."),
    (("model", "dimension"), True, "must be an integer"),
    (("shards", 0, "rows"), 3.0, "must be an integer"),
    (("shards", 0, "data_file"), "../x.parquet", "not a file of the version folder"),
    (("shards", 0, "sha256", "index"), "XYZ", "sha256.index"),
    (("shards", 0, "search_params"), "efSearch=;rm", "search_params"),
    (("version",), "20250101T000000Z", "not its folder's name"),
    (("format_version",), 2, "format_version 2 unsupported"),
    (("shards",), [], "shards must be an array"),
])
def test_fields_are_typed_and_range_checked(tmp_path: Path, path: tuple, value: Any,
                                            message: str) -> None:
    manifest = _mutate(good_manifest(), path, value, delete=False)
    with pytest.raises(SnapshotCorrupt, match=message) as caught:
        snap.read_manifest(write_folder(tmp_path, json.dumps(manifest).encode()))
    assert_one_line(caught.value)


def test_a_manifest_nested_too_deeply_is_refused(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(SnapshotCorrupt, match="not valid JSON"):
        snap.read_manifest(folder)


@PROPERTY
@given(data=st.binary(max_size=80) | st.text(max_size=80).map(str.encode))
def test_any_bytes_in_current_history_or_building(tmp_path: Path, data: bytes) -> None:
    (tmp_path / snap.CURRENT).write_bytes(data)
    (tmp_path / snap.HISTORY).write_bytes(data)
    building = tmp_path / "snapshots" / VERSION
    building.mkdir(parents=True, exist_ok=True)
    (building / snap.BUILDING).write_bytes(data)
    store = open_store(tmp_path)
    for read in (lambda: snap.current_version(tmp_path), lambda: snap._history(store)):
        try:
            read()
        except SnapshotCorrupt as exc:
            assert_one_line(exc)
    assert snap._build_alive(store, VERSION) in (True, False)


def test_a_history_that_is_not_utf8_fails_publish_before_current_changes(
        quick_snapshot: Any) -> None:
    root, v1 = quick_snapshot(TEXTS)
    _, v2 = quick_snapshot(TEXTS, publish=False)
    (root / snap.HISTORY).write_bytes(b"\xff\xfe garbage")
    with pytest.raises(SnapshotCorrupt, match="HISTORY: not UTF-8"):
        snap.publish(root, v2)
    assert snap.current_version(root) == v1


# --- the CLI: exit 2 and one line on stderr ---------------------------------------------------

def _corrupt_current(root: Path, version: str) -> None:
    (root / snap.CURRENT).write_bytes(b"\xff" + version.encode())


def _corrupt_history(root: Path, version: str) -> None:
    (root / snap.HISTORY).write_bytes(b"\x80\x81" + version.encode())


def _corrupt_manifest(root: Path, version: str) -> None:
    path = snap.version_dir(root, version) / snap.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["created_at"] = "not a time"
    path.write_text(json.dumps(manifest))


def _corrupt_shard(root: Path, version: str) -> None:
    """A data file replaced, with a checksum to match: the files themselves must be checked."""
    folder = snap.version_dir(root, version)
    path = folder / snap.MANIFEST
    manifest = json.loads(path.read_text())
    data = folder / manifest["shards"][0]["data_file"]
    data.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    manifest["shards"][0]["sha256"]["data"] = snap.sha256_file(data)
    path.write_text(json.dumps(manifest))


CORRUPTIONS = {"current": _corrupt_current, "history": _corrupt_history,
               "manifest": _corrupt_manifest, "shard": _corrupt_shard}
COMMANDS = {
    "list": (["index", "list"], ("current",)),
    "publish": (["index", "publish", "{v2}"], ("history", "manifest", "shard")),
    "rollback": (["index", "rollback"], ("current", "history", "manifest", "shard")),
    "search": (["search", "a question"], ("current", "manifest", "shard")),
}
CASES = [(command, corruption) for command, (_, kinds) in COMMANDS.items() for corruption in kinds]


@pytest.mark.parametrize("command,corruption", CASES)
def test_cli_on_a_corrupt_root_exits_2_with_one_line(quick_snapshot: Any, capsys: Any,
                                                     command: str, corruption: str) -> None:
    root, v1 = quick_snapshot(TEXTS)
    _, v2 = quick_snapshot(TEXTS)  # published: rollback goes back to v1
    target = v1 if command == "rollback" else v2
    if command == "publish":
        snap.rollback(root)
    CORRUPTIONS[corruption](root, target)
    argv = [a.format(v2=v2) for a in COMMANDS[command][0]] + ["--root", str(root)]
    capsys.readouterr()
    assert twinq(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("twinq: error: "), err


def test_index_list_shows_a_corrupt_version_as_incomplete(quick_snapshot: Any, capsys: Any
                                                          ) -> None:
    root, v1 = quick_snapshot(TEXTS)
    _, v2 = quick_snapshot(TEXTS, publish=False)
    _corrupt_manifest(root, v2)
    assert twinq(["index", "list", "--root", str(root)]) == 0
    assert [(i.version, i.complete) for i in snap.list_versions(root)] == [(v1, True), (v2, False)]


# --- the worker: refused, counted, logged once per version ------------------------------------

def _engine(root: Path, bi_encoder: Any) -> Any:
    from twinq.worker.engine import Engine
    from twinq.worker.metrics import WorkerMetrics

    engine = Engine(load_settings(env={}, overrides={"root": str(root)}), metrics=WorkerMetrics(),
                    bi_encoder=bi_encoder)
    engine.start(watch=False)
    return engine


def _failures(engine: Any) -> float:
    return engine.metrics.registry.get_sample_value(
        "twinq_reloads_total", {"result": "failure"}) or 0.0


@pytest.mark.parametrize("corruption", ["current", "manifest", "shard"])
def test_worker_refuses_counts_and_logs_once_per_version(
        quick_snapshot: Any, tiny_bi_encoder: Any, caplog: Any, monkeypatch: Any,
        corruption: str) -> None:
    import twinq.worker.served as served_module

    root, v1 = quick_snapshot(TEXTS)
    engine = _engine(root, tiny_bi_encoder)
    _, v2 = quick_snapshot(TEXTS[:4])
    CORRUPTIONS[corruption](root, v2)
    with caplog.at_level(logging.DEBUG, logger="twinq.worker.served"):
        for _ in range(3):
            assert engine.check_for_update() is None
        assert _failures(engine) == 1
        monkeypatch.setattr(served_module, "RETRY_FAILED_VERSION_S", 0.0)  # retried, counted
        for _ in range(3):
            assert engine.check_for_update() is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "refused snapshot" in errors[0].getMessage(), caplog.text
    assert not errors[0].exc_info and "\n" not in errors[0].getMessage()
    assert _failures(engine) == 4 and engine.version == v1
    assert engine.swap_pending() is None
    from prometheus_client import generate_latest

    assert b"twinq_snapshot_age_seconds" in generate_latest(engine.metrics.registry)
    snap.publish(root, v1)
    assert engine.check_for_update() is None and engine.version == v1


def test_errors_are_twinq_errors_for_the_cli() -> None:
    """SnapshotCorrupt is bad input to the CLI (exit 2) and an invalid snapshot to a worker."""
    assert issubclass(SnapshotCorrupt, BadInput) and issubclass(SnapshotCorrupt, SnapshotInvalid)


def test_a_shard_with_text_that_is_not_utf8_is_refused_at_load(quick_snapshot: Any) -> None:
    """Checksums that match do not make the bytes valid: a served row is decoded per query."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, version = quick_snapshot(TEXTS, shards=1)
    folder = snap.version_dir(root, version)
    manifest = json.loads((folder / snap.MANIFEST).read_text())
    data = folder / manifest["shards"][0]["data_file"]
    table = pq.read_table(data)
    raw = pa.array([b"\xff\xfe"] * table.num_rows, type=pa.binary()).view(pa.string())
    pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", raw), data)
    manifest["shards"][0]["sha256"]["data"] = snap.sha256_file(data)
    (folder / snap.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SnapshotCorrupt, match="Invalid UTF8") as caught:
        snap.load_snapshot(root)
    assert_one_line(caught.value)
