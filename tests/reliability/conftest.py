"""Fixtures of the reliability suites: private Redis servers, tiny models and snapshots, a
process registry that kills everything in finally blocks, and the one-line summaries.

Process-level tests run their own `redis-server` on a free port (never the shared 6379, whose
db 0 other tests flush). The counts each suite records are printed at the end of the run:

    twinq reliability: faults survived 6, requests lost 0, messages fuzzed 2412, ...
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from twinq.shared.config import Settings, load_settings
from tests.reliability.harness import Processes, RedisServer, tag

TEXTS = [f"how do I {verb} my {thing}" for verb in ("reset", "change", "delete", "recover",
                                                     "update", "export", "verify", "close")
         for thing in ("password", "email address", "account", "invoice", "username",
                       "phone number", "subscription", "payment card")]
"""64 FAQ-like questions: enough rows for a real search, small enough to embed in a second."""

_COUNTS: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
_NOTES: dict[str, list[str]] = defaultdict(list)
TOTALS = ("faults survived", "requests lost", "messages fuzzed", "requests answered",
          "requests refused")


class Summary:
    """Counts per suite, printed as one line each when the run ends (and by `line()`)."""

    def add(self, suite: str, **counts: float) -> None:
        """Add to the suite's counters; keyword names use `_` for spaces."""
        for name, value in counts.items():
            _COUNTS[suite][name.replace("_", " ")] += value

    def note(self, suite: str, text: str) -> None:
        _NOTES[suite].append(text)

    def line(self, suite: str) -> str:
        counts = _COUNTS.get(suite, {})
        parts = [f"{name} {value:g}" for name, value in counts.items()]
        return f"twinq reliability [{suite}]: " + ", ".join(parts + _NOTES.get(suite, []))


@pytest.fixture(scope="session")
def summary() -> Summary:
    return Summary()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _COUNTS and not _NOTES:
        return
    report = Summary()
    totals = {name: sum(c.get(name, 0) for c in _COUNTS.values()) for name in TOTALS}
    terminalreporter.write_sep("-", "twinq reliability summary")
    for suite in sorted(set(_COUNTS) | set(_NOTES)):
        terminalreporter.write_line(report.line(suite))
    terminalreporter.write_line("twinq reliability: " + ", ".join(
        f"{name} {value:g}" for name, value in totals.items()))
    out = os.environ.get("TWINQ_RELIABILITY_SUMMARY")
    if out:
        Path(out).write_text(json.dumps({"suites": {k: dict(v) for k, v in _COUNTS.items()},
                                         "notes": dict(_NOTES), "totals": totals}, indent=1))


@pytest.fixture
def processes() -> Iterator[Processes]:
    """Every process the test starts; the survivors are killed when it ends."""
    procs = Processes()
    try:
        yield procs
    finally:
        procs.close()


@pytest.fixture
def redis_server(processes: Processes, tmp_path: Path) -> Callable[..., RedisServer]:
    """Factory: a started private `redis-server` (`args`, `url_auth`, `tls`, `port`)."""
    count = 0

    def make(**kwargs: Any) -> RedisServer:
        nonlocal count
        count += 1
        return RedisServer(processes, tmp_path / f"redis-{count}", **kwargs).start()

    return make


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private plain `redis-server` for a module's in-process tests (unique key names per
    test keep them apart)."""
    procs = Processes()
    try:
        yield RedisServer(procs, tmp_path_factory.mktemp("module-redis")).start()
    finally:
        procs.close()


@pytest.fixture(scope="session")
def rel_bi_encoder(tiny_bi_encoder_path: str) -> Any:
    from twinq.shared.models import load_bi_encoder

    return load_bi_encoder(tiny_bi_encoder_path)


@pytest.fixture(scope="session")
def rel_cross_encoder(tiny_cross_encoder_path: str) -> Any:
    from twinq.shared.models import load_cross_encoder

    return load_cross_encoder(tiny_cross_encoder_path)


@pytest.fixture
def rel_snapshot(tmp_path: Path, rel_bi_encoder: Any, tiny_bi_encoder_path: str
                 ) -> Callable[..., tuple[Path, str]]:
    """Factory: `rel_snapshot(texts=TEXTS, shards=2, publish=True)` -> (root, version), a
    complete snapshot of the tiny bi-encoder under `tmp_path/root`."""
    from tests.conftest import write_quick_snapshot

    def make(texts: list[str] | None = None, **kwargs: Any) -> tuple[Path, str]:
        root = tmp_path / "root"
        version = write_quick_snapshot(root, texts or TEXTS, rel_bi_encoder,
                                       model_name=tiny_bi_encoder_path, **kwargs)
        return root, version

    return make


def names(prefix: str = "twinq:rel") -> dict[str, str]:
    """Stream, group and dead-stream names unique to one test (keys stay under `twinq:`)."""
    t = tag()
    return {"stream": f"{prefix}:{t}:queries", "group": f"workers-{t}",
            "dead_stream": f"{prefix}:{t}:dead"}


def make_settings(redis_url: str, root: Path | str | None, **overrides: Any) -> Settings:
    """In-process worker settings: unique names, short timeouts, fast reload polling."""
    values = {"root": str(root) if root else None, "redis_url": redis_url, **names(),
              "block_ms": 20, "visibility_timeout_ms": 1000, "reload_poll_s": 0.1, **overrides}
    return load_settings(env={}, overrides=values)


def process_settings(redis_url: str, root: Path | str, reranker: str | None,
                     **overrides: Any) -> dict[str, Any]:
    """`TWINQ_*` settings of a worker process (see `harness.worker_env`)."""
    return {"root": str(root), "redis_url": redis_url, "reranker": reranker, **names(),
            "threads": 1, "batch_size": 16, "block_ms": 20, "visibility_timeout_ms": 2000,
            "reload_poll_s": 0.2, "shutdown_grace_s": 10, **overrides}
