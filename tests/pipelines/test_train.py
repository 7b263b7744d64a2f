"""Training: swap augmentation, and one tiny end-to-end `twinq train reranker` run."""

from __future__ import annotations

import json
from pathlib import Path

from twinq.shared.pairs import LabelledPair

TOPICS = ["python", "cooking", "guitar", "running", "taxes", "travel", "chess", "gardening",
          "painting", "physics", "history", "swimming"]


def test_swap_augment_doubles_and_mirrors() -> None:
    from twinq.pipelines.train_data import swap_augment
    from twinq.pipelines.trainer import to_dataset

    pairs = [LabelledPair("a", "b", 1), LabelledPair("c", "d", 0), LabelledPair("e", "f", None)]
    out = swap_augment(pairs)
    assert len(out) == 2 * len(pairs)
    for p in pairs:
        assert p in out and LabelledPair(p.q2, p.q1, p.label) in out
    ds = to_dataset(out)
    assert ds.column_names == ["sentence1", "sentence2", "label"]
    assert ds["label"] == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def _positive_lines() -> list[str]:
    lines = []
    for t in TOPICS:
        lines.append(f"How do I learn {t}?\tWhat is the best way to learn {t}?")
        lines.append(f"Is {t} hard?\tHow difficult is {t}?")
    return lines


def _write_positive_pairs(path: Path) -> None:
    path.write_text("\n".join(_positive_lines()) + "\n")


def test_train_reranker_cli_writes_loadable_model(tmp_path: Path, tiny_cross_encoder_path: str,
                                                  tiny_bi_encoder_path: str) -> None:
    from typer.testing import CliRunner

    from twinq.pipelines.cli_train import train_app
    from twinq.shared.models import load_cross_encoder

    pairs = tmp_path / "pairs.tsv"
    _write_positive_pairs(pairs)
    out = tmp_path / "model"
    result = CliRunner().invoke(train_app, [
        "reranker", "--pairs", str(pairs), "--out", str(out), "--base", tiny_cross_encoder_path,
        "--bi-encoder", tiny_bi_encoder_path, "--max-steps", "3", "--batch-size", "8",
        "--dev-fraction", "0.3", "--threads", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "training.json").read_text())
    assert meta["base"] == str(Path(tiny_cross_encoder_path).resolve())
    assert isinstance(meta["threshold"], float)
    assert meta["fusion"]["method"] == "linear" and 0.0 <= meta["fusion"]["weight"] <= 1.0
    assert meta["fusion"]["tuned"] is True and "rule" in meta["fusion"]
    # The twin decision: fitted on serving-like dev queries of all three kinds, and loadable.
    from twinq.shared.rerank_config import load_rerank_config

    config = load_rerank_config(out)
    assert config.decision is not None and 0.0 <= config.decision.min_probability <= 1.0
    assert config.calibration is not None and config.calibration.features == ("rerank",)
    assert config.rerank_depth == meta["rerank_depth"] == 20 and config.max_length == 64
    assert config.adaptive is not None and config.adaptive.dev["depth"] == 20  # fitted on dev
    assert 0.0 < config.adaptive.dev["pairs_share"] <= 1.0
    assert list(meta)[:6] == ["base", "threshold", "fusion", "decision", "calibration",
                              "rerank_depth"]
    kinds = meta["decision_dev"]["kinds"]
    assert kinds["answerable"] > 0 and kinds["answerable"] == kinds["twin_removed"]
    assert kinds["unrelated"] > 0
    assert (out / "decision_dev.json").is_file()
    assert meta["data"]["easy_negatives"]["in_corpus"] > 0
    assert meta["data"]["easy_negatives"]["out_of_domain"] > 0
    assert len(meta["data"]["train_sources"][0]["sha256"]) == 64
    assert meta["settings"]["swap"] is True and "accuracy" in meta["dev_metrics"]
    assert meta["data"]["train_pairs"] > 0 and not (out / "checkpoints").exists()
    # What the worker's default backend (auto) serves this reranker in, and the int8 guard.
    served_in, check = meta["serving_backend"]["backend"], meta["serving_backend"]["quantisation_check"]
    assert served_in == ("torch" if check is None else "onnx" if check["passed"] else "onnx-fp32")
    assert check is None or {"spearman", "top1_agreement"} <= set(check["numbers"])
    model = load_cross_encoder(str(out))
    scores = model.predict([("How do I learn chess?", "Is chess hard?")])
    assert 0.0 <= float(scores[0]) <= 1.0
    # The decision can be fitted again without training, on the same held-out pairs.
    (out / "decision_dev.json").unlink()
    again = CliRunner().invoke(train_app, ["decide", "--reranker", str(out)],
                               catch_exceptions=False)
    assert again.exit_code == 0, again.output
    refit = json.loads((out / "training.json").read_text())
    assert refit["decision"] == meta["decision"] and refit["created_at"] == meta["created_at"]
    assert refit["adaptive_rerank"] == meta["adaptive_rerank"]
    same = ("backend", "quantisation_check")  # resolved again for the refit (its time differs)
    assert {k: refit["serving_backend"][k] for k in same} == \
        {k: meta["serving_backend"][k] for k in same}
    assert "adaptive reranking (logits up to" in again.output
    assert (out / "decision_dev.json").is_file()


