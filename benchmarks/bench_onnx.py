"""Benchmark: torch fp32 against onnxruntime int8 (and fp32), for both encoders, in the same run.

    nice -n 5 .venv/bin/python benchmarks/bench_onnx.py --beir runs/quora-beir \\
        --pairs ../shared/data/quora/labelled/dev.tsv [--reranker runs/ce-swap]

Goals: >= 2x throughput for both encoders; nDCG@10 of dense retrieval drops <= 0.5 points and
pair accuracy at the best threshold drops <= 0.5 points. Runs are interleaved (torch, onnx,
torch, ...) and the best of `--repeats` is kept, because the 2 cores are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, machine, quora_pairs, quora_questions

from twinq.shared.quantisation_check import spearman


def timed_rounds(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per run for each candidate, interleaved so that load drift hits all of them alike."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def labelled_pairs(path: str, limit: int) -> tuple[list[tuple[str, str]], np.ndarray]:
    """`label\\tq1\\tq2\\tid` rows, read with errors="replace" (the file has a few bad bytes)."""
    pairs, labels = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3 and parts[0] in ("0", "1"):
                pairs.append((parts[1], parts[2]))
                labels.append(int(parts[0]))
    return pairs[:limit], np.array(labels[:limit])


def best_threshold_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy at the threshold that maximises it (predict 1 above the threshold)."""
    order = np.argsort(-scores, kind="stable")
    hits = np.concatenate([[0], np.cumsum(labels[order])])  # positives among the top i
    negatives_below = (len(labels) - labels.sum()) - (np.arange(len(labels) + 1) - hits)
    return float((hits + negatives_below).max() / len(labels))


