"""Benchmark: one twinq worker fed through Redis against the naive retrieve-and-rerank loop.

(a) naive: what a user writes from the sentence-transformers "retrieve & re-rank" example: for
    each query, encode it, search FAISS, `CrossEncoder.predict` its top 20, one query at a time.
(b) worker: `twinq worker` in its own process, all queries submitted at once through Redis; it
    batches across requests (one embed, one search, one rerank call per batch).

Both use the same snapshot (>= 20,000 Quora questions), recall_k 50, rerank depth 20, rerank-only
order (fusion "none") so the results can be compared, and the same cross-encoder.

    .venv/bin/python benchmarks/bench_worker.py --queries 300 [--root R] [--reranker DIR] \
        [--backend onnx] [--naive-backend torch] [--baseline-rev REV]

With --baseline-rev, (c) runs the worker of an earlier commit (extracted with `git archive`)
in the same run, on the same snapshot and queries: a before/after of a change to the worker.

With --defaults, (b) is one worker process exactly as a user starts it: no backend, threads,
depth or fusion given, so it runs what the defaults say (the guarded int8 backend, adaptive
reranking and the reranker's own fusion from its training.json), and (a) reranks the top 20 in
torch fp32 and fuses the same way: "same top-1" then compares the defaults with full fp32
reranking (issue 24: >= 4x, same top-1 for >= 98% of queries).

Goals: b/a >= 1.5 in queries per second on one backend, with the same results (issue 3);
b/a >= 3 with the worker on int8 (--backend onnx) against the naive loop on torch fp32 (issue 7).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, machine, quora_questions

RECALL_K, DEPTH = 50, 20


def _snapshot(root: Path | None, rows: int, work: Path) -> Path:
    from twinq.shared.snapshot import current_version

    if root and current_version(root):
        return root
    from twinq.pipelines.index import BuildOptions, build_snapshot

    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                              for i, t in enumerate(quora_questions(rows))))
    root = work / "root"
    build_snapshot(BuildOptions(corpus=[str(corpus)], root=root, shards=4, publish=True))
    return root


def _random_head_reranker(work: Path) -> str:
    """A MiniLM cross-encoder from the bundled weights with an untrained head: the same cost as
    a trained one, for speed only."""
    from sentence_transformers import CrossEncoder

    from twinq.shared.models import bundled_model_path

    out = work / "ce-random"
    CrossEncoder(str(bundled_model_path()), num_labels=1, max_length=128).save(str(out))
    return str(out)


def naive_loop(root: Path, reranker: str, queries: list[str], backend: str,
               fusion: tuple[str, float] | None = None) -> tuple[list, list]:
    """One query at a time: encode, search, `predict` the top 20; with `fusion`, fuse as the
    worker does (recall scores and logits) before taking the top hit."""
    from twinq.shared.fusion import fuse
    from twinq.shared.models import load_bi_encoder, load_cross_encoder
    from twinq.shared.rerank import rerank, score_pairs
    from twinq.shared.search import search_shards
    from twinq.shared.snapshot import load_snapshot

    snapshot = load_snapshot(root)
    bi = load_bi_encoder(snapshot.manifest["model"]["name"], backend=backend)
    ce = load_cross_encoder(reranker, backend=backend)
    latencies, tops = [], []
    for query in queries:
        start = time.perf_counter()
        vector = bi.encode([query], normalize_embeddings=True)
        hits = search_shards(snapshot, np.asarray(vector), RECALL_K)[0]
        if fusion is None:
            hits = hits[:DEPTH]
            scores = score_pairs(ce, [(query, h.text) for h in hits])
            top = hits[int(np.argmax(scores))].id
        else:
            rerank([query], [hits], ce, depth=DEPTH)
            fuse(hits, *fusion)
            top = hits[0].id
        latencies.append(time.perf_counter() - start)
        tops.append(top)
    return latencies, tops


def _wait_for_consumers(url: str, settings: Any, processes: list[subprocess.Popen],
                        log_name: str) -> None:
    """Block until every worker has joined the group (models loaded), then warm each one up:
    the first batch of a process pays for lazy initialisation, which must not be timed."""
    import redis

    from twinq.worker.client import TwinqClient

    from twinq.shared.constants import HEARTBEAT_PREFIX

    # Readiness is each worker's heartbeat (state idle or busy, a snapshot served) on this
    # stream: an idle consumer may not be listed in XINFO CONSUMERS before its first entry.
    r = redis.Redis.from_url(url, decode_responses=True)
    for _ in range(1200):
        dead = [p for p in processes if p.poll() is not None]
        if dead:
            raise SystemExit(f"a worker exited with {dead[0].returncode}; see {log_name}")
        beats = [r.hgetall(key) for key in r.scan_iter(f"{HEARTBEAT_PREFIX}*")]
        ready = [b for b in beats if b.get("stream") == settings.stream
                 and b.get("state") in ("idle", "busy") and b.get("snapshot")]
        if len(ready) >= len(processes):
            break
        time.sleep(0.25)
    else:
        r.close()
        raise SystemExit(f"{len(processes)} workers did not all get ready within 300 s; "
                         f"see {log_name}")
    r.close()
    with TwinqClient(url, settings) as client:
        client.submit_many(["warm up"] * 8 * len(processes), timeout_s=120)


LAUNCH = ("import sys, typer; from {package}.cli import worker_command; app = typer.Typer(); "
          "app.command()(worker_command); typer.main.get_command(app)(args=sys.argv[1:])")
"""Runs the `worker` command of a tree directly: an old tree's `twinq` front door would find the
installed entry points, which name this tree's modules."""


