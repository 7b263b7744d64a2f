"""The Beam pieces of `twinq dedupe`: each shard's nearest neighbours, and the pair scorer.

    shard numbers -> ShardNeighbours (batched FAISS search of every shard; the snapshot loaded
    once per worker process through `Shared`, as RunInference shares its model)
    -> ((id_a, id_b), (cosine, text_a, text_b)) above the recall floor, once per pair
    -> RunInference(PairScorer): cross-encoder logits, both orders averaged, in batches
    -> {"a", "b", "recall", "rerank"} records, written to Parquet

Memory per worker: the snapshot (memory-mapped), the shard's query batch and its K neighbours;
never a corpus-by-corpus matrix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twinq.pipelines import index_transforms as _quiet  # noqa: F401 - first: quiets Beam's import

import apache_beam as beam  # noqa: E402
from apache_beam.metrics import Metrics  # noqa: E402
from apache_beam.ml.inference.base import ModelHandler, PredictionResult  # noqa: E402
from apache_beam.utils.shared import Shared  # noqa: E402

if TYPE_CHECKING:
    import numpy as np
    from sentence_transformers import CrossEncoder

    from twinq.shared.snapshot import Snapshot

log = logging.getLogger(__name__)
NS = "twinq_dedupe"
QUERY_BATCH = 1024
"""Rows searched per FAISS call: large enough to use BLAS well, small enough that the scores
of one call (batch x shards x K floats) stay a few megabytes."""

PairKey = tuple[str, str]
"""(id_a, id_b) with id_a < id_b: the one key of a pair, whichever row found it."""


def pair_schema() -> Any:
    """The Parquet schema of the scored pairs Beam writes (`rerank` is null without a reranker)."""
    import pyarrow as pa

    return pa.schema([("a", pa.string()), ("b", pa.string()), ("recall", pa.float32()),
                      ("rerank", pa.float32())])


@dataclass
class SearchableSnapshot:
    """A loaded snapshot and each shard's ids and texts, for vectorised look-ups by row."""

    snapshot: Snapshot
    ids: list[np.ndarray]
    texts: list[np.ndarray]

    @classmethod
    def load(cls, root: str, version: str) -> SearchableSnapshot:
        from twinq.shared.snapshot import load_snapshot

        snapshot = load_snapshot(root, version, checksums=False)  # the driver checked them
        ids = [s.table.column("id").to_numpy(zero_copy_only=False) for s in snapshot.shards]
        texts = [s.table.column("text").to_numpy(zero_copy_only=False) for s in snapshot.shards]
        log.info("dedupe worker loaded snapshot %s (%d rows)", version, snapshot.rows)
        return cls(snapshot, ids, texts)


def nearest(snapshot: Snapshot, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray,
                                                                        np.ndarray]:
    """The `k` best (score, shard, row) of each query across every shard, best first.

    Returns:
        (scores, shards, rows), each of shape (queries, k'); k' <= k when the snapshot holds
        fewer rows; missing hits have row -1.
    """
    import numpy as np

    parts_s, parts_n, parts_r = [], [], []
    for n, shard in enumerate(snapshot.shards):
        if shard.index.ntotal == 0:
            continue
        scores, rows = shard.index.search(queries, min(k, shard.index.ntotal))
        parts_s.append(scores)
        parts_r.append(rows)
        parts_n.append(np.full(rows.shape, n, dtype=np.int64))
    if not parts_s:
        empty = np.zeros((len(queries), 0))
        return empty, empty.astype(np.int64), empty.astype(np.int64)
    scores = np.concatenate(parts_s, axis=1)
    rows = np.concatenate(parts_r, axis=1)
    shards = np.concatenate(parts_n, axis=1)
    scores = np.where(rows >= 0, scores, -np.inf)
    keep = min(k, scores.shape[1])
    # Stable order: score, then shard, then row, so that ties resolve the same way every run.
    order = np.lexsort((rows, shards, -scores), axis=1)[:, :keep]
    take = np.take_along_axis
    return take(scores, order, 1), take(shards, order, 1), take(rows, order, 1)


class ShardNeighbours(beam.DoFn):
    """Search every shard for the K nearest neighbours of one shard's rows; emit candidate pairs.

    A pair is emitted when its cosine is at least `floor`, keyed by its sorted ids, so that the
    pair found from both sides is scored once (`beam.CombinePerKey(max)` downstream).
    """

    def __init__(self, root: str, version: str, k: int, floor: float,
                 query_batch: int = QUERY_BATCH) -> None:
        self._root, self._version, self._k, self._floor = root, version, k, floor
        self._query_batch = query_batch
        self._shared = Shared()
        self._snapshot: SearchableSnapshot | None = None
        self._rows = Metrics.counter(NS, "rows_searched")
        self._hits = Metrics.counter(NS, "neighbour_hits")
        self._emitted = Metrics.counter(NS, "pairs_above_floor")
        self._search_ms = Metrics.counter(NS, "search_ms")

    def setup(self) -> None:
        root, version = self._root, self._version
        self._snapshot = self._shared.acquire(lambda: SearchableSnapshot.load(root, version),
                                              tag=(root, version))

    def process(self, shard: int) -> Iterator[tuple[PairKey, tuple[float, str, str]]]:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        from twinq.shared.snapshot import embeddings_of

        loaded = self._snapshot
        assert loaded is not None, "setup() loads the snapshot"
        entry = loaded.snapshot.manifest["shards"][shard]
        if not entry["rows"]:
            return
        start_row = 0
        source = pq.ParquetFile(loaded.snapshot.path / entry["data_file"])
        for batch in source.iter_batches(batch_size=self._query_batch, columns=["embedding"]):
            vectors = embeddings_of(pa.Table.from_batches([batch]))
            started = time.perf_counter()
            scores, shards, rows = nearest(loaded.snapshot, vectors, self._k + 1)
            self._search_ms.inc(int((time.perf_counter() - started) * 1000))
            own = np.arange(start_row, start_row + len(vectors))[:, None]
            is_self = (shards == shard) & (rows == own)
            wanted = (~is_self) & (rows >= 0)
            # K neighbours besides the row itself, then the floor.
            wanted &= np.cumsum(wanted, axis=1) <= self._k
            self._hits.inc(int(wanted.sum()))
            wanted &= scores >= self._floor
            self._emitted.inc(int(wanted.sum()))
            for q, j in zip(*np.nonzero(wanted)):
                yield self._pair(loaded, shard, start_row + int(q), int(shards[q, j]),
                                 int(rows[q, j]), float(scores[q, j]))
            self._rows.inc(len(vectors))
            start_row += len(vectors)

    def _pair(self, loaded: SearchableSnapshot, shard: int, row: int, other_shard: int,
              other_row: int, score: float) -> tuple[PairKey, tuple[float, str, str]]:
        a, ta = str(loaded.ids[shard][row]), str(loaded.texts[shard][row])
        b, tb = str(loaded.ids[other_shard][other_row]), str(loaded.texts[other_shard][other_row])
        if b < a:
            a, b, ta, tb = b, a, tb, ta
        return (a, b), (round(score, 6), ta, tb)


