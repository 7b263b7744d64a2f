"""Live updates (#22): how fast an acknowledged update reaches every worker, and what a live
delta of 10,000 rows costs a query.

Part A, visibility: two workers (two consumer threads in this process, each with its own engine
and live delta, sharing one bi-encoder object; threads rather than processes to fit 2 cores)
serve a snapshot on a real Redis; a sender calls `TwinqClient.add` at `--rate` updates/s for
`--seconds`. Visibility latency of an update = from `add` returning (XADD acknowledged) to the
moment the *last* of the two workers has applied it (its delta holds the row, so the next batch
it answers searches it), observed by polling both workers every millisecond. Reported p50/p99.

Part B, query cost: one engine answers the same queries (`answer_batch`, one query per batch,
no reranker) with an empty delta and with `--live-rows` live rows, alternating the two in
rounds in the same run; reported as p50 ratio (with / without).

    .venv/bin/python benchmarks/bench_live_updates.py            # writes runs/bench-live-updates.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]


def texts_for(n: int, offset: int = 0) -> list[str]:
    """Real Quora questions when the reference data is there, else synthetic ones."""
    try:
        from common import quora_questions

        found = quora_questions(n, offset=offset)
        if len(found) >= n:
            return found[:n]
    except (Exception, SystemExit):  # no reference data: synthetic questions
        pass
    rng = random.Random(offset)
    words = ("account password refund order invoice card delivery email plan upgrade cancel "
             "address payment login export data phone support parcel discount").split()
    return [f"how do I {rng.choice(words)} my {rng.choice(words)} {rng.choice(words)} {i + offset}"
            for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def part_a(root: Path, model, args) -> dict:
    from tests.worker.conftest import running_worker
    from twinq.shared.config import load_settings
    from twinq.shared.protocol import updates_stream
    from twinq.worker.client import TwinqClient

    tag = uuid.uuid4().hex[:8]
    settings = load_settings(env={}, overrides={
        "root": str(root), "redis_url": args.redis_url, "stream": f"twinq:bench:{tag}:queries",
        "group": f"bench-{tag}", "dead_stream": f"twinq:bench:{tag}:dead", "block_ms": 20})
    texts = texts_for(int(args.rate * args.seconds), offset=args.rows)
    seen: dict[str, list[float | None]] = {}
    acked: dict[str, float] = {}
    with running_worker(settings, bi_encoder=model, worker_id=f"bench-a-{tag}") as w1, \
            running_worker(settings, bi_encoder=model, worker_id=f"bench-b-{tag}") as w2, \
            TwinqClient(settings=settings) as client:
        workers = (w1, w2)
        while any(w.engine.live is None for w in workers):
            time.sleep(0.01)
        done = threading.Event()

        waiting: list[str] = []  # ids not yet applied by both workers (the watcher's own list)

        def watch() -> None:
            while not done.is_set():
                now = time.perf_counter()
                for doc_id in list(waiting):
                    times = seen[doc_id]
                    for i, w in enumerate(workers):
                        if times[i] is None and w.engine.live.visible(doc_id):
                            times[i] = now
                    if None not in times:
                        waiting.remove(doc_id)
                time.sleep(0.001)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        start = time.perf_counter()
        for n, text in enumerate(texts):
            due = start + n / args.rate
            time.sleep(max(0.0, due - time.perf_counter()))
            doc_id = f"live-{n}"
            seen[doc_id] = [None, None]
            client.add(doc_id, text)
            acked[doc_id] = time.perf_counter()
            waiting.append(doc_id)
        sent_s = time.perf_counter() - start
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline and any(None in t for t in seen.values()):
            time.sleep(0.01)
        done.set()
        watcher.join()
    with TwinqClient(settings=settings) as client:  # the workers have left: clean up
        client.queue.client.delete(updates_stream(settings), settings.stream,
                                   settings.dead_stream)
    latencies = [max(t) - acked[d] for d, t in seen.items() if None not in t]
    lost = sum(1 for t in seen.values() if None in t)
    return {"updates": len(texts), "rate_target": args.rate, "rate_sent": len(texts) / sent_s,
            "not_visible_within_10s": lost, "visibility_p50_ms": percentile(latencies, 0.5) * 1000,
            "visibility_p99_ms": percentile(latencies, 0.99) * 1000,
            "visibility_max_ms": max(latencies) * 1000,
            "definition": "XADD acknowledged -> applied by the last of two workers"}


def part_b(root: Path, model, args) -> dict:
    from twinq.shared.config import load_settings
    from twinq.shared.models import encode_normalised
    from twinq.shared.protocol import QueryRequest, Update
    from twinq.worker.engine import Engine
    from twinq.worker.live import LiveIndex, snapshot_ids, snapshot_watermark

    settings = load_settings(env={}, overrides={"root": str(root)})
    engine = Engine(settings, bi_encoder=model)
    engine.start(watch=False)
    served = engine.holder.served
    empty = engine.live
    live = LiveIndex(empty.dim, snapshot_watermark(served.snapshot.manifest),
                     snapshot_ids(served.snapshot))
    texts = texts_for(args.live_rows, offset=args.rows + 2000)
    start = time.perf_counter()
    for i in range(0, len(texts), 1000):
        chunk = [(f"{i + j + 1}-0", Update("upsert", f"live-{i + j}", t))
                 for j, t in enumerate(texts[i:i + 1000])]
        live.apply(chunk, lambda batch: encode_normalised(model, batch, 256))
    embed_s = time.perf_counter() - start
    queries = texts_for(args.queries, offset=args.rows + 2000 + args.live_rows)
    requests = [QueryRequest(id=f"b{i}", query=q, top_k=10, recall_k=50, rerank=False,
                             reply_to="twinq:reply:x") for i, q in enumerate(queries)]
    timings: dict[str, list[float]] = {"none": [], "live": []}
    pairs: list[tuple[float, float]] = []
    for round_ in range(args.rounds):  # each query without and with, in alternating order,
        for n, request in enumerate(requests):  # so both see the same machine load
            took = {}
            order = (("none", empty), ("live", live))
            for name, delta in order if (n + round_) % 2 == 0 else order[::-1]:
                engine._live = delta
                t0 = time.perf_counter()
                engine.answer_batch([request])
                took[name] = time.perf_counter() - t0
                timings[name].append(took[name])
            pairs.append((took["none"], took["live"]))
    engine._live = live
    sample = engine.answer_batch([requests[0]])[0]
    engine.stop()
    p50 = {k: statistics.median(v) * 1000 for k, v in timings.items()}
    return {"live_rows": live.rows, "snapshot_rows": served.snapshot.rows,
            "queries_per_phase": len(timings["none"]), "embed_live_rows_s": embed_s,
            "p50_ms_none": p50["none"], "p50_ms_live": p50["live"],
            "p90_ms_none": percentile(timings["none"], 0.9) * 1000,
            "p90_ms_live": percentile(timings["live"], 0.9) * 1000,
            "ratio_p50": p50["live"] / p50["none"],
            "ratio_median_of_paired": statistics.median(b / a for a, b in pairs),
            "sources_in_a_reply": sorted({r["source"] for r in sample["results"]})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5000, help="snapshot rows")
    parser.add_argument("--live-rows", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=50.0, help="updates per second (part A)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--queries", type=int, default=100, help="queries per round (part B)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--model", default=None, help="bi-encoder (default: bundled MiniLM)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-live-updates.json"))
    args = parser.parse_args()

    from tests.conftest import write_quick_snapshot
    from twinq.shared.models import load_bi_encoder, resolve_model, set_threads

    set_threads(args.threads)
    model = load_bi_encoder(args.model)
    name = resolve_model(args.model)[1]
    with tempfile.TemporaryDirectory(prefix="twinq-bench-live-") as tmp:
        root = Path(tmp) / "root"
        t0 = time.perf_counter()
        write_quick_snapshot(root, texts_for(args.rows), model, model_name=name, shards=2)
        print(f"snapshot of {args.rows} rows written in {time.perf_counter() - t0:.1f}s", flush=True)
        a = part_a(root, model, args)
        print(json.dumps(a, indent=1), flush=True)
        b = part_b(root, model, args)
        print(json.dumps(b, indent=1), flush=True)
    from common import machine

    result = {"model": name, "machine": machine(), "args": vars(args), "visibility": a,
              "query_cost": b}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"visibility p50 {a['visibility_p50_ms']:.0f} ms, p99 {a['visibility_p99_ms']:.0f} ms "
          f"(goal p99 <= 1000 ms) at {a['rate_sent']:.1f} updates/s, two workers; query p50 "
          f"{b['p50_ms_none']:.1f} ms without, {b['p50_ms_live']:.1f} ms with {b['live_rows']:,} "
          f"live rows: ratio {b['ratio_p50']:.3f}, paired median {b['ratio_median_of_paired']:.3f} (goal <= 1.10) -> {args.out}")


if __name__ == "__main__":
    main()
