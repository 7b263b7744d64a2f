"""`twinq worker`, `twinq ask` and `twinq submit`: serve the queue, and use it.

These are plain functions; `shared/cli.py` registers them from the `twinq.commands` entry
points. Every setting goes through `twinq.shared.config.load_settings`, so flags, `TWINQ_*`
variables and a TOML file combine the same way everywhere.

Without a Redis URL (no --redis-url, no TWINQ_REDIS_URL, none in the config file), `twinq worker`
starts an embedded server on 127.0.0.1:6390 and records its URL; `twinq ask` and `twinq submit`
then find it on their own.
"""

from __future__ import annotations

import json
import re
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from twinq.shared.config import Settings, load_settings
from twinq.shared.constants import MAX_RECALL_K, MAX_TOP_K
from twinq.shared.errors import BadInput, TwinqError
from twinq.shared.models import set_threads
from twinq.shared.queue import QueueUnavailable
from twinq.worker.client import TwinqClient
from twinq.worker.consumer import Consumer, default_worker_id
from twinq.worker.embedded_redis import DEFAULT_PORT, EmbeddedRedis, url_file
from twinq.worker.engine import Engine
from twinq.worker.metrics import WorkerMetrics
from twinq.worker.status import StatusServer

log = logging.getLogger(__name__)

_CONFIG = typer.Option(None, "--config", help="TOML settings file (default $TWINQ_CONFIG).")
_REDIS = typer.Option(None, "--redis-url", help="redis:// or rediss:// URL (with user:password@ "
                      "for AUTH). Default: TWINQ_REDIS_URL, else the embedded server that "
                      "`twinq worker` records in $XDG_RUNTIME_DIR/twinq/redis-url "
                      "(/tmp/twinq-<uid>/ without XDG_RUNTIME_DIR).")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""What stops a worker: a process manager (SIGTERM), Ctrl-C (SIGINT) and a closed terminal
