"""Fine-tune the cross-encoder reranker on question pairs, on CPU.

Steps, each a function: read pairs -> question-disjoint train/dev split -> mine negatives for
positive-only data (optionally vetted by a trained reranker, `twinq.pipelines.denoise`) -> build the
(optionally swapped) dataset -> train with ``CrossEncoderTrainer`` + ``BinaryCrossEntropyLoss``
(or, with ``loss="listwise"``, a softmax over each anchor's twin and its mined near misses; see
`TrainSettings.loss`) in length-grouped batches (much less padding than random ones;
`twinq.pipelines.batching`), evaluating dev and keeping the best checkpoint -> score dev with the
saved model -> pick the threshold -> search the dev questions in the corpus the reranker will
serve, tune the fusion weight and fit the twin decision on those serving-like queries
(`twinq.pipelines.decision_set`) -> write the model and ``training.json``.

Besides the mined near misses, every positive pair gets an easy negative (`easy_negatives`): a
random corpus question or an out-of-domain one, so that the raw score of an unrelated pair is low.

``training.json`` is the contract with the query worker: ``base``, ``threshold``, ``fusion``
(``{"method": "zscore", "weight"}``), ``decision`` (the twin decision model with its default
``min_probability``; `twinq.shared.calibration`), ``calibration`` (the pair calibration of the logit),
``settings``, ``data`` (sizes and sources), ``dev_metrics`` (pairs) and ``decision_dev``.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from twinq.pipelines.decision_set import ServingFit, fit_serving, read_unrelated, split_unrelated
from twinq.pipelines.denoise import drop_likely_twins, teacher_calibration
from twinq.pipelines.metrics import best_threshold, pair_metrics
from twinq.pipelines.mining import mine_hard_negatives
from twinq.pipelines.splits import build_clusters, is_positive, question_disjoint_split, question_key
from twinq.shared.errors import BadInput
from twinq.shared.models import resolve_model, set_threads
from twinq.shared.pairs import LabelledPair, read_pairs

if TYPE_CHECKING:
    from datasets import Dataset
    from sentence_transformers import CrossEncoder

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """Everything that shapes a training run; recorded verbatim in training.json."""

    pairs: list[str]
    out: str
    base: str | None = None
    dev: list[str] | None = None
    labelled: list[str] | None = None
    """Human-labelled pairs kept in full (never capped); their 0s are hard negatives."""
    dev_fraction: float = 0.1
    max_pairs: int | None = None
    max_dev_pairs: int | None = 2000
    epochs: float = 1.0
    lr: float = 2e-5
    batch_size: int = 32
    max_length: int = 64
    swap: bool = True
    negatives: int = 1
    random_negatives: int = 0
    margin: float = 0.05
    bands: str = "1-5,6-20,21-50"
    """Rank bands mined negatives are drawn from, evenly (see `twinq.pipelines.mining`)."""
    hard_negatives: str | None = None
    denoise_with: str | None = None
    """A trained twinq reranker that vets the mined training negatives (`twinq.pipelines.denoise`)."""
    denoise_threshold: float = 0.5
    """Mined negatives the teacher gives a higher duplicate probability are dropped."""
    easy_negatives: int = 1
    """Per positive pair, this many unrelated negatives besides the mined near misses, taking
    turns between a random corpus question of another cluster and an out-of-domain question
    (`unrelated`), so that an unrelated pair gets a low raw score."""
    unrelated: str | None = None
    """Out-of-domain questions (a text file, one per line); None is the bundled list, "none"
    turns them off. Half train, the other half calibrates (`twinq.pipelines.decision_set`)."""
    bi_encoder: str | None = None
    fusion_root: str | None = None
    """The snapshot the reranker will serve: dev questions are searched in it to tune fusion
    and fit the twin decision. None searches the pairs' own questions."""
    fusion_queries: int = 1000
    """In-domain serving-like dev queries at most (half answerable, half with twins removed)."""
    warmup_ratio: float = 0.1
    eval_times: int = 4
    seed: int = 0
    threads: int | None = None
    max_steps: int = -1
    group_by_length: bool = True
    """Batch pairs of similar length (`twinq.pipelines.batching`): less padding, faster on CPU."""
    loss: str = "bce"
    """"bce": every pair scored on its own (binary cross-entropy). "listwise": each positive pair
    becomes one group (anchor, twin, its ``negatives`` mined near misses) and the loss is a
    softmax cross-entropy over the group (sentence-transformers' cross-encoder
    ``MultipleNegativesRankingLoss`` without in-batch randoms: the "localized contrastive" loss of
    Gao et al. 2021), which trains the ranking the worker serves rather than each pair's label;
    pairs with their own 0/1 labels (the human-labelled ones) are also trained with BCE in the
    same run, so their look-alike non-duplicates still teach. Swap then picks each positive-only
    group's anchor side at random instead of doubling the data."""
    timings_s: dict[str, float] = field(default_factory=dict)


