"""Workers serving a store root (real S3: SeaweedFS): sync, verify, hot-reload, ride out outages.

The worker downloads the published version into its cache, checks every file, serves it, and
follows CURRENT; it keeps at most two versions on disk. While the store does not answer it
keeps serving (and says so); with nothing cached it refuses to start (exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.worker.conftest import TEXTS, sample
from twinq.shared import snapshot as snap
from twinq.shared.snapshot_sync import cache_root, cached_versions
from twinq.shared.store import StoreError, open_store
from twinq.worker.metrics import WorkerMetrics
from twinq.worker.served import SnapshotHolder
from twinq.worker.status import worker_readiness


@pytest.fixture
def store_root(s3_root: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TWINQ_STORE_TIMEOUT_S", "1")  # a hung store fails a poll in ~seconds
    return s3_root


@pytest.fixture
def publish(store_root: str, snapshot_writer: Any):
    write = snapshot_writer(store_root)
    return lambda texts=TEXTS, **kwargs: write(texts, **kwargs)


def _holder(make_settings: Any, root: str, cache: Path, encoder: Any,
            metrics: WorkerMetrics | None = None) -> SnapshotHolder:
    return SnapshotHolder(make_settings(root, cache_dir=str(cache)), bi_encoder=encoder,
                          metrics=metrics)


def test_syncs_verifies_serves_and_keeps_two_versions(store_root: str, publish: Any,
                                                      tmp_path: Path, tiny_bi_encoder: Any,
                                                      make_settings: Any) -> None:
    v1 = publish()
    cache = tmp_path / "cache"
    holder = _holder(make_settings, store_root, cache, tiny_bi_encoder)
    holder.start(watch=False)
    assert holder.version == v1 and holder.status()["rows"] == len(TEXTS)
    local = cache_root(cache, open_store(store_root).url) / "snapshots" / v1
    assert holder.served is not None and holder.served.snapshot.path == local
    v2 = publish(TEXTS[:5])
    assert holder.check_for_update() == v2 and holder.swap_pending() == (v1, v2)
    v3 = publish(TEXTS[:7])
    assert holder.check_for_update() == v3
    assert cached_versions(store_root, cache) == [v2, v3]  # the served one and the new one
    holder.swap_pending()
    assert holder.status()["rows"] == 7


def test_a_corrupt_or_absent_version_in_the_store_is_refused(store_root: str, publish: Any,
                                                              tmp_path: Path, tiny_bi_encoder: Any,
                                                              make_settings: Any) -> None:
    v1 = publish()
    metrics = WorkerMetrics()
    holder = _holder(make_settings, store_root, tmp_path / "cache", tiny_bi_encoder, metrics)
    holder.start(watch=False)
    bad = publish(TEXTS[:5], publish=False)
    store = open_store(store_root)
    key = f"{snap.version_key(bad)}/shard-00000.parquet"
    data = bytearray(store.read_bytes(key) or b"")
    data[len(data) // 2] ^= 0xFF
    store.write_bytes(key, bytes(data))
    store.write_bytes(snap.CURRENT, f"{bad}\n".encode())
    assert holder.check_for_update() is None and holder.version == v1
    store.write_bytes(snap.CURRENT, b"20990101T000000Z\n")  # names a version that is not there
    assert holder.check_for_update() is None and holder.version == v1
    assert sample(metrics, "twinq_reloads_total", result="failure") == 2
    assert cached_versions(store_root, tmp_path / "cache") == [v1]  # nothing of `bad` kept
    assert not [p for p in (cache_root(tmp_path / "cache", store.url) / "snapshots").iterdir()
                if p.name.startswith(".") and "partial" in p.name]


def test_keeps_serving_while_the_store_hangs_and_recovers(store_root: str, publish: Any,
                                                         s3_server: Any, tmp_path: Path,
                                                         tiny_bi_encoder: Any,
                                                         make_settings: Any) -> None:
    v1 = publish()
    metrics = WorkerMetrics()
    holder = _holder(make_settings, store_root, tmp_path / "cache", tiny_bi_encoder, metrics)
    holder.start(watch=False)
    with s3_server.paused():
        assert holder.check_for_update() is None
        assert holder.version == v1 and holder.ready
        store = holder.status()["store"]
        assert store["reachable"] is False and "unreachable" in store["error"]
        assert sample(metrics, "twinq_snapshot_store_up") == 0
        assert sample(metrics, "twinq_reloads_total", result="failure") == 0  # not the version's fault

        class Worker:  # what /readyz reads
            engine = type("E", (), {"ready": True, "status": staticmethod(holder.status)})()
            queue = type("Q", (), {"ping": staticmethod(lambda: None)})()

        ready, reason = worker_readiness(Worker())  # type: ignore[arg-type]
        assert ready and f"serving cached {v1}" in reason and "unreachable" in reason
    v2 = publish(TEXTS[:5])
    assert holder.check_for_update() == v2  # by itself, at the next poll
    assert holder.status()["store"]["reachable"] is True
    assert sample(metrics, "twinq_snapshot_store_up") == 1


def test_start_with_the_store_down(store_root: str, publish: Any, s3_server: Any,
                                   tmp_path: Path, tiny_bi_encoder: Any,
                                   make_settings: Any) -> None:
    v1 = publish()
    warm = tmp_path / "warm"
    _holder(make_settings, store_root, warm, tiny_bi_encoder).start(watch=False)
    with s3_server.down():
        holder = _holder(make_settings, store_root, warm, tiny_bi_encoder)
        holder.start(watch=False)  # a warm cache: serve it
        assert holder.version == v1 and holder.status()["store"]["reachable"] is False
        cold = _holder(make_settings, store_root, tmp_path / "cold", tiny_bi_encoder)
        with pytest.raises(StoreError, match="no cached version"):
            cold.start(watch=False)


def test_worker_command_with_an_unreachable_store_and_no_cache_exits_2(
        tmp_path: Path, unreachable_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import REDIS_URL
    from twinq.shared.cli import main as twinq

    code = twinq(["worker", "--root", "s3://bucket/snapshots", "--cache-dir",
                  str(tmp_path / "empty"), "--redis-url", REDIS_URL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "unreachable" in err[0] and "no cached version" in err[0]
