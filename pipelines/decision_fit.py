"""The twin decision fitted on serving-like queries: one row per query, fit, score, store.

Each query of a `Scored` set (`twinq.pipelines.serving_queries`) is fused as the worker fuses
it; its top hit's features (`twinq.shared.calibration.hit_features`) and whether that hit is a
twin make one row (`decision_rows`). The decision model is fitted on those rows with its
default threshold (`fit_decision`) and judged by `decision_metrics`; the rows are kept beside
training.json for ablations. The pair calibration, for a pair scored alone, is fitted here too
(`pair_calibration`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twinq.pipelines.metrics import expected_calibration_error, roc_auc
from twinq.pipelines.serving_queries import KINDS
from twinq.shared.calibration import (FEATURES, Calibration, fit_logistic, hit_features,
                                      threshold_for_precision)
from twinq.shared.errors import BadInput
from twinq.shared.fusion import fuse_scores
from twinq.shared.rerank_config import TUNED_FUSION_METHOD

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from sentence_transformers import CrossEncoder

    from twinq.pipelines.candidates import Candidates
    from twinq.pipelines.serving_queries import Scored
    from twinq.shared.pairs import LabelledPair


DECISION_FEATURES: tuple[str, ...] = FEATURES
"""Features the decision model starts from; `fit_logistic` drops any that would need a negative
weight. docs/results.md §5 shows what each one adds."""

DEV_ROWS_FILE = "decision_dev.json"
"""The dev rows (features, labels, kinds; no text) beside training.json, for ablations."""


def _fused_order(c: Candidates, logits: np.ndarray, weight: float, method: str) -> np.ndarray:
    n = len(logits)
    return np.argsort(-fuse_scores(c.recall[:n], logits, method, weight), kind="mergesort")


@dataclass
class DecisionRows:
    """One row per query: its top hit's features, whether that hit is a twin, and its kind."""

    features: np.ndarray
    labels: np.ndarray
    kinds: list[str]

    @property
    def answerable(self) -> np.ndarray:
        return np.array([k == "answerable" for k in self.kinds])

    def to_json(self) -> dict[str, Any]:
        return {"features": list(FEATURES), "rows": np.round(self.features, 6).tolist(),
                "labels": self.labels.astype(int).tolist(), "kinds": self.kinds}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DecisionRows:
        if data.get("features") != list(FEATURES):
            raise BadInput(f"decision rows have features {data.get('features')}, expected "
                           f"{list(FEATURES)}")
        return cls(np.asarray(data["rows"], dtype=np.float64).reshape(-1, len(FEATURES)),
                   np.asarray(data["labels"], dtype=np.int64), list(data["kinds"]))


def decision_rows(scored: Scored, weight: float, method: str = TUNED_FUSION_METHOD,
                  depths: Mapping[str, int] | None = None) -> DecisionRows:
    """The top hit of each query after fusion (`method` at `weight`), as the worker would
    answer it: with `depths`, from the first ``depths[query]`` logits only (the candidates
    adaptive reranking scores), else from every logit scored."""
    rows, labels, kinds = [], [], []
    for qid, c in scored.cands.items():
        logits = scored.rerank[qid] if depths is None else scored.rerank[qid][:depths[qid]]
        if len(logits) == 0:
            continue  # nothing recalled: the worker answers with no hit at all
        order = _fused_order(c, logits, weight, method)
        features = hit_features(logits, c.recall[:len(logits)])
        top = int(order[0])
        rows.append(features[top])
        labels.append(int(bool(set(c.ids[top]) & scored.queries.relevant[qid])))
        kinds.append(scored.queries.kinds[qid])
    return DecisionRows(np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES)),
                        np.asarray(labels, dtype=np.int64), kinds)