def swap_augment(pairs: list[LabelledPair]) -> list[LabelledPair]:
    """Each pair in both orders, so the reranker's score barely depends on the order.

    Returns:
        A list twice as long: pair i at 2i and its mirror at 2i + 1.
    """
    out: list[LabelledPair] = []
    for p in pairs:
        out.append(p)
        out.append(LabelledPair(p.q2, p.q1, p.label))
    return out


def to_dataset(pairs: list[LabelledPair]) -> Dataset:
    """The trainer's columns: sentence1, sentence2, label (float; None counts as 1)."""
    from datasets import Dataset

    return Dataset.from_dict({
        "sentence1": [p.q1 for p in pairs], "sentence2": [p.q2 for p in pairs],
        "label": [float(1 if p.label is None else p.label) for p in pairs]})


def _sample(pairs: list[LabelledPair], limit: int | None, seed: int) -> list[LabelledPair]:
    if limit is None or len(pairs) <= limit:
        return list(pairs)
    rng = random.Random(seed)
    return rng.sample(list(pairs), limit)


def parse_bands(text: str) -> list[tuple[int, int]]:
    """"1-5,6-20" -> [(1, 5), (6, 20)]; bands are 1-based and inclusive.

    Raises:
        BadInput: a band that is not "lo-hi" with 1 <= lo <= hi.
    """
    bands = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not (sep and lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi)):
            raise BadInput(f"bad rank band {part!r}: expected lo-hi, e.g. 1-5,6-20,21-50")
        bands.append((int(lo), int(hi)))
    return bands


LOSSES = ("bce", "listwise")

Group = tuple[LabelledPair, list[str]]
"""An anchor's positive pair and the negatives mined for it (`twinq.pipelines.mining.MiningResult`)."""


class PreparedData(NamedTuple):
    """What `prepare_data` hands to `fit`.

    ``groups`` is empty unless the loss is listwise; ``labelled`` holds the training pairs that
    came with their own 0/1 label (the part a listwise run still trains pairwise).
    """

    train: list[LabelledPair]
    dev: list[LabelledPair]
    data: dict[str, Any]
    groups: list[Group]
    labelled: list[LabelledPair]
    split: SplitPairs | None = None


def random_anchor_side(pairs: list[LabelledPair], seed: int) -> list[LabelledPair]:
    """Flip about half of the positive-only pairs, so either question serves as the anchor.

    Listwise training scores (anchor, candidate) in one order only; this is its swap
    augmentation at no extra cost. Labelled pairs are left as they are.
    """
    rng = random.Random(seed)
    return [LabelledPair(p.q2, p.q1, p.label) if p.label is None and rng.random() < 0.5 else p
            for p in pairs]