(SIGHUP, whose default exit would skip every cleanup and leave an embedded Redis holding its
port)."""


def install_signal_handlers(consumer: Consumer,
                            on_exit_now: Callable[[], None] | None = None) -> None:
    """A first stop signal drains (within `shutdown_grace_s`); a second one exits at once.

    Un-ACKed entries of a forced exit are redelivered to other workers after the visibility
    timeout, so exiting early loses nothing. Call from the main thread.

    Args:
        consumer: The loop to stop.
        on_exit_now: Run before a forced exit, which skips `finally` blocks: stopping the
            worker's own embedded Redis, a child process that would outlive it.
    """
    def force(signum: int, _frame: Any) -> None:
        consumer.log.warning("signal %s while draining: exiting now; un-acked entries will be "
                             "redelivered", signal.Signals(signum).name)
        try:
            if on_exit_now is not None:
                on_exit_now()
        finally:
            logging.shutdown()
            os._exit(1)

    def drain(signum: int, _frame: Any) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, force)
        consumer.request_stop()
        timer = threading.Timer(consumer.settings.shutdown_grace_s, force, (signum, None))
        timer.daemon = True
        timer.start()

    for sig in STOP_SIGNALS:
        signal.signal(sig, drain)


def serve(settings: Settings, *, worker_id: str | None = None,
          consumer_cls: type[Consumer] = Consumer, embedded_port: int = DEFAULT_PORT,
          signals: bool = True) -> int:
    """Run one worker until it is told to stop; return its exit code.

    The status server starts before the models load, so that /healthz answers during a slow
    start (a Kubernetes startupProbe) while /readyz says not yet. A stop signal that arrives
    before the drain handlers are in place (the embedded Redis up, the engine not yet built) is
    noted, not obeyed on the spot (an exception raised there could cut the embedded server's
    own start in half), and ends the start once they are: what was started is stopped, exit 0.

    Args:
        settings: Everything; `root` is required. No `redis_url` starts an embedded server.
        worker_id: Consumer name. Defaults to `<hostname>-<pid>`.
        consumer_cls: The loop class (tests pass a slowed-down subclass).
        embedded_port: Port of the embedded server. Defaults to 6390.
        signals: Install the handlers of `STOP_SIGNALS`. Defaults to True.
    """
    if not settings.root:
        raise BadInput("--root is required (or TWINQ_ROOT): the snapshot root to serve")
    set_threads(settings.threads)
    worker_id = worker_id or default_worker_id()
    embedded = status = None
    stop_noted: list[str] = []
    if signals:
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, _frame: stop_noted.append(
                signal.Signals(signum).name))
    try:
        if settings.redis_url is None:
            embedded = EmbeddedRedis(port=embedded_port, record=True)
            settings = settings.replace(redis_url=embedded.start())
        metrics = WorkerMetrics()
        engine = Engine(settings, metrics=metrics, worker_id=worker_id)
        consumer = consumer_cls(settings, engine, worker_id=worker_id, metrics=metrics)
        if settings.metrics_port is not None:
            status = StatusServer(consumer, settings.metrics_host, settings.metrics_port).start()
        if signals:
            install_signal_handlers(consumer, embedded.stop if embedded is not None else None)
        if stop_noted:
            log.info("%s while starting: stopped before serving", stop_noted[0])
            return 0
        engine.start()
        return consumer.run()
    finally:
        if status is not None:
            status.stop()
        if embedded is not None:
            embedded.stop()


def worker_command(
    root: str | None = typer.Option(None, "--root", help="Snapshot root to serve: a folder, or "
                                    "s3://bucket/prefix, gs://... (synced into --cache-dir)."),
    cache_dir: str | None = typer.Option(None, "--cache-dir", help="Local copies of a store "
                                         "root's versions (default ~/.cache/twinq)."),
    reranker: str | None = typer.Option(None, "--reranker", help="Cross-encoder folder or hub "
                                        "name; without it replies carry recall scores only."),
    model: str | None = typer.Option(None, "--model", help="Bi-encoder override (default: the "
                                     "snapshot manifest's model)."),
    redis_url: str | None = typer.Option(None, "--redis-url", help="redis:// or rediss:// URL "
                                         "(user:password@ for AUTH). Default: TWINQ_REDIS_URL, "
                                         "else start an embedded server on --embedded-port and "
                                         "record its URL for `twinq ask`."),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="Serve /, /metrics, "
                                            "/healthz and /readyz on this port (0: any free)."),
    metrics_host: str | None = typer.Option(None, "--metrics-host", help="Interface for the "
                                            "status server (default 127.0.0.1)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Requests per batch."),
    block_ms: int | None = typer.Option(None, "--block-ms", min=0, help="Longest wait for a "
                                        "batch, milliseconds."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Torch threads."),
    worker_id: str | None = typer.Option(None, "--worker-id", help="Consumer name (default "
                                         "<hostname>-<pid>)."),
    embedded_port: int = typer.Option(DEFAULT_PORT, "--embedded-port", help="Port of the "
                                      "embedded Redis started when no URL is configured."),
    config: Path | None = _CONFIG,
) -> None:
    """Answer queries from the Redis stream (starts an embedded Redis when no URL is set)."""
    settings = load_settings(config, overrides={
        "root": root, "cache_dir": cache_dir, "reranker": reranker, "model": model,
        "redis_url": redis_url,
        "metrics_port": metrics_port, "metrics_host": metrics_host, "batch_size": batch_size,
        "block_ms": block_ms, "threads": threads})
    serve(settings, worker_id=worker_id, embedded_port=embedded_port)


def _client(settings: Settings) -> TwinqClient:
    return TwinqClient(settings=settings)


def redact(url: str) -> str:
    """A Redis URL fit for an error message: the password replaced by ***."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def _send(call: Any, url_hint: str) -> Any:
    try:
        return call()
    except TimeoutError as exc:
        raise TwinqError(str(exc)) from exc
    except QueueUnavailable as exc:
        raise TwinqError(f"cannot reach Redis ({redact(url_hint)}): {exc}") from exc


def clip(text: str, width: int) -> str:
    """`text` cut to at most `width` characters at a word boundary, with "…" when cut."""
    if len(text) <= width:
        return text
    head = text[: width - 1]
    cut = head.rsplit(None, 1)[0] if " " in head.strip() else head
    return cut.rstrip(" ,;:.") + "…"


def also_asked_line(alternatives: list[dict[str, Any]]) -> Any:
    """The dim line under a collapsed hit: the other members of its duplicate cluster among
    the candidates, printed literally."""
    from rich.text import Text

    quoted = "; ".join(f"\"{clip(a['text'], 60)}\"" for a in alternatives)
    return Text(f"also asked as: {quoted}", style="dim")