def ndcg_at_10(beir: Path, models: dict[str, Any], corpus_size: int, seed: int) -> dict[str, float]:
    """nDCG@10 of exact dense retrieval per model, over the relevant docs plus a random fill."""
    read = lambda p: [json.loads(line) for line in open(p, encoding="utf-8")]  # noqa: E731
    corpus = {d["_id"]: d["text"] for d in read(beir / "corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in read(beir / "queries.jsonl")}
    qrels: dict[str, set[str]] = {}
    for line in list(open(beir / "qrels" / "test.tsv", encoding="utf-8"))[1:]:
        qid, did, score = line.split("\t")
        if int(score) > 0 and qid in queries:
            qrels.setdefault(qid, set()).add(did)
    keep = {d for ds in qrels.values() for d in ds} | set(qrels)
    rest = sorted(set(corpus) - keep)
    random.Random(seed).shuffle(rest)
    ids = sorted(keep) + (rest if corpus_size <= 0 else rest[:max(0, corpus_size - len(keep))])
    qids = sorted(qrels)
    discount = 1 / np.log2(np.arange(2, 12))
    out = {}
    for name, model in models.items():
        docs = model.encode([corpus[i] for i in ids], batch_size=64, normalize_embeddings=True)
        qv = model.encode([queries[q] for q in qids], batch_size=64, normalize_embeddings=True)
        scores = np.asarray(qv, dtype=np.float32) @ np.asarray(docs, dtype=np.float32).T
        total = 0.0
        for row, qid in enumerate(qids):
            top = [ids[j] for j in np.argsort(-scores[row])[:11] if ids[j] != qid][:10]  # BEIR
            gains = np.array([d in qrels[qid] for d in top], dtype=float)  # drops self-hits
            ideal = discount[:min(10, len(qrels[qid]))].sum()
            total += float((gains * discount[:len(gains)]).sum() / ideal)
        out[name] = 100 * total / len(qids)
    out["docs"], out["queries"] = len(ids), len(qids)
    return out


def random_head_cross_encoder(seed: int) -> str:
    """A MiniLM-L6 CrossEncoder from the bundled weights with a random 1-logit head, saved once."""
    import torch
    from sentence_transformers import CrossEncoder

    from twinq.shared.models import bundled_model_path

    folder = REPO / "runs" / "bench-onnx" / f"ce-random-{seed}"
    if not (folder / "config.json").is_file():
        torch.manual_seed(seed)
        CrossEncoder(str(bundled_model_path()), num_labels=1, device="cpu").save(str(folder))
    return str(folder)


def recipe_variants(folder: Path) -> dict[str, Path]:
    """The four `quantize_dynamic` recipes the brief asks to compare, each with onnxruntime's
    own activation scales (one per batch) and with ours (one per row: what twinq serves,
    `twinq.shared.row_quantisation`), written once under runs/."""
    from twinq.shared.onnx_backend import INT8_RECIPE, quantise

    out = REPO / "runs" / "bench-onnx" / "recipes"
    out.mkdir(parents=True, exist_ok=True)
    variants = {}
    for weight in ("QInt8", "QUInt8"):
        for per_channel in (True, False):
            name = f"{weight} per-{'channel' if per_channel else 'tensor'}"
            path = out / f"bi_{weight}_{'pc' if per_channel else 'pt'}.onnx"
            row_path = path.with_name(f"{path.stem}_rows.onnx")
            # 8-bit weights, as these four were first compared (recipe 3's 7 bits: INT8_RECIPE)
            recipe = {**INT8_RECIPE, "weight_type": weight, "per_channel": per_channel,
                      "reduce_range": False}
            for per_row, file in ((False, path), (True, row_path)):
                if not file.is_file():
                    quantise(folder / "model.onnx", file, per_row=per_row, recipe=recipe)
            variants[f"{name}, batch scales"] = path
            variants[f"{name}, row scales"] = row_path
    return variants


def compare_recipes(bi: dict[str, Any], texts: list[str], threads: int, repeats: int) -> None:
    """Quality and speed of each int8 recipe for the bi-encoder, against torch and onnx fp32."""
    import copy

    from twinq.shared.onnx_backend import make_session

    models = {"torch fp32": bi["torch fp32"], "onnx fp32": bi["onnx fp32"]}
    for name, path in recipe_variants(bi["onnx int8"].folder).items():
        models[name] = copy.copy(bi["onnx int8"])
        models[name].session = make_session(path, threads)
    vectors: dict[str, np.ndarray] = {}
    runs = {name: (lambda n=name: vectors.__setitem__(n, models[n].encode(texts, batch_size=64)))
            for name in models}
    secs = timed_rounds(runs, repeats)
    print(f"\n### int8 recipes (bi-encoder, {len(texts)} questions, best of {repeats})\n")
    print("| recipe | questions/s | vs torch fp32 | vs onnx fp32 | mean cosine to torch fp32 | 1st pct |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in models:
        cos = (np.asarray(vectors[name]) * np.asarray(vectors["torch fp32"])).sum(axis=1)
        print(f"| {name} | {len(texts) / min(secs[name]):.0f} | "
              f"{min(secs['torch fp32']) / min(secs[name]):.2f}x | "
              f"{min(secs['onnx fp32']) / min(secs[name]):.2f}x | {cos.mean():.4f} | "
              f"{np.percentile(cos, 1):.4f} |")


def speed_table(title: str, unit: str, n: int, secs: dict[str, list[float]]) -> None:
    """Print one encoder's throughput table: best and median rate, and ratios to torch fp32."""
    base = secs["torch fp32"]
    print(f"\n### {title}\n")
    print(f"| backend | {unit}/s (best) | {unit}/s (median) | speed-up (best) | speed-up (median) |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in secs.items():
        best = f"{min(base) / min(seconds):.2f}x"
        median = f"{statistics.median(base) / statistics.median(seconds):.2f}x"
        print(f"| {name} | {n / min(seconds):.0f} | {n / statistics.median(seconds):.0f} | "
              f"{best} | {median} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=5000)
    parser.add_argument("--pair-count", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beir", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv).")
    parser.add_argument("--corpus-size", type=int, default=20000, help="BEIR corpus subset; 0: all.")
    parser.add_argument("--reranker", help="Trained cross-encoder folder; else a random head.")
    parser.add_argument("--pairs", help="Labelled pairs: label\\tq1\\tq2\\tid.")
    parser.add_argument("--labelled-limit", type=int, default=5000)
    parser.add_argument("--recipes", action="store_true",
                        help="Also compare QInt8/QUInt8 x per-channel/per-tensor x activation scales "
                             "per batch/per row (bi-encoder).")
    parser.add_argument("--beir-only", action="store_true",
                        help="Only the nDCG@10 comparison (e.g. with --corpus-size 0 for all docs).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from twinq.shared.models import load_bi_encoder, load_cross_encoder, set_threads

    set_threads(args.threads)
    print(f"machine: {machine()}; torch {torch.__version__}, {args.threads} threads")

    # -- bi-encoder -------------------------------------------------------------------------
    if args.beir_only:
        models = {"torch fp32": load_bi_encoder(), "onnx int8": load_bi_encoder(backend="onnx")}
        result = ndcg_at_10(Path(args.beir), models, args.corpus_size, args.seed)
        print(f"nDCG@10, {result['queries']} queries over {result['docs']} docs: torch fp32 "
              f"{result['torch fp32']:.2f}, onnx int8 {result['onnx int8']:.2f} "
              f"(change {result['onnx int8'] - result['torch fp32']:+.2f} points)")
        return
    texts = quora_questions(args.questions, offset=20000)
    bi = {"torch fp32": load_bi_encoder(), "onnx fp32": load_bi_encoder(backend="onnx-fp32"),
          "onnx int8": load_bi_encoder(backend="onnx")}
    for model in bi.values():
        model.encode(texts[:64], batch_size=64)  # warm up
    vectors: dict[str, np.ndarray] = {}

    def encode(name: str) -> Callable[[], None]:
        return lambda: vectors.__setitem__(name, np.asarray(bi[name].encode(
            texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)))

    secs = timed_rounds({name: encode(name) for name in bi}, args.repeats)
    speed_table(f"Bi-encoder: {len(texts)} real Quora questions, batch 64, best / median of "
                f"{args.repeats}", "questions", len(texts), secs)
    ref = vectors["torch fp32"]
    for name in ("onnx fp32", "onnx int8"):
        cos = (vectors[name] * ref).sum(axis=1)
        print(f"\n{name}: cosine to torch fp32 mean {cos.mean():.4f}, 1st percentile "
              f"{np.percentile(cos, 1):.4f}, min {cos.min():.4f}")
    if args.beir:
        result = ndcg_at_10(Path(args.beir), {k: bi[k] for k in ("torch fp32", "onnx int8")},
                            args.corpus_size, args.seed)
        print(f"\nnDCG@10, exact dense retrieval, {result['queries']} queries over {result['docs']} "
              f"docs: torch fp32 {result['torch fp32']:.2f}, onnx int8 {result['onnx int8']:.2f} "
              f"(change {result['onnx int8'] - result['torch fp32']:+.2f} points)")
    if args.recipes:
        compare_recipes(bi, texts[:2000], args.threads, args.repeats)
    del bi, vectors

    # -- cross-encoder ----------------------------------------------------------------------
    source = args.reranker or random_head_cross_encoder(args.seed)
    what = "trained reranker " + args.reranker if args.reranker else \
        "MiniLM-L6 from the bundled weights with a RANDOM 1-logit head (speed only is meaningful)"
    pairs = quora_pairs(args.pair_count)
    ce = {"torch fp32": load_cross_encoder(source), "onnx fp32": load_cross_encoder(source, backend="onnx-fp32"),
          "onnx int8": load_cross_encoder(source, backend="onnx")}
    identity = torch.nn.Identity()
    for model in ce.values():
        model.predict(pairs[:32], batch_size=32, show_progress_bar=False)
    logits: dict[str, np.ndarray] = {}

    def predict(name: str) -> Callable[[], None]:
        return lambda: logits.__setitem__(name, np.asarray(ce[name].predict(
            pairs, batch_size=32, show_progress_bar=False, activation_fn=identity)).reshape(-1))

    secs = timed_rounds({name: predict(name) for name in ce}, args.repeats)
    speed_table(f"Cross-encoder: {what}; {len(pairs)} real Quora pairs, batch 32", "pairs",
                len(pairs), secs)
    for name in ("onnx fp32", "onnx int8"):
        a, b = logits[name], logits["torch fp32"]
        print(f"\n{name}: logits vs torch fp32: Spearman {spearman(a, b):.4f}, Pearson "
              f"{np.corrcoef(a, b)[0, 1]:.4f}, max |diff| {np.abs(a - b).max():.4f}")
    if args.pairs:
        labelled, labels = labelled_pairs(args.pairs, args.labelled_limit)
        acc = {name: best_threshold_accuracy(np.asarray(ce[name].predict(
            labelled, batch_size=32, show_progress_bar=False)).reshape(-1), labels)
            for name in ("torch fp32", "onnx int8")}
        print(f"\nPair accuracy at the best threshold, {len(labels)} labelled pairs ({args.pairs}): "
              f"torch fp32 {100 * acc['torch fp32']:.2f}, onnx int8 {100 * acc['onnx int8']:.2f} "
              f"(change {100 * (acc['onnx int8'] - acc['torch fp32']):+.2f} points)")


if __name__ == "__main__":
    main()
