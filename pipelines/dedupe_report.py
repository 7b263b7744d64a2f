"""What `twinq dedupe` writes: cluster records, scored pairs, the summary and the size plot.

    OUT/clusters.parquet   one row per cluster (schema `CLUSTER_SCHEMA`), largest first
    OUT/clusters.jsonl     the same records, one JSON object a line
    OUT/pairs.parquet      every scored candidate pair: a, b, recall, rerank, score
    OUT/summary.json       counts, size histogram, threshold, models, timings
    OUT/sizes.png          the cluster size distribution

Every file is written to a temporary name and renamed, so a reader sees the old file or the new
one; running again on the same snapshot rewrites the same records (ids are hashes of the
canonical id, and every order is fixed).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twinq.pipelines.beam_options import runner_name
from twinq.pipelines.dedupe_clusters import Cluster

if TYPE_CHECKING:
    import pyarrow as pa

    from twinq.pipelines.dedupe import DedupeOptions, EdgeScore
    from twinq.shared.snapshot import Snapshot

CLUSTERS_PARQUET = "clusters.parquet"
CLUSTERS_JSONL = "clusters.jsonl"
PAIRS_PARQUET = "pairs.parquet"
SUMMARY = "summary.json"
SIZES_PNG = "sizes.png"
OUTPUT_FILES = (CLUSTERS_PARQUET, CLUSTERS_JSONL, PAIRS_PARQUET, SUMMARY, SIZES_PNG)


def cluster_schema() -> pa.Schema:
    """The columns of clusters.parquet (and the keys of each clusters.jsonl line)."""
    import pyarrow as pa

    edge = pa.struct([("a", pa.string()), ("b", pa.string()), ("score", pa.float64())])
    return pa.schema([
        ("cluster_id", pa.string()), ("size", pa.int32()),
        ("canonical_id", pa.string()), ("canonical_text", pa.string()),
        ("member_ids", pa.list_(pa.string())), ("member_texts", pa.list_(pa.string())),
        ("member_scores", pa.list_(pa.float64())), ("min_score", pa.float64()),
        ("edges", pa.list_(edge)),
    ])


def cluster_id(canonical_id: str) -> str:
    """A stable cluster id: a hash of the canonical member's id (not of the cluster's rank,
    which shifts whenever another cluster grows)."""
    return "c" + hashlib.blake2b(canonical_id.encode("utf-8"), digest_size=8).hexdigest()


def texts_of(snapshot: Snapshot, clusters: list[Cluster], names: np.ndarray) -> dict[str, str]:
    """The stored text of every clustered row, read from the snapshot's shards."""
    wanted = {str(names[m]) for c in clusters for m in c.members}
    found: dict[str, str] = {}
    for shard in snapshot.shards:
        ids = shard.table.column("id").to_pylist()
        texts = shard.table.column("text").to_pylist()
        found.update((i, t) for i, t in zip(ids, texts) if i in wanted)
    return found


def cluster_records(clusters: list[Cluster], names: np.ndarray, texts: dict[str, str]
                    ) -> list[dict[str, Any]]:
    """One record per cluster, in the clusters' order (largest first)."""
    records = []
    for c in clusters:
        ids = [str(names[m]) for m in c.members]
        linked = [s for s in c.scores if s is not None]
        records.append({
            "cluster_id": cluster_id(ids[0]), "size": len(ids),
            "canonical_id": ids[0], "canonical_text": texts[ids[0]],
            "member_ids": ids, "member_texts": [texts[i] for i in ids],
            "member_scores": [None if s is None else round(float(s), 6) for s in c.scores],
            "min_score": round(float(min(linked)), 6) if linked else None,
            "edges": [{"a": str(names[x]), "b": str(names[y]), "score": round(float(p), 6)}
                      for x, y, p in c.edges],
        })
    return records


