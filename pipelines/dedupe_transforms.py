"""The Beam pieces of `twinq dedupe`: each shard's nearest neighbours, and the pair scorer.

    shard numbers -> ShardNeighbours (batched FAISS search of every shard; the snapshot loaded
    once per worker process)
    -> ((id_a, id_b), (cosine, text_a, text_b)) above the recall floor, once per pair
    -> GroupByKey by a hash of the pair -> ScorePairBatches(PairScorer): cross-encoder logits,
       both orders averaged, in batches
    -> {"a", "b", "recall", "rerank"} records -> GroupByKey by part -> WritePairs: one Parquet
       file per part in the work folder -> their counts -> `index_transforms.write_counts`
       into the work folder, the last step

The pipeline keeps to what every runner the build supports runs correctly (the DaskRunner's
gaps are listed in docs/dask_runner_probe.md): no RunInference (its batching emits a bundle's
last batch from `finish_bundle`), no Beam sink, no side input, and counts travel as data
(`COUNT` pairs written by the last step, which every write feeds), because Beam metrics are not
collected on every runner. Files go through the store layer, so the work folder may be a local
path or an s3:// / gs:// URL that workers on other machines reach.

Memory per worker: the snapshot (memory-mapped), the shard's query batch and its K neighbours;
never a corpus-by-corpus matrix.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twinq.pipelines import index_transforms as _quiet  # noqa: F401 - first: quiets Beam's import

import apache_beam as beam  # noqa: E402
from apache_beam.ml.inference.base import ModelHandler, PredictionResult  # noqa: E402

from twinq.pipelines.index_transforms import COUNT, once_per_process  # noqa: E402
from twinq.pipelines.index_transforms import COUNTS as COUNTS_FILE  # noqa: E402, N811
from twinq.shared.text import stable_shard  # noqa: E402

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
Candidate = tuple[PairKey, tuple[float, str, str]]
"""A candidate pair: its key, and (cosine, text_a, text_b)."""

PAIR = "pair"
RECORD = "record"
"""Tags of the DoFns' `(tag, value)` outputs, besides `COUNT` (see `index_transforms.split`)."""
PAIRS_PREFIX = "pairs-"
SCORE_GROUPS = (4, 256)
"""Fewest and most groups the candidate pairs are hashed into for scoring: the units of
parallel cross-encoder work (one group is scored in batches of `--batch-size` pairs)."""


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

    A pair is emitted as `(PAIR, candidate)` when its cosine is at least `floor`, keyed by its
    sorted ids, so that the pair found from both sides is scored once
    (`beam.CombinePerKey(max)` downstream); then `COUNT` pairs for the shard.
    """

    def __init__(self, root: str, version: str, k: int, floor: float,
                 query_batch: int = QUERY_BATCH) -> None:
        self._root, self._version, self._k, self._floor = root, version, k, floor
        self._query_batch = query_batch
        self._snapshot: SearchableSnapshot | None = None

    def setup(self) -> None:
        root, version = self._root, self._version
        self._snapshot = once_per_process("snapshot", (root, version),
                                          lambda: SearchableSnapshot.load(root, version))

    def process(self, shard: int) -> Iterator[tuple[str, Any]]:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        from twinq.shared.snapshot import embeddings_of

        loaded = self._snapshot
        assert loaded is not None, "setup() loads the snapshot"
        entry = loaded.snapshot.manifest["shards"][shard]
        counts = {"shards_searched": 1, "rows_searched": 0, "neighbour_hits": 0,
                  "pairs_above_floor": 0, "search_ms": 0}
        start_row = 0
        source = (pq.ParquetFile(loaded.snapshot.path / entry["data_file"]) if entry["rows"]
                  else None)
        batches = source.iter_batches(batch_size=self._query_batch, columns=["embedding"]) \
            if source is not None else []
        for batch in batches:
            vectors = embeddings_of(pa.Table.from_batches([batch]))
            started = time.perf_counter()
            scores, shards, rows = nearest(loaded.snapshot, vectors, self._k + 1)
            counts["search_ms"] += int((time.perf_counter() - started) * 1000)
            own = np.arange(start_row, start_row + len(vectors))[:, None]
            is_self = (shards == shard) & (rows == own)
            wanted = (~is_self) & (rows >= 0)
            # K neighbours besides the row itself, then the floor.
            wanted &= np.cumsum(wanted, axis=1) <= self._k
            counts["neighbour_hits"] += int(wanted.sum())
            wanted &= scores >= self._floor
            counts["pairs_above_floor"] += int(wanted.sum())
            for q, j in zip(*np.nonzero(wanted)):
                yield PAIR, self._pair(loaded, shard, start_row + int(q), int(shards[q, j]),
                                       int(rows[q, j]), float(scores[q, j]))
            counts["rows_searched"] += len(vectors)
            start_row += len(vectors)
        for name, number in counts.items():
            yield COUNT, (name, number)

    def _pair(self, loaded: SearchableSnapshot, shard: int, row: int, other_shard: int,
              other_row: int, score: float) -> Candidate:
        a, ta = str(loaded.ids[shard][row]), str(loaded.texts[shard][row])
        b, tb = str(loaded.ids[other_shard][other_row]), str(loaded.texts[other_shard][other_row])
        if b < a:
            a, b, ta, tb = b, a, tb, ta
        return (a, b), (round(score, 6), ta, tb)


def score_groups(pairs_bound: int, batch_size: int) -> int:
    """Groups for at most `pairs_bound` candidate pairs: about one per batch, within
    `SCORE_GROUPS` (too many would make small batches, too few leave workers idle)."""
    fewest, most = SCORE_GROUPS
    return max(fewest, min(most, -(-pairs_bound // max(batch_size, 1))))


def group_key(groups: int):  # noqa: ANN201 - returns a Beam-friendly callable
    """Key a candidate pair by a stable hash of its ids, into one of `groups` groups."""

    def key(item: Candidate) -> tuple[int, Candidate]:
        (a, b), _ = item
        return stable_shard(f"{a}\t{b}", groups), item

    return key


def recall_record(item: Candidate) -> tuple[str, dict[str, Any]]:
    """A candidate pair without a reranker: its cosine only."""
    (a, b), (score, _, _) = item
    return RECORD, {"a": a, "b": b, "recall": score, "rerank": None}


class ScorePairBatches(beam.DoFn):
    """After a GroupByKey by `group_key`: score each group's pairs with the cross-encoder in
    batches of `batch_size` (cut after a sort by length, so that a batch pads little); emit
    `(RECORD, record)` per pair, then `COUNT` pairs for the time spent."""

    def __init__(self, scorer: PairScorer, batch_size: int) -> None:
        self._scorer, self._batch_size = scorer, batch_size
        self._model: Any = None
        self._load_ms = 0

    def setup(self) -> None:
        started = time.perf_counter()
        self._model = once_per_process("cross-encoder", self._scorer.model_key(),
                                       self._scorer.load_model)
        self._load_ms = int((time.perf_counter() - started) * 1000)

    def process(self, item: tuple[int, Iterable[Candidate]]) -> Iterator[tuple[str, Any]]:
        pairs = sorted(item[1], key=lambda c: (len(c[1][1]) + len(c[1][2]), c[0]))
        started = time.perf_counter()
        for start in range(0, len(pairs), self._batch_size):
            batch = pairs[start:start + self._batch_size]
            logits = self._scorer.run_inference([(ta, tb) for _, (_, ta, tb) in batch],
                                                self._model)
            for ((a, b), (score, _, _)), logit in zip(batch, logits):
                yield RECORD, {"a": a, "b": b, "recall": score,
                               "rerank": float(logit.inference)}
        yield COUNT, ("rerank_ms", int((time.perf_counter() - started) * 1000))
        yield COUNT, ("rerank_load_ms", self._load_ms)
        self._load_ms = 0  # counted once per load


def part_key(parts: int):  # noqa: ANN201 - returns a Beam-friendly callable
    """Key a scored record by a stable hash of its first id, into one of `parts` files."""

    def key(record: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return stable_shard(record["a"], parts), record

    return key


def write_pairs(work: str):  # noqa: ANN201 - returns a Beam-friendly callable
    """After a GroupByKey by `part_key`: write one part's records, sorted by (a, b), as
    `pairs-NNNNN.parquet` in the work folder (a local path or a store URL). Idempotent: a
    retried part writes the same bytes to the same name."""

    def write(item: tuple[int, Iterable[dict[str, Any]]]) -> Iterator[tuple[str, int]]:
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        from twinq.shared.store import open_store

        part, records = item
        rows = sorted(records, key=lambda r: (r["a"], r["b"]))
        table = pa.Table.from_pylist(rows, schema=pair_schema())
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        open_store(work).write_bytes(f"{PAIRS_PREFIX}{part:05d}.parquet", buffer.getvalue())
        yield "pairs_written", len(rows)

    return write


class PairScorer(ModelHandler[tuple[str, str], PredictionResult, "CrossEncoder"]):
    """Score question pairs with a cross-encoder: raw logits, both orders averaged by default.

    `load_model` only loads (once per worker process: `ScorePairBatches` keeps it under
    `model_key`); `run_inference` only scores, in one `score_pairs` call per batch, which sorts
    the pairs by length to cut padding.
    """

    def __init__(self, model: str, *, threads: int | None = None, backend: str = "auto",
                 symmetric: bool = True, max_length: int | None = None,
                 predict_batch_size: int = 64, progress_total: int | None = None) -> None:
        """
        Args:
            model: The reranker's folder.
            threads: Torch threads per SDK process. Defaults to torch's choice.
            backend: "auto", "torch", "onnx" (int8), "onnx-fp32" or "openvino" (`dedupe` passes
                the one it resolved "auto" to). Defaults to "auto".
            symmetric: Average the logits of (a, b) and (b, a): a twin relation has no order.
                Defaults to True.
            max_length: Token cut-off of a pair (training.json's). Defaults to the model's.
            predict_batch_size: Pairs per forward pass inside a batch. Defaults to 64.
            progress_total: Expected pairs, for progress lines with an ETA.
        """
        super().__init__()
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

    def model_key(self) -> tuple[Any, ...]:
        """What the loaded model depends on: one load per process for each."""
        return (self._model, self._backend, self._threads, self._max_length)

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