def _with_negatives(pairs: list[LabelledPair], settings: TrainSettings, bi_encoder: Any,
                    snapshot: Any = None, teacher: str | None = None
                    ) -> tuple[list[LabelledPair], dict[str, int], list[Group]]:
    """Keep labelled pairs as they are; add mined negatives for every positive pair (label 1 or
    None), vetted by `teacher` when one is given.

    Labelled positives are anchors too: a labelled file's own negatives are only those someone
    wrote down (the demo's are mostly designated near-miss groups and other topics), so without
    mining the reranker never sees the other questions of the same topic and scores them all
    as twins."""
    if not any(is_positive(p) for p in pairs) or settings.negatives + settings.random_negatives == 0:
        return [LabelledPair(p.q1, p.q2, 1 if p.label is None else p.label) for p in pairs], {}, []
    mined = mine_hard_negatives(pairs, bi_encoder, snapshot=snapshot,
                                num_negatives=settings.negatives,
                                random_negatives=settings.random_negatives,
                                bands=parse_bands(settings.bands),
                                margin=settings.margin, seed=settings.seed)
    if teacher:
        mined = drop_likely_twins(mined, teacher, settings.denoise_threshold)
    labelled = [LabelledPair(p.q1, p.q2, 1 if p.label is None else p.label) for p in pairs]
    return labelled + mined.negatives, mined.stats, mined.groups


def easy_negatives(pairs: Sequence[LabelledPair], unrelated: Sequence[str], per_anchor: int,
                   seed: int) -> tuple[list[LabelledPair], dict[str, int]]:
    """(anchor, unrelated question, 0) for every positive pair, `per_anchor` times.

    Mined negatives are all near misses, so the reranker never learns what an unrelated pair
    looks like, and its raw score for one is arbitrary (an off-topic question once scored
    0.988 against an FAQ entry). These take turns: a random question of another duplicate
    cluster from the pairs themselves, then an out-of-domain one from `unrelated`.
    """
    rng = random.Random(seed)
    clusters = build_clusters([p for p in pairs if is_positive(p)])
    questions = list(dict.fromkeys(t for p in pairs for t in (p.q1, p.q2)))
    out: list[LabelledPair] = []
    stats = {"in_corpus": 0, "out_of_domain": 0}
    turn = 0
    for anchor in (p for p in pairs if is_positive(p)):
        own = clusters.get(question_key(anchor.q1))
        for _ in range(per_anchor):
            turn += 1
            if unrelated and turn % 2 == 0:
                out.append(LabelledPair(anchor.q1, unrelated[rng.randrange(len(unrelated))], 0))
                stats["out_of_domain"] += 1
                continue
            for _try in range(20):
                text = questions[rng.randrange(len(questions))]
                if clusters.get(question_key(text), -1) != own:
                    out.append(LabelledPair(anchor.q1, text, 0))
                    stats["in_corpus"] += 1
                    break
    return out, stats


class SplitPairs(NamedTuple):
    """Pairs as read and split, before any negative is added.

    ``everything`` holds every pair read (train side and dev side, uncapped): the duplicate
    clusters it forms say which stored questions are a dev query's twins, complete even where
    `max_dev_pairs` sampled some of its pairs away. ``kept`` are the human-labelled pairs.
    """

    train: list[LabelledPair]
    dev: list[LabelledPair]
    everything: list[LabelledPair]
    data: dict[str, Any]
    kept: set[LabelledPair]


def split_pairs(settings: TrainSettings) -> SplitPairs:
    """Read the pair files, split them question-disjointly (or take --dev) and cap both sides.

    Raises:
        BadInput: no pairs, or --labelled pairs without 0/1 labels.
    """
    source = read_pairs(settings.pairs)
    if not source.pairs:
        raise BadInput(f"no pairs read from {settings.pairs}")
    data: dict[str, Any] = {"train_sources": source.sources, "train_rejected": source.rejected}
    extra = read_pairs(settings.labelled) if settings.labelled else None
    if extra is not None:
        if not extra.pairs or any(p.label is None for p in extra.pairs):
            raise BadInput(f"--labelled needs pairs with 0/1 labels: {settings.labelled}")
        data["labelled_sources"] = extra.sources
    kept = set(extra.pairs) if extra is not None else set()
    everything = list(source.pairs) + (list(extra.pairs) if extra is not None else [])
    if settings.dev:
        dev_source = read_pairs(settings.dev)
        train, dev = everything, list(dev_source.pairs)
        everything = everything + dev
        data["dev_sources"] = dev_source.sources
    else:
        # One split over both sources, so a labelled question never sits on both sides.
        split = question_disjoint_split(everything, settings.dev_fraction, settings.seed)
        train, dev = split.train, split.dev
        data["split"] = {"method": "question-disjoint clusters", "dev_fraction":
                         settings.dev_fraction, "dropped_cross_pairs": split.dropped}
    # --max-pairs caps the bulk source only: the human-labelled pairs are few and the most useful.
    train = (_sample([p for p in train if p not in kept], settings.max_pairs, settings.seed)
             + [p for p in train if p in kept])
    dev = _sample(dev, settings.max_dev_pairs, settings.seed + 1)
    return SplitPairs(train, dev, everything, data, kept)