def summary(opts: DedupeOptions, snapshot: Snapshot, score: EdgeScore, counters: dict[str, float],
            names: np.ndarray, a: np.ndarray, b: np.ndarray, scores: np.ndarray,
            clusters: list[Cluster], timings: dict[str, float]) -> dict[str, Any]:
    """summary.json: what was run, how many of what came out, and how long each part took."""
    label = np.full(len(names), -1, dtype=np.int64)
    for n, c in enumerate(clusters):
        label[c.members] = n
    edge = scores >= score.threshold
    inside = (label[a] >= 0) & (label[a] == label[b])
    sizes = Counter(len(c.members) for c in clusters)
    return {
        "snapshot": {"root": str(opts.root), "version": snapshot.version, "rows": snapshot.rows},
        "models": {"bi_encoder": snapshot.manifest["model"]["name"], "reranker": score.reranker,
                   "backend": opts.backend if score.reranker else None,
                   "calibration": score.calibration_name, "symmetric": bool(score.reranker)
                   and opts.symmetric},
        "score": score.kind,
        "threshold": {"value": score.threshold, "source": score.threshold_source},
        "note": score.note,
        "neighbours": opts.neighbours, "recall_floor": opts.recall_floor, "method": opts.method,
        "veto_below": score.veto(opts.veto_below) if opts.method == "centre" else None,
        "counts": {
            "rows": snapshot.rows,
            "rows_searched": int(counters.get("rows_searched", 0)),
            "neighbour_hits": int(counters.get("neighbour_hits", 0)),
            "candidate_pairs": len(scores),
            "pairs_reranked": len(scores) if score.kind == "probability" else 0,
            "edges": int(edge.sum()),
            "edges_inside_clusters": int((edge & inside).sum()),
            "edges_left_out": int((edge & ~inside).sum()),
            "clusters": len(clusters),
            "rows_in_clusters": int(sum(sizes[s] * s for s in sizes)),
            "largest_cluster": max(sizes, default=0),
        },
        "size_histogram": {str(s): sizes[s] for s in sorted(sizes)},
        "runner": runner_name(opts.beam_args), "beam_args": list(opts.beam_args),
        "timings_s": {"search_s": round(counters.get("search_ms", 0) / 1000, 3),
                      "rerank_s": round(counters.get("rerank_s", 0.0), 3),
                      "rerank_load_s": round(counters.get("rerank_load_s", 0.0), 3), **timings},
        "files": list(OUTPUT_FILES),
    }


def _replace(out: Path, name: str, write: Any) -> None:
    """Write `out/name` through a temporary sibling and an atomic rename."""
    tmp = out / f".{name}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, out / name)
    finally:
        tmp.unlink(missing_ok=True)


def write_outputs(out: Path, records: list[dict[str, Any]], pairs: pa.Table,
                  scores: np.ndarray, summary_data: dict[str, Any]) -> None:
    """clusters.parquet, clusters.jsonl, pairs.parquet and sizes.png (summary.json comes last,
    from `write_summary`, once the timings are complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(records, schema=cluster_schema())
    _replace(out, CLUSTERS_PARQUET, lambda p: pq.write_table(table, p, compression="zstd"))

    def jsonl(path: Path) -> None:
        with path.open("w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    _replace(out, CLUSTERS_JSONL, jsonl)
    scored = pairs.append_column("score", pa.array(scores, pa.float64()))
    _replace(out, PAIRS_PARQUET, lambda p: pq.write_table(scored, p, compression="zstd"))
    _replace(out, SIZES_PNG, lambda p: plot_sizes(summary_data, p))


def write_summary(out: Path, summary_data: dict[str, Any]) -> None:
    _replace(out, SUMMARY, lambda p: p.write_text(json.dumps(summary_data, indent=2) + "\n",
                                                   encoding="utf-8"))


def plot_sizes(summary_data: dict[str, Any], path: Path) -> None:
    """A bar chart of how many clusters have each size (log scale: most clusters are pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histogram = {int(k): v for k, v in summary_data["size_histogram"].items()}
    counts = summary_data["counts"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if histogram:
        ax.bar(list(histogram), list(histogram.values()), color="#4C72B0")
        ax.set_yscale("log")
    ax.set_xlabel("cluster size (questions)")
    ax.set_ylabel("clusters")
    threshold = summary_data["threshold"]["value"]
    ax.set_title(f"{counts['clusters']} clusters, {counts['rows_in_clusters']} of "
                 f"{counts['rows']} rows ({summary_data['score']} >= {threshold:g})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