def _print_reply(reply: dict[str, Any]) -> None:
    """The answer (or "no twin found"), the hits and the timings. Stored questions and answers
    are printed literally (rich `Text`): a "[/]" in a question is text, not markup."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = Console()
    results = reply["results"]
    answer = results[0]["metadata"].get("answer") if results else None
    if reply.get("no_twin"):
        # The worker decides on the top hit alone (its probability is the calibrated one), so
        # the message names that hit's probability, not the largest in the table.
        top = results[0]["duplicate_probability"] if results else None
        needed = f"{reply['min_probability']:.2f}"
        console.print(Text.assemble(
            ("no twin found", "bold yellow"),
            ": nothing matched" if not results else
            f": the best match has no duplicate probability to reach {needed}" if top is None else
            f": the best match's duplicate probability, {top:.2f}, is below {needed} "
            "(the matches below are not an answer)"))
    elif answer:
        console.print(Panel(Text(str(answer)), border_style="green",
                            title=Text(f"Answer — matched: {clip(results[0]['text'], 70)}")))
    table = Table(show_lines=False)
    for column in ("rank", "matched question", "recall", "rerank", "p(dup)", "answer"):
        table.add_column(column, overflow="fold")

    def num(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    for hit in results:
        table.add_row(str(hit["rank"]), Text(hit["text"]), num(hit["recall_score"]),
                      num(hit["rerank_score"]), num(hit["duplicate_probability"]),
                      Text(clip(str(hit["metadata"].get("answer", "")), 80)))
        if hit.get("also_asked"):
            table.add_row("", also_asked_line(hit["also_asked"]), "", "", "", "")
    console.print(table)
    t = reply["timings_ms"]
    console.print(Text(f"snapshot {reply['snapshot']} · {reply['models']['bi_encoder']} · "
                       f"reranker {reply['models']['cross_encoder'] or 'off'} · "
                       f"{t['total']:.0f} ms (queue {t['queue']:.0f}, embed {t['embed']:.0f}, "
                       f"search {t['search']:.0f}, rerank {t['rerank']:.0f})", style="dim"))


def ask_command(
    question: str = typer.Argument(..., help="The question to find twins of."),
    top_k: int | None = typer.Option(None, "--top-k", min=1, max=MAX_TOP_K, help="Hits wanted."),
    recall_k: int | None = typer.Option(None, "--recall-k", min=1, max=MAX_RECALL_K,
                                        help="Candidates recalled before reranking."),
    rerank: bool = typer.Option(True, "--rerank/--no-rerank", help="Rerank with the worker's "
                                "cross-encoder."),
    min_probability: float | None = typer.Option(None, "--min-probability", min=0.0, max=1.0,
                                                 help="Say 'no twin found' below this calibrated "
                                                 "duplicate probability (default: the "
                                                 "reranker's, from its dev set)."),
    collapse: bool | None = typer.Option(None, "--collapse/--no-collapse",
                                         help="One hit per duplicate cluster, the others shown "
                                         "as 'also asked as' (default: the worker's "
                                         "collapse_clusters, true)."),
    json_out: bool = typer.Option(False, "--json", help="Print the raw reply as JSON."),
    redis_url: str | None = _REDIS,
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds to wait."),
    config: Path | None = _CONFIG,
) -> None:
    """Ask through the queue and print the twins (a worker must be running).

    Exits 2 when the worker refuses the request (bad_request, too_large), 1 on other errors.
    """
    if not question.strip():
        raise BadInput("the question is empty")
    settings = load_settings(config, overrides={"redis_url": redis_url})
    knobs = {k: v for k, v in (("min_probability", min_probability), ("collapse", collapse))
             if v is not None}
    with _client(settings) as client:
        reply = _send(lambda: client.ask(question, top_k=top_k, recall_k=recall_k, rerank=rerank,
                                         timeout_s=timeout, **knobs),
                      settings.redis_url or f"embedded, see {url_file()}")
    if json_out:
        typer.echo(json.dumps(reply, ensure_ascii=False, indent=2))
    elif reply["ok"]:
        _print_reply(reply)
    if not reply["ok"]:
        error = reply["error"]
        refused = error["code"] in ("bad_request", "too_large")
        raise (BadInput if refused else TwinqError)(f"{error['code']}: {error['message']}")


def read_questions(path: Path) -> list[dict[str, Any]]:
    """Questions from a JSONL file (objects with `query`, `question` or `text`, or strings) or a
    text file with one question per line.

    Raises:
        BadInput: naming the file and line of the first unusable entry.
    """
    if not path.is_file():
        raise BadInput(f"no such file: {path}")
    items: list[dict[str, Any]] = []
    jsonl = path.suffix in (".jsonl", ".json", ".ndjson")
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if not jsonl:
                items.append({"query": line.strip()})
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise BadInput(f"{path}:{n}: not JSON: {exc}") from exc
            row = {"query": row} if isinstance(row, str) else row
            query = next((row[k] for k in ("query", "question", "text")
                          if isinstance(row, dict) and isinstance(row.get(k), str)), None)
            if not query or not query.strip():
                raise BadInput(f"{path}:{n}: needs a non-empty 'query' (or 'question'/'text')")
            items.append({"query": query, **({"input_id": row["id"]} if "id" in row else {})})
    if not items:
        raise BadInput(f"{path}: no questions")
    return items


def submit_command(
    file: Path = typer.Option(..., "--file", help="queries.jsonl (query/question/text per line) "
                              "or a .txt file with one question per line."),
    out: Path = typer.Option(..., "--out", help="results.jsonl: one reply per question, in order."),
    top_k: int | None = typer.Option(None, "--top-k", min=1, max=MAX_TOP_K),
    recall_k: int | None = typer.Option(None, "--recall-k", min=1, max=MAX_RECALL_K),
    rerank: bool = typer.Option(True, "--rerank/--no-rerank"),
    redis_url: str | None = _REDIS,
    timeout: float = typer.Option(120.0, "--timeout", min=0.1, help="Seconds per chunk."),
    chunk_size: int = typer.Option(256, "--chunk-size", min=1, help="Requests in flight."),
    config: Path | None = _CONFIG,
) -> None:
    """Send every question of a file through the queue and write the replies as JSONL."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    items = read_questions(file)
    settings = load_settings(config, overrides={"redis_url": redis_url})
    failed = missing = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with _client(settings) as client, Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), transient=True) as progress:
        task = progress.add_task("asking", total=len(items))
        replies = _send(lambda: client.submit_many(
            [i["query"] for i in items], top_k=top_k, recall_k=recall_k, rerank=rerank,
            timeout_s=timeout, chunk_size=chunk_size,
            on_reply=lambda _i, _r: progress.advance(task)), settings.redis_url or "embedded")
    with out.open("w", encoding="utf-8") as fh:
        for item, reply in zip(items, replies):
            if reply is None:
                missing += 1
                reply = {"ok": False, "results": [], "error": {
                    "code": "timeout", "message": f"no reply within {timeout:g}s",
                    "retryable": True}}
            failed += not reply["ok"]
            fh.write(json.dumps({**item, **reply}, ensure_ascii=False) + "\n")
    typer.echo(f"{len(items) - failed} answered, {failed - missing} errors, {missing} timeouts "
               f"-> {out}")
    if missing:
        raise TwinqError(f"{missing} of {len(items)} questions got no reply within {timeout:g}s "
                         "(is a worker running?)")