def fit_decision(rows: DecisionRows, features: Sequence[str] = DECISION_FEATURES
                 ) -> Calibration:
    """The decision model and its default threshold (95% precision on these rows)."""
    model = fit_logistic(rows.features, rows.labels, features)
    p = model.predict(rows.features)
    threshold, precision, coverage = threshold_for_precision(p, rows.labels)
    info = {"fitted_on": len(rows.labels), "twins": int(rows.labels.sum()),
            "kinds": {k: rows.kinds.count(k) for k in KINDS},
            "precision_at_min_probability": round(precision, 4),
            "coverage_at_min_probability": round(coverage, 4)}
    return Calibration(model.features, model.mean, model.scale, model.weights, model.bias,
                       round(threshold, 6), info)


def decision_metrics(p: np.ndarray, rows: DecisionRows, threshold: float) -> dict[str, Any]:
    """How trustworthy the top-1 probability is, and what answering above `threshold` gives.

    Returns:
        ``ece`` (10 bins) and ``brier`` of p against "the top hit is a twin"; ``auroc`` of p
        for answerable against not; ``auroc_correct`` for a correct top hit against not;
        at `threshold`: ``precision`` of the answered, ``coverage`` (share of all queries
        answered) and ``answered_of_answerable``; ``at_95`` the lowest threshold reaching 95%
        precision on THESE rows (an oracle when they are the test set) with its coverage.
    """
    y = rows.labels
    answered = p >= threshold
    answerable = rows.answerable
    t95, prec95, cov95 = threshold_for_precision(p, y)
    return {
        "queries": int(len(y)), "kinds": {k: rows.kinds.count(k) for k in KINDS},
        "top1_is_twin": float(y.mean()) if len(y) else 0.0,
        "ece": expected_calibration_error(y, p), "brier": float(np.mean((p - y) ** 2)),
        "auroc": roc_auc(answerable.astype(int), p) if 0 < answerable.sum() < len(y) else None,
        "auroc_correct": roc_auc(y, p) if 0 < y.sum() < len(y) else None,
        "threshold": threshold,
        "precision": float(y[answered].mean()) if answered.any() else None,
        "coverage": float(answered.mean()),
        "answered_of_answerable": float(answered[answerable].mean()) if answerable.any() else None,
        "by_kind": {k: {"mean_p": float(p[m].mean()), "answered": float(answered[m].mean())}
                    for k in KINDS if (m := np.array([x == k for x in rows.kinds])).any()},
        "at_95": {"threshold": t95, "precision": prec95, "coverage": cov95},
    }


def write_dev_rows(model_dir: str | Path, rows: DecisionRows) -> None:
    (Path(model_dir) / DEV_ROWS_FILE).write_text(json.dumps(rows.to_json()) + "\n")


def read_dev_rows(model_dir: str | Path) -> DecisionRows | None:
    path = Path(model_dir) / DEV_ROWS_FILE
    if not path.is_file():
        return None
    try:
        return DecisionRows.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{path}: unreadable decision rows: {exc}") from exc


PAIR_CALIBRATION_MIN = 20
"""Held-out labelled pairs of each class needed to calibrate pairs on them."""


def pair_calibration(model: CrossEncoder, dev: Sequence[LabelledPair], rows: DecisionRows
                     ) -> Calibration:
    """The logit-only calibration `twinq eval pairs` and `--denoise-with` use for a pair scored
    alone.

    Fitted on the held-out pairs that carry their own 0/1 label (human-labelled, like the pairs
    it will be judged on) when there are enough of both classes; otherwise on the top hits of
    the serving-like queries. Top hits are the wrong sample for pairs: a near miss that won
    its query scores high and is no twin, which flattens the map for every pair.
    """
    from twinq.shared.rerank import score_pairs

    labelled = [p for p in dev if p.label is not None]
    labels = np.array([int(p.label or 0) for p in labelled])
    if min(int(labels.sum()), int(len(labels) - labels.sum())) < PAIR_CALIBRATION_MIN:
        return fit_logistic(rows.features, rows.labels, ("rerank",))
    logits = score_pairs(model, [(p.q1, p.q2) for p in labelled], 64, scale="logit")
    features = np.zeros((len(labelled), len(FEATURES)))
    features[:, FEATURES.index("rerank")] = logits
    return fit_logistic(features, labels, ("rerank",))