def test_labelled_pairs_are_kept_in_full_and_split_question_disjointly(
        tmp_path: Path, tiny_bi_encoder_path: str) -> None:
    from twinq.pipelines.splits import question_key
    from twinq.pipelines.train_data import prepare_data
    from twinq.pipelines.train_settings import TrainSettings

    pairs = tmp_path / "pairs.tsv"
    _write_positive_pairs(pairs)
    labelled = tmp_path / "labelled.tsv"  # LCQMC format: q1 \t q2 \t label
    rows = [f"Can I eat {t} food?\tIs {t} tasty?\t0" for t in TOPICS]
    rows += [f"Where is {t} taught?\tWho teaches {t} nearby?\t1" for t in TOPICS]
    labelled.write_text("\n".join(rows) + "\n")
    settings = TrainSettings(pairs=[str(pairs)], labelled=[str(labelled)], out=str(tmp_path / "o"),
                             max_pairs=4, dev_fraction=0.3, bi_encoder=tiny_bi_encoder_path)
    train, dev, data, *_ = prepare_data(settings)
    given = {tuple(row.split("\t")[:2]) for row in rows}
    human = {(p.q1, p.q2) for p in train if (p.q1, p.q2) in given}
    human_dev = {(p.q1, p.q2) for p in dev if (p.q1, p.q2) in given}
    # Not capped by --max-pairs: every labelled pair is kept, except a negative whose two
    # questions fell on different sides of the split (dropped, so no question is on both).
    dropped = data["split"]["dropped_cross_pairs"]
    assert len(human) + len(human_dev) + dropped == len(rows) and len(human) > 4
    bulk = [p for p in train if p.label == 1 and ("learn" in p.q1 or "hard" in p.q1)]
    assert len(bulk) == 4, "the bulk source is capped"
    train_keys = {question_key(q) for p in train for q in (p.q1, p.q2)}
    assert not train_keys & {question_key(q) for p in dev for q in (p.q1, p.q2)}
    assert data["labelled_sources"][0]["paths"][0].endswith("labelled.tsv")


def test_train_only_pairs_are_never_held_out(tmp_path: Path, tiny_bi_encoder_path: str) -> None:
    """--train-only pairs (another domain) all train, uncapped; none reaches dev, and one that
    shares a question with dev is dropped, so dev stays unseen."""
    from twinq.pipelines.splits import question_key
    from twinq.pipelines.train_data import prepare_data
    from twinq.pipelines.train_settings import TrainSettings

    pairs = tmp_path / "pairs.tsv"
    _write_positive_pairs(pairs)
    other = tmp_path / "other.tsv"
    rows = [f"Can I renew a {t} book online?\tHow do I extend my {t} loan?\t1" for t in TOPICS]
    rows += [f"Can I renew a {t} book online?\tCan I reserve a {t} book online?\t0" for t in TOPICS]
    settings = TrainSettings(pairs=[str(pairs)], out=str(tmp_path / "o"), max_pairs=4,
                             dev_fraction=0.3, bi_encoder=tiny_bi_encoder_path)
    _, first_dev, *_ = prepare_data(settings)
    shared = first_dev[0].q1  # a dev question, also written into the other domain's file
    rows.append(f"{shared}\tCan I renew a chess book online?\t0")
    other.write_text("\n".join(rows) + "\n")
    settings.train_only = [str(other)]
    train, dev, data, *_ = prepare_data(settings)
    assert dev == first_dev, "the split and dev are --pairs' alone"
    given = {tuple(row.split("\t")[:2]) for row in rows}
    kept = {(p.q1, p.q2) for p in train if (p.q1, p.q2) in given}
    assert len(kept) == len(rows) - 1 and (shared, "Can I renew a chess book online?") not in kept
    assert data["train_only"] == {"pairs": len(rows) - 1, "dropped_sharing_a_dev_question": 1}
    train_keys = {question_key(q) for p in train for q in (p.q1, p.q2)}
    assert not train_keys & {question_key(q) for p in dev for q in (p.q1, p.q2)}