def to_example(item: tuple[PairKey, tuple[float, str, str]]
               ) -> tuple[tuple[str, str, float], tuple[str, str]]:
    """(pair, (cosine, texts)) to RunInference's keyed example: key (a, b, cosine), texts."""
    (a, b), (score, ta, tb) = item
    return (a, b, score), (ta, tb)


def scored_record(item: tuple[tuple[str, str, float], PredictionResult]) -> dict[str, Any]:
    """Back from RunInference: one Parquet record with the pair's averaged logit."""
    (a, b, score), prediction = item
    return {"a": a, "b": b, "recall": score, "rerank": float(prediction.inference)}


def recall_record(item: tuple[PairKey, tuple[float, str, str]]) -> dict[str, Any]:
    """A candidate pair without a reranker: its cosine only."""
    (a, b), (score, _, _) = item
    return {"a": a, "b": b, "recall": score, "rerank": None}


class PairScorer(ModelHandler[tuple[str, str], PredictionResult, "CrossEncoder"]):
    """Score question pairs with a cross-encoder: raw logits, both orders averaged by default.

    `load_model` only loads (once per worker process, shared across its threads by
    RunInference); `run_inference` only scores, in one `score_pairs` call per Beam batch, which
    sorts the pairs by length to cut padding.
    """

    def __init__(self, model: str, *, threads: int | None = None, backend: str = "torch",
                 symmetric: bool = True, max_length: int | None = None,
                 min_batch_size: int = 512, max_batch_size: int = 512,
                 predict_batch_size: int = 64, progress_total: int | None = None) -> None:
        """
        Args:
            model: The reranker's folder.
            threads: Torch threads per SDK process. Defaults to torch's choice.
            backend: "torch", "onnx" (int8), "onnx-fp32" or "openvino". Defaults to "torch".
            symmetric: Average the logits of (a, b) and (b, a): a twin relation has no order.
                Defaults to True.
            max_length: Token cut-off of a pair (training.json's). Defaults to the model's.
            min_batch_size: Smallest batch Beam forms (but for a bundle's last). Defaults to 512.
            max_batch_size: Largest batch Beam forms. Defaults to 512.
            predict_batch_size: Pairs per forward pass inside a batch. Defaults to 64.
            progress_total: Expected pairs, for progress lines with an ETA.
        """
        if min_batch_size > max_batch_size:
            raise ValueError(f"min_batch_size ({min_batch_size}) > max_batch_size ({max_batch_size})")
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size)
        self._model, self._threads, self._backend = model, threads, backend
        self._symmetric, self._predict_batch_size = symmetric, predict_batch_size
        self._max_length = max_length
        self._progress_total = progress_total
        self._done, self._started, self._last_log = 0, 0.0, 0.0

    def load_model(self) -> CrossEncoder:
        from twinq.shared.models import load_cross_encoder, set_threads

        set_threads(self._threads)
        return load_cross_encoder(self._model, backend=self._backend,  # type: ignore[return-value]
                                  max_length=self._max_length)

    def run_inference(self, batch: Sequence[tuple[str, str]], model: CrossEncoder,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        from twinq.shared.rerank import score_pairs

        start = time.perf_counter()
        logits = score_pairs(model, list(batch), self._predict_batch_size, symmetric=self._symmetric,
                             scale="logit")
        self._report(len(batch), start)
        return [PredictionResult(pair, float(logit), self.model_id())
                for pair, logit in zip(batch, logits)]

    def model_id(self) -> str:
        from twinq.shared.models import resolve_model

        return resolve_model(self._model)[1]

    def get_metrics_namespace(self) -> str:
        return "twinq_dedupe_rerank"

    def _report(self, n: int, batch_start: float) -> None:
        """A progress line every ~10 s: pairs scored in this process, rate and ETA."""
        now = time.perf_counter()
        self._started = self._started or batch_start
        self._done += n
        if now - self._last_log < 10:
            return
        self._last_log = now
        elapsed = max(now - self._started, 1e-9)
        rate = self._done / elapsed
        if self._progress_total:
            left = max(self._progress_total - self._done, 0)
            log.info("scored %d/~%d pairs (%.0f/s, ETA %.0fs)", self._done, self._progress_total,
                     rate, left / rate)
        else:
            log.info("scored %d pairs (%.0f/s)", self._done, rate)