def prepare_data(settings: TrainSettings) -> PreparedData:
    """Read, split, cap and complete train and dev pairs with negatives.

    Returns:
        Train pairs before swap, dev pairs, data facts for training.json and, for the listwise
        loss, the mined groups.

    Raises:
        BadInput: no pairs, a side of the split without both labels, an unknown loss, or the
            listwise loss without positive-only pairs to group.
    """
    if settings.loss not in LOSSES:
        raise BadInput(f"unknown loss {settings.loss!r}: expected one of {', '.join(LOSSES)}")
    from twinq.shared.models import load_bi_encoder

    parse_bands(settings.bands)  # a typo fails now, not after the pairs are read
    if settings.denoise_with:  # likewise a teacher without calibration, before minutes of mining
        teacher_calibration(settings.denoise_with, settings.denoise_threshold)
    split = split_pairs(settings)
    train, dev, data, kept = split.train, split.dev, split.data, split.kept
    needs_bi = (settings.negatives + settings.random_negatives > 0
                and any(is_positive(p) for p in train + dev))
    bi_encoder = load_bi_encoder(settings.bi_encoder) if needs_bi else None
    snapshot = None
    if settings.hard_negatives:
        from twinq.shared.snapshot import load_snapshot

        snapshot = load_snapshot(settings.hard_negatives)
    listwise = settings.loss == "listwise"
    labelled = [p for p in train if p.label is not None]
    if listwise and settings.swap:
        train = random_anchor_side(train, settings.seed)
    # Only the training negatives are vetted: dev keeps the plain miner's, so rows compare.
    train, data["train_mining"], mined_groups = _with_negatives(train, settings, bi_encoder,
                                                                snapshot, settings.denoise_with)
    dev, data["dev_mining"], _ = _with_negatives(dev, settings, bi_encoder)
    if settings.easy_negatives > 0:
        unrelated_train, _ = split_unrelated(read_unrelated(settings.unrelated))
        easy, data["easy_negatives"] = easy_negatives(train, unrelated_train,
                                                      settings.easy_negatives, settings.seed)
        train = train + easy
        labelled = labelled + easy  # the listwise loss trains labelled pairs with BCE
    groups: list[Group] = []
    if listwise:
        groups = [(a, negs[:settings.negatives]) for a, negs in mined_groups
                  if len(negs) >= settings.negatives]
        if not groups:
            raise BadInput("the listwise loss needs positive-only pairs with mined negatives "
                           "(--negatives >= 1)")
        data["listwise_groups"] = {"kept": len(groups), "short": len(mined_groups) - len(groups)}
    for name, side in (("train", train), ("dev", dev)):
        labels = {p.label for p in side}
        if labels != {0, 1}:
            raise BadInput(f"{name} pairs need both labels 0 and 1, found {sorted(labels)}")
        data[f"{name}_pairs"] = len(side)
        data[f"{name}_positives"] = sum(1 for p in side if is_positive(p))
    return PreparedData(train, dev, data, groups, labelled, split)


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


TRAIN_SAMPLE = 1000
"""Training pairs re-scored after training, to report train metrics beside dev (overfitting)."""


