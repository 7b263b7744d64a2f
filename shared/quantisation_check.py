"""The int8 guard: does the quantised export still agree with fp32 on a fixed sample?

`twinq.shared.onnx_backend.ensure_exported` runs `run_check` once per export and stores the
result in the export's meta.json; `twinq.shared.models.resolve_backend` reads it, so that the
`auto` backend serves int8 only where the check passed (else onnx fp32, with one log line).

The sample ships with the package (`quantisation_sample.tsv`: about 100 short questions, English
and some Chinese, each with a lightly edited paraphrase). The bi-encoder embeds every text in
int8 and fp32 and compares the vectors by cosine. The cross-encoder scores groups built from the
sample (each question against its paraphrase and four other texts) and compares the logits by
Spearman correlation over all pairs and by top-1 agreement per group.

Both sides are onnxruntime graphs of the same export, fp32 and int8, so the check measures
quantisation alone (the fp32 export matches torch exactly: docs/performance.md). Batches have a
fixed size, though int8 activations are scaled per row (`twinq.shared.row_quantisation`), so a
row's score no longer depends on its batch.

This module imports no other twinq module (the export imports it). To see what `auto` makes of
a model, with these numbers: `python -m twinq.shared.models [--kind cross-encoder] [MODEL]`.

Example:
    >>> check = run_check("bi-encoder", fp32_model, int8_model)    # doctest: +SKIP
    >>> check["passed"], check["numbers"]["mean_cosine"]
    (True, 0.9937)
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_VERSION = 1
"""Bump when the sample or the metrics change, so that cached verdicts are made again."""

SAMPLE_PATH = Path(__file__).with_name("quantisation_sample.tsv")

BATCH_SIZE = 32
"""Texts or pairs per forward pass on both sides, fixed so that the check is repeatable."""

BI_MEAN_COSINE_MIN = 0.99
"""Lowest mean cosine(int8, fp32) over the sample's texts for the bi-encoder to serve int8.

The bundled all-MiniLM-L6-v2 gives about 0.994 here (docs/performance.md: 0.9944 on 5,000 real
Quora questions, with +0.13 nDCG@10, i.e. no loss); per-tensor quantisation, which did lose
quality, gave 0.969. 0.99 sits between them with room for CPU-to-CPU variation."""

BI_MIN_COSINE_MIN = 0.95
"""Lowest single-text cosine(int8, fp32): one text far off means int8 breaks some inputs
(bundled model: about 0.98 at worst here; 0.9823 on 5,000 Quora questions)."""

CE_SPEARMAN_MIN = 0.95
"""Lowest Spearman correlation of int8 and fp32 logits over all the sample's pairs.

A trained MiniLM reranker gave 0.972 against fp32 on 2,000 real Quora pairs with no loss in
pair accuracy (+0.08 points; docs/performance.md), so 0.98 would have refused a reranker int8
serves well. The bundled MiniLM body with a random head gives about 0.99 on this sample."""

CE_TOP1_MIN = 0.95
"""Lowest share of groups whose best-scored candidate is the same in int8 and fp32: the top
hit is what a reply's twin decision rests on."""

def thresholds(kind: str) -> dict[str, float]:
    """The current thresholds of `kind` ("bi-encoder" or "cross-encoder"), by metric; read at
    each call, so that a patched constant (tests) takes effect."""
    if kind == "bi-encoder":
        return {"mean_cosine": BI_MEAN_COSINE_MIN, "min_cosine": BI_MIN_COSINE_MIN}
    return {"spearman": CE_SPEARMAN_MIN, "top1_agreement": CE_TOP1_MIN}


@lru_cache(maxsize=1)
def sample() -> tuple[tuple[str, str], ...]:
    """The (question, paraphrase) lines of the shipped sample, comments skipped."""
    rows = []
    for line in SAMPLE_PATH.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            question, paraphrase = line.split("\t")
            rows.append((question, paraphrase))
    return tuple(rows)


def bi_encoder_texts() -> list[str]:
    """Every question and paraphrase of the sample, once each."""
    return list(dict.fromkeys(text for row in sample() for text in row))


