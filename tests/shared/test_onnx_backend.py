"""The onnx backend against torch on tiny random models: same outputs, same order, cached exports.

The tiny models are random 2-layer BERTs (tests/conftest.py), so int8 bounds are looser than on
the real model; docs/performance.md has the real model's numbers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from twinq.shared.onnx_backend import OnnxBiEncoder, OnnxCrossEncoder, cache_dir  # noqa: E402

TEXTS = [
    "How do I learn Python quickly?",
    "hi",
    "What is the best way to prepare for a long distance running race in cold weather, "
    "and which shoes should I buy if my budget is small?",
    "Why is the sky blue?",
    "",
    "word " * 200,  # longer than max_seq_length (64): truncated the same way on both sides
    "Is it safe?",
]
PAIRS = [(TEXTS[i], TEXTS[(i * 3 + 1) % len(TEXTS)]) for i in range(len(TEXTS))]


@pytest.fixture(scope="module")
def bi_folder(tiny_bi_encoder_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy, so that the export cache written inside it is this module's alone."""
    folder = tmp_path_factory.mktemp("onnx-bi") / "model"
    shutil.copytree(tiny_bi_encoder_path, folder)
    return folder


def _spread_head(model, folder: Path) -> Path:  # noqa: ANN001 - a sentence-transformers CrossEncoder
    """Give `model` a head that reads the direction in which PAIRS differ most, and save it.

    A fresh head's logits all lie within 1e-4 of each other, which would let a 1e-3 tolerance
    pass a wrong graph; with this head they spread over about +-3 and the sigmoid matters.
    """
    import torch

    bert = model.model
    features = model.tokenizer([p[0] for p in PAIRS], [p[1] for p in PAIRS], padding=True,
                               truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        pooled = bert.bert(**features).pooler_output
        centred = pooled - pooled.mean(dim=0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        weight = direction * 2.0 / (centred @ direction).std()
        bert.classifier.weight.copy_(weight[None, :])
        bert.classifier.bias.fill_(float(-(pooled.mean(dim=0) @ weight)))
    model.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def ce_folder(tiny_cross_encoder_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random cross-encoder with a spread head: fast, for graph and plumbing checks."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(tiny_cross_encoder_path, device="cpu")
    return _spread_head(model, tmp_path_factory.mktemp("onnx-ce") / "model")


@pytest.fixture(scope="module")
def real_ce_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled MiniLM body with a seeded, spread head: int8 quality needs real weights.

    A random 32-wide model's pair outputs differ by less than int8 noise, so its int8 order is
    noise too: on a CPU with AVX-512 VNNI its int8 logits correlated only 0.87 with fp32, while
    this real body gives 0.9999 on the same pairs (int8 recipe as shipped).
    """
    import torch
    from sentence_transformers import CrossEncoder

    from twinq.shared.models import bundled_model_path

    torch.manual_seed(0)
    model = CrossEncoder(str(bundled_model_path()), num_labels=1, max_length=64, device="cpu")
    return _spread_head(model, tmp_path_factory.mktemp("onnx-real-ce") / "model")


@pytest.fixture(scope="module")
def torch_bi(bi_folder: Path):
    from twinq.shared.models import load_bi_encoder

    return load_bi_encoder(str(bi_folder))


@pytest.fixture(scope="module")
def torch_ce(ce_folder: Path):
    from twinq.shared.models import load_cross_encoder

    return load_cross_encoder(str(ce_folder))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def test_bi_encoder_fp32_matches_torch(bi_folder: Path, torch_bi) -> None:
    onnx = OnnxBiEncoder.load(bi_folder, precision="fp32", threads=1)
    expected = torch_bi.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    got = onnx.encode(TEXTS, batch_size=3)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert _cosines(got, expected).min() > 0.999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert onnx.get_embedding_dimension() == torch_bi.get_embedding_dimension()
    assert onnx.max_seq_length == torch_bi.max_seq_length


def test_bi_encoder_int8_stays_close(bi_folder: Path, torch_bi) -> None:
    onnx = OnnxBiEncoder.load(bi_folder, threads=1)
    assert onnx.precision == "int8"
    cosines = _cosines(onnx.encode(TEXTS), torch_bi.encode(TEXTS, normalize_embeddings=True))
    # A random tiny BERT has no outlier-robust weights; the real model gives ~0.994 (docs).
    assert cosines.mean() > 0.95 and cosines.min() > 0.9


def test_bi_encoder_preserves_order_across_batches(bi_folder: Path) -> None:
    onnx = OnnxBiEncoder.load(bi_folder, precision="fp32", threads=1)
    together = onnx.encode(TEXTS, batch_size=2)
    alone = np.stack([onnx.encode(t) for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    reversed_ = onnx.encode(TEXTS[::-1], batch_size=4)
    np.testing.assert_allclose(reversed_[::-1], together, atol=1e-5)
    assert onnx.encode([]).shape == (0, onnx.get_embedding_dimension())


def test_cross_encoder_fp32_matches_torch_default_scores(ce_folder: Path, torch_ce) -> None:
    import torch

    onnx = OnnxCrossEncoder.load(ce_folder, precision="fp32", threads=1)
    assert type(onnx.activation_fn) is type(torch_ce.activation_fn)  # Sigmoid for one label
    expected = torch_ce.predict(PAIRS, show_progress_bar=False)
    got = onnx.predict(PAIRS, batch_size=3)
    assert got.shape == (len(PAIRS),)
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert np.ptp(expected) > 0.05, "scores must differ enough for the tolerance to mean something"
    logits = torch_ce.predict(PAIRS, activation_fn=torch.nn.Identity(), show_progress_bar=False)
    np.testing.assert_allclose(onnx.predict(PAIRS, activation_fn=torch.nn.Identity()), logits, atol=1e-3)
    assert float(onnx.predict(PAIRS[0])) == pytest.approx(float(got[0]), abs=1e-5)


def test_cross_encoder_int8_stays_close(real_ce_folder: Path) -> None:
    import torch

    from twinq.shared.models import load_cross_encoder

    identity = torch.nn.Identity()
    expected = load_cross_encoder(str(real_ce_folder)).predict(PAIRS, activation_fn=identity,
                                                              show_progress_bar=False)
    got = OnnxCrossEncoder.load(real_ce_folder, threads=1).predict(PAIRS, activation_fn=identity)
    assert np.ptp(expected) > 2.0, "scores must spread for the bounds to mean something"
    # The centred check tolerates a constant shift (it cannot reorder candidates); the real
    # reranker's pair accuracy and nDCG under int8 are in docs/performance.md.
    centred_error = (got - got.mean()) - (expected - expected.mean())
    assert np.abs(centred_error).mean() < 0.05 * np.ptp(expected)
    assert np.corrcoef(got, expected)[0, 1] > 0.99
    assert list(np.argsort(got)) == list(np.argsort(expected))


def test_int8_scores_do_not_depend_on_their_batch_mates(bi_folder: Path,
                                                        real_ce_folder: Path) -> None:
    """Per-row activation scales (twinq.shared.row_quantisation): a row scored alone and in any
    batch gets the same numbers. onnxruntime's own per-batch scales moved real logits by up to
    2.2 here, and this test fails with them (docs/performance.md)."""
    bi = OnnxBiEncoder.load(bi_folder, threads=1)
    alone = np.stack([bi.encode(t) for t in TEXTS])
    for batch_size in (2, 4, len(TEXTS)):
        np.testing.assert_allclose(bi.encode(TEXTS, batch_size=batch_size), alone, atol=1e-5)
    ce = OnnxCrossEncoder.load(real_ce_folder, threads=1)
    scores_alone = np.array([ce.predict(p) for p in PAIRS])
    for batch_size in (2, len(PAIRS)):
        np.testing.assert_allclose(ce.predict(PAIRS, batch_size=batch_size), scores_alone,
                                   atol=1e-5)


def test_int8_graph_computes_the_same_at_every_optimisation_level(real_ce_folder: Path) -> None:
    """The exported int8 graph writes its fused MatMuls out itself: a session without graph
    optimisations (or any other tool's session) gets what twinq's sessions get. Not to the
    last bit: the optimiser's fused fp32 kernels move a value across an int8 rounding step now
    and then (0.008 at most here); leaving the fusion to onnxruntime misread the row scales
    and moved the real bi-encoder's vectors to cosine 0.71."""
    import onnxruntime as ort

    ce = OnnxCrossEncoder.load(real_ce_folder, threads=1)
    expected = ce.predict(PAIRS)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ce.session = ort.InferenceSession(str(ce.folder / "model_qint8.onnx"), options,
                                      providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(ce.predict(PAIRS), expected, atol=0.02)


def test_cross_encoder_preserves_order(ce_folder: Path) -> None:
    onnx = OnnxCrossEncoder.load(ce_folder, precision="fp32", threads=1)
    together = onnx.predict(PAIRS, batch_size=2)
    alone = np.array([onnx.predict(p) for p in PAIRS])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_export_cache_is_reused_and_refreshed(bi_folder: Path) -> None:
    OnnxBiEncoder.load(bi_folder, threads=1)
    folder = cache_dir(bi_folder, "bi-encoder")
    assert folder == bi_folder.resolve() / "onnx" / "bi-encoder"
    files = [folder / "model.onnx", folder / "model_qint8.onnx", folder / "meta.json"]
    before = [f.stat().st_mtime_ns for f in files]
    OnnxBiEncoder.load(bi_folder, threads=1)
    assert [f.stat().st_mtime_ns for f in files] == before, "second load must not re-export"
    # twinq's own records (rewritten by `twinq train decide`) are no input of the export.
    for record in ("training.json", "decision_dev.json"):
        (bi_folder / record).write_text("{}")
    OnnxBiEncoder.load(bi_folder, threads=1)
    assert [f.stat().st_mtime_ns for f in files] == before, "a refit must not re-export"
    for record in ("training.json", "decision_dev.json"):
        (bi_folder / record).unlink()
    # New weights (a training run rewrote them) make the cache stale.
    weights = next(bi_folder.glob("*.safetensors"))
    weights.touch()
    OnnxBiEncoder.load(bi_folder, threads=1)
    assert files[2].stat().st_mtime_ns != before[2]


def test_cache_goes_to_home_when_folder_is_read_only(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = cache_dir(tmp_path, "cross-encoder", owned=False)
    assert folder.is_relative_to(tmp_path / "home" / ".cache" / "twinq" / "onnx")
    assert folder.name == "cross-encoder"


def test_models_dispatch_onnx_backend(bi_folder: Path, ce_folder: Path) -> None:
    from twinq.shared.models import load_bi_encoder, load_cross_encoder

    bi = load_bi_encoder(str(bi_folder), backend="onnx")
    assert isinstance(bi, OnnxBiEncoder) and bi.precision == "int8"
    assert bi.encode(["hello"]).shape == (1, bi.get_embedding_dimension())
    assert isinstance(load_bi_encoder(str(bi_folder), backend="onnx-fp32"), OnnxBiEncoder)
    ce = load_cross_encoder(str(ce_folder), backend="onnx", max_length=16)
    assert isinstance(ce, OnnxCrossEncoder) and ce.max_seq_length == 16
    assert ce.predict([("a", "b"), ("c", "d")]).shape == (2,)


def test_rerank_helpers_accept_the_onnx_cross_encoder(ce_folder: Path, torch_ce) -> None:
    from twinq.shared.rerank import score_pairs

    onnx = OnnxCrossEncoder.load(ce_folder, precision="fp32", threads=1)
    np.testing.assert_allclose(score_pairs(onnx, PAIRS), score_pairs(torch_ce, PAIRS), atol=1e-3)


def test_onnx_backend_unknown_hub_model_raises_model_load_error() -> None:
    from twinq.shared.errors import ModelLoadError
    from twinq.shared.models import load_bi_encoder

    with pytest.raises(ModelLoadError):
        load_bi_encoder("no-such-owner/no-such-model", backend="onnx")


# --- the int8 guard and the `auto` backend ---------------------------------------------------


def _meta(folder: Path, kind: str) -> dict:
    import json

    return json.loads((cache_dir(folder, kind) / "meta.json").read_text())  # type: ignore[arg-type]


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget this process's one-line warnings, so that each test sees its own."""
    from twinq.shared import models

    monkeypatch.setattr(models, "_warned", set())


def test_guard_numbers_land_in_meta_json_once_per_export(bi_folder: Path, real_ce_folder: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from twinq.shared import quantisation_check as qc
    from twinq.shared.models import resolve_backend

    resolved = resolve_backend("bi-encoder", str(bi_folder), "auto")
    check = _meta(bi_folder, "bi-encoder")["quantisation_check"]
    assert check["passed"] and resolved == type(resolved)("onnx", check)
    assert set(check["numbers"]) >= {"mean_cosine", "min_cosine"}
    assert check["thresholds"] == {"mean_cosine": qc.BI_MEAN_COSINE_MIN,
                                   "min_cosine": qc.BI_MIN_COSINE_MIN}
    assert check["numbers"]["texts"] == len(qc.bi_encoder_texts()) > 150
    # An untrained head ranks each group's candidates by near-ties, which int8 noise reorders:
    # its logits correlate, but top-1 agreement falls short (about 0.88), so auto takes fp32. A
    # trained reranker passes (docs/performance.md); lowered thresholds stand in for one here.
    ce = resolve_backend("cross-encoder", str(real_ce_folder), "auto")
    numbers = _meta(real_ce_folder, "cross-encoder")["quantisation_check"]["numbers"]
    assert numbers["groups"] == len(qc.sample()) and numbers["pairs"] == 5 * numbers["groups"]
    assert numbers["spearman"] >= qc.CE_SPEARMAN_MIN, numbers
    assert ce.backend == ("onnx" if numbers["top1_agreement"] >= qc.CE_TOP1_MIN else "onnx-fp32")
    monkeypatch.setattr(qc, "CE_TOP1_MIN", 0.5)
    ce = resolve_backend("cross-encoder", str(real_ce_folder), "auto")
    assert ce.backend == "onnx" and ce.check and ce.check["passed"], ce.check

    def never(*args: object) -> None:
        raise AssertionError("a cached export must not be checked again")

    monkeypatch.setattr(qc, "run_check", never)
    assert resolve_backend("bi-encoder", str(bi_folder), "auto").backend == "onnx"


def test_a_failed_guard_falls_back_to_onnx_fp32_with_one_log_line(
        bi_folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        fresh_warnings: None) -> None:
    import logging

    from twinq.shared import quantisation_check as qc
    from twinq.shared.models import backend_of, load_bi_encoder, resolve_backend

    monkeypatch.setattr(qc, "BI_MEAN_COSINE_MIN", 1.01)  # no int8 model can reach it
    with caplog.at_level(logging.INFO, logger="twinq.shared.models"):
        first = load_bi_encoder(str(bi_folder), backend="auto")
        again = resolve_backend("bi-encoder", str(bi_folder), "auto")
    assert isinstance(first, OnnxBiEncoder) and first.precision == "fp32"
    assert backend_of(first) == again.backend == "onnx-fp32"
    assert again.check and not again.check["passed"]
    assert again.check["thresholds"]["mean_cosine"] == 1.01  # judged again, not re-exported
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "mean_cosine" in warnings[0] and "onnx-fp32" in warnings[0]
    # An explicit onnx still serves int8, as asked, and says once that the guard failed.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="twinq.shared.models"):
        explicit = load_bi_encoder(str(bi_folder), backend="onnx")
    assert explicit.precision == "int8" and backend_of(explicit) == "onnx"
    assert ["serving int8 as asked" in r.getMessage() for r in caplog.records] == [True]


def test_auto_falls_back_to_torch_when_onnx_cannot_export(
        bi_folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        fresh_warnings: None) -> None:
    import logging

    from twinq.shared import onnx_backend
    from twinq.shared.errors import ModelLoadError
    from twinq.shared.models import backend_of, load_bi_encoder, resolve_backend

    def broken(*args: object, **kwargs: object) -> None:
        raise ModelLoadError("the onnx backend supports Transformer+Pooling, not [...]")

    monkeypatch.setattr(onnx_backend, "ensure_exported", broken)
    with caplog.at_level(logging.WARNING, logger="twinq.shared.models"):
        model = load_bi_encoder(str(bi_folder), backend="auto")
    assert backend_of(model) == "torch" and not isinstance(model, OnnxBiEncoder)
    assert len(caplog.records) == 1 and "using torch" in caplog.records[0].getMessage()
    with pytest.raises(ModelLoadError):  # asked for by name: the error is the caller's
        resolve_backend("bi-encoder", str(bi_folder), "onnx")
    assert resolve_backend("bi-encoder", str(bi_folder), "auto", device="cuda").backend == "torch"
    assert resolve_backend("bi-encoder", str(bi_folder), "torch").check is None


def test_guard_metrics_on_known_inputs() -> None:
    from twinq.shared import quantisation_check as qc

    assert qc.spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.5])) == 1.0
    assert qc.spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == -1.0
    assert qc.judge("bi-encoder", {"mean_cosine": 0.999, "min_cosine": 0.9}) == (
        False, [f"min_cosine 0.9000 < {qc.BI_MIN_COSINE_MIN}"])
    assert qc.judge("cross-encoder", {"spearman": float("nan"), "top1_agreement": 1.0})[0] is False
    groups = qc.cross_encoder_groups()
    assert all(len(c) == 5 and query not in c for query, c in groups)
    assert any("\u4e00" <= ch <= "\u9fff" for text in qc.bi_encoder_texts() for ch in text)
