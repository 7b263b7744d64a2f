"""`twinq demo` stopped the way a process manager, `kill` or a closed terminal stops it.

Python's default for SIGTERM and SIGHUP exits without cleanups, which left the demo's embedded
Redis running after `make serve` was killed. These run the `--fast` demo (30 training steps) in
its own file, so they share the suite's main lane rather than the long demo test's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

READY_S = 900
"""The `--fast` demo takes 48 s alone on a 2-core Zen 5 EPYC; slow hosts beside the other lane
take several times that."""


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_naming(*parts: str) -> list[int]:
    """Pids of live processes whose command line contains every one of `parts` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:  # gone meanwhile
                continue
            if all(part.encode() in cmdline for part in parts):
                pids.append(int(entry.name))
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _demo(workdir: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "twinq.shared.cli", "demo", "--fast", "--workdir", str(workdir),
         *extra], stdout=out.open("w"), stderr=subprocess.STDOUT)


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + READY_S
    while not condition():
        assert process.poll() is None, out.read_text()[-3000:]
        assert time.monotonic() < deadline, out.read_text()[-3000:]
        time.sleep(0.5)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo workdir for both signals: the second run reuses the first's cached reranker."""
    return tmp_path_factory.mktemp("demo")


@pytest.mark.timeout(READY_S + 200)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_served_demo_stops_its_worker_and_redis_on_a_signal(workdir: Path, tmp_path: Path,
                                                             sig: int) -> None:
    report, out = tmp_path / "report.json", tmp_path / "out.log"
    process = _demo(workdir, out, "--serve", "--report", str(report))
    data: dict[str, Any] = {}
    redis_port = 0
    try:
        _wait_for(lambda: "Ctrl-C stops the worker and Redis" in out.read_text(), process, out)
        data = json.loads(report.read_text())
        redis_port = int(data["redis_url"].rsplit(":", 1)[1])
        # What must stop is running: the test can fail.
        assert _pid_alive(data["worker_pid"]) and _port_open(redis_port)
        assert _port_open(data["status_port"])
        process.send_signal(sig)
        assert process.wait(timeout=120) == 0, out.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        # Measured first, then cleaned up, so that a failure leaves nothing behind either.
        left = {"worker": _pid_alive(data["worker_pid"]) if data else False,
                "redis": _port_open(redis_port) if data else False}
        _kill(_processes_naming(str(workdir))
              + (_processes_naming(f"127.0.0.1:{redis_port}\0") if redis_port else []))
    assert "shutting down" in out.read_text()
    assert not any(left.values()), left
    assert not _port_open(data["status_port"])


@pytest.mark.timeout(READY_S + 200)
def test_demo_stopped_while_training_stops_the_training(tmp_path: Path) -> None:
    workdir, out = tmp_path / "demo", tmp_path / "out.log"
    process = _demo(workdir, out)
    try:
        # The training step names the workdir in its --out (the demo's own command line names
        # it too, but not the subcommand).
        _wait_for(lambda: bool(_processes_naming("reranker", str(workdir))), process, out)
        steps = _processes_naming("reranker", str(workdir))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) != 0  # stopped before it finished: not a success
    finally:
        if process.poll() is None:
            process.kill()
    deadline = time.monotonic() + 30
    while any(_pid_alive(pid) for pid in steps) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in steps if _pid_alive(pid)]
    _kill(left)
    assert not left, "the training step was left running"
    assert not (workdir / "logs" / "worker.log").exists()
