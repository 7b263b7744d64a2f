"""`twinq demo`: the whole lifecycle on the bundled FAQ, offline, in one command.

    1. build a snapshot of the demo corpus with the Beam pipeline   (twinq index build)
       and keep the last two versions                                (twinq index gc --keep 2)
    2. train a small reranker on the demo pairs, unless cached       (twinq train reranker)
    3. start an embedded Redis and a worker                          (twinq worker)
    4. ask the sample questions through the queue                    (TwinqClient)
    5. print a table per question, with the stored answer of the top hit, or "no twin found"
       for the questions the FAQ does not answer
    6. shut everything down: worker first (SIGTERM, it drains), then Redis; also when the
       demo is stopped by Ctrl-C, SIGTERM or SIGHUP

Each step runs the real command in a child process, exactly as a user would, so the demo
exercises the same code paths as a deployment. Its full output goes to a log file; the terminal
shows a progress bar with an ETA, read from the step's own progress lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from twinq.shared.errors import TwinqError
from twinq.worker.client import TwinqClient
from twinq.worker.embedded_redis import EmbeddedRedis

console = Console()
# The demo pairs are few (about 1,300 for training) and short: one epoch at 5e-5 barely moved
# the loss (0.69 -> 0.57) and the reranker learned nothing; 1e-4 with 32 tokens reached a dev AP
# of 0.95 and fixed the near-miss questions when fused. 62 FAQ groups are still too few to learn
# intent, so the reranker also trains on 68 groups from other help desks (pipelines/paraphrases,
# --train-only: never dev); two epochs over both brought the most dev twins to p >= 0.5 (0.75
# against 0.32-0.66 for FAQ-only recipes and 0.59-0.67 for 1 or 1.5 epochs; docs/results.md §5).
# A fifth of the groups is held out (not the default tenth): the twin decision is fitted on
# their questions, and 8 groups gave it under 50 queries.
TRAIN_FULL = ["--epochs", "2", "--max-length", "32", "--lr", "1e-4", "--batch-size", "32",
              "--dev-fraction", "0.2"]
TRAIN_FAST = ["--epochs", "1", "--max-length", "32", "--lr", "1e-4", "--batch-size", "32",
              "--max-steps", "30"]


TRAINING_VERSION = "8"
"""Part of the cached reranker's key: bump it when `twinq train reranker` changes what it writes
(4: easy negatives, mined near misses for labelled positives, the twin decision model,
fusion falling back to recall only without a dev gain; 5: linear fusion, the adaptive rule's
logit bound, the decision fitted on the candidates it scores; 6: the other domains' groups,
two epochs; 7: fitted on int8 scores with per-row activation scales; 8: on int8 recipe 3's,
7-bit weights)."""


def demo_dir() -> Path:
    return Path(str(files("twinq.pipelines") / "demo"))


def _twinq(*args: str) -> list[str]:
    return [sys.executable, "-m", "twinq.shared.cli", *args]


PROGRESS = re.compile(r"\| *(\d+)/(\d+) \[|embedded (\d+)/~?(\d+) texts")
"""A step's progress line: a tqdm bar ("train:  40%|####      | 12/30 [00:05<...") or the index
build's "embedded 128/~385 texts"."""


def _progress(log_file: Path) -> tuple[int, int] | None:
    """(done, total) from the last progress line in the log so far, if any."""
    try:
        with log_file.open("rb") as fh:
            fh.seek(max(0, log_file.stat().st_size - 4096))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    found = PROGRESS.findall(tail)
    if not found:
        return None
    done, total = [int(x) for x in found[-1] if x][:2]
    return done, total


