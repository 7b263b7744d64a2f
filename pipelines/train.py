"""`twinq train reranker` and `twinq train decide`: the recipe, step by step.

read pairs -> question-disjoint train/dev split -> negatives (`twinq.pipelines.train_data`) ->
train, keeping the best dev checkpoint (`twinq.pipelines.trainer`) -> score dev with the saved
model -> pick the pair threshold -> search the dev questions in the corpus the reranker will
serve, tune the fusion weight and fit the twin decision on those serving-like queries
(`twinq.pipelines.serving_fit`) -> write the model and ``training.json``.

``training.json`` is the contract with the query worker (read by
`twinq.shared.rerank_config`): ``base``, ``threshold``, ``fusion`` (``{"method": "linear",
"weight"}`` and how it was tuned), ``decision`` (the twin decision model with its default
``min_probability``; `twinq.shared.calibration`), ``calibration`` (the pair calibration of the
logit), ``rerank_depth`` (the depth they were fitted at), ``adaptive_rerank`` (the adaptive
reranking rule; `twinq.shared.adaptive_depth`), ``raw_score``, ``settings``, ``data``
(sizes and sources), ``dev_metrics`` and ``train_metrics`` (pairs), ``decision_dev``,
``serving_backend`` (what the worker's default backend, auto, resolves to for this reranker and
the int8 guard's numbers; fusion, the decision, the pair calibration and the adaptive rule are
fitted on that backend's logits, because int8 logits differ from fp32 ones by up to a logit or
two even where the ranking agrees) and ``created_at``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from twinq.pipelines.metrics import best_threshold, pair_metrics
from twinq.pipelines.serving_fit import ServingFit, fit_serving
from twinq.pipelines.train_data import SplitPairs, prepare_data, sample_pairs, split_pairs
from twinq.pipelines.train_settings import TrainSettings
from twinq.pipelines.trainer import fit, scored_pairs
from twinq.pipelines.unrelated_questions import read_unrelated, split_unrelated
from twinq.shared.errors import BadInput
from twinq.shared.models import resolve_backend, resolve_model, set_threads
from twinq.shared.onnx_backend import recipe_fields
from twinq.shared.pairs import LabelledPair
from twinq.shared.rerank_config import TRAINING_FILE, write_training_json

log = logging.getLogger(__name__)

TRAIN_SAMPLE = 1000
"""Training pairs re-scored after training, to report train metrics beside dev (overfitting)."""

PAIR_SCORE = "CrossEncoder.predict default activation (Sigmoid); rerank_score is its logit"
"""training.json's ``raw_score``: the scale of ``threshold`` and the pair metrics."""


def pair_report(model_dir: str, dev: list[LabelledPair], settings: TrainSettings,
                train: list[LabelledPair] | None = None) -> dict[str, Any]:
    """Score dev pairs with the saved model on the sigmoid scale; pick the threshold.

    Pairs are scored in their given order, as a plain `CrossEncoder.predict` does. Also
    scores a fixed sample of the training pairs at the dev threshold (train metrics).
    """
    from twinq.shared.models import load_cross_encoder
    from twinq.shared.rerank import score_pairs

    def scores(pairs: list[LabelledPair]) -> Any:
        return score_pairs(model, [(p.q1, p.q2) for p in pairs], 64, scale="sigmoid",
                           length_sorted=False)

    model = load_cross_encoder(model_dir, max_length=settings.max_length)
    labels = [int(p.label or 0) for p in dev]
    raw = scores(dev)
    threshold, _ = best_threshold(labels, raw, "accuracy")
    result = {"threshold": float(threshold), "dev_metrics": pair_metrics(labels, raw, threshold),
              "raw_score": PAIR_SCORE}
    if train:
        sample = sample_pairs(train, TRAIN_SAMPLE, settings.seed + 2)
        result["train_metrics"] = pair_metrics([int(p.label or 0) for p in sample],
                                               scores(sample), threshold)
    return result


def serving_backend(model_dir: str) -> dict[str, Any]:
    """Export the trained reranker to ONNX and run the int8 guard (about 15 s for MiniLM-L6):
    the backend `auto` will serve it in, and the check's numbers, for training.json. The export
    is cached in the model folder, so the worker's first load is instant."""
    start = time.perf_counter()
    resolved = resolve_backend("cross-encoder", model_dir, "auto")
    # int8 logits, which the decision is fitted on, depend on the recipe: it is recorded too.
    record = {"backend": resolved.backend, "quantisation_check": resolved.check,
              "seconds": round(time.perf_counter() - start, 1), **recipe_fields(resolved.backend)}
    log.info("serving backend of %s: %s (%s)", model_dir, resolved.backend,
             resolved.check["numbers"] if resolved.check else "no onnx export")
    return record