def tree_worker(rev: str, work: Path) -> tuple[list[str], dict[str, str], Path]:
    """The command, environment and folder that run the worker of commit `rev`.

    Trees before the code moved under the `twinq` name import `worker.cli`; later ones get a
    folder with a `twinq` package whose subpackages link to the tree's folders.
    """
    tree = work / f"tree-{rev}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    if '"twinq.worker"' in (tree / "pyproject.toml").read_text():
        shim = work / f"path-{rev}" / "twinq"
        shim.mkdir(parents=True)
        (shim / "__init__.py").write_text("")
        for folder in ("shared", "worker", "pipelines"):
            (shim / folder).symlink_to(tree / folder)
        return ([sys.executable, "-c", LAUNCH.format(package="twinq.worker")],
                {"PYTHONPATH": str(shim.parent)}, tree)
    return [sys.executable, "-c", LAUNCH.format(package="worker")], {"PYTHONPATH": str(tree)}, tree


def worker_run(root: Path, reranker: str, queries: list[str], backend: str | None, url: str, *,
               workers: int = 1, threads: int | None = None,
               launch: tuple[list[str], dict[str, str], Path] | None = None,
               defaults: bool = False) -> tuple[list, list, float]:
    import redis

    from twinq.shared.config import load_settings

    tag = uuid.uuid4().hex[:8]
    command, extra_env, cwd = launch or ([sys.executable, "-m", "twinq.shared.cli", "worker"], {},
                                         REPO)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TWINQ_")}, **extra_env,
           "TWINQ_STREAM": f"bench:{tag}", "TWINQ_GROUP": f"bench-{tag}",
           "TWINQ_MAX_STREAM_LENGTH": str(len(queries) * 2)}
    if backend:
        env["TWINQ_BACKEND"] = backend
    if threads:
        env["TWINQ_THREADS"] = str(threads)
    settings = load_settings(env=env)
    log = open(Path(tempfile.gettempdir()) / f"bench-worker-{tag}.log", "w")
    processes = [subprocess.Popen([*command, "--root", str(root), "--reranker", reranker,
                                   "--redis-url", url], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=cwd)
                 for _ in range(workers)]
    try:
        _wait_for_consumers(url, settings, processes, log.name)
        r = redis.Redis.from_url(url, socket_timeout=None)
        sent: dict[str, float] = {}
        start = time.perf_counter()
        pipe = r.pipeline(transaction=False)
        for i, query in enumerate(queries):
            rid = f"{tag}-{i}"
            payload = {"id": rid, "query": query, "recall_k": RECALL_K, "top_k": 10}
            if not defaults:
                payload.update({"rerank_depth": DEPTH, "fusion": "none"})
            pipe.xadd(settings.stream, {"payload": json.dumps(payload)})
            sent[rid] = time.perf_counter()
        pipe.execute()
        latencies, tops = [], []
        for i in range(len(queries)):
            rid = f"{tag}-{i}"
            _, raw = r.blpop([settings.reply_prefix + rid], timeout=600)
            reply = json.loads(raw)
            latencies.append(time.perf_counter() - sent[rid])
            tops.append(reply["results"][0]["id"])
        total = time.perf_counter() - start
        r.close()
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=60)
        log.close()
    return latencies, tops, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--rows", type=int, default=20_000, help="Corpus size if --root is not given.")
    parser.add_argument("--root", type=Path, help="An existing snapshot root (>= 20k rows).")
    parser.add_argument("--reranker", help="Cross-encoder folder; default: MiniLM, untrained head.")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    parser.add_argument("--naive-backend", choices=["torch", "onnx"],
                        help="Backend of the naive loop (default: --backend). Issue 7's goal is "
                        "the worker with --backend onnx against the naive loop in torch fp32.")
    parser.add_argument("--workers", type=int, default=1, help="Worker processes for (b), each "
                        "with --threads threads: one process per core is how twinq scales.")
    parser.add_argument("--threads", type=int, help="TWINQ_THREADS per worker process.")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--baseline-rev", help="Also run the worker of this commit as (c), in "
                        "the same run: a before/after of a worker change.")
    parser.add_argument("--defaults", action="store_true", help="(b) is one worker with every "
                        "default (backend, threads, depth, adaptive reranking, fusion); (a) is "
                        "torch fp32 at depth 20 with the reranker's fusion (issue 24).")
    args = parser.parse_args()
    if args.defaults and (args.workers != 1 or args.threads or args.baseline_rev
                          or args.naive_backend not in (None, "torch")):
        parser.error("--defaults runs one worker with its defaults against the torch loop: "
                     "leave --workers, --threads, --naive-backend and --baseline-rev out")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="twinq-bench-worker-"))
    root = _snapshot(args.root.resolve() if args.root else None, args.rows, work)
    reranker = str(Path(args.reranker).resolve()) if args.reranker else _random_head_reranker(work)
    queries = quora_questions(args.queries, offset=60_000)

    naive_backend = "torch" if args.defaults else args.naive_backend or args.backend
    fusion = None
    if args.defaults:
        from twinq.shared.rerank_config import load_rerank_config

        fusion = load_rerank_config(reranker).resolve_fusion()
    lat_a, top_a = naive_loop(root, reranker, queries, naive_backend, fusion)
    lat_b, top_b, total_b = worker_run(root, reranker, queries,
                                       None if args.defaults else args.backend, args.redis_url,
                                       workers=args.workers, threads=args.threads,
                                       defaults=args.defaults)
    qps_a, qps_b = len(queries) / sum(lat_a), len(queries) / total_b
    same = sum(a == b for a, b in zip(top_a, top_b)) / len(queries)
    if args.baseline_rev:
        lat_c, top_c, total_c = worker_run(root, reranker, queries, args.backend, args.redis_url,
                                           workers=args.workers, threads=args.threads,
                                           launch=tree_worker(args.baseline_rev, work))
        qps_c = len(queries) / total_c

    def pct(values: list[float], p: int) -> float:
        return float(np.percentile(values, p) * 1000)

    worker_backend = "defaults (auto)" if args.defaults else args.backend
    print(f"machine: {machine()}; snapshot {root}; {len(queries)} queries; backend: naive "
          f"{naive_backend}, worker {worker_backend}; {args.workers} worker process(es), threads "
          f"{args.threads or 'default'} each; fusion {fusion or 'none (rerank order)'}")
    print("| path | queries/s | p50 ms | p95 ms |\n|---|---:|---:|---:|")
    print(f"| (a) naive loop, one query at a time | {qps_a:.1f} | {pct(lat_a, 50):.0f} | {pct(lat_a, 95):.0f} |")
    print(f"| (b) {args.workers} worker(s) through Redis, burst | {qps_b:.1f} | {pct(lat_b, 50):.0f} | {pct(lat_b, 95):.0f} |")
    print(f"ratio b/a: {qps_b / qps_a:.2f} (goals: >= 1.5 on one backend, issue 3; >= 3 for "
          f"worker onnx over naive torch, issue 7; >= 4 with --defaults, issue 24); same top-1 "
          f"result: {same:.1%}")
    if args.baseline_rev:
        print(f"| (c) the same at {args.baseline_rev}, burst | {qps_c:.1f} | {pct(lat_c, 50):.0f} "
              f"| {pct(lat_c, 95):.0f} |")
        print(f"ratio b/c (this tree over {args.baseline_rev}): {qps_b / qps_c:.2f}; same top-1 "
              f"result as (c): {sum(b == c for b, c in zip(top_b, top_c)) / len(queries):.1%}")
    print("(b)'s latency includes queueing: every query was submitted at once.")


if __name__ == "__main__":
    main()
