"""The training data of a reranker: read pairs, split them, add negatives.

Pairs are read and split question-disjointly (or the given dev files are taken), both sides
are capped, then every positive pair gets mined near misses (`twinq.pipelines.mining`,
optionally vetted by a teacher, `twinq.pipelines.denoise`) and easy negatives: a random
corpus question or an out-of-domain one, so that the raw score of an unrelated pair is low.
For the listwise loss, each positive pair becomes a group with its near misses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, NamedTuple

from twinq.pipelines.denoise import drop_likely_twins, teacher_calibration
from twinq.pipelines.mining import mine_hard_negatives
from twinq.pipelines.splits import (build_clusters, drop_overlap, is_positive,
                                    question_disjoint_split, question_key, question_set)
from twinq.pipelines.train_settings import LOSSES, TrainSettings, parse_bands
from twinq.pipelines.unrelated_questions import read_unrelated, split_unrelated
from twinq.shared.errors import BadInput
from twinq.shared.models import resolve_model
from twinq.shared.pairs import LabelledPair, read_pairs


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


def sample_pairs(pairs: list[LabelledPair], limit: int | None, seed: int) -> list[LabelledPair]:
    """At most `limit` of `pairs`, a seeded sample (all of them, in order, when they fit)."""
    if limit is None or len(pairs) <= limit:
        return list(pairs)
    rng = random.Random(seed)
    return rng.sample(list(pairs), limit)


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
    train = (sample_pairs([p for p in train if p not in kept], settings.max_pairs, settings.seed)
             + [p for p in train if p in kept])
    if settings.train_only:
        train = train + _train_only(settings.train_only, dev, data)
    dev = sample_pairs(dev, settings.max_dev_pairs, settings.seed + 1)
    return SplitPairs(train, dev, everything, data, kept)


def _train_only(paths: list[str], dev: list[LabelledPair], data: dict[str, Any]
                ) -> list[LabelledPair]:
    """The --train-only pairs, less any that share a question with dev (dev stays unseen)."""
    source = read_pairs(paths)
    if not source.pairs:
        raise BadInput(f"no pairs read from --train-only {paths}")
    pairs, overlap = drop_overlap(source.pairs, question_set(dev))
    data["train_only_sources"] = source.sources
    data["train_only"] = {"pairs": len(pairs), "dropped_sharing_a_dev_question": overlap}
    return pairs


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
    train, dev, data = split.train, split.dev, split.data
    needs_bi = (settings.negatives + settings.random_negatives > 0
                and any(is_positive(p) for p in train + dev))
    bi_encoder = load_bi_encoder(settings.bi_encoder) if needs_bi else None
    snapshot = None
    if settings.hard_negatives:
        from twinq.shared.opened_snapshot import check_dimension
        from twinq.shared.snapshot import load_snapshot

        snapshot = load_snapshot(settings.hard_negatives)
        if bi_encoder is not None:
            check_dimension(snapshot, bi_encoder, resolve_model(settings.bi_encoder)[1])
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