def pair_report(model_dir: str, dev: list[LabelledPair], settings: TrainSettings,
                train: list[LabelledPair] | None = None) -> dict[str, Any]:
    """Score dev pairs with the saved model's default predict output; pick the threshold.

    Also scores a fixed sample of the training pairs at the dev threshold (train metrics).
    """
    from twinq.shared.models import load_cross_encoder

    model = load_cross_encoder(model_dir, max_length=settings.max_length)
    labels = [int(p.label or 0) for p in dev]
    raw = model.predict([(p.q1, p.q2) for p in dev], batch_size=64, show_progress_bar=False)
    threshold, _ = best_threshold(labels, raw, "accuracy")
    result = {"threshold": float(threshold), "dev_metrics": pair_metrics(labels, raw, threshold),
              "raw_score": f"CrossEncoder.predict default activation "
                           f"({type(model.activation_fn).__name__}); rerank_score is its logit"}
    if train:
        sample = _sample(train, TRAIN_SAMPLE, settings.seed + 2)
        train_raw = model.predict([(p.q1, p.q2) for p in sample], batch_size=64,
                                  show_progress_bar=False)
        result["train_metrics"] = pair_metrics([int(p.label or 0) for p in sample], train_raw,
                                               threshold)
    return result


def serving_fit(model_dir: str, settings: TrainSettings, split: SplitPairs | None) -> ServingFit:
    """Fusion, the twin decision and the pair calibration of a trained reranker, fitted on the
    held-out side of `split` (`twinq.pipelines.decision_set.fit_serving`)."""
    split = split or split_pairs(settings)
    _, unrelated_held_out = split_unrelated(read_unrelated(settings.unrelated))
    return fit_serving(model_dir, split.dev, split.everything, root=settings.fusion_root,
                       bi_encoder=settings.bi_encoder, unrelated=unrelated_held_out,
                       limit=settings.fusion_queries, seed=settings.seed,
                       max_length=settings.max_length)


def refit_decision(model_dir: str, *, fusion_root: str | None = None) -> dict[str, Any]:
    """Fit fusion and the twin decision of a reranker trained by twinq again, without training.

    The training pairs and split are read from the settings in its training.json, so the dev
    side is the same held-out one; `fusion_root` points it at another snapshot (the corpus it
    will now serve). training.json's ``fusion``, ``decision``, ``calibration`` and
    ``decision_dev`` are replaced; everything else is kept.

    Raises:
        BadInput: no training.json with settings in `model_dir`.
    """
    path = Path(model_dir) / "training.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        stored = dict(report["settings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{path}: not a training.json written by twinq train reranker ({exc})") from exc
    known = {f for f in TrainSettings.__dataclass_fields__}
    settings = TrainSettings(**{k: v for k, v in stored.items() if k in known})
    if fusion_root:
        settings.fusion_root = fusion_root
    serving = serving_fit(model_dir, settings, None)
    report.update(fusion=serving.fusion, decision=serving.decision.to_dict(),
                  calibration=serving.calibration.to_dict(), decision_dev=serving.dev)
    report["settings"]["fusion_root"] = settings.fusion_root
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
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
    serving = serving_fit(str(out), settings, split)
    settings.timings_s["calibrate"] = round(time.perf_counter() - t2, 1)
    report = {"base": resolve_model(settings.base)[1], "threshold": result["threshold"],
              "fusion": serving.fusion, "decision": serving.decision.to_dict(),
              "calibration": serving.calibration.to_dict(), "raw_score": result["raw_score"],
              "settings": asdict(settings), "data": data, "dev_metrics": result["dev_metrics"],
              "decision_dev": serving.dev, "train_metrics": result.get("train_metrics", {}),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "training.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log.info("wrote %s: dev pairs %s; twin decision on %d serving-like dev queries: ECE %.3f, "
             "min_probability %.3f answers %.0f%% at precision %.3f", out,
             {k: round(float(v), 4) for k, v in result["dev_metrics"].items()},
             serving.dev["queries"], serving.dev["ece"], serving.decision.min_probability or 1.0,
             100 * serving.dev["coverage"], serving.dev["precision"] or 0.0)
    return report
