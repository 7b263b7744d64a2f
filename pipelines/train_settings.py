"""Everything that shapes a `twinq train reranker` run, recorded verbatim in training.json."""

from __future__ import annotations

from dataclasses import dataclass, field

from twinq.shared.errors import BadInput


@dataclass
class TrainSettings:
    """Everything that shapes a training run; recorded verbatim in training.json."""

    pairs: list[str]
    out: str
    base: str | None = None
    dev: list[str] | None = None
    labelled: list[str] | None = None
    """Human-labelled pairs kept in full (never capped); their 0s are hard negatives."""
    train_only: list[str] | None = None
    """Pairs from elsewhere (another domain, say) that only add training signal: never split
    into dev and never capped, so dev, fusion and the twin decision stay about --pairs."""
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
    turns them off. Half train, the other half calibrates the decision
    (`twinq.pipelines.unrelated_questions`)."""
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
