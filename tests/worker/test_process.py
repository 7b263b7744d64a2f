"""Worker processes under faults: SIGKILL mid-batch (work is taken over), SIGTERM mid-batch
(the batch is finished, acknowledged, and the process exits 0), and a worker's own embedded
Redis stopped however the worker is (a closed terminal's SIGHUP, a second signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.worker.conftest import (TEXTS, free_port, port_open, running_worker, send,
                                   stop_left_over_redis, wait_reply, wait_until)

REPO = Path(__file__).resolve().parents[2]


def start_worker(settings: Any, marker: Path, hold_s: float, worker_id: str,
                 log: Path, embedded_port: int | None = None) -> subprocess.Popen:
    """A slow worker on `settings`' Redis, or with `embedded_port` on an embedded one of its
    own (its URL file under the log's folder)."""
    env = {**os.environ, "TWINQ_ROOT": settings.root, "TWINQ_REDIS_URL": settings.redis_url,
           "TWINQ_STREAM": settings.stream, "TWINQ_GROUP": settings.group,
           "TWINQ_DEAD_STREAM": settings.dead_stream, "TWINQ_BATCH_SIZE": "8",
           "TWINQ_BLOCK_MS": "20", "TWINQ_THREADS": "1", "TWINQ_SHUTDOWN_GRACE_S": "20",
           "TWINQ_VISIBILITY_TIMEOUT_MS": str(settings.visibility_timeout_ms)}
    env.pop("TWINQ_CONFIG", None)
    argv = [sys.executable, "-m", "tests.worker.slow_worker", str(marker), str(hold_s), worker_id]
    if embedded_port is not None:
        env.pop("TWINQ_REDIS_URL")
        env["XDG_RUNTIME_DIR"] = str(log.parent / "run")
        argv.append(str(embedded_port))
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def wait_for_batch(proc: subprocess.Popen, marker: Path, log: Path) -> None:
    def in_flight() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"worker exited early ({proc.returncode}):\n{log.read_text()}")
        return marker.exists()

    wait_until(in_flight, timeout_s=60, step_s=0.05)


@pytest.mark.slow
def test_worker_process_killed_mid_batch_is_taken_over(quick_snapshot: Any, make_settings: Any,
                                                       tiny_bi_encoder: Any, redis_client: Any,
                                                       tmp_path: Path) -> None:
    root, version = quick_snapshot(TEXTS)
    settings = make_settings(root, visibility_timeout_ms=1000)
    ids = [f"k{i}" for i in range(3)]
    for i, request_id in enumerate(ids):
        send(redis_client, settings, {"id": request_id, "query": TEXTS[i]})
    marker, log = tmp_path / "in-flight", tmp_path / "victim.log"
    victim = start_worker(settings, marker, 120.0, "victim", log)
    try:
        wait_for_batch(victim, marker, log)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        stop(victim)
    pending = redis_client.xpending(settings.stream, settings.group)
    assert pending["pending"] == 3 and pending["consumers"][0]["name"] == b"victim"
    with running_worker(settings, bi_encoder=tiny_bi_encoder, worker_id="rescuer"):
        replies = [wait_reply(redis_client, f"twinq:reply:{i}") for i in ids]
        wait_until(lambda: redis_client.xpending(settings.stream, settings.group)["pending"] == 0)
    assert all(r["ok"] and r["worker"] == "rescuer" and r["snapshot"] == version for r in replies)
    assert all(redis_client.llen(f"twinq:reply:{i}") == 0 for i in ids)  # exactly one each


@pytest.mark.slow
def test_worker_process_sigterm_finishes_batch_and_exits_zero(quick_snapshot: Any,
                                                              make_settings: Any,
                                                              redis_client: Any,
                                                              tmp_path: Path) -> None:
    root, _ = quick_snapshot(TEXTS)
    settings = make_settings(root)
    ids = [f"t{i}" for i in range(3)]
    for i, request_id in enumerate(ids):
        send(redis_client, settings, {"id": request_id, "query": TEXTS[i]})
    marker, log = tmp_path / "in-flight", tmp_path / "worker.log"
    proc = start_worker(settings, marker, 1.5, "drainer", log)
    try:
        wait_for_batch(proc, marker, log)
        proc.send_signal(signal.SIGTERM)
        send(redis_client, settings, {"id": "late", "query": TEXTS[4]})
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        stop(proc)
    assert all(wait_reply(redis_client, f"twinq:reply:{i}", 1)["ok"] for i in ids)
    group = redis_client.xinfo_groups(settings.stream)[0]
    assert group["pending"] == 0  # the batch in flight was acknowledged
    assert group["lag"] == 1  # the request sent while draining was left for other workers
    assert "stopping: finishing the batch in flight" in log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("when", ["serving", "starting"])
def test_worker_on_its_own_embedded_redis_stops_it_on_sighup(
        quick_snapshot: Any, make_settings: Any, tmp_path: Path, when: str) -> None:
    """A closed terminal: SIGHUP once the worker consumes (it drains), or as soon as its
    embedded Redis is up (the start is cut short). Either way it exits 0 and stops Redis."""
    root, _ = quick_snapshot(TEXTS)
    port, marker, log = free_port(), tmp_path / "in-flight", tmp_path / "worker.log"
    proc = start_worker(make_settings(root), marker, 0.0, "terminal", log, embedded_port=port)
    url_file = tmp_path / "run" / "twinq" / "redis-url"
    try:
        if when == "serving":
            wait_until(lambda: "consuming" in log.read_text(), timeout_s=60, step_s=0.1)
        else:
            wait_until(lambda: port_open(port), timeout_s=60, step_s=0.01)
        proc.send_signal(signal.SIGHUP)
        code = proc.wait(timeout=30)
    finally:
        stop(proc)
        left_over = stop_left_over_redis(port)
    assert code == 0 and not left_over, log.read_text()
    assert not url_file.exists()
    if when == "serving":
        assert "stopping: finishing the batch in flight" in log.read_text()


@pytest.mark.slow
def test_second_signal_exits_at_once_and_still_stops_the_embedded_redis(
        quick_snapshot: Any, make_settings: Any, tmp_path: Path) -> None:
    root, _ = quick_snapshot(TEXTS)
    settings = make_settings(root)
    port, marker, log = free_port(), tmp_path / "in-flight", tmp_path / "worker.log"
    proc = start_worker(settings, marker, 120.0, "impatient", log, embedded_port=port)
    try:
        wait_until(lambda: port_open(port), timeout_s=60, step_s=0.1)
        client = redis.Redis(port=port)
        wait_until(lambda: client.exists(settings.stream), timeout_s=60, step_s=0.1)
        send(client, settings, {"id": "held", "query": TEXTS[0]})
        wait_for_batch(proc, marker, log)
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping: finishing the batch in flight" in log.read_text(),
                   timeout_s=10, step_s=0.05)
        proc.send_signal(signal.SIGINT)  # a second Ctrl-C: do not wait for the batch
        code = proc.wait(timeout=15)
    finally:
        stop(proc)
        left_over = stop_left_over_redis(port)
    assert code == 1 and not left_over, log.read_text()
    assert "exiting now" in log.read_text()
