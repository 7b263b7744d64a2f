"""Train the cross-encoder with sentence-transformers' `CrossEncoderTrainer`, on CPU.

Binary cross-entropy on pairs, or (``loss="listwise"``) a softmax over each anchor's twin and
its mined near misses (see `TrainSettings.loss`), in length-grouped batches (much less
padding than random ones; `twinq.pipelines.batching`), evaluating dev and keeping the best
checkpoint.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twinq.pipelines.train_data import Group, swap_augment
from twinq.pipelines.train_settings import TrainSettings
from twinq.shared.models import resolve_model
from twinq.shared.pairs import LabelledPair

if TYPE_CHECKING:
    from datasets import Dataset
    from sentence_transformers import CrossEncoder


def to_dataset(pairs: list[LabelledPair]) -> Dataset:
    """The trainer's columns: sentence1, sentence2, label (float; None counts as 1)."""
    from datasets import Dataset

    return Dataset.from_dict({
        "sentence1": [p.q1 for p in pairs], "sentence2": [p.q2 for p in pairs],
        "label": [float(1 if p.label is None else p.label) for p in pairs]})


def progress_callback() -> Any:
    """A tqdm bar over optimizer steps with the running loss and ETA (HF's own bar is off)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        bar: Any = None

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.bar = tqdm(total=state.max_steps, desc="train", unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if self.bar is not None and logs:
                shown = {k: f"{v:.3g}" for k, v in logs.items()
                         if k in ("loss", "eval_dev_average_precision", "learning_rate")}
                self.bar.set_postfix(shown)
                # Plain numbers, and none of the evaluator's throughput keys: it runs outside the
                # trainer's loop, so they read 0.0 and say nothing.
                kept = {k: round(float(v), 4) for k, v in logs.items()
                        if isinstance(v, (int, float)) and not k.endswith(("_per_second",
                                                                             "_runtime"))}
                tqdm.write(f"step {state.global_step}: {kept}")

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self.bar.close()

    return Progress()


def _batching(settings: TrainSettings) -> dict[str, Any]:
    if not settings.group_by_length:
        return {}
    from twinq.pipelines.batching import LengthGroupedBatchSampler

    return {"batch_sampler": LengthGroupedBatchSampler}


def to_group_dataset(groups: list[Group]) -> Dataset:
    """The listwise loss's columns: query, positive, negative_1 .. negative_n (no label)."""
    from datasets import Dataset

    width = min(len(negs) for _, negs in groups)
    columns: dict[str, list[str]] = {"query": [a.q1 for a, _ in groups],
                                     "positive": [a.q2 for a, _ in groups]}
    for j in range(width):
        columns[f"negative_{j + 1}"] = [negs[j] for _, negs in groups]
    return Dataset.from_dict(columns)


def _hard_negatives_only_loss(model: CrossEncoder) -> Any:
    """Softmax cross-entropy over (twin, mined negatives) per anchor, with no in-batch randoms.

    The library's ``num_negatives=0`` is refused by its sampler and ``None`` adds every
    in-batch candidate (easy ones, a forward pass each), hence the override.
    """
    from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss

    class HardNegativesOnlyLoss(MultipleNegativesRankingLoss):
        def get_in_batch_negatives(self, anchors, candidates):  # noqa: ANN001, ANN202
            return iter(())

    return HardNegativesOnlyLoss(model, num_negatives=None)


def _training_sets(train: list[LabelledPair], groups: list[Group], labelled: list[LabelledPair],
                   settings: TrainSettings, model: CrossEncoder) -> tuple[Any, Any, int]:
    """(dataset or dict of datasets, loss or dict of losses, rows) for the chosen loss."""
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    def pairs_set(rows: list[LabelledPair]) -> Dataset:
        rows = swap_augment(rows) if settings.swap else list(rows)
        random.Random(settings.seed).shuffle(rows)
        return to_dataset(rows)

    if settings.loss != "listwise":
        dataset = pairs_set(train)
        return dataset, BinaryCrossEntropyLoss(model), len(dataset)
    datasets = {"groups": to_group_dataset(groups)}
    losses: dict[str, Any] = {"groups": _hard_negatives_only_loss(model)}
    if labelled:
        datasets["labelled"] = pairs_set(labelled)
        losses["labelled"] = BinaryCrossEntropyLoss(model)
    return datasets, losses, sum(len(d) for d in datasets.values())


def fit(train: list[LabelledPair], dev: list[LabelledPair], settings: TrainSettings,
        groups: Sequence[Group] = (), labelled: Sequence[LabelledPair] = ()) -> CrossEncoder:
    """Train a cross-encoder and return it with the best dev checkpoint loaded."""
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder import (CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments)
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderClassificationEvaluator

    from transformers import set_seed

    source, _ = resolve_model(settings.base)
    # The classification head is initialised here, before the trainer seeds anything: without
    # this, two runs with the same seed start from different heads and end apart.
    set_seed(settings.seed)
    model = CrossEncoder(source, num_labels=1, max_length=settings.max_length, device="cpu")
    dataset, loss, rows = _training_sets(train, list(groups), list(labelled), settings, model)
    steps = settings.max_steps if settings.max_steps > 0 else max(
        1, int(rows * settings.epochs / settings.batch_size))
    eval_steps = max(1, steps // max(1, settings.eval_times))
    evaluator = CrossEncoderClassificationEvaluator(
        [(p.q1, p.q2) for p in dev], [int(p.label or 0) for p in dev], name="dev",
        batch_size=64, write_csv=False)
    args = CrossEncoderTrainingArguments(
        output_dir=str(Path(settings.out) / "checkpoints"), num_train_epochs=settings.epochs,
        max_steps=settings.max_steps, per_device_train_batch_size=settings.batch_size,
        # transformers 5 takes the warm-up share as a float `warmup_steps` (`warmup_ratio` is
        # deprecated there).
        learning_rate=settings.lr, warmup_steps=settings.warmup_ratio, seed=settings.seed,
        eval_strategy="steps", eval_steps=eval_steps, save_strategy="steps", save_steps=eval_steps,
        save_total_limit=2, load_best_model_at_end=True,
        metric_for_best_model="eval_dev_average_precision", greater_is_better=True,
        logging_steps=max(1, min(50, eval_steps)), report_to="none", disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0, **_batching(settings))
    from transformers import PrinterCallback

    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                                  evaluator=evaluator,
                                  callbacks=[progress_callback()])
    trainer.remove_callback(PrinterCallback)  # our bar's step lines say it once, in order
    trainer.train()
    return trainer.model


def scored_pairs(train: list[LabelledPair], groups: list[Group], labelled: list[LabelledPair],
                 settings: TrainSettings) -> float:
    """Pairs the model scored in training (forward and backward): the cost, comparable across
    losses, behind training.json's ``examples_per_s``."""
    if settings.loss == "listwise":
        per_step = settings.batch_size * (1 + settings.negatives)  # a step of groups, mostly
        total = sum(1 + len(n) for _, n in groups) + len(labelled) * (2 if settings.swap else 1)
    else:
        per_step = settings.batch_size
        total = len(train) * (2 if settings.swap else 1)
    total *= settings.epochs
    return min(total, settings.max_steps * per_step) if settings.max_steps > 0 else total
