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
