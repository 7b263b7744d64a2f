"""Benchmark: does an int8 score depend on the rows batched with it? twinq's per-row activation
scales against onnxruntime's per-batch ones, for both encoders, in the same run.

    .venv/bin/python benchmarks/bench_batch_dependence.py --reranker runs/demo/reranker-<digest>

onnxruntime's dynamic quantisation gives the activations before each quantised MatMul ONE scale
for the whole input tensor, that is for the whole mini-batch: a pair's logit and a question's
vector then depend on the other rows of the batch and on the padding they bring. twinq's int8
recipe (since recipe 2) scales each row by itself (`twinq.shared.row_quantisation`). This
script scores each row in a length-sorted batch, as twinq does, and alone, and prints how far
the two differ, the error against torch fp32 and the speed, for the shipped per-row graph, the
same weights with onnxruntime's per-batch scales (twinq's recipe 1), and onnx fp32. Needs the
Quora pairs in ../shared/data (TWINQ_DATA) and a trained cross-encoder (the demo's is enough:
the question is the arithmetic, not the ranking).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
from typing import Any

import numpy as np
from bench_onnx import timed_rounds
from common import REPO, machine, quora_pairs, quora_questions

from twinq.shared.quantisation_check import spearman


def quantised_variant(model: Any, kind: str, threads: int, *, per_row: bool,
                      reduce_range: bool) -> Any:
    """`model` with its graph quantised again from its fp32 export: the shipped recipe but for
    `reduce_range` (7-bit weights), and activations per row (twinq's rewrite) or per batch
    (recipe 1, every onnxruntime fusion on)."""
    import onnxruntime as ort

    from twinq.shared.onnx_backend import INT8_RECIPE, quantise

    out = REPO / "runs" / "bench-batch"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}_{'row' if per_row else 'batch'}_{'7' if reduce_range else '8'}bit.onnx"
    quantise(model.folder / "model.onnx", path, per_row=per_row,
             recipe={**INT8_RECIPE, "reduce_range": reduce_range})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    variant = copy.copy(model)
    variant.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return variant


def variants(model: Any, kind: str, threads: int) -> dict[str, Any]:
    """The shipped graph and, made from the same fp32 export, the other weight width with
    per-row activations and the shipped weight width with per-batch ones (recipe 1)."""
    from twinq.shared.onnx_backend import INT8_RECIPE

    shipped = bool(INT8_RECIPE.get("reduce_range", False))
    other = "8-bit" if shipped else "7-bit"
    return {"int8 per row (shipped)": model,
            f"int8 per row, {other} weights": quantised_variant(
                model, kind, threads, per_row=True, reduce_range=not shipped),
            "int8 per batch (recipe 1)": quantised_variant(
                model, kind, threads, per_row=False, reduce_range=False)}


def score(model: Any, pairs: list[tuple[str, str]]) -> np.ndarray:
    from twinq.shared.rerank import score_pairs

    return score_pairs(model, pairs)


def cross_encoder_rows(reranker: str, pairs: list[tuple[str, str]], threads: int,
                       repeats: int) -> None:
    from twinq.shared.models import load_cross_encoder

    fp32 = score(load_cross_encoder(reranker, backend="torch"), pairs)
    models = variants(load_cross_encoder(reranker, backend="onnx"), "cross-encoder", threads)
    models["onnx fp32"] = load_cross_encoder(reranker, backend="onnx-fp32")
    secs = timed_rounds({n: (lambda m=m: score(m, pairs)) for n, m in models.items()}, repeats)
    print(f"\n### Cross-encoder: {len(pairs)} Quora pairs, batches of 32 sorted by length\n")
    print("| model | mean / max |logit batched - alone| | pairs moved > 0.5 | mean / max "
          "|logit - torch fp32| | Spearman to fp32 | pairs/s (best, median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, model in models.items():
        batched = score(model, pairs)
        alone = np.array([score(model, [p])[0] for p in pairs])
        moved, error = np.abs(batched - alone), np.abs(batched - fp32)
        print(f"| {name} | {moved.mean():.4f} / {moved.max():.3f} | {np.mean(moved > 0.5):.2%} | "
              f"{error.mean():.3f} / {error.max():.3f} | {spearman(batched, fp32):.4f} | "
              f"{len(pairs) / min(secs[name]):.0f}, {len(pairs) / statistics.median(secs[name]):.0f} |")


def bi_encoder_rows(texts: list[str], threads: int, repeats: int) -> None:
    from twinq.shared.models import bundled_model_path, load_bi_encoder
    from twinq.shared.onnx_backend import OnnxBiEncoder

    fp32 = load_bi_encoder(None, backend="torch").encode(texts, normalize_embeddings=True)
    int8 = OnnxBiEncoder.load(bundled_model_path(), threads=threads)
    models = variants(int8, "bi-encoder", threads)
    models["onnx fp32"] = OnnxBiEncoder.load(bundled_model_path(), precision="fp32",
                                             threads=threads)
    secs = timed_rounds({n: (lambda m=m: m.encode(texts, batch_size=64))
                         for n, m in models.items()}, repeats)
    print(f"\n### Bi-encoder (bundled all-MiniLM-L6-v2): {len(texts)} Quora questions, "
          "batches of 64\n")
    print("| model | min / 1st pct cosine batched vs alone | mean / 1st pct cosine to torch fp32 | "
          "questions/s (best, median) |")
    print("|---|---:|---:|---:|")
    for name, model in models.items():
        batched = model.encode(texts, batch_size=64)
        alone = np.vstack([model.encode([t]) for t in texts])
        same = (batched * alone).sum(axis=1)
        to_fp32 = (batched * fp32).sum(axis=1)
        print(f"| {name} | {same.min():.4f} / {np.percentile(same, 1):.4f} | "
              f"{to_fp32.mean():.4f} / {np.percentile(to_fp32, 1):.4f} | "
              f"{len(texts) / min(secs[name]):.0f}, {len(texts) / statistics.median(secs[name]):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reranker", required=True, help="a trained cross-encoder folder")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--questions", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"machine: {machine()}; best and median of {args.repeats} interleaved rounds")
    cross_encoder_rows(args.reranker, quora_pairs(args.pairs), args.threads, args.repeats)
    bi_encoder_rows(quora_questions(args.questions), args.threads, args.repeats)


if __name__ == "__main__":
    main()
