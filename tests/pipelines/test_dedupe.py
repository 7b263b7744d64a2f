"""`twinq dedupe` end to end: real Beam (DirectRunner), real FAISS, snapshots with hand-made
vectors (so that which pairs are twins is known exactly) and the tiny random cross-encoder."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import write_quick_snapshot
from twinq.pipelines.dedupe import DedupeOptions, dedupe
from twinq.pipelines.dedupe_clusters import cluster_pairs
from twinq.pipelines.dedupe_metrics import cluster_scores, labels_from_clusters
from twinq.pipelines.dedupe_report import OUTPUT_FILES, cluster_schema
from twinq.shared import snapshot as snap
from twinq.shared.cli import main as twinq

DIM = 16


def _unit(*parts: tuple[int, float]) -> np.ndarray:
    v = np.zeros(DIM)
    for axis, value in parts:
        v[axis] = value
    return v / np.linalg.norm(v)


def _turn(axis_a: int, axis_b: int, degrees: float) -> np.ndarray:
    """A unit vector `degrees` from axis_a towards axis_b: cos between two of them is the cos
    of the angle between."""
    r = math.radians(degrees)
    return _unit((axis_a, math.cos(r)), (axis_b, math.sin(r)))


# Known geometry (cosines): a group of three near-identical questions, a pair, a chain of five
# where only neighbours are twins (18 to 25 degrees apart: cos 0.906 to 0.951; two apart at
# most 0.788, below the threshold of 0.85), and three loners. Question 2 of the chain has the
# strongest links (0.940 + 0.951), so it is the chain's centre.
CORPUS: dict[str, np.ndarray] = {
    "how do I reset my password": _turn(0, 1, 0),
    "how can I reset my password": _turn(0, 1, 8),
    "password reset how": _turn(0, 1, 14),
    "where is my parcel": _turn(2, 3, 0),
    "my parcel has not arrived": _turn(2, 3, 10),
    **{f"chain question {i}": _turn(4, 5, angle) for i, angle in enumerate((0, 25, 45, 63, 88))},
    "what is the capital of France": _unit((8, 1.0)),
    "how do I bake bread": _unit((9, 1.0)),
    "is the shop open on sunday": _unit((10, 1.0)),
}
TEXTS = list(CORPUS)
GROUPS = [{"how do I reset my password", "how can I reset my password", "password reset how"},
          {"where is my parcel", "my parcel has not arrived"}]
CHAIN = [f"chain question {i}" for i in range(5)]


class HandMadeEncoder:
    """Stands in for a bi-encoder: each text's vector is the one written above."""

    def encode(self, texts: list[str], **_: Any) -> np.ndarray:
        return np.stack([CORPUS[t] for t in texts]).astype(np.float32)


@pytest.fixture
def hand_made_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    write_quick_snapshot(root, TEXTS, HandMadeEncoder(), model_name="hand-made", shards=3)
    return root


def _run(root: Path, out: Path, **kwargs: Any):
    options = {"min_probability": 0.85, "recall_floor": 0.5, "neighbours": 4, **kwargs}
    return dedupe(DedupeOptions(root=root, out=out, beam_args=["--runner=DirectRunner"],
                                **options))


def _groups(records: list[dict[str, Any]]) -> list[set[str]]:
    return [set(r["member_texts"]) for r in records]


def test_dedupe_finds_the_known_groups_and_leaves_loners_alone(hand_made_root: Path,
                                                                 tmp_path: Path) -> None:
    result = _run(hand_made_root, tmp_path / "out")
    groups = _groups(result.clusters)
    for group in GROUPS:
        assert group in groups
    clustered = set().union(*groups)
    assert not clustered & {"what is the capital of France", "how do I bake bread",
                            "is the shop open on sunday"}
    counts = result.summary["counts"]
    assert counts["rows"] == counts["rows_searched"] == len(TEXTS)
    assert counts["neighbour_hits"] == len(TEXTS) * 4  # exactly K besides the row itself
    assert result.summary["score"] == "cosine"
    assert result.summary["threshold"] == {"value": 0.85, "source": "--min-probability"}
    assert result.clusters[0]["size"] == 3  # largest first


def test_dedupe_does_not_chain_where_connected_components_would(hand_made_root: Path,
                                                                  tmp_path: Path) -> None:
    guarded = _run(hand_made_root, tmp_path / "centre").clusters
    chained = _run(hand_made_root, tmp_path / "components", method="components").clusters
    assert set(CHAIN) in _groups(chained)  # single linkage walks the whole chain
    for record in guarded:
        # every member is a twin of the canonical one, at or above the threshold
        assert record["member_scores"][0] is None
        assert all(s >= 0.85 for s in record["member_scores"][1:])
    chain = [r for r in guarded if set(r["member_texts"]) & set(CHAIN)]
    assert [(r["canonical_text"], r["member_texts"]) for r in chain] == [
        (CHAIN[2], [CHAIN[2], CHAIN[3], CHAIN[1]])]  # best twin first; both ends left alone


