"""One open (a snapshot with its checked bi-encoder) and one encode (unit float32 vectors)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from twinq.shared.errors import SnapshotInvalid, SnapshotNotFound
from twinq.shared.models import encode_normalised
from twinq.shared.opened_snapshot import open_snapshot
from twinq.shared.search import search_shards

TEXTS = ["How do I reset my password?", "Where is my refund?", "Can I change my email?"]


class _Encoder:
    """Stands in for a bi-encoder of another dimension."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def get_embedding_dimension(self) -> int:
        return self.dim


def test_encode_normalised_gives_unit_float32_rows_in_input_order(tiny_bi_encoder: Any) -> None:
    vectors = encode_normalised(tiny_bi_encoder, TEXTS, batch_size=2)
    assert vectors.dtype == np.float32 and vectors.shape == (3, 32)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    alone = encode_normalised(tiny_bi_encoder, [TEXTS[2]])
    assert alone[0] == pytest.approx(vectors[2], abs=1e-5)
    assert encode_normalised(tiny_bi_encoder, []).shape == (0, 32)


def test_open_snapshot_loads_the_manifests_model_and_finds_its_own_rows(
        quick_snapshot: Any, tiny_bi_encoder_path: str) -> None:
    root, version = quick_snapshot(TEXTS)
    opened = open_snapshot(root)
    assert opened.snapshot.version == version
    assert opened.bi_encoder_name == tiny_bi_encoder_path  # the manifest's name
    hits = search_shards(opened.snapshot, encode_normalised(opened.bi_encoder, TEXTS), 1)
    assert [h[0].text for h in hits] == TEXTS


def test_open_snapshot_refuses_a_model_of_another_dimension(quick_snapshot: Any) -> None:
    root, version = quick_snapshot(TEXTS)
    asked: list[str] = []

    def load(name: str, backend: str) -> _Encoder:
        asked.append(name)
        assert backend == "torch"  # the quick snapshot records none: torch
        return _Encoder(16)

    with pytest.raises(SnapshotInvalid) as info:
        open_snapshot(root, load_encoder=load)
    message = str(info.value)
    assert "\n" not in message and version in message
    assert "16-dimensional" in message and "holds 32" in message
    assert len(asked) == 1  # the manifest's model, by its stable name


def test_open_snapshot_warns_when_another_model_is_chosen(
        quick_snapshot: Any, tiny_bi_encoder: Any, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    root, _ = quick_snapshot(TEXTS)
    other = tmp_path / "other-model"
    other.mkdir()
    with caplog.at_level(logging.WARNING):
        opened = open_snapshot(root, model=str(other), load_encoder=lambda name, backend: tiny_bi_encoder)
    assert opened.bi_encoder_name == str(other.resolve())
    assert any("was built with" in r.getMessage() for r in caplog.records)


def test_open_snapshot_without_a_published_version_says_so(tmp_path: Path) -> None:
    with pytest.raises(SnapshotNotFound, match="no snapshot published"):
        open_snapshot(tmp_path)
