"""Helpers shared by the benchmark scripts: reference data, timing and the machine's description."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TWINQ_DATA", REPO.parent / "shared" / "data"))


def quora_questions(limit: int, *, offset: int = 0) -> list[str]:
    """Distinct questions from the Quora duplicate pairs in ../shared/data, in file order."""
    seen: dict[str, None] = {}
    folder = DATA / "quora" / "duplicate-pairs"
    if not folder.is_dir():
        raise SystemExit(f"reference data not found at {folder}; set TWINQ_DATA")
    for name in ("train_q1.txt", "train_q2.txt", "test_q1.txt", "test_q2.txt"):
        with open(folder / name, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                text = line.strip()
                if text:
                    seen.setdefault(text, None)
    questions = list(seen)[offset: offset + limit]
    if len(questions) < limit:
        raise SystemExit(f"only {len(questions)} distinct questions available, asked for {limit}")
    return questions


def quora_pairs(limit: int) -> list[tuple[str, str]]:
    """Real question pairs (aligned lines of the duplicate-pairs test files)."""
    folder = DATA / "quora" / "duplicate-pairs"
    with open(folder / "test_q1.txt", encoding="utf-8", errors="replace") as f1, \
            open(folder / "test_q2.txt", encoding="utf-8", errors="replace") as f2:
        pairs = [(a.strip(), b.strip()) for a, b in zip(f1, f2) if a.strip() and b.strip()]
    return pairs[:limit]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


@contextmanager
def stopwatch(into: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    into[name] = time.perf_counter() - start