def test_dedupe_a_known_non_twin_keeps_two_twins_of_the_centre_apart(hand_made_root: Path,
                                                                       tmp_path: Path) -> None:
    # Chain questions 1 and 3 are both twins of 2, but were scored against each other at 0.788:
    # below a veto of 0.8 they are known non-twins, so 2 keeps 3 (its better twin) and 1 pairs
    # with 0 instead.
    result = _run(hand_made_root, tmp_path / "out", veto_below=0.8)
    chain = [r["member_texts"] for r in result.clusters if set(r["member_texts"]) & set(CHAIN)]
    assert sorted(map(sorted, chain)) == [[CHAIN[0], CHAIN[1]], [CHAIN[2], CHAIN[3]]]
    assert result.summary["veto_below"] == 0.8
    assert _run(hand_made_root, tmp_path / "default").summary["veto_below"] is None  # cosines


def test_cluster_pairs_a_known_non_twin_vetoes_the_bridge() -> None:
    # A~B 0.9, B~C 0.8, A-C scored 0.1: B is the centre and keeps A, its better twin.
    names = ["A", "B", "C"]
    vetoed = cluster_pairs(names, [0, 1, 0], [1, 2, 2], [0.9, 0.8, 0.1], 0.5, veto_below=0.3)
    assert [c.members for c in vetoed] == [[1, 0]]
    trusted = cluster_pairs(names, [0, 1, 0], [1, 2, 2], [0.9, 0.8, 0.1], 0.5)
    assert [c.members for c in trusted] == [[1, 0, 2]]
    assert trusted[0].scores == [None, 0.9, 0.8]
    assert trusted[0].edges == [(0, 1, 0.9), (1, 2, 0.8)]


def test_cluster_pairs_does_not_depend_on_the_order_of_the_pairs() -> None:
    rng = np.random.default_rng(0)
    n = 60
    a, b = rng.integers(0, n, 400), rng.integers(0, n, 400)
    s = rng.random(400)
    names = [f"q{i:03d}" for i in range(n)]
    first = cluster_pairs(names, a, b, s, 0.7, veto_below=0.3)
    order = rng.permutation(400)
    again = cluster_pairs(names, a[order], b[order], s[order], 0.7, veto_below=0.3)
    swapped = cluster_pairs(names, b, a, s, 0.7, veto_below=0.3)
    as_lists = [(c.canonical, c.members, c.scores) for c in first]
    assert as_lists == [(c.canonical, c.members, c.scores) for c in again]
    assert as_lists == [(c.canonical, c.members, c.scores) for c in swapped]
    seen: set[int] = set()
    for c in first:
        assert not seen & set(c.members)
        seen |= set(c.members)
        assert all(p >= 0.7 for p in c.scores[1:])


def test_cluster_scores_pairwise_and_bcubed_by_hand() -> None:
    # truth {0,1,2} {3,4}; predicted {0,1} {2,3} {4}
    scores = cluster_scores([0, 0, 1, 1, 2], [0, 0, 0, 1, 1])
    assert scores["pairwise_precision"] == pytest.approx(1 / 2)  # (0,1) right, (2,3) wrong
    assert scores["pairwise_recall"] == pytest.approx(1 / 4)  # of (0,1) (0,2) (1,2) (3,4)
    assert scores["bcubed_precision"] == pytest.approx((1 + 1 + 0.5 + 0.5 + 1) / 5)
    assert scores["bcubed_recall"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 / 2 + 1 / 2) / 5)
    perfect = cluster_scores(labels_from_clusters(5, [[0, 1, 2], [3, 4]]), [7, 7, 7, 9, 9])
    assert perfect["pairwise_f1"] == perfect["bcubed_f1"] == 1.0


