"""Fit what a trained reranker serves with: fusion, the twin decision and the pair calibration.

`fit_serving` searches held-out questions in the corpus the reranker will serve (a snapshot,
or the pairs' own questions as an in-memory corpus), reranks them as the worker does, tunes
the fusion weight (`twinq.pipelines.fusion_tuning`), measures the adaptive reranking rule on
the same full-depth scores (`twinq.pipelines.adaptive_fit`), fits the decision model on the
fused top hits of the candidates that rule scores (`twinq.pipelines.decision_fit`), and
returns them as the reranker's `RerankConfig`.
`twinq train reranker` calls it after training; `twinq train decide` calls it again alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from twinq.pipelines.adaptive_fit import fit_adaptive, rule_depths, with_dev_report
from twinq.pipelines.decision_fit import (decision_metrics, decision_rows, fit_decision,
                                          pair_calibration, write_dev_rows)
from twinq.pipelines.fusion_tuning import tune_fusion
from twinq.pipelines.serving_queries import corpus_keys, dev_queries, score_queries
from twinq.shared.constants import DEFAULT_RERANK_DEPTH
from twinq.shared.errors import BadInput
from twinq.shared.models import encode_normalised
from twinq.shared.rerank_config import RerankConfig

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sentence_transformers import SentenceTransformer

    from twinq.shared.pairs import LabelledPair


class _MemoryShard:
    """A flat inner-product index over a few questions, shaped like a snapshot shard."""

    def __init__(self, texts: list[str], vectors: np.ndarray) -> None:
        import faiss
        import pyarrow as pa

        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        ids = [f"m{n}" for n in range(len(texts))]
        self.table = pa.table({"id": ids, "ids": [[i] for i in ids], "text": texts})
        self._texts, self._ids = texts, ids

    def row(self, n: int) -> dict[str, Any]:
        return {"id": self._ids[n], "ids": [self._ids[n]], "text": self._texts[n], "metadata": None}


@dataclass
class MemoryCorpus:
    """The questions of the pair files as a one-shard corpus, for training without a snapshot
    (`--fusion-root`): the decision is then fitted against the pairs' own questions."""

    shards: list[_MemoryShard]
    manifest: dict[str, Any]

    @classmethod
    def build(cls, texts: Sequence[str], bi_encoder: SentenceTransformer, name: str
              ) -> MemoryCorpus:
        unique = list(dict.fromkeys(texts))
        vectors = encode_normalised(bi_encoder, unique, 128)
        return cls([_MemoryShard(unique, vectors)], {"model": {"name": name}})


@dataclass
class ServingFit:
    """What `fit_serving` fitted, as the reranker's config, and its report on the dev queries.

    ``config`` carries fusion (with its tuning report), the decision model, the pair
    calibration, the adaptive reranking rule and the depth they were fitted at; training adds
    the pair threshold.
    """

    config: RerankConfig
    dev: dict[str, Any]


def fit_serving(model_dir: str, dev: Sequence[LabelledPair], corpus_pairs: Sequence[LabelledPair],
                *, root: str | None, bi_encoder: str | None, unrelated: Sequence[str],
                limit: int = 1000, seed: int = 0, max_length: int | None = None,
                depth: int = DEFAULT_RERANK_DEPTH, backend: str = "torch") -> ServingFit:
    """Tune fusion, fit the decision model, the pair calibration and the adaptive reranking rule
    on serving-like dev queries.

    Args:
        model_dir: The trained reranker.
        dev: Held-out pairs; their questions are the in-domain queries.
        corpus_pairs: All pairs read (train and dev sides): their duplicate clusters name each
            query's twins, and their questions form the corpus when no snapshot `root` is given.
        root: The snapshot the reranker will serve (searched with the dev questions), or None.
        bi_encoder: The bi-encoder for the in-memory corpus; a snapshot uses its own.
        unrelated: Out-of-domain questions never trained on (`split_unrelated`'s second half).
        limit: In-domain queries at most. Defaults to 1000.
        seed: Seed for the query choice. Defaults to 0.
        max_length: Reranker token limit. Defaults to the model's.
        depth: Candidates reranked per query. Defaults to the worker's, `DEFAULT_RERANK_DEPTH`.
        backend: The cross-encoder backend the worker will serve (`serving_backend`): the
            decision model and the pair calibration read logits, and int8 logits differ from
            fp32 ones by up to a logit or two, so they are fitted on the ones served. Defaults
            to "torch".

    Raises:
        BadInput: when no dev question yields an answerable and a twin-removed query.
        SnapshotInvalid: the snapshot fails its checks or does not match its bi-encoder.
    """
    from twinq.shared.models import load_bi_encoder, load_cross_encoder, resolve_model
    from twinq.shared.opened_snapshot import open_snapshot

    if root:
        opened = open_snapshot(root)
        snapshot: Any = opened.snapshot
        bi = opened.bi_encoder
    else:
        bi = load_bi_encoder(bi_encoder)
        snapshot = MemoryCorpus.build([t for p in corpus_pairs for t in (p.q1, p.q2)], bi,
                                      resolve_model(bi_encoder)[1])
    queries = dev_queries(dev, corpus_keys(snapshot), limit=limit, seed=seed,
                          cluster_pairs=corpus_pairs)
    if not queries.texts:
        raise BadInput("no dev question has a twin in the corpus: cannot fit the twin decision "
                       f"({'snapshot ' + root if root else 'the pairs files'})")
    # A fifth of the set: enough to place "unrelated" far below any near miss, few enough not
    # to swamp the in-domain kinds the threshold is really about.
    queries.add_unrelated(list(unrelated), len(queries.texts) // 4)
    model = load_cross_encoder(model_dir, max_length=max_length, backend=backend)
    scored = score_queries(snapshot, bi, model, queries, depth=depth)
    fusion = tune_fusion(scored)
    adaptive = fit_adaptive(scored, method=fusion["method"], depth=depth)
    depths = rule_depths(scored, adaptive, fusion["weight"], depth) if adaptive else None
    rows = decision_rows(scored, fusion["weight"], fusion["method"], depths)
    decision = fit_decision(rows)
    calibration = pair_calibration(model, dev, rows)
    write_dev_rows(model_dir, rows)
    if adaptive is not None:
        adaptive = with_dev_report(adaptive, scored, weight=fusion["weight"], decision=decision,
                                   depth=depth)
    report = decision_metrics(decision.predict(rows.features), rows, decision.min_probability or 1.0)
    report["corpus"] = f"snapshot {root}" if root else "the questions of the pairs files"
    config = RerankConfig(
        fusion_method=fusion["method"], fusion_weight=fusion["weight"], decision=decision,
        calibration=calibration, rerank_depth=depth, adaptive=adaptive,
        fusion_info={k: v for k, v in fusion.items() if k not in ("method", "weight")})
    return ServingFit(config, report)
