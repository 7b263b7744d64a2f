"""How the demo's sample questions rank (recall only, rerank only, fused) and are decided.

The questions with a twin are ranked three ways; then every question is decided as the worker
does (`twinq.shared.calibration.calibrate` on the fused list, the reranker's own `min_probability`):
paraphrases should be answered from their twin, questions with no twin refused.

Reads a demo work folder (snapshot + cached reranker) left by `make demo` / `twinq demo`:

    .venv/bin/python benchmarks/demo_rankings.py --workdir runs/demo [--reranker DIR]

`--reranker` scores another reranker trained for the demo's snapshot (a recipe being compared);
the last line sums up what issue 18's demo goals count.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np

from common import REPO

from twinq.shared.constants import DEFAULT_RECALL_K, DEFAULT_RERANK_DEPTH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--depth", type=int, default=DEFAULT_RERANK_DEPTH)
    parser.add_argument("--reranker", type=Path, default=None,
                        help="default: the newest reranker cached in --workdir")
    parser.add_argument("--backend", default="auto",
                        help="cross-encoder backend; default auto, as the worker: int8 where the "
                             "reranker's guard passed, which its decision model was fitted on")
    args = parser.parse_args()

    from twinq.shared.calibration import calibrate
    from twinq.shared.fusion import fuse
    from twinq.shared.models import encode_normalised, load_cross_encoder
    from twinq.shared.opened_snapshot import open_snapshot
    from twinq.shared.rerank import rerank
    from twinq.shared.rerank_config import TUNED_FUSION_METHOD, load_rerank_config
    from twinq.shared.search import search_shards

    demo = REPO / "pipelines" / "demo"
    group_of = {r["id"]: r["group"] for r in map(json.loads, (demo / "faq.jsonl").read_text().splitlines())}
    questions = [json.loads(line) for line in (demo / "questions.jsonl").read_text().splitlines()]
    reranker = args.reranker or max((args.workdir / "").glob("reranker-*/training.json"),
                                    key=lambda p: p.stat().st_mtime).parent
    opened = open_snapshot(args.workdir / "root")
    texts = [q["query"] for q in questions]
    vectors = encode_normalised(opened.bi_encoder, texts)
    hits = [h[: args.depth] for h in search_shards(opened.snapshot, vectors, DEFAULT_RECALL_K)]
    rerank(texts, hits, load_cross_encoder(str(reranker), backend=args.backend),
           depth=args.depth)
    defaults = load_rerank_config(str(reranker))
    method, weight = defaults.resolve_fusion(fallback=TUNED_FUSION_METHOD)
    tuned = {"method": method, "weight": weight}
    twins = [(q, h) for q, h in zip(questions, hits) if q.get("group")]

    def correct(method: str, weight: float, key: str = "score") -> int:
        total = 0
        for question, candidates in twins:
            ranked = copy.deepcopy(candidates)
            fuse(ranked, method, weight)
            best = max(ranked, key=lambda h: getattr(h, key))
            total += group_of[best.id] == question["group"]
        return total

    n = len(twins)
    print(f"reranker {reranker}")
    print("| ranking | twin at rank 1 |\n|---|---|")
    print(f"| recall only | {correct('none', 0.0, 'recall_score')}/{n} |")
    print(f"| rerank only (top {args.depth}) | {correct('none', 0.0)}/{n} |")
    print(f"| fused, {tuned['method']} weight {tuned['weight']} (from training.json) | "
          f"{correct(tuned['method'], float(tuned['weight']))}/{n} |")
    if defaults.decision is None:
        return
    threshold = float(defaults.decision.min_probability or 1.0)
    trained_on = _trained_groups(reranker)
    print(f"\nTwin decision at min_probability {threshold:.3f} (from training.json); the top "
          "hit's logit and cosine, and whether the reranker trained on the question's FAQ group "
          "(else it was on the dev side of its split):\n"
          "| question | kind | trained on group | logit | cosine | top hit p | decision | right? |"
          "\n|---|---|---|---|---|---|---|---|")
    confident = answered_right = refused = 0
    off_topic: list[float] = []
    for question, candidates in zip(questions, hits):
        ranked = copy.deepcopy(candidates)
        fuse(ranked, tuned["method"], float(tuned["weight"]))
        calibrate(ranked, defaults.decision)
        p = ranked[0].duplicate_probability or 0.0
        answered = p >= threshold
        kind = question.get("kind") or "paraphrase"
        right = (answered and group_of[ranked[0].id] == question["group"]) if question.get(
            "group") else not answered
        group = question.get("group")
        side = "-" if group is None else ("yes" if group in trained_on else "no (dev)")
        print(f"| {question['query'][:60]} | {kind} | {side} | {ranked[0].rerank_score:.2f} | "
              f"{ranked[0].recall_score:.3f} | {p:.3f} | "
              f"{'answer' if answered else 'no twin'} | {'yes' if right else 'NO'} |")
        if question.get("group"):
            at_one = group_of[ranked[0].id] == question["group"]
            confident += at_one and p >= 0.5
            answered_right += right
        else:
            refused += right
            if kind == "off-topic":
                off_topic.append(p)
    dev_rows = json.loads((reranker / "decision_dev.json").read_text())
    dev_p = defaults.decision.predict(np.asarray(dev_rows["rows"]))
    twins = np.asarray(dev_rows["labels"]) == 1
    no_twin = np.asarray(dev_rows["kinds"]) != "answerable"
    print(f"\ndev ({len(dev_p)} queries, decision_dev.json): twins at p >= 0.5: "
          f"{np.mean(dev_p[twins] >= 0.5):.2f} of {int(twins.sum())}; no-twin queries below 0.5: "
          f"{np.mean(dev_p[no_twin] < 0.5):.2f} of {int(no_twin.sum())}")
    print(f"paraphrases at rank 1 with p >= 0.5: {confident}/{n}; answered: {answered_right}/{n}; "
          f"no-twin questions refused: {refused}/{len(questions) - n}; off-topic p at most "
          f"{max(off_topic, default=0.0):.3f}")


def _trained_groups(reranker: Path) -> set[str]:
    """The FAQ groups on the training side of the reranker's split (its training.json settings).

    The split is recomputed from the same pair files, fraction and seed, so it is the one the
    reranker was trained with while those files are unchanged (their sha256 is in training.json).
    """
    from twinq.pipelines.splits import question_key
    from twinq.pipelines.train_data import split_pairs
    from twinq.pipelines.train_settings import TrainSettings

    settings = json.loads((reranker / "training.json").read_text())["settings"]
    split = split_pairs(TrainSettings(
        pairs=settings["pairs"], out=str(reranker), dev=settings.get("dev"),
        labelled=settings.get("labelled"), train_only=settings.get("train_only"),
        dev_fraction=settings["dev_fraction"], max_pairs=settings.get("max_pairs"),
        max_dev_pairs=settings.get("max_dev_pairs"), seed=settings["seed"]))
    faq = REPO / "pipelines" / "demo" / "faq.jsonl"
    group_of_text = {question_key(r["text"]): r["group"]
                     for r in map(json.loads, faq.read_text().splitlines())}
    return {group_of_text[question_key(q)] for pair in split.train for q in (pair.q1, pair.q2)
            if question_key(q) in group_of_text}


if __name__ == "__main__":
    main()
