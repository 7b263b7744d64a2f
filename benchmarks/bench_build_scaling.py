"""Benchmark: how `twinq index build`'s cost grows with the corpus, full and incremental.

For each size in `--sizes`, the first N distinct Quora questions from TWINQ_DATA (default
../shared/data; synthetic question-like sentences when absent, and the output says which) are
written as a JSONL corpus and built by the real command line, in a fresh process:

    twinq index build --corpus C --root R --publish --threads T --shards S [--backend B] [--model M]

then built again after `--changed` of the texts were edited (default 1%), into the same root, so
that the build reuses the stored vectors of the unchanged texts (`reuse_from`="auto"). Each
build runs with OMP_NUM_THREADS=T too, so that FAISS and torch use T threads; DirectRunner runs
in-process. Recorded per build: wall seconds of the whole command (process start, model load,
Beam, assembly, validation), its CPU seconds (user + system of the child), the manifest's
`build.stages_s`, rows indexed/embedded/reused, the shards' index types, and the snapshot's
Parquet and FAISS bytes per row (real embeddings here, unlike bench_index_memory.py).

    .venv/bin/python benchmarks/bench_build_scaling.py                    # 2k, 8k, 32k: ~10 min
    cp -r "$(.venv/bin/python -c 'from twinq.shared.models import bundled_model_path as p; print(p())')" runs/minilm
    .venv/bin/python benchmarks/bench_build_scaling.py --sizes 8000 32000 --changed 0 \
        --backend onnx --model runs/minilm --out runs/bench_build_scaling_onnx.json

Writes a table to stdout and JSON to `--out` (default runs/bench_build_scaling.json); the
snapshots go to `--work` (default runs/bench-build-scaling/) and are deleted unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, machine

TWINQ = Path(sys.executable).with_name("twinq")


def corpus_texts(n: int) -> tuple[list[str], str]:
    from bench_index_memory import sample_texts

    return sample_texts(n)


def write_corpus(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                            for i, t in enumerate(texts)))


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def build(corpus: Path, root: Path, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """One `twinq index build` in a fresh process; its wall and CPU time and its manifest."""
    command = [str(TWINQ), "index", "build", "--corpus", str(corpus), "--root", str(root),
               "--publish", "--threads", str(args.threads), "--shards", str(args.shards)]
    if args.backend:
        command += ["--backend", args.backend]
    if args.model:
        command += ["--model", args.model]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    cpu0, start = child_cpu(), time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    wall, cpu = time.perf_counter() - start, child_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}); see {log}:\n"
                         + log.read_text()[-3000:])
    version = (root / "CURRENT").read_text().strip()
    folder = root / "snapshots" / version
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = manifest["corpus"]["rows_indexed"]
    parquet = sum((folder / s["data_file"]).stat().st_size for s in manifest["shards"])
    faiss_bytes = sum((folder / s["index_file"]).stat().st_size for s in manifest["shards"])
    return {"command": " ".join(command), "wall_s": wall, "cpu_s": cpu,
            "stages_s": manifest["build"]["stages_s"], "rows_indexed": rows,
            "rows_embedded": manifest["corpus"]["rows_embedded"],
            "rows_reused": manifest["corpus"]["rows_reused"],
            "index_types": sorted({s["faiss_factory"] for s in manifest["shards"]}),
            "parquet_bytes_per_row": parquet / rows, "faiss_bytes_per_row": faiss_bytes / rows,
            "rows_per_s_wall": rows / wall, "rows_per_cpu_s": rows / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads.")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--backend", default=None, help="Encoder backend (default: the build's).")
    parser.add_argument("--model", default=None, help="Bi-encoder (default: the bundled "
                        "MiniLM). A copy of it under runs/ keeps an onnx export cache out of the "
                        "venv.")
    parser.add_argument("--changed", type=float, default=0.01, help="Share of texts edited "
                        "for the incremental build (0 = skip it).")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-build-scaling")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_build_scaling.json")
    parser.add_argument("--keep", action="store_true", help="Keep the corpora and snapshots.")
    args = parser.parse_args()

    texts, source = corpus_texts(max(args.sizes))
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}; texts: {source}; "
          f"threads {args.threads}; shards {args.shards}; backend {args.backend or 'default'}",
          flush=True)
    if args.backend and args.backend.startswith("onnx"):  # export once, untimed
        from twinq.shared.models import load_bi_encoder

        load_bi_encoder(args.model, backend=args.backend).encode(["warm up"])
    results = []
    for n in args.sizes:
        root, sample = args.work / f"root-{n}", texts[:n]
        corpus = args.work / f"corpus-{n}.jsonl"
        write_corpus(corpus, sample)
        load = os.getloadavg()[0]
        full = build(corpus, root, args, args.work / f"build-{n}.log")
        print(f"{n:,} rows, full: {full['wall_s']:.1f} s wall, {full['cpu_s']:.1f} s CPU, "
              f"{full['rows_per_s_wall']:.0f} rows/s; stages {full['stages_s']}", flush=True)
        entry = {"rows": n, "load_average": load, "full": full}
        if args.changed:
            every = max(1, round(1 / args.changed))
            edited = [f"{t} (edited {i})" if i % every == 0 else t for i, t in enumerate(sample)]
            corpus2 = args.work / f"corpus-{n}-edited.jsonl"
            write_corpus(corpus2, edited)
            inc = build(corpus2, root, args, args.work / f"build-{n}-incremental.log")
            print(f"{n:,} rows, incremental ({inc['rows_embedded']} re-embedded, "
                  f"{inc['rows_reused']} reused): {inc['wall_s']:.1f} s wall, {inc['cpu_s']:.1f} s "
                  f"CPU; stages {inc['stages_s']}", flush=True)
            entry["incremental"] = inc
        results.append(entry)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "shared",
                            "pipelines"], capture_output=True, text=True).stdout.split("\n")
    report = {"machine": machine(), "git_head": git,
              "uncommitted_in_shared_or_pipelines": [d for d in dirty if d],
              "texts": source, "threads": args.threads, "shards": args.shards,
              "backend": args.backend, "model": args.model, "command": sys.argv,
              "sizes": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    print(f"JSON: {args.out}")


def print_table(report: dict[str, Any]) -> None:
    print("\n| rows | build | wall s | CPU s | rows/s (wall) | rows per CPU-s | pipeline s "
          "| assemble s | validate s | embedded / reused | index | parquet B/row | faiss B/row |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|")
    for entry in report["sizes"]:
        for kind in ("full", "incremental"):
            b = entry.get(kind)
            if not b:
                continue
            s = b["stages_s"]
            print(f"| {entry['rows']:,} | {kind} | {b['wall_s']:.1f} | {b['cpu_s']:.1f} | "
                  f"{b['rows_per_s_wall']:.0f} | {b['rows_per_cpu_s']:.0f} | "
                  f"{s.get('pipeline', 0):.1f} | {s.get('assemble', 0):.1f} | "
                  f"{s.get('validate', 0):.1f} | {b['rows_embedded']:,} / {b['rows_reused']:,} | "
                  f"{', '.join(b['index_types'])} | {b['parquet_bytes_per_row']:,.0f} | "
                  f"{b['faiss_bytes_per_row']:,.0f} |")


if __name__ == "__main__":
    main()
