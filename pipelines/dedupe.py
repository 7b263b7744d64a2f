"""`twinq dedupe`: the twins already sitting in a published snapshot, as clusters.

    check the inputs (snapshot, reranker, threshold, K) -> nothing is written before this passes
    Beam: every shard's rows -> K nearest neighbours in all shards -> pairs above the recall
          floor, once each -> cross-encoder logits (both orders averaged) -> scored pairs
    then, outside Beam: logits -> calibrated probabilities -> edges (>= threshold)
          -> clusters with the chaining guard (`twinq.pipelines.dedupe_clusters`)
          -> clusters.parquet, clusters.jsonl, pairs.parquet, summary.json, sizes.png

The clustering runs in one process over the scored pairs: at most rows x K of them, so memory
grows with the corpus times K, never with the corpus squared.

Example:
    >>> result = dedupe(DedupeOptions(root=Path("runs/quora-snap"), out=Path("runs/dedupe"),
    ...                               reranker="runs/ablation/mid-easy"))  # doctest: +SKIP
    >>> result.summary["counts"]["clusters"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from twinq.pipelines.beam_options import pipeline_options
from twinq.pipelines.dedupe_clusters import METHODS, Cluster, Method, cluster_pairs
from twinq.shared.errors import BadInput, SnapshotInvalid, SnapshotNotFound
from twinq.shared.models import resolve_backend

if TYPE_CHECKING:
    import pyarrow as pa

    from twinq.shared.calibration import Calibration
    from twinq.shared.snapshot import Snapshot

log = logging.getLogger(__name__)

DEFAULT_NEIGHBOURS = 10
"""Neighbours searched per row (besides itself). Quora clusters hold 2.5 questions on average;
a row's twins beyond its 10 nearest are rare, and K bounds the pairs at rows x K."""
DEFAULT_RECALL_FLOOR = 0.8
"""Least cosine of a candidate pair: pairs below it are never scored. The cross-encoder is the
cost (every pair twice, both orders), so the floor sets the run time. On all 70,733 Quora
questions with all-MiniLM-L6-v2 and K = 10, a floor of 0.8 keeps 124k candidate pairs holding
79% of the twin pairs found above 0.6 (0.75: 172k pairs, 90%; 0.85: 81k, 62%)."""
DEFAULT_VETO_PROBABILITY = 0.5
"""With calibrated probabilities, a pair scored below this is a known non-twin (the model finds
"not a twin" the likelier answer): it keeps the two questions out of one cluster even when both
are twins of its centre. Cosines carry no such meaning, so recall-only runs veto nothing."""
DEFAULT_MIN_COSINE = 0.85
"""The edge threshold in recall-only mode (no reranker with a decision model): a cosine. On all
of Quora with all-MiniLM-L6-v2, 0.80 and 0.85 give the best pairwise F1 (0.49); 0.85 is the
more precise of the two (docs/dedupe.md)."""

ScoreKind = Literal["probability", "cosine"]