def add_command(
    doc_id: str = typer.Option(..., "--id", help="The question's id ([A-Za-z0-9._:-], 1..128)."),
    text: str = typer.Option(..., "--text", help="The question's text."),
    metadata: str | None = typer.Option(None, "--metadata", help="A JSON object carried with "
                                        "the question (e.g. '{\"answer\": \"...\"}')."),
    redis_url: str | None = _REDIS,
    config: Path | None = _CONFIG,
) -> None:
    """Add (or replace) a stored question live; prints the update's stream id once Redis holds
    it. Every worker serves it within a second; the nightly build folds it in."""
    meta = None
    if metadata is not None:
        try:
            meta = json.loads(metadata)
        except ValueError as exc:
            raise BadInput(f"--metadata is not JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise BadInput(f"--metadata must be a JSON object, not {type(meta).__name__}")
    settings = load_settings(config, overrides={"redis_url": redis_url})
    with _client(settings) as client:
        entry_id = _send(lambda: client.add(doc_id, text, meta),
                         settings.redis_url or f"embedded, see {url_file()}")
    typer.echo(entry_id)


def delete_command(
    doc_id: str = typer.Argument(..., help="The id of the stored question to remove."),
    redis_url: str | None = _REDIS,
    config: Path | None = _CONFIG,
) -> None:
    """Remove a stored question live (an unknown id is harmless); prints the update's stream
    id once Redis holds it."""
    settings = load_settings(config, overrides={"redis_url": redis_url})
    with _client(settings) as client:
        entry_id = _send(lambda: client.delete(doc_id),
                         settings.redis_url or f"embedded, see {url_file()}")
    typer.echo(entry_id)
