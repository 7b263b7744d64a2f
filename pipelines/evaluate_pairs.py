"""`twinq eval pairs`: accuracy, F1, AP and ROC-AUC of a reranker on labelled pairs.

Each pair is scored alone, on the scale of the reranker's stored threshold (the sigmoid of its
logit); the pair calibration in its training.json turns the logit into a probability, whose
ECE is reported beside the raw sigmoid's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twinq.pipelines.metrics import expected_calibration_error, pair_metrics, pr_curve
from twinq.pipelines.report_files import write_report_files
from twinq.shared.errors import BadInput
from twinq.shared.pairs import read_pairs
from twinq.shared.rerank_config import DEFAULT_PAIR_THRESHOLD


def evaluate_pairs(model_dir: str, pairs_path: Sequence[str], *, symmetric: bool = False,
                   out: str | None = None, max_length: int | None = None) -> dict[str, Any]:
    """Accuracy, F1, AP and ROC-AUC at the stored threshold and at the best one.

    Args:
        model_dir: A cross-encoder folder; its training.json supplies the threshold and the pair
            calibration (``ece``; ``ece_raw`` is the sigmoid of the logit).
        pairs_path: Labelled pair files (any format `read_pairs` accepts).
        symmetric: Score both orders and average. Defaults to False.
        out: Write report.json, report.md and pr_curve.png here. Defaults to None.
        max_length: Tokenizer cut-off. Defaults to the one it was trained with, else the
            model's.

    Raises:
        BadInput: the file holds no labelled pairs.
        ConfigError: the model's training.json is malformed.
    """
    from twinq.shared.calibration import sigmoid
    from twinq.shared.models import load_cross_encoder
    from twinq.shared.rerank import score_pairs
    from twinq.shared.rerank_config import load_rerank_config

    data = read_pairs(list(pairs_path))
    pairs = [p for p in data.pairs if p.label is not None]
    if not pairs:
        raise BadInput(f"no labelled pairs in {list(pairs_path)}")
    config = load_rerank_config(model_dir)
    model = load_cross_encoder(model_dir, max_length=max_length or config.max_length)
    start = time.perf_counter()
    logits = score_pairs(model, [(p.q1, p.q2) for p in pairs], 64, symmetric=symmetric,
                         scale="logit").astype(np.float64)
    raw = sigmoid(logits)  # CrossEncoder.predict's default output, the threshold's scale
    seconds = time.perf_counter() - start
    labels = [int(p.label) for p in pairs]  # type: ignore[arg-type]
    threshold = (DEFAULT_PAIR_THRESHOLD if config.pair_threshold is None
                 else config.pair_threshold)
    report: dict[str, Any] = {"model": model_dir, "pairs": list(map(str, pairs_path)),
                              "rejected": data.rejected, "symmetric": symmetric,
                              "pairs_per_s": len(pairs) * (2 if symmetric else 1) / seconds}
    report.update(pair_metrics(labels, raw, threshold))
    if config.calibration is not None:
        report["ece"] = expected_calibration_error(labels,
                                                   config.calibration.predict_logits(logits))
    report["ece_raw"] = expected_calibration_error(labels, raw)
    if out:
        _write_pair_report(Path(out), report, labels, raw)
    return report


def _write_pair_report(out: Path, report: dict[str, Any], labels: list[int], raw: np.ndarray) -> None:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in report.items() if isinstance(v, float))
    plt = write_report_files(out, report, f"# Pair evaluation: {report['model']}\n\n"
                                          f"| metric | value |\n|---|---|\n{rows}\n")
    precision, recall, _ = pr_curve(labels, raw)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(recall, precision)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"AP {report['ap']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "pr_curve.png", dpi=100)
    plt.close(fig)