def serving_fit(model_dir: str, settings: TrainSettings, split: SplitPairs | None,
                backend: str = "torch") -> ServingFit:
    """Fusion, the twin decision and the pair calibration of a trained reranker, fitted on the
    held-out side of `split` (`twinq.pipelines.serving_fit.fit_serving`), on the logits of
    `backend` (the one the worker will serve: `serving_backend`)."""
    split = split or split_pairs(settings)
    _, unrelated_held_out = split_unrelated(read_unrelated(settings.unrelated))
    return fit_serving(model_dir, split.dev, split.everything, root=settings.fusion_root,
                       bi_encoder=settings.bi_encoder, unrelated=unrelated_held_out,
                       limit=settings.fusion_queries, seed=settings.seed,
                       max_length=settings.max_length, backend=backend)


def refit_decision(model_dir: str, *, fusion_root: str | None = None,
                   fusion_queries: int | None = None) -> dict[str, Any]:
    """Fit fusion and the twin decision of a reranker trained by twinq again, without training.

    The training pairs and split are read from the settings in its training.json, so the dev
    side is the same held-out one; `fusion_root` points it at another snapshot (the corpus it
    will now serve); `fusion_queries` sets how many dev queries it may use (more: a steadier
    fit, a longer one). training.json's ``fusion``, ``decision``, ``calibration``,
    ``rerank_depth``, ``adaptive_rerank`` and ``decision_dev`` are replaced; everything else
    is kept.

    Raises:
        BadInput: no training.json with settings in `model_dir`.
    """
    path = Path(model_dir) / TRAINING_FILE
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        stored = dict(report["settings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{path}: not a training.json written by twinq train reranker ({exc})") from exc
    known = {f for f in TrainSettings.__dataclass_fields__}
    settings = TrainSettings(**{k: v for k, v in stored.items() if k in known})
    if fusion_root:
        settings.fusion_root = fusion_root
    if fusion_queries:
        settings.fusion_queries = fusion_queries
    backend = serving_backend(model_dir)
    serving = serving_fit(model_dir, settings, None, backend["backend"])
    report.update(serving.config.to_json(), decision_dev=serving.dev, serving_backend=backend)
    report["settings"]["fusion_root"] = settings.fusion_root
    report["settings"]["fusion_queries"] = settings.fusion_queries
    write_training_json(model_dir, report)
    return report


def train_reranker(settings: TrainSettings) -> dict[str, Any]:
    """Run the whole recipe and write ``settings.out`` (model + training.json).

    Returns:
        The training.json content.

    Example:
        >>> train_reranker(TrainSettings(pairs=["train_pairs.tsv"], out="runs/ce", max_pairs=10000))
    """
    set_threads(settings.threads)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, dev, data, groups, labelled, split = prepare_data(settings)
    settings.timings_s["data"] = round(time.perf_counter() - t0, 1)
    t1 = time.perf_counter()
    model = fit(train, dev, settings, groups, labelled)
    model.save(str(out))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    settings.timings_s["train"] = round(time.perf_counter() - t1, 1)
    seen = scored_pairs(train, groups, labelled, settings)
    settings.timings_s["examples_per_s"] = round(seen / max(settings.timings_s["train"], 1e-9), 1)
    t2 = time.perf_counter()
    result = pair_report(str(out), dev, settings, train)
    backend = serving_backend(str(out))  # first: serving is fitted on the logits it will serve
    serving = serving_fit(str(out), settings, split, backend["backend"])
    settings.timings_s["calibrate"] = round(time.perf_counter() - t2, 1)
    config = replace(serving.config, pair_threshold=result["threshold"])
    report = {"base": resolve_model(settings.base)[1], **config.to_json(),
              "raw_score": result["raw_score"], "settings": asdict(settings), "data": data,
              "dev_metrics": result["dev_metrics"], "decision_dev": serving.dev,
              "train_metrics": result.get("train_metrics", {}), "serving_backend": backend,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_training_json(out, report)
    decision = serving.config.decision
    log.info("wrote %s: dev pairs %s; twin decision on %d serving-like dev queries: ECE %.3f, "
             "min_probability %.3f answers %.0f%% at precision %.3f", out,
             {k: round(float(v), 4) for k, v in result["dev_metrics"].items()},
             serving.dev["queries"], serving.dev["ece"],
             (decision.min_probability if decision else None) or 1.0,
             100 * serving.dev["coverage"], serving.dev["precision"] or 0.0)
    return report