def test_dedupe_output_files_and_their_schema(hand_made_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _run(hand_made_root, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)  # no work files left
    table = pq.read_table(out / "clusters.parquet")
    assert table.schema.equals(cluster_schema())
    lines = [json.loads(x) for x in (out / "clusters.jsonl").read_text().splitlines()]
    assert lines == table.to_pylist() == result.clusters
    for record in lines:
        assert record["member_ids"][0] == record["canonical_id"]
        assert record["member_texts"][0] == record["canonical_text"]
        assert record["size"] == len(record["member_ids"]) == len(record["member_scores"])
        assert record["min_score"] == min(record["member_scores"][1:])
        assert all(e["score"] >= 0.85 and {e["a"], e["b"]} <= set(record["member_ids"])
                   for e in record["edges"])
    pairs = pq.read_table(out / "pairs.parquet")
    assert pairs.column_names == ["a", "b", "recall", "rerank", "score"]
    assert all(a < b for a, b in zip(pairs.column("a").to_pylist(), pairs.column("b").to_pylist()))
    assert len(set(zip(pairs.column("a").to_pylist(), pairs.column("b").to_pylist()))) == len(pairs)
    assert min(pairs.column("recall").to_pylist()) >= 0.5  # the recall floor
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["clusters"] == len(lines)
    assert summary["size_histogram"] == {"2": 1, "3": sum(1 for r in lines if r["size"] == 3)}
    assert summary["counts"]["rows_in_clusters"] == sum(r["size"] for r in lines)
    assert summary["counts"]["edges"] == sum(1 for s in pairs.column("score").to_pylist()
                                             if s >= 0.85)
    assert set(summary["timings_s"]) >= {"pipeline_s", "cluster_s", "search_s", "total_s"}
    assert summary["snapshot"]["version"] == snap.current_version(hand_made_root)
    assert (out / "sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dedupe_twice_writes_the_same_clusters(hand_made_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(hand_made_root, out)
    first = {name: (out / name).read_bytes() for name in ("clusters.jsonl", "clusters.parquet")}
    _run(hand_made_root, out)
    assert {name: (out / name).read_bytes() for name in first} == first


def _reranker(tmp_path: Path, source: str, training: dict[str, Any] | None) -> Path:
    folder = tmp_path / "reranker"
    shutil.copytree(source, folder)
    if training is not None:
        (folder / "training.json").write_text(json.dumps(training))
    return folder


PAIR_CALIBRATION = {"method": "logistic", "features": ["rerank"], "mean": [0.0], "scale": [1.0],
                    "weights": [2.0], "bias": 0.5}
DECISION = {"method": "logistic", "features": ["rerank", "recall"], "mean": [0.0, 0.5],
            "scale": [1.0, 0.2], "weights": [1.0, 1.0], "bias": 0.0, "min_probability": 0.6}


def test_dedupe_with_a_reranker_scores_both_orders_and_calibrates(
        hand_made_root: Path, tmp_path: Path, tiny_cross_encoder_path: str) -> None:
    from itertools import combinations

    from twinq.shared.calibration import Calibration
    from twinq.shared.models import load_cross_encoder
    from twinq.shared.rerank import score_pairs

    # The tiny random model's logits differ only in the fifth decimal: centre and scale the
    # pair calibration on them, so that probabilities spread across the threshold.
    model = load_cross_encoder(tiny_cross_encoder_path, max_length=12)
    every = score_pairs(model, list(combinations(TEXTS, 2)), symmetric=True)
    calibration = {**PAIR_CALIBRATION, "mean": [float(np.median(every))],
                   "scale": [float(every.std())], "weights": [1.0], "bias": 0.0}
    reranker = _reranker(tmp_path, tiny_cross_encoder_path,  # trained on pairs cut at 12 tokens
                         {"decision": DECISION, "calibration": calibration,
                          "settings": {"max_length": 12}})
    out = tmp_path / "out"
    result = dedupe(DedupeOptions(root=hand_made_root, out=out, reranker=str(reranker),
                                  recall_floor=0.5, neighbours=4, batch_size=3,
                                  beam_args=["--runner=DirectRunner"]))
    summary = result.summary
    assert summary["score"] == "probability" and summary["note"] is None
    assert summary["threshold"] == {"value": 0.6, "source": "training.json"}
    assert summary["models"]["calibration"] == "calibration" and summary["models"]["symmetric"]
    assert summary["veto_below"] == 0.5
    pairs = pq.read_table(out / "pairs.parquet").to_pylist()
    assert summary["counts"]["pairs_reranked"] == len(pairs) > 0
    text = {f"q{i}": t for i, t in enumerate(TEXTS)}
    texts = [(text[p["a"]], text[p["b"]]) for p in pairs]
    expected = score_pairs(model, texts, symmetric=True)
    assert [p["rerank"] for p in pairs] == pytest.approx(expected.tolist(), abs=1e-7)
    for other in (score_pairs(model, texts),  # one order only
                  score_pairs(load_cross_encoder(tiny_cross_encoder_path), texts, symmetric=True)):
        assert np.abs(other - expected).max() > 1e-6  # the check above tells them apart
    stored = np.array([p["rerank"] for p in pairs], dtype=np.float32)  # as Parquet holds them
    probability = Calibration.from_dict(calibration).predict_logits(stored)
    assert [p["score"] for p in pairs] == pytest.approx(probability.tolist(), abs=2e-6)
    score = {(p["a"], p["b"]): p["score"] for p in pairs}
    assert 0 < sum(s >= 0.6 for s in score.values()) < len(score)
    assert result.clusters
    for record in result.clusters:
        ids = record["member_ids"]
        for member in ids[1:]:  # every member a twin of the canonical one
            assert score[tuple(sorted((ids[0], member)))] >= 0.6
        for a, b in combinations(sorted(ids), 2):  # no two members known non-twins
            assert score.get((a, b), 1.0) >= 0.5


def test_dedupe_reranker_without_a_decision_model_uses_recall_scores(
        hand_made_root: Path, tmp_path: Path, tiny_cross_encoder_path: str, capsys, caplog
) -> None:
    reranker = _reranker(tmp_path, tiny_cross_encoder_path, None)  # no training.json
    out = tmp_path / "out"
    code = twinq(["dedupe", "--root", str(hand_made_root), "--out", str(out), "--reranker",
                  str(reranker), "--min-probability", "0.85", "--recall-floor", "0.5",
                  "--neighbours", "4", "--", "--runner=DirectRunner"])
    assert code == 0
    notes = [r.getMessage() for r in caplog.records if "no decision model" in r.getMessage()]
    assert len(notes) == 1 and "recall scores" in notes[0] and "\n" not in notes[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["score"] == "cosine" and summary["models"]["reranker"] is None
    assert summary["beam_args"] == ["--runner=DirectRunner"]
    printed = capsys.readouterr().out
    assert "largest clusters" in printed and "password" in printed


@pytest.mark.parametrize("case,args,message", [
    ("unpublished", [], "no snapshot published"),
    ("missing", [], "no snapshot published"),
    ("corrupt-current", [], "CURRENT"),
    ("corrupt-shard", [], "checksum mismatch"),
    ("published", ["--min-probability", "0"], "--min-probability must be in (0, 1]"),
    ("published", ["--min-probability", "1.5"], "--min-probability must be in (0, 1]"),
    ("published", ["--min-probability", "nan"], "--min-probability must be in (0, 1]"),
    ("published", ["--neighbours", "0"], "--neighbours must be at least 1"),
    ("published", ["--veto-below", "1.5"], "--veto-below must be in [0, 1]"),
    ("published", ["--reranker", "{broken}"], "no decision model"),
])
def test_dedupe_bad_input_exits_2_with_one_line_and_writes_nothing(
        tmp_path: Path, tiny_cross_encoder_path: str, capsys, case: str, args: list[str],
        message: str) -> None:
    root = tmp_path / "root"
    if case != "missing":
        root.mkdir()
    if case in ("published", "corrupt-current", "corrupt-shard"):
        version = write_quick_snapshot(root, TEXTS, HandMadeEncoder(), model_name="hand-made")
        if case == "corrupt-current":
            (root / "CURRENT").write_text("../../etc\n")
        if case == "corrupt-shard":
            shard = snap.version_dir(root, version) / "shard-00000.faiss"
            data = bytearray(shard.read_bytes())
            middle = len(data) // 2
            data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
            shard.write_bytes(bytes(data))
    broken = _reranker(tmp_path, tiny_cross_encoder_path, {"calibration": PAIR_CALIBRATION})
    out = tmp_path / "out"
    argv = ["dedupe", "--root", str(root), "--out", str(out),
            *[a.format(broken=broken) for a in args]]
    assert twinq(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_dedupe_demo_faq_with_the_bundled_model(tmp_path: Path, bundled_bi_encoder: Any,
                                                demo_corpus_path: Path) -> None:
    """The real model on the demo FAQ (78 paraphrase groups, many with a near-miss group of
    the same words and another meaning). Recall scores alone are weak there (measured at a
    cosine of 0.75: pairwise precision 0.67, B-cubed precision 0.93), but most clusters they
    form are right."""
    rows = [json.loads(line) for line in demo_corpus_path.read_text().splitlines()]
    root = tmp_path / "root"
    write_quick_snapshot(root, [r["text"] for r in rows], bundled_bi_encoder,
                         model_name="sentence-transformers/all-MiniLM-L6-v2", shards=2)
    result = dedupe(DedupeOptions(root=root, out=tmp_path / "out", min_probability=0.75,
                                  beam_args=["--runner=DirectRunner"]))
    row_of = {f"q{i}": i for i in range(len(rows))}
    predicted = labels_from_clusters(len(rows), [[row_of[m] for m in r["member_ids"]]
                                                 for r in result.clusters])
    truth = np.unique([r["group"] for r in rows], return_inverse=True)[1]
    scores = cluster_scores(predicted, truth)
    assert len(result.clusters) >= 20
    assert scores["pairwise_precision"] >= 0.6, scores
    assert scores["bcubed_precision"] >= 0.9, scores
