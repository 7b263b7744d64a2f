"""`twinq train reranker`: fine-tune the cross-encoder on question pairs (see twinq.pipelines.train)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

train_app = typer.Typer(rich_markup_mode=None,
                        help="Train models: the cross-encoder reranker.", no_args_is_help=True,
                        add_completion=False)


@train_app.callback()
def _train() -> None:
    """Train models: the cross-encoder reranker."""


@train_app.command("reranker")
def reranker_command(
    pairs: list[Path] = typer.Option(..., "--pairs", help="Pair files (LCQMC, Quora, CSV, PAWS-X, "
                                     "positive-only; aligned *_q1/_q2 files or their prefix)."),
    out: Path = typer.Option(..., "--out", help="Output folder: model + training.json."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model; default bundled MiniLM."),
    dev: Optional[list[Path]] = typer.Option(None, "--dev", help="Dev pairs; default: a "
                                             "question-disjoint split of --pairs."),
    labelled: Optional[list[Path]] = typer.Option(
        None, "--labelled", help="Human-labelled pairs (0/1), kept in full beside --pairs: their "
        "non-duplicates are the hard negatives mining cannot find (same topic, other question)."),
    train_only: Optional[list[Path]] = typer.Option(
        None, "--train-only", help="Pairs from elsewhere (another domain) used for training "
        "only: never held out, so dev, fusion and the twin decision are about --pairs alone."),
    dev_fraction: float = typer.Option(0.1, help="Share of questions held out for dev."),
    epochs: float = typer.Option(1.0, help="Training epochs."),
    swap: bool = typer.Option(True, "--swap/--no-swap", help="Also train on (q2, q1)."),
    hard_negatives: Optional[str] = typer.Option(
        None, "--hard-negatives", help="Snapshot ROOT to mine negatives from (default: an "
        "in-memory index over the training questions). Must hold no evaluation questions."),
    negatives: int = typer.Option(1, help="Mined hard negatives per positive pair."),
    random_negatives: int = typer.Option(0, help="Random negatives per positive-only pair."),
    easy_negatives: int = typer.Option(1, help="Unrelated negatives per positive pair, taking "
                                       "turns: a random corpus question, an out-of-domain one."),
    unrelated: Optional[str] = typer.Option(None, "--unrelated", help="Out-of-domain questions, "
                                            "one per line (default: the bundled list; 'none': "
                                            "off). Half train, half calibrate the decision."),
    margin: float = typer.Option(0.05, help="False-negative margin for mining."),
    bands: str = typer.Option("1-5,6-20,21-50", help="Rank bands mined negatives are drawn from."),
    denoise_with: Optional[str] = typer.Option(None, "--denoise-with", help="A trained twinq "
                                               "reranker that drops mined negatives it calls twins."),
    denoise_threshold: float = typer.Option(0.5, help="Duplicate probability above which "
                                            "--denoise-with drops a mined negative."),
    bi_encoder: Optional[str] = typer.Option(None, "--bi-encoder", help="Bi-encoder for mining; "
                                             "default bundled MiniLM (use recall's model)."),
    fusion_root: Optional[str] = typer.Option(None, "--fusion-root", help="Snapshot ROOT the "
                                              "reranker will serve, holding the dev questions: "
                                              "fusion and the twin decision are fitted on it "
                                              "(default: the pairs' own questions)."),
    fusion_queries: int = typer.Option(1000, help="Serving-like dev queries at most."),
    max_pairs: Optional[int] = typer.Option(None, help="Cap on --pairs training pairs (before "
                                            "negatives); --labelled pairs are not capped."),
    max_dev_pairs: int = typer.Option(2000, help="Cap on dev pairs."),
    lr: float = typer.Option(2e-5, help="Learning rate."),
    batch_size: int = typer.Option(32, help="Training batch size."),
    max_length: int = typer.Option(64, help="Tokenizer cut-off in tokens."),
    max_steps: int = typer.Option(-1, help="Stop after this many steps (-1: by epochs)."),
    group_by_length: bool = typer.Option(True, "--group-by-length/--random-batches", help=
                                         "Batch pairs of similar length (less padding)."),
    loss: str = typer.Option("bce", help="bce: each pair on its own. listwise: a softmax over "
                             "each positive pair's twin and its --negatives mined near misses "
                             "(labelled pairs stay bce)."),
    seed: int = typer.Option(0, help="Seed for split, mining, shuffling and init."),
    threads: Optional[int] = typer.Option(None, help="torch threads."),
) -> None:
    """Fine-tune a cross-encoder; write the model and training.json to OUT.

    Example: twinq train reranker --pairs runs/quora-beir/train_pairs.tsv --out runs/ce --max-pairs 10000
    """
    from rich.console import Console

    from twinq.pipelines.train import train_reranker
    from twinq.pipelines.train_settings import TrainSettings

    settings = TrainSettings(
        pairs=[str(p) for p in pairs], out=str(out), base=base,
        dev=[str(p) for p in dev] if dev else None, dev_fraction=dev_fraction,
        labelled=[str(p) for p in labelled] if labelled else None,
        train_only=[str(p) for p in train_only] if train_only else None,
        max_pairs=max_pairs, max_dev_pairs=max_dev_pairs, epochs=epochs, lr=lr,
        batch_size=batch_size, max_length=max_length, swap=swap, negatives=negatives,
        random_negatives=random_negatives, margin=margin, bands=bands, bi_encoder=bi_encoder, hard_negatives=hard_negatives,
        fusion_root=fusion_root, fusion_queries=fusion_queries, easy_negatives=easy_negatives,
        unrelated=unrelated, seed=seed, threads=threads, max_steps=max_steps,
        group_by_length=group_by_length, loss=loss, denoise_with=denoise_with,
        denoise_threshold=denoise_threshold)
    report = train_reranker(settings)
    m, d = report["dev_metrics"], report["decision_dev"]
    Console().print(f"[bold]wrote {out}[/]: dev accuracy {100 * m['accuracy']:.2f}, F1 "
                    f"{100 * m['f1']:.2f}, AP {100 * m['ap']:.2f}; fusion weight "
                    f"{report['fusion']['weight']}; twin decision on {d['queries']} dev queries: "
                    f"ECE {d['ece']:.3f}, min_probability {report['decision']['min_probability']:.3f}"
                    f" answers {100 * d['coverage']:.0f}% at precision {100 * (d['precision'] or 0):.1f}%")
    Console().print(_adaptive_line(report))


@train_app.command("decide")
def decide_command(
    reranker: Path = typer.Option(..., "--reranker", help="A reranker folder written by "
                                  "`twinq train reranker`."),
    fusion_root: Optional[str] = typer.Option(None, "--fusion-root", help="Snapshot ROOT it "
                                              "will serve (default: the one it was trained "
                                              "with)."),
    fusion_queries: Optional[int] = typer.Option(None, "--fusion-queries", min=1,
                                                 help="In-domain dev queries to fit on at most "
                                                 "(default: as trained, 1000)."),
) -> None:
    """Fit fusion, the twin decision and adaptive reranking again for a trained reranker,
    without training.

    The same held-out pairs (from the settings in its training.json) are searched in the
    snapshot; use it when the corpus the reranker serves has changed.

    Example: twinq train decide --reranker runs/ce --fusion-root /srv/twinq
    """
    from rich.console import Console

    from twinq.pipelines.train import refit_decision

    report = refit_decision(str(reranker), fusion_root=fusion_root, fusion_queries=fusion_queries)
    d = report["decision_dev"]
    Console().print(f"[bold]updated {reranker / 'training.json'}[/]: fusion weight "
                    f"{report['fusion']['weight']}; twin decision on {d['queries']} dev queries: "
                    f"ECE {d['ece']:.3f}, min_probability {report['decision']['min_probability']:.3f}")
    Console().print(_adaptive_line(report))


def _adaptive_line(report: dict) -> str:
    """What the adaptive reranking rule in a training.json saves on dev, in one line."""
    from twinq.pipelines.adaptive_fit import summary
    from twinq.shared.adaptive_depth import AdaptiveRule

    data = report.get("adaptive_rerank")
    return summary(None if data is None else AdaptiveRule.from_dict(data))
