"""Training: swap augmentation, and one tiny end-to-end `twinq train reranker` run."""

from __future__ import annotations

import json
from pathlib import Path

from shared.pairs import LabelledPair

TOPICS = ["python", "cooking", "guitar", "running", "taxes", "travel", "chess", "gardening",
          "painting", "physics", "history", "swimming"]


def test_swap_augment_doubles_and_mirrors() -> None:
    from pipelines.train import swap_augment, to_dataset

    pairs = [LabelledPair("a", "b", 1), LabelledPair("c", "d", 0), LabelledPair("e", "f", None)]
    out = swap_augment(pairs)
    assert len(out) == 2 * len(pairs)
    for p in pairs:
        assert p in out and LabelledPair(p.q2, p.q1, p.label) in out
    ds = to_dataset(out)
    assert ds.column_names == ["sentence1", "sentence2", "label"]
    assert ds["label"] == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def _write_positive_pairs(path: Path) -> None:
    lines = []
    for t in TOPICS:
        lines.append(f"How do I learn {t}?\tWhat is the best way to learn {t}?")
        lines.append(f"Is {t} hard?\tHow difficult is {t}?")
    path.write_text("\n".join(lines) + "\n")


def test_train_reranker_cli_writes_loadable_model(tmp_path: Path, tiny_cross_encoder_path: str,
                                                  tiny_bi_encoder_path: str) -> None:
    from typer.testing import CliRunner

    from pipelines.cli_train import train_app
    from shared.models import load_cross_encoder

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
    assert meta["fusion"]["method"] == "zscore" and meta["fusion"]["weight"] == 0.5
    assert meta["calibration"]["method"] == "platt"
    assert {"a", "b"} <= set(meta["calibration"])
    assert len(meta["data"]["train_sources"][0]["sha256"]) == 64
    assert meta["settings"]["swap"] is True and "accuracy" in meta["dev_metrics"]
    assert meta["data"]["train_pairs"] > 0 and not (out / "checkpoints").exists()
    model = load_cross_encoder(str(out))
    scores = model.predict([("How do I learn chess?", "Is chess hard?")])
    assert 0.0 <= float(scores[0]) <= 1.0


def test_labelled_pairs_are_kept_in_full_and_split_question_disjointly(
        tmp_path: Path, tiny_bi_encoder_path: str) -> None:
    from pipelines.splits import question_key
    from pipelines.train import TrainSettings, prepare_data

    pairs = tmp_path / "pairs.tsv"
    _write_positive_pairs(pairs)
    labelled = tmp_path / "labelled.tsv"  # LCQMC format: q1 \t q2 \t label
    rows = [f"Can I eat {t} food?\tIs {t} tasty?\t0" for t in TOPICS]
    rows += [f"Where is {t} taught?\tWho teaches {t} nearby?\t1" for t in TOPICS]
    labelled.write_text("\n".join(rows) + "\n")
    settings = TrainSettings(pairs=[str(pairs)], labelled=[str(labelled)], out=str(tmp_path / "o"),
                             max_pairs=4, dev_fraction=0.3, bi_encoder=tiny_bi_encoder_path)
    train, dev, data = prepare_data(settings)
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


def test_same_seed_trains_the_same_model(tmp_path: Path, tiny_bi_encoder_path: str) -> None:
    """The demo's test asserts exact answers: training must be a function of its settings.

    The base is a bi-encoder folder, as in real use (the bundled MiniLM): the cross-encoder's
    head is new and randomly initialised, the step that was once left unseeded."""
    import torch

    from pipelines.train import TrainSettings, fit, prepare_data

    pairs = tmp_path / "pairs.tsv"
    _write_positive_pairs(pairs)
    weights = []
    for run in range(2):
        settings = TrainSettings(pairs=[str(pairs)], out=str(tmp_path / f"m{run}"),
                                 base=tiny_bi_encoder_path, bi_encoder=tiny_bi_encoder_path,
                                 max_steps=3, batch_size=8, dev_fraction=0.3, threads=1, lr=1e-3)
        train, dev, _ = prepare_data(settings)
        torch.manual_seed(run)  # whatever the global state, the result must not depend on it
        model = fit(train, dev, settings)
        weights.append(torch.cat([p.detach().flatten() for p in model.model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_parse_bands() -> None:
    import pytest

    from pipelines.train import parse_bands
    from shared.errors import BadInput

    assert parse_bands("1-5, 6-20,21-50") == [(1, 5), (6, 20), (21, 50)]
    assert parse_bands("3-3") == [(3, 3)]
    for bad in ("", "5", "0-5", "6-2", "a-b", "1-5,"):
        with pytest.raises(BadInput):
            parse_bands(bad)
