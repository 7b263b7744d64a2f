"""`twinq demo` stopped mid-step, the way a process manager, `kill` or a closed terminal stops it.

Python's default for SIGTERM and SIGHUP exits without cleanups: the step running at the time
(a training, minutes of CPU) went on alone. This stops the `--fast` demo once its training has
started; the served demo stopped by SIGTERM is in tests/worker/test_demo.py, where it reuses the
demo test's reranker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.worker.conftest import pid_alive, wait_until

pytestmark = pytest.mark.slow

START_S = 600
"""The `--fast` demo starts training within 10 s on a 2-core Zen 5 EPYC; slow hosts beside the
other lane take several times that."""


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


@pytest.mark.timeout(START_S + 200)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_demo_stopped_while_training_stops_the_training(tmp_path: Path, sig: int) -> None:
    workdir, out = tmp_path / "demo", tmp_path / "out.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "twinq.shared.cli", "demo", "--fast", "--workdir", str(workdir)],
        stdout=out.open("w"), stderr=subprocess.STDOUT)
    def training() -> list[int]:
        # The training step names the workdir in its --out (the demo's own command line names
        # the workdir too, but not the subcommand).
        if process.poll() is not None:
            pytest.fail(f"the demo exited ({process.returncode}):\n{out.read_text()[-3000:]}")
        return _processes_naming("reranker", str(workdir))

    steps: list[int] = []
    try:
        steps = wait_until(training, timeout_s=START_S, step_s=0.2)
        process.send_signal(sig)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        deadline = time.monotonic() + 30
        while any(pid_alive(pid) for pid in steps) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in steps if pid_alive(pid)]
        for pid in left:  # measured, then cleaned up: a failure leaves nothing running either
            os.kill(pid, signal.SIGKILL)
    assert not left, "the training step was left running"
    assert code != 0  # stopped before it finished: not a success
    assert not (workdir / "logs" / "worker.log").exists()
