"""Length-grouped training batches: the same examples per epoch, far less padding.

A batch is padded to its longest pair, and Quora pairs run from a dozen tokens to the 64-token
cut-off, so a randomly drawn batch of 32 spends about half its compute on padding. On 2 CPU
cores training is bound by that compute. This sampler draws a random pool of ``pool_batches``
batches' worth of rows, sorts the pool by length, cuts it into batches, and shuffles the batch
order: each batch holds pairs of similar length, while which rows meet in a pool stays random
(the idea of Hugging Face's ``LengthGroupedSampler``, as a sentence-transformers batch sampler).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from sentence_transformers import DefaultBatchSampler

POOL_BATCHES = 50
"""Batches per sorted pool: large enough to group lengths tightly, small enough to stay random."""


def pair_lengths(dataset: Any, columns: Sequence[str] | None = None) -> list[int]:
    """Characters per row over the text columns: a cheap, tokenizer-free proxy for tokens.

    Default columns: all but ``label`` (pairs, or a listwise query with its candidates).
    """
    names = [c for c in dataset.column_names if c != "label"] if columns is None else columns
    texts = [dataset[c] for c in names if c in dataset.column_names]
    return [sum(len(t[i]) for t in texts) for i in range(len(dataset))]


def grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                    pool_batches: int = POOL_BATCHES, drop_last: bool = False) -> list[list[int]]:
    """Row indices cut into batches of similar length, the batches in random order.

    Every row appears exactly once, unless ``drop_last`` drops the last pool's short batch.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    pool = batch_size * pool_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lengths.__getitem__)
        for i in range(0, len(chunk), batch_size):
            batch = chunk[i:i + batch_size]
            if len(batch) == batch_size or not drop_last:
                batches.append(batch)
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


class LengthGroupedBatchSampler(DefaultBatchSampler):
    """Pass the class as ``batch_sampler`` to the trainer's arguments; it reseeds every epoch.

    ``len()`` is the inherited ``BatchSampler`` count: pools hold whole batches, so only the last
    pool can end in a short batch, exactly as when a random order is cut into batches.
    """

    def __init__(self, dataset: Any, batch_size: int, drop_last: bool,
                 valid_label_columns: list[str] | None = None,
                 generator: torch.Generator | None = None, seed: int = 0) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        self.lengths = pair_lengths(dataset)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        yield from grouped_batches(self.lengths, self.batch_size, generator,
                                   drop_last=self.drop_last)
