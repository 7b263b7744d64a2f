"""Benchmark: Redis server CPU per twinq request, to size how many workers one Redis serves.

Drives the real queue protocol (`twinq.shared.queue.RedisQueue`, the only module that calls
Redis) with no model in the loop: per request, an asker's XADD (`send`) and BLPOP
(`wait_reply`); per batch of `--batch` requests (the worker's default `batch_size`), a worker's
XREADGROUP (`read`), done-marker GETs (`markers`), the reply script (`reply`: one EVALSHA per
request, SET + RPUSH + EXPIRE inside) and XACK + XDEL (`ack`); and the worker's heartbeat
(`beat` + `depth`) once a second. Replies are real `ok_reply` objects with `--top-k` hits of
Quora-length text. The query cache is off (its default), so it sends no commands.

It reads the server's `INFO` before and after: CPU seconds (used_cpu_user + used_cpu_sys, the
server's main thread does all command work), commands processed, and `used_memory` (what stays
after a request is answered: its done marker, kept `DONE_TTL_S`), per request. Redis executes
commands on one core, so 1 / (server CPU seconds per request) is the request rate one Redis
process can sustain with its core saturated; the wall rate here is only this single Python
client's round trips.

By default it starts a private `redis-server` (from PATH) on a free local port, persistence off,
and stops it afterwards; `--appendonly` turns on AOF with fsync every second. `--redis-url` uses
an existing server instead: its keys get a unique prefix and are deleted afterwards (done
markers, which have a fixed prefix, are deleted by name); the CPU there includes other clients.

    .venv/bin/python benchmarks/bench_redis_queue.py --requests 20000
    .venv/bin/python benchmarks/bench_redis_queue.py --requests 20000 --appendonly
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import REPO, machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(appendonly: bool) -> tuple[subprocess.Popen, str, Path]:
    folder = Path(tempfile.mkdtemp(prefix="twinq-bench-redis-"))
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
         "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0", folder


def server_numbers(client: Any) -> dict[str, float]:
    cpu, stats = client.info("cpu"), client.info("stats")
    return {"cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            "commands": float(stats["total_commands_processed"]),
            "used_memory": float(client.info("memory")["used_memory"])}


def command_counts(client: Any) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(v["calls"])
            for name, v in client.info("commandstats").items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=None, help="Worker batch (default: the "
                        "worker's batch_size setting).")
    parser.add_argument("--top-k", type=int, default=10, help="Hits per reply.")
    parser.add_argument("--appendonly", action="store_true", help="AOF on, fsync every second.")
    parser.add_argument("--redis-url", help="Use this server (unique key prefix, cleaned up).")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_redis_queue.json")
    args = parser.parse_args()

    from twinq.shared import constants as C
    from twinq.shared.config import load_settings
    from twinq.shared.protocol import encode_request, models_info, ok_reply, parse_request
    from twinq.shared.queue import Outgoing, RedisQueue
    from twinq.shared.search import Hit

    from common import quora_questions

    proc = folder = None
    if args.redis_url:
        url = args.redis_url
    else:
        proc, url, folder = start_server(args.appendonly)
    prefix = f"benchq-{uuid.uuid4().hex[:8]}"
    settings = load_settings(env={}, overrides={
        "stream": f"{prefix}:queries", "dead_stream": f"{prefix}:dead", "group": f"{prefix}-g",
        "reply_prefix": f"{prefix}:reply:", **({"batch_size": args.batch} if args.batch else {})})
    batch = settings.batch_size
    queue = RedisQueue.for_worker(settings, url)
    try:
        texts = quora_questions(args.requests + args.top_k)
    except SystemExit:
        texts = [f"How do I reset my password on device number {i}?" for i in
                 range(args.requests + args.top_k)]
    hits = [Hit(id=f"q{i}", text=t, recall_score=0.8, ids=[f"q{i}"], rerank_score=1.5, score=0.9)
            for i, t in enumerate(texts[: args.top_k])]
    models = models_info("all-MiniLM-L6-v2", "reranker", "onnx")
    worker = f"{prefix}-w1"
    queue.ensure_group()
    ids: list[str] = []
    reply_bytes = request_bytes = 0
    before, counts0 = server_numbers(queue.client), command_counts(queue.client)
    start = last_beat = time.perf_counter()
    for lo in range(0, args.requests, batch):
        chunk = texts[args.top_k + lo: args.top_k + min(lo + batch, args.requests)]
        sent = []
        for j, text in enumerate(chunk):  # each asker sends its own request: one XADD each
            request_id = f"{prefix}-{lo + j}"
            ids.append(request_id)
            fields = encode_request({"id": request_id, "query": text})
            request_bytes += sum(len(v) for v in fields.values())
            queue.send(fields)
            sent.append(request_id)
        if time.perf_counter() - last_beat >= 1.0:  # the worker's heartbeat
            queue.beat(worker, {"state": "busy", "snapshot": "v", "pid": os.getpid()})
            queue.depth()
            last_beat = time.perf_counter()
        entries = queue.read(worker, batch, 20)
        requests = [parse_request(e.fields, settings) for e in entries]
        queue.markers([r.id for r in requests])
        out = []
        for r in requests:
            reply = ok_reply(r, hits, snapshot="20260101T000000Z", models=models,
                             timings_ms={"embed": 3.0, "search": 1.0, "rerank": 40.0},
                             worker_id=worker)
            out.append(Outgoing(r.id, r.reply_to, reply, r.digest()))
        queue.reply(out, worker)
        queue.ack([e.entry_id for e in entries])
        for r in requests:  # each asker pops its own reply: one BLPOP each
            raw = queue.wait_reply(r.reply_to, 5)
            if raw is None:
                raise SystemExit(f"no reply for {r.id}")
            reply_bytes += len(raw)
    wall = time.perf_counter() - start
    after, counts1 = server_numbers(queue.client), command_counts(queue.client)
    n = len(ids)
    per_request = {k: (counts1.get(k, 0) - counts0.get(k, 0)) / n for k in counts1
                   if counts1.get(k, 0) != counts0.get(k, 0) and k not in ("info",)}
    cpu = after["cpu_s"] - before["cpu_s"]
    info = queue.client.info("server")
    report = {
        "machine": machine(), "redis_version": info["redis_version"],
        "server": "external " + url.split("@")[-1] if args.redis_url else "private redis-server",
        "appendonly": args.appendonly, "requests": n, "batch": batch, "top_k": args.top_k,
        "mean_request_bytes": request_bytes / n, "mean_reply_bytes": reply_bytes / n,
        "wall_s": wall, "client_requests_per_s": n / wall,
        "server_cpu_s": cpu, "server_cpu_us_per_request": cpu / n * 1e6,
        "requests_per_server_cpu_s": n / cpu if cpu else None,
        "commands_per_request": (after["commands"] - before["commands"]) / n,
        "commands_by_name_per_request": per_request,
        "retained_bytes_per_request": (after["used_memory"] - before["used_memory"]) / n,
    }
    # Clean up every key this run wrote.
    client = queue.client
    client.delete(settings.stream, settings.dead_stream, C.HEARTBEAT_PREFIX + worker)
    for lo in range(0, n, 1000):
        client.delete(*[C.DONE_PREFIX + i for i in ids[lo: lo + 1000]],
                      *[settings.reply_prefix + i for i in ids[lo: lo + 1000]])
    queue.close()
    if proc is not None:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"machine: {report['machine']}; Redis {report['redis_version']} ({report['server']}, "
          f"AOF {'everysec' if args.appendonly else 'off'}); {n:,} requests, batch {batch}, "
          f"requests of {report['mean_request_bytes']:,.0f} bytes, replies of {args.top_k} hits "
          f"({report['mean_reply_bytes']:,.0f} bytes)")
    print(f"server CPU: {report['server_cpu_us_per_request']:.1f} us per request -> "
          f"{report['requests_per_server_cpu_s']:,.0f} requests per server CPU-second; "
          f"{report['commands_per_request']:.2f} commands per request "
          f"({', '.join(f'{k} {v:.2f}' for k, v in sorted(per_request.items()))})")
    print(f"memory left in Redis per answered request (done markers, {C.DONE_TTL_S} s TTL): "
          f"{report['retained_bytes_per_request']:,.0f} bytes")
    print(f"this one client's wall rate: {report['client_requests_per_s']:,.0f} requests/s")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
