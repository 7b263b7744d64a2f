"""Benchmark: how close each model comes to this CPU's peak, in tokens per second.

For the bi-encoder and the cross-encoder, on the backend the defaults resolve to ("auto": int8
where its guard passes) and on torch fp32, in one run: real tokens per second (padding not
counted), the model's arithmetic per token (2 x the weights of every linear layer, plus the
attention products at the measured mean length), so the arithmetic rate reached, against the
peak of one large matrix product on the same threads, measured in the same run:

- fp32 peak: `torch.matmul` of 2048 x 2048 matrices;
- int8 peak: a single MatMul of the same size quantised by onnxruntime's `quantize_dynamic` with
  twinq's recipe, so the same kernels (dynamic activation quantisation + integer GEMM) as the
  int8 models.

The share of peak is the headroom the issue asks to see: what is left is in tokenisation,
padding, small matrices (a 384-wide layer does not fill the vector units as a 2048 one does),
softmax/GELU/LayerNorm, and the copies between them.

    .venv/bin/python benchmarks/bench_headroom.py --reranker runs/ablation/mid-easy \
        --texts 4000 --pairs 2000

Needs ../shared/data (Quora questions and pairs). Without --reranker, the cross-encoder is the
bundled MiniLM with an untrained head (speed is the same).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import machine, quora_pairs, quora_questions

PEAK_SIZE = 2048


def _best_rate(run: Any, flops: float, repeat: int = 5) -> float:
    """GFLOP/s of the fastest of `repeat` calls of `run` (after one warm-up call)."""
    run()
    best = min(_timed(run) for _ in range(repeat))
    return flops / best / 1e9


def _timed(run: Any) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def peak_fp32(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(PEAK_SIZE, PEAK_SIZE)
    b = torch.randn(PEAK_SIZE, PEAK_SIZE)
    return _best_rate(lambda: torch.matmul(a, b), 2.0 * PEAK_SIZE ** 3)


def peak_int8(threads: int, work: Path) -> float:
    """One MatMul with a constant weight, quantised with twinq's recipe, run by onnxruntime."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from twinq.shared.onnx_backend import _quantize, make_session

    n = PEAK_SIZE
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal(
        (n, n)).astype(np.float32), name="w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "peak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fp32, int8 = work / "peak.onnx", work / "peak_qint8.onnx"
    onnx.save(model, str(fp32))
    _quantize(fp32, int8)
    session = make_session(int8, threads)
    x = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    return _best_rate(lambda: session.run(None, {"x": x}), 2.0 * n ** 3)


def linear_weights(module: Any) -> int:
    """Weights of every `torch.nn.Linear` in `module` (the multiply-adds per token)."""
    import torch

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def model_shape(torch_model: Any) -> tuple[int, int, int]:
    """(linear weights, layers, hidden width) of a transformers model inside `torch_model`."""
    config = getattr(torch_model, "config", None)
    if config is None:  # a SentenceTransformer: its first module holds the transformer
        config = torch_model[0].auto_model.config
    return linear_weights(torch_model), config.num_hidden_layers, config.hidden_size


def flops_per_token(weights: int, layers: int, hidden: int, mean_length: float) -> float:
    """2 x linear weights, plus QK^T and attention x V: 2 x 2 x length x hidden per layer."""
    return 2.0 * weights + 4.0 * layers * hidden * mean_length


def measure(encode: Any, repeat: int = 3) -> float:
    """Seconds of the fastest of `repeat` runs (after one warm-up on a slice)."""
    encode(warm=True)
    return min(_timed(encode) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reranker", help="Cross-encoder folder (default: bundled MiniLM with "
                        "an untrained head).")
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from sentence_transformers import CrossEncoder

    from twinq.shared.models import (bundled_model_path, encode_normalised, load_bi_encoder,
                                     load_cross_encoder, resolve_backend, set_threads)
    from twinq.shared.rerank import score_pairs

    set_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="twinq-bench-headroom-"))
    reranker = args.reranker
    if reranker is None:
        reranker = str(work / "ce-random")
        CrossEncoder(str(bundled_model_path()), num_labels=1, max_length=128).save(reranker)
    texts = quora_questions(args.texts)
    pairs = quora_pairs(args.pairs)

    peaks = {"fp32": peak_fp32(args.threads), "int8": peak_int8(args.threads, work)}
    rows = []
    torch_bi = load_bi_encoder(None, backend="torch")
    torch_ce = load_cross_encoder(reranker, backend="torch")
    bi_tokens = [len(ids) for ids in torch_bi.tokenizer(
        texts, truncation=True, max_length=torch_bi.max_seq_length)["input_ids"]]
    ce_tokens = [len(ids) for ids in torch_ce.tokenizer(
        [a for a, _ in pairs], [b for _, b in pairs], truncation=True,
        max_length=torch_ce.max_length)["input_ids"]]
    shapes = {"bi-encoder": model_shape(torch_bi), "cross-encoder": model_shape(torch_ce.model)}
    for kind, tokens in (("bi-encoder", bi_tokens), ("cross-encoder", ce_tokens)):
        resolved = resolve_backend(kind, None if kind == "bi-encoder" else reranker, "auto")
        for backend in (resolved.backend, "torch") if resolved.backend != "torch" else ("torch",):
            if kind == "bi-encoder":
                model = torch_bi if backend == "torch" else load_bi_encoder(None, backend=backend)

                def run(warm: bool = False, model: Any = model) -> None:
                    encode_normalised(model, texts[:64] if warm else texts, 64)
            else:
                model = torch_ce if backend == "torch" else load_cross_encoder(reranker,
                                                                                backend=backend)

                def run(warm: bool = False, model: Any = model) -> None:
                    score_pairs(model, pairs[:32] if warm else pairs, 32)
            seconds = measure(run)
            weights, layers, hidden = shapes[kind]
            mean_length = float(np.mean(tokens))
            rate = sum(tokens) / seconds
            gflops = rate * flops_per_token(weights, layers, hidden, mean_length) / 1e9
            precision = "int8" if backend == "onnx" else "fp32"
            rows.append((kind, backend + (" (default)" if backend == resolved.backend else ""),
                         rate, mean_length, gflops, precision, gflops / peaks[precision]))
    print(f"machine: {machine()}; {args.threads} threads; {len(texts)} questions, "
          f"{len(pairs)} pairs; cross-encoder {args.reranker or 'bundled MiniLM, random head'}")
    print(f"peak of one {PEAK_SIZE}x{PEAK_SIZE} matrix product: fp32 {peaks['fp32']:.0f} GFLOP/s "
          f"(torch), int8 {peaks['int8']:.0f} GOP/s (onnxruntime, twinq's quantisation recipe)")
    print("| model | backend | tokens/s | mean tokens | G(FL)OP/s reached | share of its peak |")
    print("|---|---|---:|---:|---:|---:|")
    for kind, backend, rate, mean_length, gflops, precision, share in rows:
        print(f"| {kind} | {backend} | {rate:,.0f} | {mean_length:.1f} | {gflops:.0f} | "
              f"{share:.0%} of {precision} |")


if __name__ == "__main__":
    main()
