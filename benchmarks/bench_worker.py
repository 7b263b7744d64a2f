"""Benchmark: one twinq worker fed through Redis against the naive retrieve-and-rerank loop.

(a) naive: what a user writes from the sentence-transformers "retrieve & re-rank" example: for
    each query, encode it, search FAISS, `CrossEncoder.predict` its top 20, one query at a time.
(b) worker: `twinq worker` in its own process, all queries submitted at once through Redis; it
    batches across requests (one embed, one search, one rerank call per batch).

Both use the same snapshot (>= 20,000 Quora questions), recall_k 50, rerank depth 20, rerank-only
order (fusion "none") so the results can be compared, and the same cross-encoder.

    .venv/bin/python benchmarks/bench_worker.py --queries 300 [--root R] [--reranker DIR] \
        [--backend onnx] [--naive-backend torch]

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


def naive_loop(root: Path, reranker: str, queries: list[str], backend: str) -> tuple[list, list]:
    from twinq.shared.models import load_bi_encoder, load_cross_encoder
    from twinq.shared.rerank import score_pairs
    from twinq.shared.search import search_shards
    from twinq.shared.snapshot import load_snapshot

    snapshot = load_snapshot(root)
    bi = load_bi_encoder(snapshot.manifest["model"]["name"], backend=backend)
    ce = load_cross_encoder(reranker, backend=backend)
    latencies, tops = [], []
    for query in queries:
        start = time.perf_counter()
        vector = bi.encode([query], normalize_embeddings=True)
        hits = search_shards(snapshot, np.asarray(vector), RECALL_K)[0][:DEPTH]
        scores = score_pairs(ce, [(query, h.text) for h in hits])
        latencies.append(time.perf_counter() - start)
        tops.append(hits[int(np.argmax(scores))].id)
    return latencies, tops


def _wait_for_consumers(url: str, settings: Any, processes: list[subprocess.Popen],
                        log_name: str) -> None:
    """Block until every worker has joined the group (models loaded), then warm each one up:
    the first batch of a process pays for lazy initialisation, which must not be timed."""
    import redis

    from twinq.worker.client import TwinqClient

    r = redis.Redis.from_url(url)
    for _ in range(1200):
        dead = [p for p in processes if p.poll() is not None]
        if dead:
            raise SystemExit(f"a worker exited with {dead[0].returncode}; see {log_name}")
        try:
            if len(r.xinfo_consumers(settings.stream, settings.group)) >= len(processes):
                break
        except redis.ResponseError:  # the group does not exist yet
            pass
        time.sleep(0.25)
    else:
        r.close()
        raise SystemExit(f"{len(processes)} workers did not all join the group within 300 s; "
                         f"see {log_name}")
    r.close()
    with TwinqClient(url, settings) as client:
        client.submit_many(["warm up"] * 8 * len(processes), timeout_s=120)


def worker_run(root: Path, reranker: str, queries: list[str], backend: str, url: str, *,
               workers: int = 1, threads: int | None = None) -> tuple[list, list, float]:
    import redis

    from twinq.shared.config import load_settings

    tag = uuid.uuid4().hex[:8]
    env = {**os.environ, "TWINQ_STREAM": f"bench:{tag}", "TWINQ_GROUP": f"bench-{tag}",
           "TWINQ_BACKEND": backend, "TWINQ_MAX_STREAM_LENGTH": str(len(queries) * 2)}
    if threads:
        env["TWINQ_THREADS"] = str(threads)
    settings = load_settings(env=env)
    log = open(Path(tempfile.gettempdir()) / f"bench-worker-{tag}.log", "w")
    processes = [subprocess.Popen([sys.executable, "-m", "twinq.shared.cli", "worker", "--root", str(root),
                                   "--reranker", reranker, "--redis-url", url], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
                 for _ in range(workers)]
    try:
        _wait_for_consumers(url, settings, processes, log.name)
        r = redis.Redis.from_url(url, socket_timeout=None)
        sent: dict[str, float] = {}
        start = time.perf_counter()
        pipe = r.pipeline(transaction=False)
        for i, query in enumerate(queries):
            rid = f"{tag}-{i}"
            payload = {"id": rid, "query": query, "recall_k": RECALL_K, "rerank_depth": DEPTH,
                       "top_k": 10, "fusion": "none"}
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
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="twinq-bench-worker-"))
    root = _snapshot(args.root.resolve() if args.root else None, args.rows, work)
    reranker = str(Path(args.reranker).resolve()) if args.reranker else _random_head_reranker(work)
    queries = quora_questions(args.queries, offset=60_000)

    naive_backend = args.naive_backend or args.backend
    lat_a, top_a = naive_loop(root, reranker, queries, naive_backend)
    lat_b, top_b, total_b = worker_run(root, reranker, queries, args.backend, args.redis_url,
                                       workers=args.workers, threads=args.threads)
    qps_a, qps_b = len(queries) / sum(lat_a), len(queries) / total_b
    same = sum(a == b for a, b in zip(top_a, top_b)) / len(queries)

    def pct(values: list[float], p: int) -> float:
        return float(np.percentile(values, p) * 1000)

    print(f"machine: {machine()}; snapshot {root}; {len(queries)} queries; backend: naive "
          f"{naive_backend}, worker {args.backend}; {args.workers} worker process(es), threads "
          f"{args.threads or 'default'} each")
    print("| path | queries/s | p50 ms | p95 ms |\n|---|---:|---:|---:|")
    print(f"| (a) naive loop, one query at a time | {qps_a:.1f} | {pct(lat_a, 50):.0f} | {pct(lat_a, 95):.0f} |")
    print(f"| (b) {args.workers} worker(s) through Redis, burst | {qps_b:.1f} | {pct(lat_b, 50):.0f} | {pct(lat_b, 95):.0f} |")
    print(f"ratio b/a: {qps_b / qps_a:.2f} (goals: >= 1.5 on one backend, issue 3; >= 3 for "
          f"worker onnx over naive torch, issue 7); same top-1 result: {same:.1%}")
    print("(b)'s latency includes queueing: every query was submitted at once.")


if __name__ == "__main__":
    main()
