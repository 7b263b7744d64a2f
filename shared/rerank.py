"""Score (query, candidate) pairs with a cross-encoder, and rerank each query's candidates.

Reranking is the main cost on a CPU, so a whole batch of queries is scored in ONE
`CrossEncoder.predict` call, with the pairs sorted by length to cut padding. The score a hit
carries (`rerank_score`) is the cross-encoder's logit: what fusion (`twinq.shared.fusion`) and
the twin decision (`twinq.shared.calibration`) are fitted on.

Example:
    >>> hits = [[Hit("q1", "reset my password", 0.9), Hit("q2", "change email", 0.7)]]
    >>> rerank(["how to reset password"], hits, cross_encoder, depth=20)  # doctest: +SKIP
    >>> score_pairs(cross_encoder, [("a", "b")], scale="sigmoid")        # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sentence_transformers import CrossEncoder

    from twinq.shared.search import Hit

Scale = Literal["logit", "sigmoid"]
"""What `score_pairs` returns.

- ``logit``: the raw score, what the worker fuses and the decision model reads.
- ``sigmoid``: its logistic, `CrossEncoder.predict`'s default output for a one-label model and
  the scale of training.json's pair ``threshold``. Not a calibrated probability: the pair
  calibration (`Calibration.predict_logits`) is.
"""


def _activation(scale: Scale) -> Any:
    import torch

    if scale not in get_args(Scale):
        raise ValueError(f"scale must be one of {get_args(Scale)}, got {scale!r}")
    return torch.nn.Identity() if scale == "logit" else torch.nn.Sigmoid()


def score_pairs(model: CrossEncoder, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
                *, symmetric: bool = False, scale: Scale = "logit", length_sorted: bool = True
                ) -> np.ndarray:
    """Cross-encoder scores for `pairs`, in their given order.

    Pairs are predicted sorted by length so that each mini-batch pads to similar lengths, then
    the scores are put back in input order.

    Args:
        model: A loaded cross-encoder.
        pairs: (query, candidate) text pairs.
        batch_size: Pairs per forward pass. Defaults to 32.
        symmetric: Score (c, q) too, in the same predict call, and return the mean of both
            logits (in `scale`). Defaults to False.
        scale: "logit" or "sigmoid" (see `Scale`). Defaults to "logit".
        length_sorted: Predict in length order. False predicts in the given order, exactly as
            a plain `predict` call does (padding differs, so a score can differ in its last
            bits). Defaults to True.

    Returns:
        float32 array of shape (len(pairs),).

    Raises:
        ValueError: an unknown scale.
    """
    activation = _activation(scale)
    if not pairs:
        return np.zeros(0, dtype=np.float32)
    if symmetric:
        both = score_pairs(model, [*pairs, *((c, q) for q, c in pairs)], batch_size,
                           length_sorted=length_sorted)
        mean = (both[:len(pairs)] + both[len(pairs):]) / 2.0
        if scale == "logit":
            return mean
        import torch

        return activation(torch.from_numpy(mean)).numpy()
    order = list(range(len(pairs)))
    if length_sorted:
        order.sort(key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    scores = model.predict([list(pairs[i]) for i in order], batch_size=batch_size,
                           show_progress_bar=False, activation_fn=activation,
                           convert_to_numpy=True)
    scores = np.asarray(scores, dtype=np.float32).reshape(len(pairs), -1)[:, -1]
    restored = np.empty(len(pairs), dtype=np.float32)
    restored[order] = scores
    return restored


def rerank(queries: Sequence[str], hits_per_query: list[list[Hit]], model: CrossEncoder, *,
           depth: int | Sequence[int], symmetric: bool = False, batch_size: int = 32) -> None:
    """Score every query's top `depth` candidates in one call, and reorder each list in place.

    Reranked candidates come first, best rerank score first; candidates beyond `depth` keep
    their recall order after them. Callers fuse (`twinq.shared.fusion.fuse`) and cut to
    `top_k` afterwards.

    Args:
        queries: One query text per list of hits.
        hits_per_query: Candidates per query in recall order; `rerank_score` (the logit) is
            filled in.
        model: The cross-encoder.
        depth: Candidates to rerank per query: one value for all, or one per query.
        symmetric: Score the mean of (q, c) and (c, q). Defaults to False.
        batch_size: Pairs per forward pass. Defaults to 32.
    """
    depths = [depth] * len(queries) if isinstance(depth, int) else list(depth)
    pairs: list[tuple[str, str]] = []
    owners: list[Hit] = []
    for query, hits, d in zip(queries, hits_per_query, depths):
        for hit in hits[:max(0, d)]:
            pairs.append((query, hit.text))
            owners.append(hit)
    scores = score_pairs(model, pairs, batch_size, symmetric=symmetric)
    for hit, score in zip(owners, scores):
        hit.rerank_score = float(score)
    for hits, d in zip(hits_per_query, depths):
        head = sorted(hits[:max(0, d)], key=lambda h: -(h.rerank_score or 0.0))
        hits[:] = head + hits[max(0, d):]
