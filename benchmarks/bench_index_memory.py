"""Benchmark: memory per vector of every FAISS index type twinq chooses, and Parquet bytes per row.

For each rung of `choose_index_key`'s ladder at `--rows` vectors (plus Flat, which the ladder
picks only below 20,000 vectors), over random unit vectors of dimension 384 (all-MiniLM-L6-v2):

- build it with `twinq.shared.index_choice.build_index`, exactly as a shard build does (same
  factory key, training sample and seed), in a fresh subprocess with `--threads` FAISS threads:
  build wall and CPU seconds (and the training's wall seconds), and the written file's size;
- load the file in another fresh subprocess per index type and load mode, reading VmRSS, RssAnon
  and RssFile from /proc/self/status before and after `faiss.read_index`, and again after one
  search of `--queries` queries with the manifest's search parameters applied. Two load modes:
  `plain` (flags 0: the whole index in private memory) and `twinq` (IO_FLAG_MMAP |
  IO_FLAG_READ_ONLY, what `twinq.shared.snapshot.load_snapshot` uses for serving: FAISS then
  maps IVF inverted lists from the file, so they are page cache shared by every process on the
  host; Flat and HNSW storage is still read into private memory).

Then one snapshot shard's Parquet file (the snapshot schema: id, ids, text, text_key, metadata,
384-float32 embedding), written by the build's own `write_shard_records`, for `--parquet-rows`
real Quora questions from TWINQ_DATA (default ../shared/data; synthetic sentences when absent,
and the output says which) with random unit vectors as embeddings: bytes per row on disk, per
column, and the RSS a worker adds when it opens the served columns as `load_snapshot` does.

    .venv/bin/python benchmarks/bench_index_memory.py                       # 1M vectors, ~20 min
    .venv/bin/python benchmarks/bench_index_memory.py --rows 100000 --rows-for HNSW=50000

Writes a table to stdout and JSON to `--out` (default runs/bench_index_memory.json). Large
files go to `--work` (default runs/bench-index-memory/) and are deleted unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import DATA, REPO, machine

DIM = 384
MODEL_NAME = "all-MiniLM-L6-v2"
TWINQ_FLAGS = "IO_FLAG_MMAP|IO_FLAG_READ_ONLY"


# --- helpers that run in the child processes ------------------------------------------------

def proc_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[name] = int(value.split()[0]) * 1024
    return out


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in ("VmRSS", "RssAnon", "RssFile")}


def child_build(args: argparse.Namespace) -> dict[str, Any]:
    """Build one index over the first `args.n` vectors as `build_index` does; write it."""
    import faiss
    import numpy as np

    from twinq.shared.index_choice import build_index, train_size

    faiss.omp_set_num_threads(args.threads)
    vectors = np.array(np.load(args.vectors, mmap_mode="r")[: args.n], dtype=np.float32)
    # Time training apart from adding: wrap `train` on the class `index_factory` returns for this
    # key, then call the real `build_index` (no copy of its logic here).
    timing: dict[str, float] = {}
    cls = type(faiss.index_factory(vectors.shape[1], args.key, faiss.METRIC_INNER_PRODUCT))
    original = cls.train

    def timed_train(self: Any, x: Any) -> Any:
        start = time.perf_counter()
        result = original(self, x)
        timing["train_s"] = time.perf_counter() - start
        return result

    cls.train = timed_train
    before = proc_status()
    cpu0, start = time.process_time(), time.perf_counter()
    index = build_index(vectors, args.key)
    build_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu0
    start = time.perf_counter()
    faiss.write_index(index, args.path)
    write_s = time.perf_counter() - start
    return {"n": int(index.ntotal), "build_s": build_s, "build_cpu_s": cpu_s,
            "train_s": timing.get("train_s", 0.0), "train_points": train_size(args.key, args.n),
            "write_s": write_s, "file_bytes": os.path.getsize(args.path),
            "rss_growth_while_building": _diff(proc_status(), before)}


def child_load(args: argparse.Namespace) -> dict[str, Any]:
    """Load one index file (plain or twinq's mmap flags); RSS before and after loading, and
    after one search."""
    import faiss
    import numpy as np

    from twinq.shared.index_choice import apply_search_params

    faiss.omp_set_num_threads(args.threads)
    queries = np.array(np.load(args.vectors, mmap_mode="r")[: args.queries], dtype=np.float32)
    flags = 0 if args.mode == "plain" else faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    before = proc_status()
    start = time.perf_counter()
    index = faiss.read_index(args.path, flags)
    load_s = time.perf_counter() - start
    loaded = proc_status()
    apply_search_params(index, args.params)
    start = time.perf_counter()
    index.search(queries, 50)
    search_s = time.perf_counter() - start
    searched = proc_status()
    return {"mode": args.mode, "n": int(index.ntotal), "load_s": load_s, "search_s": search_s,
            "queries": len(queries), "before": before, "after_load": loaded,
            "after_search": searched, "load_growth": _diff(loaded, before),
            "search_growth": _diff(searched, before)}


def child_parquet_load(args: argparse.Namespace) -> dict[str, Any]:
    """RSS added by opening a shard's served columns as `load_snapshot` does."""
    import pyarrow.parquet as pq

    from twinq.shared.snapshot import SERVE_COLUMNS

    # Warm up Arrow's memory pool and thread pool on a shard a quarter the size first, so that
    # their fixed cost (tens of MiB) is not counted as per-row memory.
    warm = pq.read_table(args.key, columns=SERVE_COLUMNS, memory_map=True)
    warm.validate(full=True)
    before = proc_status()
    table = pq.read_table(args.path, columns=SERVE_COLUMNS, memory_map=True)
    table.validate(full=True)
    after = proc_status()
    return {"rows": table.num_rows, "columns": SERVE_COLUMNS, "table_nbytes": table.nbytes,
            "load_growth": _diff(after, before)}


# --- the parent ------------------------------------------------------------------------------

def run_child(*argv: str) -> dict[str, Any]:
    """Run this script in a fresh interpreter in child mode; return its JSON (last stdout line)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child {argv[:2]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_vectors(path: Path, n: int, dim: int, seed: int) -> float:
    """N random unit vectors (seeded), written in chunks so the parent never holds them all."""
    import numpy as np

    if path.exists():
        existing = np.load(path, mmap_mode="r")
        if existing.shape == (n, dim):
            return 0.0
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(str(path) + ".part", mode="w+", dtype=np.float32,
                                    shape=(n, dim))
    for lo in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - lo), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[lo: lo + len(block)] = block
    out.flush()
    del out
    os.replace(str(path) + ".part", path)
    return time.perf_counter() - start


def ladder(rows: int, dim: int) -> list[tuple[str, str, str]]:
    """(key, search params, why) for every rung `choose_index_key` offers at `rows`, plus Flat."""
    from twinq.shared.index_choice import FLAT_THRESHOLD, choose_index_key

    rungs = [("Flat", "", f"exact; chosen only below {FLAT_THRESHOLD:,} vectors "
                          "(shown for reference)")]
    for choice in choose_index_key(rows, dim, 1 << 50):  # unlimited budget: every rung
        if choice.key != "Flat":
            rungs.append((choice.key, choice.search_params, choice.reason))
    return rungs


def sample_texts(n: int) -> tuple[list[str], str]:
    """n distinct Quora questions from TWINQ_DATA, else synthetic question-like sentences."""
    from common import quora_questions

    try:
        return quora_questions(n), f"Quora questions from {DATA}/quora/duplicate-pairs"
    except SystemExit:
        import random

        rng = random.Random(0)
        starts = ["How do I", "What is the best way to", "Why can't I", "Is it possible to",
                  "How can I", "What happens if I", "Where can I", "When should I"]
        verbs = ["reset", "change", "cancel", "recover", "update", "delete", "share", "download",
                 "transfer", "verify", "unlock", "export"]
        things = ["my password", "my account", "an order", "the invoice", "two-factor login",
                  "my email address", "a refund", "the mobile app", "my subscription",
                  "a shared folder", "my phone number", "payment details"]
        tails = ["", " on Android", " without losing data", " after it expired", " from abroad",
                 " for my whole team", " in the new version", " if I forgot it"]
        texts = {f"{rng.choice(starts)} {rng.choice(verbs)} {rng.choice(things)}"
                 f"{rng.choice(tails)}? ({i})" for i in range(n)}
        return sorted(texts)[:n], "synthetic question-like sentences (no Quora data found)"


def parquet_shard(rows: int, work: Path, seed: int) -> dict[str, Any]:
    """Write one shard with the build's writer; bytes per row on disk, per column, and loaded."""
    import numpy as np
    import pyarrow.parquet as pq

    from twinq.pipelines.index_transforms import write_shard_records
    from twinq.shared.text import normalize_text, text_key

    texts, source = sample_texts(rows)
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((len(texts), DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = []
    for i, (text, vector) in enumerate(zip(texts, vectors)):
        clean = normalize_text(text)
        records.append({"id": f"q{i:08d}", "ids": [f"q{i:08d}"], "text": clean,
                        "text_key": text_key(clean, MODEL_NAME), "metadata": "{}",
                        "embedding": vector.astype("<f4").tobytes()})
    folder = work / "parquet-shard"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "warm").mkdir(parents=True)
    warm = write_shard_records(folder / "warm", 0, records[: len(records) // 4], "Flat", 1 << 40)
    entry = write_shard_records(folder, 0, records, "Flat", 1 << 40)
    data = folder / entry["data_file"]
    meta = pq.ParquetFile(data).metadata
    per_column: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            col = group.column(c)
            name = col.path_in_schema.split(".")[0]
            per_column[name] = per_column.get(name, 0) + col.total_compressed_size
    loaded = run_child("_parquet_load", "--path", str(data), "--key",
                       str(folder / "warm" / warm["data_file"]))
    n = entry["rows"]
    result = {
        "rows": n, "texts": source, "mean_text_chars": sum(len(r["text"]) for r in records) / n,
        "metadata": "'{}' (the Quora corpus has no columns besides id and text)",
        "embeddings": "random unit float32 vectors (incompressible, like real embeddings)",
        "compression": "zstd (twinq.shared.snapshot.write_shard)",
        "file_bytes": data.stat().st_size, "bytes_per_row": data.stat().st_size / n,
        "column_bytes_per_row": {k: v / n for k, v in per_column.items()},
        "served_columns_loaded": loaded,
        "served_bytes_per_row_rss": loaded["load_growth"]["VmRSS"] / n,
        "served_bytes_per_row_arrow": loaded["table_nbytes"] / n,
    }
    shutil.rmtree(folder, ignore_errors=True)
    return result


def parse_rows_for(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        prefix, _, n = item.partition("=")
        out[prefix] = int(n.replace("_", "").replace(",", ""))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="Vectors per index.")
    parser.add_argument("--rows-for", action="append", default=[], metavar="PREFIX=N",
                        help="Build the index types whose key starts with PREFIX at N vectors "
                             "instead (e.g. HNSW=300000, when a full-size build is too slow).")
    parser.add_argument("--keys", nargs="*", help="Only these key prefixes (default: every rung).")
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads (build and search).")
    parser.add_argument("--queries", type=int, default=200, help="Queries searched after loading.")
    parser.add_argument("--parquet-rows", type=int, default=50_000,
                        help="Rows of the Parquet sample shard (0 = skip).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-index-memory")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_index_memory.json")
    parser.add_argument("--keep", action="store_true", help="Keep the vectors and index files.")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    rows_for = parse_rows_for(args.rows_for)
    rungs = [r for r in ladder(args.rows, DIM)
             if not args.keys or any(r[0].startswith(k) for k in args.keys)]
    sizes = {key: next((n for p, n in rows_for.items() if key.startswith(p)), args.rows)
             for key, _, _ in rungs}
    n_max = max(sizes.values())
    vectors = args.work / f"vectors-{n_max}x{DIM}-seed{args.seed}.npy"
    gen_s = make_vectors(vectors, n_max, DIM, args.seed)
    load = os.getloadavg()
    print(f"machine: {machine()}; load average {load[0]:.1f}; {n_max:,} x {DIM} random unit "
          f"vectors ({'generated in %.0f s' % gen_s if gen_s else 'cached'}); FAISS threads "
          f"{args.threads}", flush=True)

    results: list[dict[str, Any]] = []
    for key, params, why in rungs:
        n = sizes[key]
        if n != args.rows:  # the ladder's own key and params at this size
            from twinq.shared.index_choice import choose_index_key

            same = [c for c in choose_index_key(n, DIM, 1 << 50)
                    if re.sub(r"IVF\d+", "IVF", c.key) == re.sub(r"IVF\d+", "IVF", key)]
            if same:
                key, params = same[0].key, same[0].search_params
        path = args.work / (re.sub(r"[^A-Za-z0-9]+", "_", key) + f"-{n}.faiss")
        print(f"{key} at {n:,} vectors: building ...", flush=True)
        built = run_child("_build", "--key", key, "--n", str(n), "--vectors", str(vectors),
                          "--path", str(path), "--threads", str(args.threads))
        print(f"  built in {built['build_s']:.1f} s (train {built['train_s']:.1f} s), "
              f"{built['file_bytes'] / n:,.0f} bytes/vector on disk", flush=True)
        loads = {}
        for mode in ("plain", "twinq"):
            loads[mode] = run_child("_load", "--path", str(path), "--mode", mode, "--vectors",
                                    str(vectors), "--params", params, "--queries",
                                    str(args.queries), "--threads", str(args.threads))
            g, s = loads[mode]["load_growth"], loads[mode]["search_growth"]
            print(f"  load {mode}: RSS +{g['VmRSS'] / n:,.0f} B/vector (anon {g['RssAnon'] / n:,.0f}, "
                  f"file {g['RssFile'] / n:,.0f}); after search +{s['VmRSS'] / n:,.0f} "
                  f"(anon {s['RssAnon'] / n:,.0f}, file {s['RssFile'] / n:,.0f})", flush=True)
        results.append({"key": key, "why": why, "search_params": params, "n": n, "build": built,
                        "load": loads, "bytes_per_vector_file": built["file_bytes"] / n})
        if not args.keep:
            path.unlink(missing_ok=True)

    parquet = parquet_shard(args.parquet_rows, args.work, args.seed) if args.parquet_rows else None
    if not args.keep:
        vectors.unlink(missing_ok=True)
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    report = {"machine": machine(), "load_average_start": load, "git_head": git, "dim": DIM,
              "faiss_threads": args.threads, "queries": args.queries, "command": sys.argv,
              "indexes": results, "parquet": parquet}
    import faiss

    report["faiss_version"] = faiss.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"JSON: {args.out}")


def print_table(report: dict[str, Any]) -> None:
    mib = 2**20
    print(f"\n| index | vectors | build s ({report['faiss_threads']} thread) | build CPU s | of which train s "
          f"| file bytes/vector | RSS plain load, bytes/vector | RSS twinq load (mmap) + search: "
          f"private / page cache, bytes/vector | GiB per 1M vectors (file) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["indexes"]:
        n, b = r["n"], r["build"]
        plain = r["load"]["plain"]["load_growth"]["VmRSS"] / n
        tw = r["load"]["twinq"]["search_growth"]
        print(f"| {r['key']} | {n:,} | {b['build_s']:.1f} | {b['build_cpu_s']:.1f} | {b['train_s']:.1f} | "
              f"{b['file_bytes'] / n:,.0f} | {plain:,.0f} | {tw['RssAnon'] / n:,.0f} / "
              f"{tw['RssFile'] / n:,.0f} | {b['file_bytes'] / n * 1e6 / 2**30:.2f} |")
    p = report.get("parquet")
    if p:
        cols = ", ".join(f"{k} {v:,.0f}" for k, v in p["column_bytes_per_row"].items())
        print(f"\nParquet shard: {p['rows']:,} rows of {p['texts']} (mean {p['mean_text_chars']:.0f} "
              f"chars): {p['bytes_per_row']:,.0f} bytes/row on disk ({cols}); served columns "
              f"loaded: +{p['served_bytes_per_row_rss']:,.0f} bytes/row RSS "
              f"(Arrow {p['served_bytes_per_row_arrow']:,.0f}); {p['file_bytes'] / mib:.1f} MiB")


def child_main(mode: str, argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    for name in ("--key", "--vectors", "--path", "--mode"):
        parser.add_argument(name)
    parser.add_argument("--params", default="")
    for name in ("--n", "--threads", "--queries"):
        parser.add_argument(name, type=int, default=1)
    args = parser.parse_args(argv)
    run = {"_build": child_build, "_load": child_load, "_parquet_load": child_parquet_load}[mode]
    print(json.dumps(run(args)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        child_main(sys.argv[1], sys.argv[2:])
    else:
        main()