@dataclass(frozen=True)
class DedupeOptions:
    """Everything a dedupe run needs; the CLI fills it from flags.

    Attributes:
        root: Snapshot root; its published version is read (pinned at the start).
        out: Output folder (created; the files named in `OUTPUT_FILES` are replaced).
        reranker: A reranker folder trained by twinq (with a decision model), or None for
            recall scores only.
        neighbours: K, the nearest neighbours searched per row. Defaults to 10.
        min_probability: The edge threshold, in (0, 1]; None takes the reranker's
            `min_probability` (recall-only: `DEFAULT_MIN_COSINE`, as a cosine).
        recall_floor: Least cosine of a pair worth scoring. Defaults to `DEFAULT_RECALL_FLOOR`.
        method: "centre" (the chaining guard) or "components" (none). Defaults to "centre".
        veto_below: A scored pair below this keeps its two questions apart (see
            `cluster_pairs`); None takes the default for the score (probabilities:
            `DEFAULT_VETO_PROBABILITY`, capped at the threshold; cosines: no veto); 0 vetoes
            nothing.
        symmetric: Average the logits of both orders. Defaults to True.
        backend: Cross-encoder backend ("auto", "torch", "onnx", ...); "auto" is resolved once,
            in the driver, so that every Beam worker scores alike, and the summary records the
            resolved one. Defaults to "auto".
        threads: Torch threads per Beam worker process. Defaults to torch's choice.
        batch_size: Pairs per inference batch. Defaults to 512.
        work_dir: Where Beam workers write the scored pairs for the driver (a folder or a
            store URL such as s3://bucket/tmp, which every worker and the driver reach); a
            run writes and then deletes one folder under it. Defaults to a hidden folder in
            `out`, which workers on this machine reach.
        beam_args: Beam options (`--runner`, `--direct_num_workers`, ...).
    """

    root: str | Path
    out: Path
    reranker: str | None = None
    neighbours: int = DEFAULT_NEIGHBOURS
    min_probability: float | None = None
    recall_floor: float = DEFAULT_RECALL_FLOOR
    method: Method = "centre"
    veto_below: float | None = None
    symmetric: bool = True
    backend: str = "auto"
    threads: int | None = None
    batch_size: int = 512
    work_dir: str | None = None
    beam_args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EdgeScore:
    """How a scored pair becomes an edge score, and the threshold on it.

    Attributes:
        kind: "probability" (a reranker with a decision model) or "cosine" (recall only).
        threshold: The least edge score.
        threshold_source: "--min-probability", "training.json" or "default".
        reranker: The reranker folder used, or None.
        calibration: The logit-to-probability map (the pair calibration, or the decision model
            with zero margins when the reranker has none).
        calibration_name: "calibration" or "decision": which map of training.json is used.
        max_length: The token cut-off the reranker was trained with, or None.
        note: One line saying why recall scores are used, or None.
    """

    kind: ScoreKind
    threshold: float
    threshold_source: str
    reranker: str | None = None
    calibration: Calibration | None = None
    calibration_name: str | None = None
    note: str | None = None
    max_length: int | None = None

    def veto(self, given: float | None) -> float | None:
        """The veto level: `given` (0 = none), else the default for this kind of score."""
        if given is not None:
            return given or None
        return min(DEFAULT_VETO_PROBABILITY, self.threshold) if self.kind == "probability" else None

    def scores(self, recall: np.ndarray, rerank: np.ndarray) -> np.ndarray:
        """Edge scores of pairs from their cosines and (averaged) logits."""
        recall = np.asarray(recall, dtype=np.float64)
        if self.kind == "cosine" or self.calibration is None:
            return recall
        logits = np.asarray(rerank, dtype=np.float64)
        if self.calibration.features == ("rerank",):
            return self.calibration.predict_logits(logits)
        from twinq.shared.calibration import FEATURES

        features = np.zeros((len(logits), len(FEATURES)))
        features[:, FEATURES.index("rerank")] = logits
        features[:, FEATURES.index("recall")] = recall
        return self.calibration.predict(features)  # margins 0: a pair scored alone


@dataclass
class DedupeResult:
    """What `dedupe` wrote and measured."""

    out: Path
    clusters: list[dict[str, Any]]
    summary: dict[str, Any]


def edge_score(opts: DedupeOptions) -> EdgeScore:
    """Read the reranker's decision model and settle the threshold.

    A reranker folder without training.json (a hub model, or one not trained by twinq) has no
    decision model: the run then uses recall scores only, and `note` says so.

    Raises:
        BadInput: a threshold outside (0, 1]; a training.json that is malformed or lacks its
            decision model (`ConfigError`).
    """
    from twinq.shared.rerank_config import load_rerank_config

    given = opts.min_probability
    if given is not None and not 0.0 < given <= 1.0:  # NaN fails the comparison too
        raise BadInput(f"--min-probability must be in (0, 1], got {given}")
    source = "--min-probability" if given is not None else None
    if opts.reranker:
        config = load_rerank_config(opts.reranker) if Path(opts.reranker).is_dir() else None
        if config is not None and config.decision is not None:
            threshold = given if given is not None else config.min_probability
            pair_map = config.calibration or config.decision
            return EdgeScore("probability", float(threshold or 0.5),
                             source or "training.json", opts.reranker, pair_map,
                             "calibration" if config.calibration else "decision",
                             max_length=config.max_length)
        why = "no twinq training.json" if Path(opts.reranker).is_dir() else "not a local folder"
        note = (f"--reranker {opts.reranker} has no decision model ({why}): the clusters use "
                "recall scores (cosine) only")
    else:
        note = "no --reranker: the clusters use recall scores (cosine) only"
    threshold = given if given is not None else DEFAULT_MIN_COSINE
    return EdgeScore("cosine", float(threshold), source or "default", None, None, None, note)


