"""`twinq dedupe`: find the duplicate clusters already inside a published snapshot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from twinq.pipelines.dedupe_clusters import METHODS

LARGEST_SHOWN = 10
"""Clusters in the table the command prints."""


def dedupe_command(
    beam_args: Optional[list[str]] = typer.Argument(
        None, metavar="-- BEAM_OPTIONS", show_default=False,
        help="Beam options after `--`, e.g. `-- --direct_num_workers 2 --direct_running_mode "
        "multi_processing` or `-- --runner FlinkRunner`."),
    out: Path = typer.Option(..., "--out", help="Output folder: clusters.parquet, clusters.jsonl, "
                             "pairs.parquet, summary.json, sizes.png."),
    root: Optional[str] = typer.Option(None, "--root", help="Snapshot root: a folder or "
                                       "s3://bucket/prefix, gs://... (or TWINQ_ROOT)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML settings file (or TWINQ_CONFIG)."),
    reranker: Optional[str] = typer.Option(None, "--reranker", help="Reranker folder trained by "
                                           "twinq (or TWINQ_RERANKER); without a decision model "
                                           "the clusters use recall scores only."),
    neighbours: int = typer.Option(10, "--neighbours", help="K: nearest neighbours searched per row."),
    min_probability: Optional[float] = typer.Option(
        None, "--min-probability", help="Edge threshold in (0, 1]; default: the reranker's "
        "min_probability (recall-only: 0.85, a cosine)."),
    recall_floor: float = typer.Option(0.8, "--recall-floor",
                                       help="Least cosine of a pair worth scoring."),
    method: str = typer.Option("centre", "--method", help=f"Clustering: {' or '.join(METHODS)} "
                               "(centre: every member a twin of the canonical one)."),
    veto_below: Optional[float] = typer.Option(
        None, "--veto-below", help="A pair scored below this keeps its questions apart even "
        "when both are twins of one centre; default: 0.5 with probabilities, none with "
        "cosines; 0: none."),
    symmetric: bool = typer.Option(True, "--symmetric/--one-order",
                                   help="Average the logits of both orders."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Cross-encoder backend: auto "
                                          "(default: onnx int8 where its quality check passes, "
                                          "else onnx-fp32, else torch), torch, onnx (int8), "
                                          "onnx-fp32, openvino (or TWINQ_BACKEND)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads per Beam worker "
                                          "process (or TWINQ_THREADS)."),
    batch_size: int = typer.Option(512, "--batch-size", help="Pairs per inference batch."),
    work_dir: Optional[str] = typer.Option(
        None, "--work-dir", help="Where Beam workers leave the scored pairs for this process: a "
        "folder or s3://bucket/tmp that every worker reaches (default: a hidden folder in "
        "--out, enough for workers on this machine)."),
) -> None:
    """Cluster the twins inside the published snapshot: K nearest neighbours per row, the
    cross-encoder on the pairs above the recall floor, clusters whose members are all twins of
    their canonical member. Beam options follow `--` (the runner defaults to DirectRunner).

    Example: twinq dedupe --root runs/quora-snap --reranker runs/ablation/mid-easy --out runs/dedupe
    """
    from rich.console import Console

    from twinq.pipelines.dedupe import DedupeOptions, dedupe
    from twinq.shared.config import load_settings
    from twinq.shared.errors import BadInput

    settings = load_settings(config, overrides={"root": root,
                                                "reranker": reranker, "backend": backend,
                                                "threads": threads})
    if not settings.root:
        raise BadInput("no snapshot root: pass --root or set TWINQ_ROOT")
    opts = DedupeOptions(root=settings.root, out=out, reranker=settings.reranker,
                         neighbours=neighbours, min_probability=min_probability,
                         recall_floor=recall_floor, method=method,  # type: ignore[arg-type]
                         veto_below=veto_below,
                         symmetric=symmetric, backend=settings.backend, threads=settings.threads,
                         batch_size=batch_size, work_dir=work_dir,
                         beam_args=list(beam_args or []))
    result = dedupe(opts)
    console = Console(markup=False, emoji=False, highlight=False)  # stored text, printed literally
    console.print(largest_table(result.clusters))
    console.print(summary_line(result.summary, out))


def largest_table(records: list[dict[str, Any]], limit: int = LARGEST_SHOWN) -> Any:
    """The largest clusters: size, weakest link to the canonical member, canonical text, id."""
    from rich.table import Table

    table = Table(title=f"largest clusters ({min(limit, len(records))} of {len(records)})")
    for column, justify in (("size", "right"), ("min score", "right"), ("canonical question", "left"),
                            ("cluster", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for record in records[:limit]:
        text = record["canonical_text"]
        table.add_row(str(record["size"]),
                      "-" if record["min_score"] is None else f"{record['min_score']:.3f}",
                      text if len(text) <= 70 else text[:67] + "...", record["cluster_id"])
    return table


def summary_line(summary: dict[str, Any], out: Path) -> str:
    counts, threshold = summary["counts"], summary["threshold"]
    return (f"{counts['clusters']} clusters hold {counts['rows_in_clusters']} of {counts['rows']} "
            f"rows; {counts['candidate_pairs']} candidate pairs, {counts['edges']} edges "
            f"({summary['score']} >= {threshold['value']:g}, from {threshold['source']}); "
            f"{summary['timings_s']['total_s']:.1f}s; wrote {out}")