def _run(step: str, argv: list[str], log_file: Path) -> None:
    """Run one lifecycle step with a progress bar; on failure show the tail of its log and stop
    the demo."""
    from rich.progress import (BarColumn, Progress, SpinnerColumn, TaskProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)

    start = time.perf_counter()
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
               TaskProgressColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with log_file.open("w") as log, Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(step, total=None)
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            while process.poll() is None:
                time.sleep(0.5)
                seen = _progress(log_file)
                if seen is not None and seen[1] > 0:
                    bar.update(task, completed=min(seen), total=seen[1])
        except BaseException:
            _stop(process)  # a demo that is stopped stops its step: no orphaned training
            raise
        code = process.returncode
    if code != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        raise TwinqError(f"{step} failed (exit {code}); log {log_file}:\n{tail}")
    console.print(f"[bold]{step}[/bold]: done in {time.perf_counter() - start:.0f}s "
                  f"(log {log_file})")


def _reranker(work: Path, root: Path, fast: bool, logs: Path) -> Path:
    """Train the demo reranker once per pairs file and mode; later runs reuse the cache."""
    pairs = demo_dir() / "pairs.tsv"
    recipe = TRAIN_FAST if fast else TRAIN_FULL
    data = Path(str(files("twinq.pipelines")))  # data folders, not code
    other, unrelated = data / "paraphrases" / "pairs.tsv", data / "unrelated" / "questions.txt"
    digest = hashlib.sha256(pairs.read_bytes() + other.read_bytes() + unrelated.read_bytes()
                            + " ".join([TRAINING_VERSION, *recipe]).encode()).hexdigest()[:12]
    out = work / f"reranker-{digest}"
    if (out / "training.json").is_file():
        console.print(f"[bold]2. reranker[/bold]: cached at {out}")
        return out
    _run("2. training the demo reranker on pipelines/demo and pipelines/paraphrases "
         "(cached for next time)",
         _twinq("train", "reranker", "--pairs", str(pairs), "--train-only", str(other),
                "--out", str(out), "--fusion-root", str(root), *recipe),
         logs / "train.log")
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(process: subprocess.Popen, port: int, timeout_s: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TwinqError(f"worker exited with {process.returncode}; log {log_file}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TwinqError(f"worker not ready after {timeout_s:.0f}s; log {log_file}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM lets the worker finish its batch (or a step end); a stuck one is killed after the
    grace period."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _show(question: dict[str, Any], reply: dict[str, Any], group_of: dict[str, str]) -> bool:
    """Print one question's hits and its answer (or "no twin found"); True when twinq did the
    right thing: the expected twin first and answered, or no answer for a question without one.
    Stored texts are printed literally (rich `Text`), never as markup."""
    from rich.text import Text

    results = reply.get("results") or []
    top_group = group_of.get(results[0]["id"]) if results else None
    expected = question.get("group")
    abstained = bool(reply.get("no_twin"))
    ok = abstained if expected is None else (top_group == expected and not abstained)
    title = question["query"] + ("" if expected else f"   [{question.get('kind', 'no twin')}]")
    table = Table(title=Text(title, style="bold"), title_justify="left")
    for column, justify in (("rank", "right"), ("matched question", "left"), ("recall", "right"),
                            ("rerank", "right"), ("p(twin)", "right")):
        table.add_column(column, justify=justify)
    for hit in results[:3]:
        rerank = "-" if hit["rerank_score"] is None else f"{hit['rerank_score']:.2f}"
        p = hit["duplicate_probability"]
        table.add_row(str(hit["rank"]), Text(hit["text"]), f"{hit['recall_score']:.3f}", rerank,
                      "-" if p is None else f"{p:.3f}")
    console.print(table)
    if abstained:
        mark = ("green", "as expected") if ok else ("red", f"expected group {expected}")
        console.print(Text.assemble(("  no twin found", "bold yellow"), (f" ({mark[1]})", mark[0])))
    elif ok:
        console.print(Text.assemble(("  answer: ", "green"),
                                    str(results[0]["metadata"].get("answer", ""))))
    else:
        wrong = (f"answered from group {top_group}, but this question has no twin" if expected
                 is None else f"top hit is from group {top_group}, expected {expected}")
        console.print(Text("  " + wrong, style="red"))
    return ok


def _twinq_path() -> str:
    """How to call twinq from a fresh shell in this folder: the venv's script, relative when
    it lies below the working directory."""
    script = Path(sys.executable).with_name("twinq")
    try:
        return "./" + str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


@contextmanager
def _interrupt_on_termination() -> Iterator[None]:
    """Make SIGTERM and SIGHUP stop the demo as Ctrl-C does.

    Python's default for both exits at once, without cleanups: `kill`, a process manager or a
    closed terminal left the embedded Redis (and a running step) behind. As a KeyboardInterrupt
    they unwind the demo's `ExitStack`, which drains the worker and stops Redis; `--serve`
    then exits 0, as after Ctrl-C. The previous handlers come back on the way out.
    """
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def demo_command(
    serve: bool = typer.Option(False, "--serve", help="Stay up: print the status page and how to ask."),
    fast: bool = typer.Option(False, "--fast", help="Train for a few steps only (tests)."),
    workdir: Path = typer.Option(Path("runs/demo"), "--workdir", help="Snapshots, model cache and logs."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the replies as JSON here."),
) -> None:
    """Run the whole twinq lifecycle on the bundled FAQ, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _interrupt_on_termination():
        _lifecycle(workdir.resolve(), serve=serve, fast=fast, report=report)


def _lifecycle(work: Path, *, serve: bool, fast: bool, report: Path | None) -> None:
    """Steps 1 to 6 of the module docstring, in `work`."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    root = work / "root"
    corpus = demo_dir() / "faq.jsonl"
    started = time.perf_counter()
    _run("1. building a snapshot of pipelines/demo/faq.jsonl with Beam",
         _twinq("index", "build", "--corpus", str(corpus), "--root", str(root), "--shards", "2",
                "--publish"), logs / "index.log")
    _run("   keeping the last two snapshot versions", _twinq("index", "gc", "--root", str(root),
                                                           "--keep", "2"), logs / "gc.log")
    reranker = _reranker(work, root, fast, logs)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    group_of = {row["id"]: row["group"] for row in rows}
    questions = [json.loads(line) for line in (demo_dir() / "questions.jsonl").read_text().splitlines()]
    with ExitStack() as stack:
        redis = stack.enter_context(EmbeddedRedis(port=None))
        port = _free_port()
        worker_log = logs / "worker.log"
        console.print(f"[bold]3. starting embedded Redis ({redis.url}) and a worker[/bold]")
        process = subprocess.Popen(
            _twinq("worker", "--root", str(root), "--reranker", str(reranker), "--redis-url", redis.url,
                   "--metrics-port", str(port)),
            stdout=worker_log.open("w"), stderr=subprocess.STDOUT)
        stack.callback(_stop, process)
        _wait_ready(process, port, 180, worker_log)
        console.print(f"[bold]4. asking {len(questions)} sample questions through the queue[/bold]")
        with TwinqClient(redis.url) as client:
            replies = [client.ask(q["query"], timeout_s=60) for q in questions]
        ok = [_show(q, r, group_of) for q, r in zip(questions, replies)]
        twins = [o for o, q in zip(ok, questions) if q.get("group")]
        none = [o for o, q in zip(ok, questions) if not q.get("group")]
        correct = sum(ok)
        console.print(f"\n[bold]{sum(twins)}/{len(twins)}[/bold] sample questions found their twin "
                      f"at rank 1 and were answered; [bold]{sum(none)}/{len(none)}[/bold] questions "
                      f"the FAQ does not answer got \"no twin found\" (snapshot "
                      f"{replies[0]['snapshot']}, {time.perf_counter() - started:.0f}s in all)")
        if report:
            report.write_text(json.dumps({"questions": questions, "replies": replies,
                                          "correct": correct, "worker_pid": process.pid,
                                          "redis_url": redis.url, "status_port": port}, indent=1))
        if serve:
            console.print(f"\nstatus page: http://127.0.0.1:{port}/   (metrics at /metrics)\n"
                          f"ask: {_twinq_path()} ask --redis-url {redis.url} "
                          "\"how do I get a refund?\"\n"
                          f"  (or: make ask URL={redis.url} Q=\"how do I get a refund?\")\n"
                          "Ctrl-C stops the worker and Redis.")
            try:
                while process.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        console.print("[bold]5. shutting down[/bold] (worker drains, then Redis stops)")
