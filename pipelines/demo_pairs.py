"""Derive labelled pairs from paraphrase groups: the demo FAQ's, and the other domains' the
demo reranker also trains on (`pipelines/paraphrases`).

Every two questions of a group are a duplicate pair. Near-miss groups (same words, another
meaning) give the hard negatives a reranker must learn; pairs across random groups give easy
ones. The output is deterministic, so each pairs.tsv can be regenerated and checked.

    python -m twinq.pipelines.demo_pairs > pipelines/demo/pairs.tsv
    python -m twinq.pipelines.demo_pairs pipelines/paraphrases/groups.jsonl > pipelines/paraphrases/pairs.tsv
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"
PARAPHRASES_DIR = Path(__file__).resolve().parent / "paraphrases"
HARD_PER_NEAR_MISS = 36
"""Up to every cross pair of two near-miss groups: the distinctions a reranker is for."""


def load_groups(path: Path = DEMO_DIR / "faq.jsonl") -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """Questions by group, and the (group, near-miss group) pairs."""
    groups: dict[str, list[str]] = defaultdict(list)
    near: set[tuple[str, str]] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        groups[row["group"]].append(row["text"])
        if row.get("near_miss_of"):
            near.add((row["group"], row["near_miss_of"]))
    return dict(groups), sorted(near)


def derive_pairs(groups: dict[str, list[str]], near: list[tuple[str, str]], seed: int = 13
                 ) -> list[tuple[str, str, int]]:
    """Positives within groups; hard negatives across near-miss groups; random negatives to balance."""
    rng = random.Random(seed)
    positives = [(a, b, 1) for texts in groups.values() for a, b in itertools.combinations(texts, 2)]
    hard = []
    for g1, g2 in near:
        cross = list(itertools.product(groups[g1], groups[g2]))
        hard += [(a, b, 0) for a, b in rng.sample(cross, min(HARD_PER_NEAR_MISS, len(cross)))]
    names = sorted(groups)
    easy = []
    while len(hard) + len(easy) < len(positives):
        g1, g2 = rng.sample(names, 2)
        easy.append((rng.choice(groups[g1]), rng.choice(groups[g2]), 0))
    pairs = positives + hard + easy
    rng.shuffle(pairs)
    return pairs


def render(pairs: list[tuple[str, str, int]]) -> str:
    """LCQMC format: q1 TAB q2 TAB label."""
    return "".join(f"{a}\t{b}\t{label}\n" for a, b, label in pairs)


if __name__ == "__main__":
    sys.stdout.write(render(derive_pairs(*load_groups(*(Path(a) for a in sys.argv[1:2])))))