def test_same_seed_trains_the_same_model(tmp_path: Path, tiny_bi_encoder_path: str) -> None:
    """The demo's test asserts exact answers: training must be a function of its settings.

    The base is a bi-encoder folder, as in real use (the bundled MiniLM): the cross-encoder's
    head is new and randomly initialised, the step that was once left unseeded."""
    import torch

    from twinq.pipelines.train_data import prepare_data
    from twinq.pipelines.train_settings import TrainSettings
    from twinq.pipelines.trainer import fit

    pairs = tmp_path / "pairs.tsv"
    _write_positive_pairs(pairs)
    weights = []
    for run in range(2):
        settings = TrainSettings(pairs=[str(pairs)], out=str(tmp_path / f"m{run}"),
                                 base=tiny_bi_encoder_path, bi_encoder=tiny_bi_encoder_path,
                                 max_steps=3, batch_size=8, dev_fraction=0.3, threads=1, lr=1e-3)
        train, dev, *_ = prepare_data(settings)
        torch.manual_seed(run)  # whatever the global state, the result must not depend on it
        model = fit(train, dev, settings)
        weights.append(torch.cat([p.detach().flatten() for p in model.model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_parse_bands() -> None:
    import pytest

    from twinq.pipelines.train_settings import parse_bands
    from twinq.shared.errors import BadInput

    assert parse_bands("1-5, 6-20,21-50") == [(1, 5), (6, 20), (21, 50)]
    assert parse_bands("3-3") == [(3, 3)]
    for bad in ("", "5", "0-5", "6-2", "a-b", "1-5,"):
        with pytest.raises(BadInput):
            parse_bands(bad)


def test_listwise_groups_hold_the_twin_and_mined_negatives_outside_its_cluster(
        tmp_path: Path, tiny_bi_encoder_path: str) -> None:
    from twinq.pipelines.splits import build_clusters, question_key
    from twinq.pipelines.train_data import prepare_data
    from twinq.pipelines.train_settings import TrainSettings
    from twinq.pipelines.trainer import to_group_dataset

    pairs = tmp_path / "pairs.tsv"
    _write_positive_pairs(pairs)
    labelled = tmp_path / "labelled.tsv"
    labelled.write_text("".join(f"Can I eat {t} food?\tIs {t} tasty?\t0\n" for t in TOPICS))
    settings = TrainSettings(pairs=[str(pairs)], labelled=[str(labelled)], out=str(tmp_path / "o"),
                             dev_fraction=0.3, bi_encoder=tiny_bi_encoder_path, loss="listwise",
                             negatives=2, margin=0.0, easy_negatives=0)
    train, _, data, groups, human, _split = prepare_data(settings)
    assert groups and data["listwise_groups"]["kept"] == len(groups)
    clusters = build_clusters(train)
    given = {tuple(line.split("\t")) for line in _positive_lines()}
    for anchor, negatives in groups:
        # The twin is a real pair (either side may be the anchor), never among its negatives.
        assert (anchor.q1, anchor.q2) in given or (anchor.q2, anchor.q1) in given
        assert len(negatives) == 2 and anchor.q2 not in negatives
        own = clusters[question_key(anchor.q1)]
        assert all(clusters[question_key(n)] != own for n in negatives)
    flipped = sum((a.q1, a.q2) not in given for a, _ in groups)
    assert 0 < flipped < len(groups), "swap picks the anchor side at random"
    assert human and all(p.label == 0 and "eat" in p.q1 for p in human)
    ds = to_group_dataset(groups)
    assert ds.column_names == ["query", "positive", "negative_1", "negative_2"]


def test_listwise_loss_is_softmax_cross_entropy_over_the_group(
        tiny_cross_encoder_path: str) -> None:
    """Hand-computed: -log softmax(10 * sigmoid(logits))[twin], mean over anchors; no in-batch
    randoms (two anchors, so a random would change the value)."""
    import torch

    from twinq.pipelines.trainer import _hard_negatives_only_loss
    from twinq.shared.models import load_cross_encoder

    model = load_cross_encoder(tiny_cross_encoder_path)
    loss = _hard_negatives_only_loss(model)
    queries = ["how to learn chess", "is tax hard"]
    twins = ["best way to learn chess", "tax difficulty"]
    negs = [["chess rules", "tax forms"], ["chess clubs", "tax dates"]]  # columns, as the trainer
    got = loss([queries, twins, *negs], torch.zeros(2)).item()
    with torch.no_grad():
        rows = [[twins[i], negs[0][i], negs[1][i]] for i in range(2)]
        logits = [[loss.call_model_with_pairs([(q, c)])[0].item() for c in row]
                  for q, row in zip(queries, rows)]
    expected = 0.0
    for row in logits:
        s = [10 * (1 / (1 + torch.exp(torch.tensor(-x)).item())) for x in row]
        expected += -(s[0] - torch.logsumexp(torch.tensor(s), 0).item()) / 2
    assert abs(got - expected) < 1e-4


def test_listwise_training_runs_and_records_its_cost(tmp_path: Path, tiny_bi_encoder_path: str,
                                                     tiny_cross_encoder_path: str) -> None:
    import pytest

    from twinq.pipelines.train import train_reranker
    from twinq.pipelines.train_settings import TrainSettings
    from twinq.shared.errors import BadInput

    pairs = tmp_path / "pairs.tsv"
    _write_positive_pairs(pairs)
    settings = TrainSettings(pairs=[str(pairs)], out=str(tmp_path / "m"), loss="listwise",
                             base=tiny_cross_encoder_path, bi_encoder=tiny_bi_encoder_path,
                             max_steps=2, batch_size=4, dev_fraction=0.3, threads=1, negatives=2,
                             margin=0.0)
    report = train_reranker(settings)
    assert report["settings"]["loss"] == "listwise"
    assert report["data"]["listwise_groups"]["kept"] > 0
    assert report["settings"]["timings_s"]["examples_per_s"] > 0
    with pytest.raises(BadInput, match="unknown loss"):
        train_reranker(TrainSettings(pairs=[str(pairs)], out=str(tmp_path / "x"), loss="pairwise"))


def test_a_teacher_vets_the_training_negatives_only(tmp_path: Path, tiny_bi_encoder_path: str,
                                                    tiny_cross_encoder_path: str) -> None:
    import json
    import shutil

    from twinq.pipelines.train_data import prepare_data
    from twinq.pipelines.train_settings import TrainSettings

    pairs = tmp_path / "pairs.tsv"
    _write_positive_pairs(pairs)
    labelled = tmp_path / "labelled.tsv"
    labelled.write_text("".join(f"Can I eat {t} food?\tIs {t} tasty?\t0\n" for t in TOPICS))
    teacher = tmp_path / "teacher"  # calls every pair a twin: probability sigmoid(10)
    shutil.copytree(tiny_cross_encoder_path, teacher)
    always = {"method": "logistic", "features": ["rerank"], "mean": [0.0], "scale": [1.0],
              "weights": [0.0], "bias": 10.0}
    (teacher / "training.json").write_text(json.dumps(
        {"calibration": always, "decision": {**always, "min_probability": 0.5}}))
    common = dict(pairs=[str(pairs)], labelled=[str(labelled)], dev_fraction=0.3,
                  bi_encoder=tiny_bi_encoder_path, easy_negatives=0)
    plain = prepare_data(TrainSettings(**common, out=str(tmp_path / "a")))
    vetted = prepare_data(TrainSettings(**common, out=str(tmp_path / "b"),
                                        denoise_with=str(teacher)))
    mined = plain.data["train_mining"]["anchors"] - plain.data["train_mining"]["no_hard_negative"]
    assert mined > 0 and vetted.data["train_mining"]["denoised"] == mined
    assert [p for p in vetted.train if p.label == 0] == plain.labelled  # only the human 0s left
    assert vetted.dev == plain.dev and "denoised" not in vetted.data["dev_mining"]


def test_easy_negatives_take_turns_and_never_pick_the_anchors_cluster() -> None:
    from twinq.pipelines.splits import build_clusters, question_key
    from twinq.pipelines.train_data import easy_negatives

    pairs = [LabelledPair(f"How do I learn {t}?", f"What is the best way to learn {t}?", None)
             for t in TOPICS] + [LabelledPair("Is chess hard?", "Is chess easy?", 0)]
    unrelated = ["What is the capital of Peru?", "How tall is Everest?"]
    negatives, stats = easy_negatives(pairs, unrelated, per_anchor=2, seed=0)
    assert stats == {"in_corpus": len(TOPICS), "out_of_domain": len(TOPICS)}
    assert all(n.label == 0 for n in negatives) and len(negatives) == 2 * len(TOPICS)
    clusters = build_clusters([p for p in pairs if p.label is None])
    for n in negatives:
        if n.q2 not in unrelated:
            assert clusters[question_key(n.q1)] != clusters.get(question_key(n.q2), -1)
    assert easy_negatives(pairs, unrelated, per_anchor=2, seed=0)[0] == negatives  # seeded
    only_corpus, stats = easy_negatives(pairs, [], per_anchor=1, seed=0)
    assert stats["out_of_domain"] == 0 and len(only_corpus) == len(TOPICS)
