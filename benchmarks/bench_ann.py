"""Benchmark: the ANN indexes `choose_index_key` picks, against exact (Flat) search.

    nice -n 5 .venv/bin/python benchmarks/bench_ann.py --sizes 100000 1000000

For each size: recall@10 against Flat, queries/s for one batch of 1,000 queries, build time, and
index bytes per million vectors. Goal: recall@10 >= 0.98 at >= 5x Flat's speed at 1M.

Vectors: every distinct Quora question (~70.8k), embedded once with the onnx int8 bi-encoder and
cached under runs/bench-ann/. 1,000 of them are held out as queries; the rest are the base, grown
to each size with Gaussian-noise copies (renormalised, cosine `--copy-cosine` to their source),
so larger sizes hold many near-duplicates, which is harder for ANN than fresh data would be.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
from common import REPO, machine, quora_questions

CACHE = REPO / "runs" / "bench-ann"


def real_vectors(threads: int) -> np.ndarray:
    """All distinct Quora questions, embedded once (about 4 minutes on 2 cores) and cached."""
    path = CACHE / "quora-all-minilm-l6-v2-onnx-int8.npy"
    if path.is_file():
        return np.load(path)
    from twinq.shared.models import load_bi_encoder, set_threads

    set_threads(threads)
    texts = quora_questions(70788)
    start = time.perf_counter()
    vectors = load_bi_encoder(backend="onnx").encode(texts, batch_size=64, normalize_embeddings=True)
    print(f"embedded {len(texts)} questions in {time.perf_counter() - start:.0f}s")
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors.astype(np.float32))
    return vectors


def grow(base: np.ndarray, size: int, copy_cosine: float, seed: int) -> np.ndarray:
    """`base` followed by noisy, renormalised copies of its rows, `size` rows in all."""
    if size <= len(base):
        return np.ascontiguousarray(base[:size])
    rng = np.random.default_rng(seed)
    # For a unit vector v and noise n ~ N(0, s^2 I_d): cos(v, v+n) ~ 1/sqrt(1 + d s^2).
    sigma = np.sqrt((1 / copy_cosine**2 - 1) / base.shape[1])
    out = np.empty((size, base.shape[1]), dtype=np.float32)
    out[:len(base)] = base
    for start in range(len(base), size, 100_000):
        stop = min(size, start + 100_000)
        rows = base[np.arange(start, stop) % len(base)]
        noisy = rows + rng.normal(0, sigma, rows.shape).astype(np.float32)
        out[start:stop] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return out


def search_seconds(index, queries: np.ndarray, k: int, repeats: int) -> tuple[float, np.ndarray]:
    """Best of `repeats` wall times for one batched search, and its ids."""
    best, ids = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        _, ids = index.search(queries, k)
        best = min(best, time.perf_counter() - start)
    return best, ids


def recall_at(ids: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a[:k]) & set(t)) / k for a, t in zip(ids, truth)]))


def build(vectors: np.ndarray, key: str, seed: int, trained: dict[int, np.ndarray]):
    """`twinq.shared.index_choice.build_index`, except that IVF indexes of one size share one coarse
    k-means (the slow part: 200k x 4096 x 384 at 1M) and PQ skips polysemous training, which
    only matters for Hamming-filtered search (polysemous_ht, unused here) and cost minutes."""
    import faiss

    from twinq.shared.index_choice import build_index, train_size

    nlist = int(key.split(",")[0][3:]) if key.startswith("IVF") else 0
    if not nlist or nlist not in trained and "PQ" not in key:
        index = build_index(vectors, key, seed=seed)
        if nlist:
            trained[nlist] = index.quantizer.reconstruct_n(0, nlist)
        return index
    index = faiss.index_factory(vectors.shape[1], key, faiss.METRIC_INNER_PRODUCT)
    if nlist in trained:
        index.quantizer.add(trained[nlist])  # IndexIVF.train then skips the coarse k-means
    if hasattr(index, "do_polysemous_training"):
        index.do_polysemous_training = False
    sample = np.random.default_rng(seed).choice(len(vectors), train_size(key, len(vectors)), replace=False)
    index.train(np.ascontiguousarray(vectors[np.sort(sample)]))
    index.add(vectors)
    return index


def sweep(choice_params: str, factors: list[float]) -> list[str]:
    """Cheaper and dearer settings around the chosen one: search-time only, no rebuild."""
    name, _, value = choice_params.partition("=")
    return [f"{name}={int(int(value) * f)}" for f in factors if int(int(value) * f) >= 8 and f != 1]


def bench_size(vectors: np.ndarray, queries: np.ndarray, args: argparse.Namespace,
               skip_hnsw: bool) -> list[str]:
    import faiss

    from twinq.shared.index_choice import apply_search_params, choose_index_key

    n, dim = vectors.shape
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    flat_s, truth = search_seconds(flat, queries, args.k, args.repeats)
    del flat
    rows: list[str] = []

    def emit(key: str, params: str, build_s: str, recall: float, seconds: float, size: int) -> None:
        rows.append(f"| {n:,} | {key} | {params} | {build_s} | {recall:.3f} | "
                    f"{len(queries) / seconds:,.0f} | {flat_s / seconds:.1f}x | {size / n:,.0f} | "
                    f"{size / n * 1e6 / 2**30:.2f} GiB |")
        print(rows[-1], flush=True)

    emit("Flat (exact)", "-", "0", 1.0, flat_s, n * dim * 4)
    trained: dict[int, np.ndarray] = {}
    for choice in choose_index_key(n, dim, max_index_bytes=2**40):
        if args.keys and not any(k in choice.key for k in args.keys):
            continue
        if skip_hnsw and choice.key.startswith("HNSW"):
            rows.append(f"| {n:,} | {choice.key} | {choice.search_params} | skipped (--hnsw-max) | | | | | |")
            continue
        start = time.perf_counter()
        index = build(vectors, choice.key, args.seed, trained)
        build_s = f"{time.perf_counter() - start:.0f}"
        size = faiss.serialize_index(index).nbytes
        for params in [choice.search_params] + sweep(choice.search_params, args.sweep):
            apply_search_params(index, params)
            seconds, ids = search_seconds(index, queries, args.k, args.repeats)
            label = params if params == choice.search_params else f"{params} (sweep)"
            emit(choice.key, label, build_s, recall_at(ids, truth), seconds, size)
        del index
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--copy-cosine", type=float, default=0.9,
                        help="Expected cosine of a noise copy to its source row.")
    parser.add_argument("--hnsw-max", type=int, default=10**9,
                        help="Skip HNSW above this many vectors (its build is the slow part).")
    parser.add_argument("--keys", nargs="*", default=[],
                        help="Only index keys containing one of these (e.g. HNSW SQ8).")
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.25, 0.5, 2],
                        help="Also search at these multiples of the chosen efSearch/nprobe.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import faiss

    faiss.omp_set_num_threads(args.threads)
    real = real_vectors(args.threads)
    rng = np.random.default_rng(args.seed)
    held = rng.choice(len(real), args.queries, replace=False)
    queries = np.ascontiguousarray(real[held])
    base = np.ascontiguousarray(np.delete(real, held, axis=0))
    print(f"machine: {machine()}; faiss {faiss.__version__}, {args.threads} threads; "
          f"{len(base):,} real vectors, {len(queries):,} held-out real queries, k={args.k}")
    header = ("| vectors | index | search params | build s | recall@10 vs Flat | queries/s "
              "(batch of 1,000) | speed vs Flat | bytes/vector | size per 1M vectors |\n"
              "|---:|---|---|---:|---:|---:|---:|---:|---:|")
    print(header, flush=True)
    rows = []
    for size in args.sizes:
        start = time.perf_counter()
        vectors = grow(base, size, args.copy_cosine, args.seed)
        rows += bench_size(vectors, queries, args, skip_hnsw=size > args.hnsw_max)
        print(f"<!-- {size:,} vectors took {time.perf_counter() - start:.0f}s -->", flush=True)
        del vectors
    print("\n" + header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
