"""Process harness for the reliability suites: private `redis-server` instances on free ports,
real worker processes, bounded waits, and small Redis helpers.

Everything binds 127.0.0.1. Every process is started in its own session so that it (and any
child) can be killed as a group; `Processes` kills whatever is still running when a test ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
HOST = "127.0.0.1"

WORKER_START_S = 180.0
"""Longest wait for a worker process to load its models and consume (CI runs on 2 busy cores)."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout_s: float, step_s: float = 0.05,
               what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s:g}s")
        time.sleep(step_s)


def tag() -> str:
    """A short random tag for stream, group and key names unique to one test."""
    return uuid.uuid4().hex[:10]


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, wait_s: float = 20.0) -> None:
    """Signal a process started with `start_new_session=True` and its whole group; reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=wait_s)


class Processes:
    """Every process a test starts; `close()` (always in a finally block) kills the survivors."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def spawn(self, args: list[str], *, log: Path, env: dict[str, str] | None = None,
              cwd: Path = REPO) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.started:
            kill_group(proc)


@dataclass
class RedisServer:
    """A private `redis-server` child bound to 127.0.0.1, with its own data folder.

    Args:
        processes: Where the child is registered (so it is killed when the test ends).
        dir: Data folder (AOF, RDB, log).
        args: Extra server arguments, e.g. `["--requirepass", "s3cret"]`.
        port: Fixed port (a restart reuses it); None picks a free one.
        url_auth: `user:password@` (or `:password@`) put into `url`.
        tls: Serve TLS on the port instead of plain TCP (needs the `--tls-*` file arguments).
    """

    processes: Processes
    dir: Path
    args: list[str] = field(default_factory=list)
    port: int | None = None
    url_auth: str = ""
    tls: bool = False
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.url_auth}{HOST}:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def start(self, timeout_s: float = 30.0) -> RedisServer:
        """Start (or restart on the same port and folder) and wait until it accepts clients."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            port = self.port or free_port()
            listen = (["--port", "0", "--tls-port", str(port)] if self.tls
                      else ["--port", str(port)])
            argv = [REDIS_SERVER, *listen, "--bind", HOST, "--dir", str(self.dir),
                    "--save", "", "--daemonize", "no", "--logfile", str(self.log), *self.args]
            marker = self.log.stat().st_size if self.log.exists() else 0
            proc = self.processes.spawn(argv, log=self.dir / "redis.stdout")
            try:
                wait_until(lambda: proc.poll() is not None or self._ready_since(marker),
                           timeout_s, what=f"redis-server on port {port}")
            except AssertionError:
                kill_group(proc)
                raise
            if proc.poll() is None:
                self.proc, self.port = proc, port
                self.starts += 1
                return self
            if self.port is not None or attempt == 4:  # a fixed port that is taken: give up
                raise RuntimeError(f"redis-server exited {proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
        raise AssertionError("unreachable")

    def _ready_since(self, offset: int) -> bool:
        try:
            with self.log.open("rb") as fh:
                fh.seek(offset)
                return b"Ready to accept connections" in fh.read()
        except FileNotFoundError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Stop the server (SIGTERM: Redis' graceful shutdown, which fsyncs the AOF)."""
        assert self.proc is not None, "not running"
        proc, self.proc = self.proc, None
        proc.send_signal(sig)
        return proc.wait(timeout=timeout_s)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client for this server (same URL as the workers get). Reads block as
        long as the command asks (redis-py 8's default 5 s socket timeout would cut BLPOP)."""
        kwargs = {"socket_connect_timeout": 5, "socket_timeout": None, **kwargs}
        return redis.Redis.from_url(self.url, **kwargs)


def worker_env(settings: dict[str, Any], extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker process: no inherited TWINQ_* variables, then `settings`
    as `TWINQ_<NAME>`, single-threaded torch, offline models, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWINQ_")}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    env.update({f"TWINQ_{k.upper()}": str(v) for k, v in settings.items() if v is not None})
    env.update(extra or {})
    return env


@dataclass
class WorkerProcess:
    """A worker process and its log file."""

    proc: subprocess.Popen
    log: Path
    worker_id: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout_s: float = WORKER_START_S) -> None:
        """Wait for the loop's first line ("consuming ..."): models and snapshot are loaded."""
        def ready() -> bool:
            if not self.alive:
                raise AssertionError(f"worker {self.worker_id} exited {self.proc.returncode} "
                                     f"before consuming:\n{self.log_text()[-4000:]}")
            return "consuming " in self.log_text()

        wait_until(ready, timeout_s, step_s=0.1, what=f"worker {self.worker_id} ready")

    def rss_kb(self) -> int:
        """Resident set size from /proc/<pid>/status (VmRSS), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for pid {self.pid}")

    def count(self, text: str) -> int:
        return self.log_text().count(text)


def start_worker(processes: Processes, settings: dict[str, Any], worker_id: str, log_dir: Path,
                 *, module: Iterable[str] = ("twinq.shared.cli", "worker"),
                 args: Iterable[str] = ()) -> WorkerProcess:
    """Start `python -m twinq.shared.cli worker --worker-id ID` (or another module with `args`),
    configured through `TWINQ_*` variables only."""
    log = log_dir / f"{worker_id}.log"
    mod, *rest = module
    argv = [PYTHON, "-m", mod, *rest, *args]
    if tuple(module) == ("twinq.shared.cli", "worker"):
        argv += ["--worker-id", worker_id]
    proc = processes.spawn(argv, log=log, env=worker_env(settings))
    return WorkerProcess(proc, log, worker_id)


def request_payload(request_id: str, query: str, **knobs: Any) -> dict[str, str]:
    """Stream fields of a request, as the client library writes them."""
    body = {"id": request_id, "query": query, **knobs}
    return {"payload": json.dumps(body, ensure_ascii=False, separators=(",", ":"))}


def xadd_many(client: redis.Redis, stream: str, fields: list[dict[str, Any]]) -> list[str]:
    """Pipelined XADDs; the entry ids Redis returned (each one an accepted request)."""
    pipe = client.pipeline(transaction=False)
    for f in fields:
        pipe.xadd(stream, f)
    return [i.decode() if isinstance(i, bytes) else i for i in pipe.execute()]


def collect_replies(client: redis.Redis, keys: Iterable[str], timeout_s: float
                    ) -> dict[str, dict[str, Any] | None]:
    """BLPOP every reply key in turn, all within one overall deadline; None where none came."""
    deadline = time.monotonic() + timeout_s
    found: dict[str, dict[str, Any] | None] = {}
    for key in keys:
        left = deadline - time.monotonic()
        popped = client.blpop([key], timeout=max(0.01, left)) if left > 0 else client.lpop(key)
        if isinstance(popped, (list, tuple)):
            popped = popped[1]
        found[key] = json.loads(popped) if popped else None
    return found


def leftover_replies(client: redis.Redis, keys: Iterable[str]) -> dict[str, int]:
    """Reply lists that still hold something (a second reply), with their lengths."""
    keys = list(keys)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.llen(key)
    return {k: n for k, n in zip(keys, pipe.execute()) if n}


def percentiles(values: list[float], qs: Iterable[float] = (0.5, 0.95, 0.99)) -> list[float]:
    """Nearest-rank percentiles of `values` (milliseconds in, milliseconds out)."""
    if not values:
        return [float("nan") for _ in qs]
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] for q in qs]
