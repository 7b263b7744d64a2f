"""Benchmark: `twinq index build` on a Dask cluster of 1 and of 2 worker processes, one run.

The same corpus (`--rows` distinct Quora questions from TWINQ_DATA, default ../shared/data;
synthetic question-like sentences when absent, and the output says which), split into
`--files` JSONL files (the DaskRunner's parallelism: see deploy/runners/dask.md), is built with
the bundled model by the real command line, in a fresh driver process:

    twinq index build --corpus F1 ... --root R --threads 1 --canary 0 \
        --runner DaskRunner --dask_client_address tcp://... --dask_npartitions FILES

against a cluster of one scheduler and W worker processes (`--nthreads 1`, OMP_NUM_THREADS=1,
`tests/dask_cluster.py`), for W = 1 and W = 2. The workers import Beam, torch and twinq before
the clock starts (process start-up is not the build's cost); loading the model is part of the
build. Recorded per build: wall seconds of the command, the manifest's `stages_s`, and each
worker's share of the texts embedded (counted inside the workers). The two snapshots must have
the same fingerprint. `--repeats N` alternates the two N times and keeps each one's median.

    .venv/bin/python benchmarks/bench_distributed.py                 # 4,000 rows: a few minutes
    .venv/bin/python benchmarks/bench_distributed.py --rows 8000 --files 8 --repeats 2

Writes a table to stdout and JSON to `--out` (default runs/bench_distributed.json); snapshots go
to `--work` (default runs/bench-distributed/), deleted unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import DATA, REPO, machine, quora_questions

sys.path.insert(0, str(REPO))
from tests.dask_cluster import (LocalDaskCluster, install_work_tally,  # noqa: E402
                                read_work_tally)

TWINQ = Path(sys.executable).with_name("twinq")
WARM = ["apache_beam", "torch", "sentence_transformers", "faiss",
        "twinq.pipelines.index_transforms", "twinq.pipelines.embed_handler"]


def corpus_texts(n: int) -> tuple[list[str], str]:
    if (DATA / "quora" / "duplicate-pairs").is_dir():
        return quora_questions(n), f"Quora questions ({DATA})"
    rng = random.Random(0)
    starts = ["How do I", "What is the best way to", "Why does", "Can I", "Is it possible to",
              "Where can I", "When should I", "Which"]
    words = ("learn python fast reset password phone battery drain travel visa cheap flights "
             "lose weight start business invest money improve english write essay fix laptop "
             "cook rice grow tomatoes train dog quit smoking sleep better").split()
    texts: dict[str, None] = {}
    while len(texts) < n:
        texts[f"{rng.choice(starts)} {' '.join(rng.sample(words, rng.randint(3, 9)))}?"] = None
    return list(texts), "synthetic questions (no reference data)"


def write_corpus(folder: Path, texts: list[str], files: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        paths.append(folder / f"part-{f:03d}.jsonl")
        paths[-1].write_text("".join(json.dumps({"id": f"q{i}", "text": texts[i]}) + "\n"
                                     for i in range(f, len(texts), files)))
    return paths


def build(cluster: LocalDaskCluster, corpus: list[Path], root: Path, args: argparse.Namespace,
          log: Path) -> dict[str, Any]:
    shutil.rmtree(root, ignore_errors=True)
    install_work_tally(cluster.client())
    command = [str(TWINQ), "index", "build", *(a for p in corpus for a in ("--corpus", str(p))),
               "--root", str(root), "--threads", "1", "--canary", "0",
               "--shards", str(args.shards), "--runner", "DaskRunner",
               "--dask_client_address", cluster.address, "--dask_npartitions", str(args.files)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"build failed ({done.returncode}); see {log}")
    manifest = json.loads(next((root / "snapshots").glob("*/manifest.json")).read_text())
    tally = read_work_tally(cluster.client())
    return {"wall_s": round(wall, 2), "stages_s": manifest["build"]["stages_s"],
            "rows_embedded": manifest["corpus"]["rows_embedded"],
            "fingerprint": manifest["corpus"]["fingerprint"],
            "texts_embedded_by_worker": [t.get("texts_embedded", 0) for t in tally.values()],
            "shards_written_by_worker": [t.get("shards_written", 0) for t in tally.values()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--files", type=int, default=8, help="corpus files = --dask_npartitions")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-distributed")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_distributed.json")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    texts, source = corpus_texts(args.rows)
    corpus = write_corpus(args.work / "corpus", texts, args.files)
    print(f"{len(texts)} rows of {source} in {args.files} files; {machine()}; "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for repeat in range(args.repeats):
        for workers in (1, 2):
            folder = args.work / f"dask-{workers}w"
            with LocalDaskCluster(workers, folder=folder, env={"OMP_NUM_THREADS": "1"}) as cluster:
                cluster.client().run(_import_all, WARM)
                run = build(cluster, corpus, args.work / f"root-{workers}w", args,
                            folder / f"build-{repeat}.log")
            run["load_average_after"] = round(os.getloadavg()[0], 2)
            runs[workers].append(run)
            print(f"  {workers} worker(s), run {repeat + 1}: {run['wall_s']:.1f}s "
                  f"(pipeline {run['stages_s'].get('pipeline')}s), texts embedded per worker "
                  f"{run['texts_embedded_by_worker']}", flush=True)
    fingerprints = {r["fingerprint"] for rs in runs.values() for r in rs}
    if len(fingerprints) != 1:
        raise SystemExit(f"the builds differ: fingerprints {sorted(fingerprints)}")
    one = statistics.median(r["wall_s"] for r in runs[1])
    two = statistics.median(r["wall_s"] for r in runs[2])
    pipe1 = statistics.median(r["stages_s"]["pipeline"] for r in runs[1])
    pipe2 = statistics.median(r["stages_s"]["pipeline"] for r in runs[2])
    print(f"\n{'workers':>8} {'wall s':>8} {'pipeline s':>11}\n{1:>8} {one:>8.1f} {pipe1:>11.1f}\n"
          f"{2:>8} {two:>8.1f} {pipe2:>11.1f}\n"
          f"speed-up, 2 workers over 1: {one / two:.2f}x wall, {pipe1 / pipe2:.2f}x pipeline")
    result = {"benchmark": "bench_distributed", "machine": machine(), "rows": len(texts),
              "source": source, "files": args.files, "shards": args.shards,
              "repeats": args.repeats, "runs": {str(k): v for k, v in runs.items()},
              "median_wall_s": {"1": one, "2": two}, "speedup_wall": round(one / two, 3),
              "median_pipeline_s": {"1": pipe1, "2": pipe2},
              "speedup_pipeline": round(pipe1 / pipe2, 3),
              "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


def _import_all(modules: list[str]) -> None:
    import importlib

    for name in modules:
        importlib.import_module(name)


if __name__ == "__main__":
    main()
