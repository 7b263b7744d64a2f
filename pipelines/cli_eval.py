"""`twinq eval pairs`, `twinq eval retrieval` and `twinq eval decide` (twinq.pipelines.
evaluate_pairs, evaluate_retrieval and evaluate_decision)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from twinq.shared.constants import DEFAULT_RERANK_DEPTH

eval_app = typer.Typer(rich_markup_mode=None,
                       help="Evaluate the reranker on pairs, or the whole retrieval path.",
                       no_args_is_help=True, add_completion=False)


@eval_app.command("pairs")
def pairs_command(
    model: str = typer.Option(..., "--model", help="Cross-encoder folder (or hub name)."),
    pairs: list[Path] = typer.Option(..., "--pairs", help="Labelled pair files."),
    symmetric: bool = typer.Option(False, "--symmetric", help="Average both orders."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write report + PR curve here."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Accuracy, F1, AP and ROC-AUC at the stored and the best threshold.

    Example: twinq eval pairs --model runs/ce --pairs runs/quora-beir/labelled_test.tsv
    """
    from rich.console import Console
    from rich.table import Table

    from twinq.pipelines.evaluate_pairs import evaluate_pairs

    report = evaluate_pairs(model, [str(p) for p in pairs], symmetric=symmetric,
                            out=str(out) if out else None)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title=f"{model} on {', '.join(map(str, pairs))}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
    Console().print(table)


@eval_app.command("retrieval")
def retrieval_command(
    root: str = typer.Option(..., "--root", help="Snapshot root (published version)."),
    queries: Path = typer.Option(..., "--queries", help="BEIR queries.jsonl."),
    qrels: Path = typer.Option(..., "--qrels", help="BEIR qrels TSV (with header)."),
    reranker: Optional[str] = typer.Option(None, "--reranker", help="Cross-encoder to compare."),
    recall_k: int = typer.Option(100, "--recall-k", help="Candidates recalled per query."),
    rerank_depth: int = typer.Option(DEFAULT_RERANK_DEPTH, "--rerank-depth",
                                     help="Candidates reranked."),
    fusion_weight: Optional[float] = typer.Option(None, "--fusion-weight",
                                                  help="z-score weight (default: training.json)."),
    symmetric: bool = typer.Option(False, "--symmetric",
                                   help="Rerank both orders and average (2x the cost)."),
    max_queries: Optional[int] = typer.Option(None, "--max-queries", help="First N queries only."),
    out: Optional[Path] = typer.Option(None, "--out", help="report.json, report.md, retrieval.png."),
    adaptive: Optional[bool] = typer.Option(None, "--adaptive/--no-adaptive", help="Rerank each "
                                            "query's adaptive head, or the full depth (default: "
                                            "as the reranker's training.json says)."),
    backend: str = typer.Option("auto", "--backend", help="Cross-encoder backend: auto (what "
                                "the worker serves by default, and what `twinq train` fits the "
                                "fusion, decision and adaptive rule on), torch, onnx, onnx-fp32."),
) -> None:
    """Recall-only vs rerank-only vs fused nDCG@10, MRR@10, Recall@k and queries/s, with the
    rerank pairs scored (adaptive reranking against the full depth).

    Example: twinq eval retrieval --root runs/quora-snap --queries q.jsonl --qrels test.tsv --reranker runs/ce
    """
    from rich.console import Console

    from twinq.pipelines.evaluate_retrieval import evaluate_retrieval, retrieval_table

    report = evaluate_retrieval(root, str(queries), str(qrels), reranker=reranker,
                                recall_k=recall_k, rerank_depth=rerank_depth,
                                fusion_weight=fusion_weight, symmetric=symmetric,
                                max_queries=max_queries, adaptive=adaptive, backend=backend,
                                out=str(out) if out else None)
    Console().print(retrieval_table(report))


@eval_app.command("decide")
def decide_command(
    root: str = typer.Option(..., "--root", help="Snapshot root holding the corpus."),
    queries: Path = typer.Option(..., "--queries", help="BEIR queries.jsonl."),
    qrels: Path = typer.Option(..., "--qrels", help="BEIR qrels TSV (with header)."),
    reranker: str = typer.Option(..., "--reranker", help="Reranker trained by twinq."),
    removed_share: float = typer.Option(0.5, "--removed-share", min=0.0, max=1.0,
                                        help="Share of queries whose twins are removed."),
    unrelated: str = typer.Option("none", "--unrelated", help="File of out-of-domain questions "
                                  "added as no-twin queries ('none': none)."),
    seed: int = typer.Option(13, help="Seed for which queries lose their twins."),
    max_queries: Optional[int] = typer.Option(None, "--max-queries", help="First N queries only."),
    out: Optional[Path] = typer.Option(None, "--out", help="report.json, report.md, decision.png."),
    backend: str = typer.Option("auto", "--backend", help="Cross-encoder backend: auto (what "
                                "the worker serves by default, and what `twinq train` fits the "
                                "decision on), torch, onnx, onnx-fp32."),
) -> None:
    """Answer or abstain: precision/coverage, ECE, Brier and AUROC of the top-1 probability.

    Example: twinq eval decide --root runs/quora-snap --queries q.jsonl --qrels test.tsv --reranker runs/ce
    """
    from rich.console import Console
    from rich.text import Text

    from twinq.pipelines.evaluate_decision import decision_table, evaluate_decision

    report = evaluate_decision(root, str(queries), str(qrels), reranker,
                               removed_share=removed_share, unrelated=unrelated, seed=seed,
                               max_queries=max_queries, out=str(out) if out else None,
                               backend=backend)
    Console().print(Text(decision_table(report)))
