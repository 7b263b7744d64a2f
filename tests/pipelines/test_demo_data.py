"""The shipped demo corpus and the other domains' paraphrase groups: their shape, and that each
pairs.tsv is what its groups derive."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from twinq.pipelines.demo_pairs import DEMO_DIR, PARAPHRASES_DIR, derive_pairs, load_groups, render


def test_demo_pairs_file_matches_its_groups() -> None:
    assert (DEMO_DIR / "pairs.tsv").read_text(encoding="utf-8") == render(derive_pairs(*load_groups()))
    other = load_groups(PARAPHRASES_DIR / "groups.jsonl")
    assert (PARAPHRASES_DIR / "pairs.tsv").read_text(encoding="utf-8") == render(derive_pairs(*other))


OTHER_DOMAIN_BATCHES = {"groups.jsonl": 60, "concrete_groups.jsonl": 30}
"""pipelines/paraphrases' two batches of groups, with the fewest groups each must hold."""


@pytest.mark.parametrize(("name", "least"), OTHER_DOMAIN_BATCHES.items())
def test_other_domains_stay_apart_from_the_demo(name: str, least: int) -> None:
    """The other domains' groups train the demo reranker only: none of their texts may be an FAQ
    question, a sample question, an unrelated question or one of the other batch, and each group
    has a near miss."""
    groups, near = load_groups(PARAPHRASES_DIR / name)
    texts = [t.lower() for ts in groups.values() for t in ts]
    assert len(groups) >= least and all(len(ts) >= 4 for ts in groups.values())
    assert len(set(texts)) == len(texts)
    assert {g for pair in near for g in pair} == set(groups)
    other, _ = load_groups(PARAPHRASES_DIR / next(b for b in OTHER_DOMAIN_BATCHES if b != name))
    assert not set(texts) & {t.lower() for ts in other.values() for t in ts}
    assert not set(groups) & set(other)
    faq = {json.loads(line)["text"].lower() for line in (DEMO_DIR / "faq.jsonl").read_text().splitlines()}
    asked = {json.loads(line)["query"].lower()
             for line in (DEMO_DIR / "questions.jsonl").read_text().splitlines()}
    unrelated = set((DEMO_DIR.parent / "unrelated" / "questions.txt").read_text(encoding="utf-8")
                    .lower().splitlines())
    assert not set(texts) & (faq | asked | unrelated)


def test_demo_corpus_shape() -> None:
    rows = [json.loads(line) for line in (DEMO_DIR / "faq.jsonl").read_text().splitlines()]
    groups = Counter(r["group"] for r in rows)
    assert len(rows) >= 300 and len(groups) >= 60 and len({r["id"] for r in rows}) == len(rows)
    assert len({r["topic"] for r in rows}) >= 6 and all(r["answer"] for r in rows)
    _, near = load_groups()
    assert len(near) >= 10 and all(a in groups and b in groups for a, b in near)
    questions = [json.loads(line) for line in (DEMO_DIR / "questions.jsonl").read_text().splitlines()]
    texts = {r["text"] for r in rows}
    assert all(q["query"] not in texts for q in questions)
    assert all(q["group"] in groups for q in questions if q["group"] is not None)
    assert all(q.get("kind") in ("off-topic", "near-miss") for q in questions if q["group"] is None)
    unrelated = (DEMO_DIR.parent / "unrelated" / "questions.txt").read_text(encoding="utf-8").lower().splitlines()
    assert not {q["query"].lower() for q in questions} & set(unrelated)


def test_derive_pairs_labels() -> None:
    groups, near = load_groups()
    group_of = {t: g for g, texts in groups.items() for t in texts}
    pairs = derive_pairs(groups, near)
    assert all((group_of[a] == group_of[b]) == bool(label) for a, b, label in pairs)
    near_set = {frozenset(p) for p in near}
    hard = [p for p in pairs if not p[2] and frozenset((group_of[p[0]], group_of[p[1]])) in near_set]
    assert len(hard) >= 5 * len(near)
