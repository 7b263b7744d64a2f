"""The snapshot holder: load beside the served version, swap only when asked, refuse bad ones."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from twinq.shared.errors import SnapshotInvalid, SnapshotNotFound
from twinq.shared.snapshot import CURRENT, version_dir
from tests.conftest import write_quick_snapshot
from tests.worker.conftest import TEXTS, sample
from twinq.worker import served as served_module
from twinq.worker.metrics import WorkerMetrics
from twinq.worker.served import SnapshotHolder


def test_holder_needs_a_root(make_settings: Any) -> None:
    with pytest.raises(SnapshotNotFound, match="no snapshot root"):
        SnapshotHolder(make_settings())


def test_holder_serves_the_published_version_with_its_bi_encoder(
        quick_snapshot: Any, tiny_bi_encoder: Any, make_settings: Any) -> None:
    root, version = quick_snapshot(TEXTS)
    holder = SnapshotHolder(make_settings(root), bi_encoder=tiny_bi_encoder)
    assert holder.served is None and not holder.ready
    holder.start(watch=False)
    assert holder.ready and holder.version == version
    assert holder.served is not None and holder.served.bi_encoder is tiny_bi_encoder
    assert holder.status()["rows"] == len(TEXTS)


def test_holder_refuses_model_of_another_dimension(quick_snapshot: Any, bundled_bi_encoder: Any,
                                                   make_settings: Any) -> None:
    root, version = quick_snapshot(TEXTS[:3])
    metrics = WorkerMetrics()
    holder = SnapshotHolder(make_settings(root), bi_encoder=bundled_bi_encoder, metrics=metrics)
    with pytest.raises(SnapshotInvalid, match="384-dimensional"):
        holder._load(version)
    holder.start(watch=False)
    assert not holder.ready
    assert sample(metrics, "twinq_reloads_total", result="failure") == 1


def test_holder_hot_reload_swaps_only_when_asked(quick_snapshot: Any, tiny_bi_encoder: Any,
                                                 tiny_bi_encoder_path: str,
                                                 make_settings: Any) -> None:
    root, old = quick_snapshot(TEXTS)
    metrics = WorkerMetrics()
    holder = SnapshotHolder(make_settings(root), bi_encoder=tiny_bi_encoder, metrics=metrics)
    holder.start(watch=False)
    first = holder.served
    new = write_quick_snapshot(root, TEXTS[:4], tiny_bi_encoder, model_name=tiny_bi_encoder_path)
    assert holder.check_for_update() == new
    assert holder.version == old and holder.served is first  # loaded beside, not yet served
    assert holder.swap_pending() == (old, new)
    assert holder.status()["rows"] == 4 and holder.served is not first
    assert sample(metrics, "twinq_reloads_total", result="success") == 1
    assert holder.check_for_update() is None and holder.swap_pending() is None


def test_holder_refuses_corrupt_snapshot_keeps_serving_and_logs_once(
        quick_snapshot: Any, tiny_bi_encoder: Any, tiny_bi_encoder_path: str, make_settings: Any,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    root, old = quick_snapshot(TEXTS)
    metrics = WorkerMetrics()
    holder = SnapshotHolder(make_settings(root), bi_encoder=tiny_bi_encoder, metrics=metrics)
    holder.start(watch=False)
    bad = write_quick_snapshot(root, TEXTS, tiny_bi_encoder, model_name=tiny_bi_encoder_path,
                               publish=False)
    index = next(version_dir(root, bad).glob("*.faiss"))
    index.write_bytes(index.read_bytes()[:-16] + b"\0" * 16)
    (root / CURRENT).write_text(bad + "\n")
    with caplog.at_level(logging.DEBUG, logger="twinq.worker.served"):
        assert holder.check_for_update() is None
        assert holder.swap_pending() is None and holder.version == old
        assert sample(metrics, "twinq_reloads_total", result="failure") == 1
        assert holder.check_for_update() is None  # not retried at every poll
        assert sample(metrics, "twinq_reloads_total", result="failure") == 1
        monkeypatch.setattr(served_module, "RETRY_FAILED_VERSION_S", 0.0)
        assert holder.check_for_update() is None  # retried: counted again, not logged again
        assert sample(metrics, "twinq_reloads_total", result="failure") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"refused snapshot {bad}" in errors[0], errors
    assert f"still serving {old}" in errors[0]


def test_holder_without_snapshot_warns_once_and_is_not_ready(
        tmp_path: Path, tiny_bi_encoder: Any, make_settings: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    holder = SnapshotHolder(make_settings(tmp_path / "empty"), bi_encoder=tiny_bi_encoder)
    with caplog.at_level(logging.WARNING, logger="twinq.worker.served"):
        holder.start(watch=False)
        holder.check_for_update()
    assert not holder.ready and {k: v for k, v in holder.status().items() if k != "store"} == {
        "version": None, "age_s": None, "rows": 0}
    assert caplog.text.count("no snapshot published") == 1


def test_auto_backend_embeds_queries_as_the_snapshot_was_built(
        quick_snapshot: Any, tiny_bi_encoder: Any, make_settings: Any) -> None:
    """A manifest without a backend was embedded with torch: `auto` (the default) loads torch."""
    import numpy as np

    from twinq.shared.models import backend_of, encode_normalised

    root, _ = quick_snapshot(TEXTS)
    settings = make_settings(root)
    assert settings.backend == "auto"
    holder = SnapshotHolder(settings)
    holder.start(watch=False)
    served = holder.served
    assert served is not None and served.bi_encoder_backend == "torch"
    assert backend_of(served.bi_encoder) == "torch"
    np.testing.assert_allclose(encode_normalised(served.bi_encoder, TEXTS),
                               encode_normalised(tiny_bi_encoder, TEXTS), atol=1e-6)


def test_explicit_backend_other_than_the_snapshots_is_refused_by_name(
        tmp_path: Path, quick_snapshot: Any, tiny_bi_encoder_path: str, make_settings: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """A worker set to torch keeps serving its torch snapshot when an onnx-built one is
    published: one clear refusal naming both backends (vectors of two backends never mix)."""
    import json
    import shutil

    pytest.importorskip("onnxruntime")
    from twinq.pipelines.index import BuildOptions, build_snapshot

    model = tmp_path / "model"  # a private copy: the onnx export is cached inside it
    shutil.copytree(tiny_bi_encoder_path, model)
    root = tmp_path / "root"
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n"
                              for i, t in enumerate(TEXTS)))
    options = dict(corpus=[str(corpus)], root=root, shards=1, model=str(model), publish=True,
                   canary=0)
    old = build_snapshot(BuildOptions(**options, backend="torch")).version
    metrics = WorkerMetrics()
    holder = SnapshotHolder(make_settings(root, backend="torch"), metrics=metrics)
    holder.start(watch=False)
    assert holder.version == old
    new = build_snapshot(BuildOptions(**options, backend="onnx")).version
    with caplog.at_level(logging.ERROR, logger="twinq.worker.served"):
        assert holder.check_for_update() is None
    assert holder.version == old
    assert sample(metrics, "twinq_reloads_total", result="failure") == 1
    [line] = [r.getMessage() for r in caplog.records if r.name == "twinq.worker.served"]
    assert f"refused snapshot {new}" in line and "embedded with the onnx backend, not torch" in line
    assert f"still serving {old}" in line and "\n" not in line
    auto = SnapshotHolder(make_settings(root))  # auto follows the snapshot instead
    auto.start(watch=False)
    assert auto.served is not None and auto.served.bi_encoder_backend == "onnx"
