"""Length-grouped batches: every row once per epoch, similar lengths together, seeded order."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("datasets")


def _dataset(n: int, seed: int = 0):  # noqa: ANN202
    rng = random.Random(seed)
    words = ["how", "do", "i", "learn", "python", "fast", "what", "is", "the", "best", "way"]
    q1 = [" ".join(rng.choices(words, k=rng.randint(2, 30))) for _ in range(n)]
    q2 = [" ".join(rng.choices(words, k=rng.randint(2, 30))) for _ in range(n)]
    return datasets.Dataset.from_dict({"sentence1": q1, "sentence2": q2,
                                       "label": [float(i % 2) for i in range(n)]})


@pytest.mark.parametrize("n,drop_last", [(5000, False), (5000, True), (31, False), (3207, True)])
def test_each_row_once_and_len_matches(n: int, drop_last: bool) -> None:
    from twinq.pipelines.batching import LengthGroupedBatchSampler

    sampler = LengthGroupedBatchSampler(_dataset(n), batch_size=32, drop_last=drop_last, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    rows = [i for b in batches for i in b]
    assert len(rows) == len(set(rows))
    if drop_last:
        assert all(len(b) == 32 for b in batches)
    else:
        assert sorted(rows) == list(range(n))


def test_batches_group_similar_lengths() -> None:
    from twinq.pipelines.batching import LengthGroupedBatchSampler, pair_lengths

    data = _dataset(6400)
    lengths = pair_lengths(data)
    grouped = list(LengthGroupedBatchSampler(data, batch_size=32, drop_last=False, seed=0))
    padded = sum(32 * max(lengths[i] for i in b) for b in grouped)
    rng = random.Random(0)
    order = rng.sample(range(len(data)), len(data))
    naive = sum(32 * max(lengths[i] for i in order[k:k + 32]) for k in range(0, len(order), 32))
    # the padded size of grouped batches is close to the real total; random ones are far above
    assert padded < 0.75 * naive
    assert padded < 1.1 * sum(lengths)


def test_order_is_seeded_and_changes_by_epoch() -> None:
    from twinq.pipelines.batching import LengthGroupedBatchSampler

    data = _dataset(2000)
    a = LengthGroupedBatchSampler(data, batch_size=16, drop_last=False, seed=7)
    b = LengthGroupedBatchSampler(data, batch_size=16, drop_last=False, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