def check_options(opts: DedupeOptions) -> tuple[Snapshot, EdgeScore]:
    """Everything that can be refused before anything is written.

    Raises:
        BadInput: K < 1, a recall floor outside [-1, 1], an unknown method, an unpublished,
            missing or corrupt snapshot, a bad threshold or reranker file.
    """
    from twinq.shared import snapshot as snap

    if opts.neighbours < 1:
        raise BadInput(f"--neighbours must be at least 1, got {opts.neighbours}")
    if not -1.0 <= opts.recall_floor <= 1.0:
        raise BadInput(f"--recall-floor must be a cosine in [-1, 1], got {opts.recall_floor}")
    if opts.method not in METHODS:
        raise BadInput(f"--method must be one of {', '.join(METHODS)}, got {opts.method!r}")
    if opts.veto_below is not None and not 0.0 <= opts.veto_below <= 1.0:
        raise BadInput(f"--veto-below must be in [0, 1], got {opts.veto_below}")
    if opts.batch_size < 1:
        raise BadInput(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.out.exists() and not opts.out.is_dir():
        raise BadInput(f"--out {opts.out} exists and is not a folder")
    score = edge_score(opts)
    try:
        snapshot = snap.load_snapshot(opts.root)
    except (SnapshotNotFound, SnapshotInvalid) as exc:
        if isinstance(exc, BadInput):
            raise
        raise BadInput(f"--root {opts.root}: {exc}") from exc
    return snapshot, score


def run_beam(opts: DedupeOptions, snapshot: Snapshot, score: EdgeScore, work: str
             ) -> dict[str, float]:
    """Find and score the candidate pairs with Beam; write them as Parquet parts under `work`
    (a local folder or a store URL); return the pipeline's counts, checked.

    Raises:
        RuntimeError: the runner lost work (a count short or missing; see `_check_counts`).
    """
    from twinq.pipelines import dedupe_transforms as T  # first: it quiets Beam's import
    from twinq.pipelines.index_transforms import COUNT, ONE, split, write_counts

    import apache_beam as beam

    shards = len(snapshot.shards)
    pipeline = beam.Pipeline(options=pipeline_options(opts.beam_args))
    found = split(pipeline
                  | "Shards" >> beam.Create(list(range(shards)))
                  | "Neighbours" >> beam.ParDo(T.ShardNeighbours(
                      str(opts.root), snapshot.version, opts.neighbours, opts.recall_floor)),
                  "Found", [T.PAIR, COUNT])
    pairs = found[T.PAIR] | "OncePerPair" >> beam.CombinePerKey(max)
    if score.kind == "probability":
        scorer = T.PairScorer(str(score.reranker), threads=opts.threads, backend=opts.backend,
                              symmetric=opts.symmetric, max_length=score.max_length)
        groups = T.score_groups(snapshot.rows * opts.neighbours, opts.batch_size)
        scored = split(pairs
                       | "ByGroup" >> beam.Map(T.group_key(groups))
                       | "Groups" >> beam.GroupByKey()
                       | "Rerank" >> beam.ParDo(T.ScorePairBatches(scorer, opts.batch_size)),
                       "Scored", [T.RECORD, COUNT])
        records, score_counts = scored[T.RECORD], [scored[COUNT]]
    else:
        records = pairs | "RecallOnly" >> beam.Map(lambda item: T.recall_record(item)[1])
        score_counts = []
    written = (records
               | "ByPart" >> beam.Map(T.part_key(max(1, shards)))
               | "Parts" >> beam.GroupByKey()
               | "WritePairs" >> beam.FlatMap(T.write_pairs(work)))
    _ = ((found[COUNT], *score_counts, written)
         | "AllCounts" >> beam.Flatten()
         | "OneKey" >> beam.Map(lambda count: (ONE, count))
         | "GatherCounts" >> beam.GroupByKey()
         | "WriteCounts" >> beam.Map(write_counts(work, T.COUNTS_FILE)))
    pipeline.run().wait_until_finish()
    return _check_counts(work, snapshot)


def _check_counts(work: str, snapshot: Snapshot) -> dict[str, float]:
    """The pipeline's counts, refused when the runner lost work: every shard searched, every
    row searched, and the pair files holding every pair they report."""
    import json

    from twinq.pipelines.dedupe_transforms import COUNTS_FILE
    from twinq.shared.store import open_store

    body = open_store(work).read_bytes(COUNTS_FILE)
    if body is None:
        raise RuntimeError(f"the runner lost work: no {COUNTS_FILE} under {work} (the "
                           "pipeline's last step did not run)")
    counts = {name: float(value) for name, value in json.loads(body).items()}
    expected = {"shards_searched": len(snapshot.shards), "rows_searched": snapshot.rows}
    short = {name: (counts.get(name, 0), want) for name, want in expected.items()
             if counts.get(name, 0) != want}
    if short:
        raise RuntimeError(f"the runner lost work: counts (found, expected) {short}")
    counts["rerank_s"] = counts.pop("rerank_ms", 0.0) / 1000
    counts["rerank_load_s"] = counts.pop("rerank_load_ms", 0.0) / 1000
    return counts


def read_pairs(work: str, expected: int | None = None) -> pa.Table:
    """The scored pairs Beam wrote, sorted by (a, b) so that the order never depends on it.

    Raises:
        RuntimeError: the part files hold another number of pairs than `expected`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from twinq.pipelines.dedupe_transforms import PAIRS_PREFIX, pair_schema
    from twinq.shared.store import open_store

    store = open_store(work)
    tables = []
    for name in store.list(""):
        if name.startswith(PAIRS_PREFIX) and name.endswith(".parquet"):
            with store.open(name) as fh:
                tables.append(pq.read_table(fh, schema=pair_schema()))
    table = pa.concat_tables(tables) if tables else pair_schema().empty_table()
    if expected is not None and table.num_rows != expected:
        raise RuntimeError(f"the runner lost work: the pair files under {work} hold "
                           f"{table.num_rows} pairs, the pipeline wrote {expected}")
    return table.sort_by([("a", "ascending"), ("b", "ascending")])


def score_table(pairs: pa.Table, score: EdgeScore) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                              np.ndarray]:
    """(names, a, b, scores): node names (sorted ids) and each pair's nodes and edge score."""
    ids_a = pairs.column("a").to_numpy(zero_copy_only=False)
    ids_b = pairs.column("b").to_numpy(zero_copy_only=False)
    names, inverse = np.unique(np.concatenate([ids_a, ids_b]).astype(str), return_inverse=True)
    recall = pairs.column("recall").to_numpy(zero_copy_only=False).astype(np.float64)
    rerank = pairs.column("rerank").fill_null(0.0).to_numpy(zero_copy_only=False)
    scores = np.round(score.scores(recall, rerank), 6)
    return names, inverse[:len(ids_a)], inverse[len(ids_a):], scores


def dedupe(opts: DedupeOptions, *, clock: Any = time.perf_counter) -> DedupeResult:
    """Check the inputs, find and score the pairs with Beam, cluster, and write the outputs.

    Raises:
        BadInput: see `check_options`; nothing is written then.
    """
    from twinq.pipelines import dedupe_report as R

    started = clock()
    timings: dict[str, float] = {}
    snapshot, score = check_options(opts)
    if score.reranker:  # "auto" resolved once, here: every worker then scores in one backend
        opts = replace(opts, backend=resolve_backend("cross-encoder", str(score.reranker),
                                                     opts.backend).backend)
    if score.note:
        log.warning("%s", score.note)
    timings["check_s"] = round(clock() - started, 3)
    opts.out.mkdir(parents=True, exist_ok=True)
    run = f"work-{snapshot.version}-{time.time_ns()}"
    work = (f"{opts.work_dir.rstrip('/')}/{run}" if opts.work_dir
            else str(opts.out / f".{run}"))
    try:
        mark = clock()
        counters = run_beam(opts, snapshot, score, work)
        timings["pipeline_s"] = round(clock() - mark, 3)
        mark = clock()
        pairs = read_pairs(work, int(counters.get("pairs_written", 0)))
        names, a, b, scores = score_table(pairs, score)
        clusters = cluster_pairs(names, a, b, scores, score.threshold, method=opts.method,
                                 veto_below=score.veto(opts.veto_below))
        timings["cluster_s"] = round(clock() - mark, 3)
        mark = clock()
        records = R.cluster_records(clusters, names, R.texts_of(snapshot, clusters, names))
        summary = R.summary(opts, snapshot, score, counters, names, a, b, scores, clusters,
                            timings)
        R.write_outputs(opts.out, records, pairs, scores, summary)
        timings["write_s"] = round(clock() - mark, 3)
        timings["total_s"] = round(clock() - started, 3)
        summary["timings_s"].update(timings)
        R.write_summary(opts.out, summary)
    finally:
        _remove_work(work)
    return DedupeResult(opts.out, records, summary)


def _remove_work(work: str) -> None:
    """Delete the work folder (pair parts and counts), wherever it is; never raises."""
    from twinq.shared.store import open_store

    try:
        open_store(work).remove_tree("")
    except Exception as exc:  # cleaning up must not hide the run's own error
        log.warning("could not remove the work folder %s: %s", work, exc)
    if "://" not in work:
        shutil.rmtree(work, ignore_errors=True)


__all__ = ["DEFAULT_MIN_COSINE", "DEFAULT_VETO_PROBABILITY", "DEFAULT_NEIGHBOURS", "DEFAULT_RECALL_FLOOR", "Cluster",
           "DedupeOptions", "DedupeResult", "EdgeScore", "check_options", "dedupe", "edge_score"]