def cross_encoder_groups() -> list[tuple[str, list[str]]]:
    """(query, candidates) per sample question: its paraphrase, three other questions and one
    other paraphrase (fixed offsets, so every run builds the same groups)."""
    rows = sample()
    n = len(rows)
    return [(q, [p, rows[(i + 1) % n][0], rows[(i + 7) % n][0], rows[(i + 31) % n][0],
                 rows[(i + 13) % n][1]]) for i, (q, p) in enumerate(rows)]


def judge(kind: str, numbers: dict[str, float]) -> tuple[bool, list[str]]:
    """Whether `numbers` meet the current thresholds, and a phrase per metric that falls short."""
    failed = [f"{name} {numbers[name]:.4f} < {limit}" for name, limit in thresholds(kind).items()
              if not numbers[name] >= limit]
    return not failed, failed


def record(kind: str, numbers: dict[str, float], seconds: float) -> dict[str, Any]:
    """The dict stored in meta.json, manifests and training.json."""
    passed, failed = judge(kind, numbers)
    return {"kind": kind, "sample_version": SAMPLE_VERSION, "numbers": numbers,
            "thresholds": thresholds(kind), "passed": passed, "failed": failed,
            "seconds": round(seconds, 2)}


def rejudged(check: dict[str, Any]) -> dict[str, Any]:
    """`check` judged against the current thresholds (they may have changed since the export)."""
    if check.get("thresholds") == thresholds(check["kind"]):
        return check
    passed, failed = judge(check["kind"], check["numbers"])
    return {**check, "thresholds": thresholds(check["kind"]), "passed": passed, "failed": failed}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)
    b = b / np.clip(np.linalg.norm(b, axis=1, keepdims=True), 1e-12, None)
    return (a * b).sum(axis=1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties broken by position; float logits rarely tie)."""
    ranks_a = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)
    ranks_b = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(np.float64)
    if ranks_a.std() == 0 or ranks_b.std() == 0:
        return 0.0
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def compare_bi_encoders(fp32: Any, int8: Any) -> dict[str, float]:
    """Cosines between the two models' vectors of the sample's texts."""
    texts = bi_encoder_texts()
    cosines = _cosines(int8.encode(texts, batch_size=BATCH_SIZE),
                       fp32.encode(texts, batch_size=BATCH_SIZE))
    return {"mean_cosine": round(float(cosines.mean()), 5),
            "min_cosine": round(float(cosines.min()), 5), "texts": len(texts)}


def _logits(model: Any, pairs: list[tuple[str, str]]) -> np.ndarray:
    import torch

    scores = np.asarray(model.predict(pairs, batch_size=BATCH_SIZE,
                                      activation_fn=torch.nn.Identity()), dtype=np.float64)
    return scores[:, -1] if scores.ndim == 2 else scores  # several labels: the last (positive)


def compare_cross_encoders(fp32: Any, int8: Any) -> dict[str, float]:
    """Spearman of the logits over all pairs, and top-1 agreement over the groups."""
    groups = cross_encoder_groups()
    pairs = [(query, c) for query, candidates in groups for c in candidates]
    ref, got = _logits(fp32, pairs), _logits(int8, pairs)
    width = len(groups[0][1])
    same_top = (ref.reshape(-1, width).argmax(axis=1) == got.reshape(-1, width).argmax(axis=1))
    return {"spearman": round(spearman(ref, got), 5),
            "top1_agreement": round(float(same_top.mean()), 5),
            "max_abs_logit_diff": round(float(np.abs(ref - got).max()), 4),
            "pairs": len(pairs), "groups": len(groups)}


def run_check(kind: str, fp32: Any, int8: Any) -> dict[str, Any]:
    """Compare the fp32 and int8 models of one export (`twinq.shared.onnx_backend` opens them)
    on the sample.

    Returns:
        `record(...)`: numbers, thresholds, passed, the failed metrics, and the seconds taken.
    """
    start = time.perf_counter()
    compare = compare_bi_encoders if kind == "bi-encoder" else compare_cross_encoders
    return record(kind, compare(fp32, int8), time.perf_counter() - start)
