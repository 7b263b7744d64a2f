from __future__ import annotations

from pathlib import Path

import pytest

from twinq.shared import snapshot as snap
from twinq.shared.errors import BadInput, SnapshotInvalid, SnapshotNotFound

TEXTS = [f"question {i} about {topic}" for i, topic in enumerate(["billing", "shipping", "login"] * 20)]


def test_load_snapshot_counts_and_version(quick_snapshot) -> None:
    root, version = quick_snapshot(TEXTS, shards=3)
    loaded = snap.load_snapshot(root)
    assert loaded.version == version == snap.current_version(root)
    assert loaded.rows == len(TEXTS) and len(loaded.shards) == 3


def test_validate_detects_corrupted_shard(quick_snapshot) -> None:
    root, version = quick_snapshot(TEXTS)
    path = snap.version_dir(root, version)
    shard = path / "shard-00001.faiss"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SnapshotInvalid, match="checksum"):
        snap.load_snapshot(root)
    with pytest.raises(SnapshotInvalid):
        snap.validate(path, snap.read_manifest(path))


def test_validate_detects_row_count_mismatch(quick_snapshot) -> None:
    root, version = quick_snapshot(TEXTS)
    path = snap.version_dir(root, version)
    manifest = snap.read_manifest(path)
    manifest["corpus"]["rows_indexed"] += 1
    with pytest.raises(SnapshotInvalid, match="shards hold"):
        snap.validate(path, manifest)


def test_publish_is_atomic_and_rollback_returns_previous(quick_snapshot, tmp_path: Path) -> None:
    root, first = quick_snapshot(TEXTS)
    _, second = quick_snapshot(TEXTS[:30])
    assert snap.current_version(root) == second
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp files left
    assert snap.rollback(root) == first
    assert snap.current_version(root) == first
    assert snap.load_snapshot(root).rows == len(TEXTS)
    with pytest.raises(SnapshotNotFound):
        snap.rollback(root)
    snap.publish(root, second)
    assert snap.current_version(root) == second


def test_publish_refuses_incomplete_and_bad_names(quick_snapshot) -> None:
    root, version = quick_snapshot(TEXTS)
    incomplete = snap.version_dir(root, "20990101T000000Z")
    incomplete.mkdir()
    with pytest.raises(SnapshotInvalid, match="no manifest"):
        snap.publish(root, "20990101T000000Z")
    with pytest.raises(BadInput, match="invalid snapshot version"):
        snap.publish(root, "../../etc")
    (root / snap.CURRENT).write_text("../escape\n")
    with pytest.raises(BadInput):
        snap.current_version(root)


def test_gc_keeps_published_and_running_builds(quick_snapshot) -> None:
    root, v1 = quick_snapshot(TEXTS)
    _, v2 = quick_snapshot(TEXTS)
    _, v3 = quick_snapshot(TEXTS, publish=False)
    snap.publish(root, v1)
    abandoned = snap.version_dir(root, "20200101T000000Z")
    abandoned.mkdir()
    snap.mark_building(root, "20200102T000000Z")  # this process is alive: its build must survive gc
    removed = snap.gc(root, keep=1)
    assert sorted(removed) == sorted(["20200101T000000Z", v2])
    assert {i.version for i in snap.list_versions(root)} == {v1, v3, "20200102T000000Z"}
    with pytest.raises(BadInput):
        snap.gc(root, keep=0)
