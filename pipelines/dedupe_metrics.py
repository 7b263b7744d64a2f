"""Quality of predicted clusters against ground-truth clusters: pairwise and B-cubed scores.

Both compare two labelings of the same items; an item outside every predicted cluster is a
cluster of its own. Pairwise counts each pair of items put together (quadratic in a cluster's
size, so large clusters weigh most); B-cubed averages over items (Bagga and Baldwin, 1998;
Amigó et al., 2009), so every question weighs the same.

Example:
    >>> cluster_scores([0, 0, 1, 2], [0, 0, 0, 1])["pairwise_precision"]
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def labels_from_clusters(n: int, clusters: Sequence[Sequence[int]]) -> np.ndarray:
    """One label per item: its cluster's number, or a fresh label for an item left alone."""
    labels = np.arange(len(clusters), len(clusters) + n, dtype=np.int64)
    for c, members in enumerate(clusters):
        labels[np.asarray(members, dtype=np.int64)] = c
    return labels


def cluster_scores(predicted: Sequence[int] | np.ndarray, truth: Sequence[int] | np.ndarray
                   ) -> dict[str, float]:
    """Pairwise precision, recall and F1, and B-cubed precision, recall and F1.

    Args:
        predicted: A cluster label per item.
        truth: The true cluster label per item, in the same order.

    Returns:
        ``pairwise_precision``, ``pairwise_recall``, ``pairwise_f1``, ``bcubed_precision``,
        ``bcubed_recall``, ``bcubed_f1`` and the pair counts ``predicted_pairs``,
        ``true_pairs``, ``correct_pairs``. A precision with nothing predicted is 1.0 (no
        wrong pair), a recall with nothing to find 1.0.
    """
    p = np.asarray(predicted, dtype=np.int64)
    t = np.asarray(truth, dtype=np.int64)
    if p.shape != t.shape:
        raise ValueError("predicted and truth must label the same items")
    if p.size == 0:
        return {k: 1.0 for k in ("pairwise_precision", "pairwise_recall", "pairwise_f1",
                                 "bcubed_precision", "bcubed_recall", "bcubed_f1")} | {
            "predicted_pairs": 0.0, "true_pairs": 0.0, "correct_pairs": 0.0}
    _, p = np.unique(p, return_inverse=True)
    _, t = np.unique(t, return_inverse=True)
    cells, n_ij = np.unique(p * (t.max() + 1) + t, return_counts=True)
    n_i = np.bincount(p)
    n_j = np.bincount(t)
    correct = float(np.sum(n_ij * (n_ij - 1) // 2))
    predicted_pairs = float(np.sum(n_i * (n_i - 1) // 2))
    true_pairs = float(np.sum(n_j * (n_j - 1) // 2))
    precision = correct / predicted_pairs if predicted_pairs else 1.0
    recall = correct / true_pairs if true_pairs else 1.0
    cell_p, cell_t = cells // (t.max() + 1), cells % (t.max() + 1)
    b_precision = float(np.sum(n_ij * n_ij / n_i[cell_p]) / p.size)
    b_recall = float(np.sum(n_ij * n_ij / n_j[cell_t]) / p.size)
    return {
        "pairwise_precision": precision, "pairwise_recall": recall,
        "pairwise_f1": _f1(precision, recall),
        "bcubed_precision": b_precision, "bcubed_recall": b_recall,
        "bcubed_f1": _f1(b_precision, b_recall),
        "predicted_pairs": predicted_pairs, "true_pairs": true_pairs, "correct_pairs": correct,
    }


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0
