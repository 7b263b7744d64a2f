"""The Beam index pipeline end to end, with a tiny model (DirectRunner, in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twinq.pipelines.embed_handler import EmbedHandler
from twinq.pipelines.index import BuildOptions, build_snapshot
from twinq.shared import snapshot as snap
from twinq.shared.cli import main as twinq
from twinq.shared.errors import SnapshotInvalid


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _corpus(n: int = 40) -> list[dict]:
    return [{"id": f"q{i:03d}", "text": f"how do I fix problem number {i} with my {w}?", "answer": f"a{i}"}
            for i, w in zip(range(n), ["account", "order", "invoice", "phone"] * n)]


def test_build_snapshot_shards_dedupes_and_rejects(tmp_path: Path, tiny_bi_encoder_path: str) -> None:
    rows = _corpus()
    rows.append({"id": "dup", "text": "  how do I fix problem   number 3 with my phone? "})
    jsonl = _write_jsonl(tmp_path / "a.jsonl", rows[:30])
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[30:]) +
                                      "{broken\n" + json.dumps({"id": "e", "text": " \t "}) + "\n")
    pq.write_table(pa.table({"id": ["p1"], "text": ["a parquet question"]}), tmp_path / "c.parquet")
    result = build_snapshot(BuildOptions(corpus=[str(jsonl), str(tmp_path / "b.jsonl"),
                                                 str(tmp_path / "c.parquet")],
                                         root=tmp_path / "root", shards=3, model=tiny_bi_encoder_path,
                                         publish=True))
    corpus = result.manifest["corpus"]
    assert (corpus["rows_read"], corpus["rows_rejected"], corpus["rows_indexed"]) == (44, 2, 41)
    assert corpus["ids_indexed"] == 42
    rejects = (result.path / snap.REJECTS).read_text().splitlines()
    assert len(rejects) == 2 and "invalid JSON" in rejects[0] + rejects[1]
    loaded = snap.load_snapshot(tmp_path / "root")
    assert loaded.version == result.version and len(loaded.shards) == 3
    all_rows = [s.row(i) for s in loaded.shards for i in range(s.index.ntotal)]
    assert sum(s.index.ntotal for s in loaded.shards) == len(all_rows) == 41
    merged = next(r for r in all_rows if r["id"] == "dup")
    assert merged["ids"] == ["dup", "q003"] and json.loads(merged["metadata"]) == {}
    from twinq.shared.text import stable_shard
    for shard_no, shard in enumerate(loaded.shards):
        assert all(stable_shard(shard.row(i)["id"], 3) == shard_no for i in range(shard.index.ntotal))
    assert result.manifest["validation"]["passed"] and result.manifest["model"]["dimension"] == 32


def test_incremental_build_reembeds_only_changed_rows(tmp_path: Path, tiny_bi_encoder_path: str) -> None:
    rows = _corpus(50)
    root = tmp_path / "root"
    options = dict(root=root, shards=2, model=tiny_bi_encoder_path, publish=True)
    first = build_snapshot(BuildOptions(corpus=[str(_write_jsonl(tmp_path / "v1.jsonl", rows))], **options))
    rows[7]["text"] = "a completely rewritten question"
    rows.append({"id": "new", "text": "a brand new question"})
    second = build_snapshot(BuildOptions(corpus=[str(_write_jsonl(tmp_path / "v2.jsonl", rows))], **options))
    corpus = second.manifest["corpus"]
    assert (corpus["rows_embedded"], corpus["rows_reused"], corpus["reused_from"]) == (2, 49, first.version)
    # Reused vectors are the stored ones, bit for bit.
    old = {r["id"]: r["embedding"] for r in _all_rows(first.path)}
    new = {r["id"]: r["embedding"] for r in _all_rows(second.path)}
    assert new["q000"] == old["q000"] and new["q007"] != old["q007"]


def test_backend_is_recorded_and_vectors_are_not_reused_across_backends(
        tmp_path: Path, tiny_bi_encoder_path: str) -> None:
    pytest.importorskip("onnxruntime")
    import shutil

    model = tmp_path / "model"  # a private copy: the onnx export is cached inside it
    shutil.copytree(tiny_bi_encoder_path, model)
    corpus = str(_write_jsonl(tmp_path / "c.jsonl", _corpus(30)))
    options = dict(corpus=[corpus], root=tmp_path / "root", shards=2, model=str(model), publish=True)
    first = build_snapshot(BuildOptions(**options, backend="torch"))
    assert first.manifest["model"]["backend"] == "torch"
    assert first.manifest["model"]["quantisation_check"] is None
    second = build_snapshot(BuildOptions(**options, backend="onnx"))
    assert second.manifest["model"]["backend"] == "onnx"
    assert second.manifest["corpus"]["rows_reused"] == 0, "int8 and fp32 vectors must not mix"
    assert second.manifest["validation"]["passed"]
    third = build_snapshot(BuildOptions(**options, backend="onnx"))
    assert third.manifest["corpus"]["rows_reused"] == 30


def test_int8_recipe_is_recorded_and_an_older_recipe_is_rebuilt_not_reused(
        tmp_path: Path, tiny_bi_encoder_path: str, caplog: pytest.LogCaptureFixture) -> None:
    """int8 vectors name the recipe that made them. A snapshot from an older recipe (recipe 1
    scaled activations per batch; a manifest from then has no `int8_recipe`) is served with a
    warning, and the next build embeds every row again rather than mix two recipes' vectors."""
    pytest.importorskip("onnxruntime")
    import shutil

    from twinq.shared.onnx_backend import RECIPE_VERSION
    from twinq.shared.opened_snapshot import open_snapshot

    model = tmp_path / "model"
    shutil.copytree(tiny_bi_encoder_path, model)
    root = tmp_path / "root"
    corpus = str(_write_jsonl(tmp_path / "c.jsonl", _corpus(30)))
    options = dict(corpus=[corpus], root=root, shards=2, model=str(model), publish=True,
                   backend="onnx")
    first = build_snapshot(BuildOptions(**options))
    assert first.manifest["model"]["int8_recipe"] == RECIPE_VERSION
    old = snap.read_manifest_at(root, first.version)
    del old["model"]["int8_recipe"]  # as written before recipes were recorded
    snap.write_manifest(root, first.version, old)
    with caplog.at_level("WARNING"):
        opened = open_snapshot(root)
    assert opened.bi_encoder.precision == "int8"
    assert f"made with int8 recipe 1, queries now with recipe {RECIPE_VERSION}" in caplog.text
    with caplog.at_level("INFO"):
        second = build_snapshot(BuildOptions(**options))
    assert second.manifest["corpus"]["rows_reused"] == 0, "two int8 recipes' vectors must not mix"
    assert f"embedded with int8 recipe 1, not {RECIPE_VERSION}" in caplog.text
    assert second.manifest["model"]["int8_recipe"] == RECIPE_VERSION
    third = build_snapshot(BuildOptions(**options))
    assert third.manifest["corpus"]["rows_reused"] == 30
    caplog.clear()
    with caplog.at_level("WARNING"):
        open_snapshot(root)
    assert "int8 recipe" not in caplog.text
    torch_built = build_snapshot(BuildOptions(**{**options, "backend": "torch"}))
    assert "int8_recipe" not in torch_built.manifest["model"]


def test_auto_backend_is_recorded_resolved_with_its_check_and_reuse_compares_it(
        tmp_path: Path, tiny_bi_encoder_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default (auto) resolves once: the manifest names the backend the vectors were made
    in, with the int8 guard's numbers; a build whose auto resolves otherwise re-embeds all."""
    pytest.importorskip("onnxruntime")
    import shutil

    from twinq.shared import quantisation_check as qc
    from twinq.shared.opened_snapshot import open_snapshot

    model = tmp_path / "model"
    shutil.copytree(tiny_bi_encoder_path, model)
    corpus = str(_write_jsonl(tmp_path / "c.jsonl", _corpus(30)))
    options = dict(corpus=[corpus], root=tmp_path / "root", shards=2, model=str(model), publish=True)
    first = build_snapshot(BuildOptions(**options))
    assert BuildOptions(**options).backend == "auto"
    recorded = first.manifest["model"]
    assert recorded["backend"] == "onnx"  # the tiny bi-encoder passes the guard
    check = recorded["quantisation_check"]
    assert check["passed"] and check["kind"] == "bi-encoder"
    assert check["numbers"]["mean_cosine"] >= check["thresholds"]["mean_cosine"]
    assert snap.read_manifest_at(tmp_path / "root", first.version)["model"] == recorded
    opened = open_snapshot(tmp_path / "root")  # auto: queries in the snapshot's backend
    assert opened.bi_encoder_backend == "onnx" and opened.bi_encoder.precision == "int8"
    monkeypatch.setattr(qc, "BI_MEAN_COSINE_MIN", 1.01)  # now auto resolves to onnx-fp32
    second = build_snapshot(BuildOptions(**options))
    assert second.manifest["model"]["backend"] == "onnx-fp32"
    assert second.manifest["model"]["quantisation_check"]["passed"] is False
    assert second.manifest["corpus"]["rows_reused"] == 0


def _all_rows(path: Path) -> list[dict]:
    return [r for f in sorted(path.glob("shard-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_failed_build_publishes_nothing(tmp_path: Path, tiny_bi_encoder_path: str, monkeypatch) -> None:
    root = tmp_path / "root"
    corpus = str(_write_jsonl(tmp_path / "c.jsonl", _corpus(20)))
    good = build_snapshot(BuildOptions(corpus=[corpus], root=root, shards=2,
                                       model=tiny_bi_encoder_path, publish=True))

    def broken(*args, **kwargs):
        raise SnapshotInvalid("canary failed (simulated)")

    monkeypatch.setattr(snap, "validate", broken)
    with pytest.raises(SnapshotInvalid):
        build_snapshot(BuildOptions(corpus=[corpus], root=root, shards=2,
                                    model=tiny_bi_encoder_path, publish=True))
    assert snap.current_version(root) == good.version
    incomplete = [i for i in snap.list_versions(root) if not i.complete]
    assert len(incomplete) == 1 and not incomplete[0].building
    assert snap.gc(root, keep=5) == [incomplete[0].version]


@pytest.mark.parametrize("setup,args,message", [
    (None, ["--corpus", "{d}/missing.jsonl"], "not found"),
    ("x.xlsx", ["--corpus", "{d}/x.xlsx"], "unknown corpus format"),
    ("empty.jsonl", ["--corpus", "{d}/empty.jsonl"], "empty corpus"),
    ("zero.jsonl", ["--corpus", "{d}/zero.jsonl"], "empty corpus"),
    ("noid.jsonl", ["--corpus", "{d}/noid.jsonl"], "no id column"),
    ("ok.jsonl", ["--corpus", "{d}/ok.jsonl", "--text-field", "body"], "no text column 'body'"),
    ("bad.parquet", ["--corpus", "{d}/bad.parquet"], "cannot read"),
])
def test_index_build_bad_input_exits_2(tmp_path: Path, tiny_bi_encoder_path: str, capsys, setup: str | None,
                                       args: list[str], message: str) -> None:
    files = {"x.xlsx": "whatever", "empty.jsonl": '{"id": "1", "text": "   "}\n', "zero.jsonl": "",
             "noid.jsonl": '{"key": "1", "text": "q"}\n', "ok.jsonl": '{"id": "1", "text": "q"}\n',
             "bad.parquet": "PAR1 not really"}
    if setup:
        (tmp_path / setup).write_text(files[setup])
    argv = ["index", "build", *[a.format(d=tmp_path) for a in args], "--root", str(tmp_path / "root"),
            "--model", tiny_bi_encoder_path, "--publish"]
    assert twinq(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    # Nothing published and nothing complete, whether or not the build got to make the root.
    root = tmp_path / "root"
    assert not (root / snap.CURRENT).exists() and snap.current_version(root) is None
    assert not any(info.complete for info in snap.list_versions(root))


def test_parquet_with_a_corrupt_data_page_exits_2_with_one_line(
        tmp_path: Path, tiny_bi_encoder_path: str, capsys, caplog) -> None:
    """The footer reads, so the file passes the checks before Beam; the page fails inside it."""
    from tests.shared.test_corpus import write_parquet

    path = write_parquet(tmp_path / "c.parquet", 1500)
    page = pq.read_metadata(path).row_group(0).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[page + 8: page + 200] = bytes(b ^ 0x5A for b in data[page + 8: page + 200])
    path.write_bytes(bytes(data))
    argv = ["index", "build", "--corpus", str(path), "--root", str(tmp_path / "root"),
            "--model", tiny_bi_encoder_path, "--publish"]
    assert twinq(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read" in err[0] and "c.parquet" in err[0], err
    assert not [r for r in caplog.records if r.levelno >= 40], caplog.text[-2000:]
    assert snap.current_version(tmp_path / "root") is None


def test_duplicate_id_first_occurrence_wins_and_the_other_is_rejected(
        tmp_path: Path, tiny_bi_encoder_path: str, caplog) -> None:
    first = _write_jsonl(tmp_path / "a.jsonl", [
        {"id": "x", "text": "how do I pay?"}, {"id": "y", "text": "where is my order?"},
        {"id": "x", "text": "how do I pay?"}])
    second = _write_jsonl(tmp_path / "b.jsonl", [
        {"id": "x", "text": "how do I cancel?"}, {"id": "z", "text": "can I get a refund?"}])

    def build(paths: list[Path], root: str) -> tuple[dict, dict, list[dict]]:
        result = build_snapshot(BuildOptions(corpus=[str(p) for p in paths],
                                             root=tmp_path / root, shards=2,
                                             model=tiny_bi_encoder_path, canary=0))
        texts = {r["id"]: (r["text"], r["ids"]) for r in _all_rows(result.path)}
        rejects = [json.loads(line) for line in
                   (result.path / snap.REJECTS).read_text().splitlines()]
        return result.manifest["corpus"], texts, rejects

    with caplog.at_level("WARNING", logger="twinq.pipelines.index"):
        corpus, texts, rejects = build([first, second], "r1")
    assert texts == {"x": ("how do I pay?", ["x"]), "y": ("where is my order?", ["y"]),
                     "z": ("can I get a refund?", ["z"])}
    assert [(r["reason"], r["source"], r["line"]) for r in rejects] == [
        ("duplicate id with a different text", str(second), 1)]
    assert (corpus["rows_read"], corpus["rows_rejected"], corpus["rows_duplicate_id"],
            corpus["rows_repeated"], corpus["rows_indexed"], corpus["ids_indexed"]) == (
        5, 1, 1, 1, 3, 3)
    assert "1 rows reuse an earlier row's id with a different text" in caplog.text
    _, texts, _ = build([second, first], "r2")  # the order of the files decides
    assert texts["x"] == ("how do I cancel?", ["x"])


def test_index_cli_list_publish_rollback_gc(tmp_path: Path, tiny_bi_encoder_path: str, capsys) -> None:
    corpus = str(_write_jsonl(tmp_path / "c.jsonl", _corpus(10)))
    root = str(tmp_path / "root")
    base = ["index", "build", "--corpus", corpus, "--root", root, "--model", tiny_bi_encoder_path,
            "--shards", "1", "--reuse-from", "none"]
    assert twinq(base + ["--publish"]) == 0
    assert twinq(base) == 0  # built, not published
    first, second = [i.version for i in snap.list_versions(root)]
    assert snap.current_version(root) == first
    assert twinq(["index", "publish", second, "--root", root]) == 0
    assert twinq(["index", "rollback", "--root", root]) == 0 and snap.current_version(root) == first
    assert twinq(base) == 0
    third = snap.list_versions(root)[-1].version
    assert twinq(["index", "gc", "--keep", "1", "--root", root]) == 0
    # the newest complete version and the published one stay; the one in between goes
    assert [i.version for i in snap.list_versions(root)] == [first, third]
    assert twinq(["index", "publish", "../oops", "--root", root]) == 2


_BATCHES: list[int] = []
"""Size of every batch RunInference handed over (DirectRunner runs in-process)."""


class _RecordingEmbedHandler(EmbedHandler):
    """Module-level, so that Beam pickles it by reference and appends to the real `_BATCHES`."""

    def run_inference(self, batch, model, inference_args=None):  # noqa: ANN001, ANN201
        _BATCHES.append(len(batch))
        return super().run_inference(batch, model, inference_args)


def test_runinference_forms_full_batches_and_keeps_keys(tiny_bi_encoder_path: str) -> None:
    """Padding is cut by `encode`'s length sort inside large batches, so batches must be full."""
    import apache_beam as beam
    import numpy as np
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.testing.util import assert_that

    from twinq.shared.models import load_bi_encoder

    _BATCHES.clear()
    texts = [f"question {n} " + "w" * (n % 97) for n in range(100)]
    handler = KeyedModelHandler(_RecordingEmbedHandler(tiny_bi_encoder_path, min_batch_size=32,
                                                       max_batch_size=32))
    expected = load_bi_encoder(tiny_bi_encoder_path).encode(texts, normalize_embeddings=True)

    def check(results: list) -> None:
        assert len(results) == len(texts)
        for key, prediction in results:
            np.testing.assert_allclose(prediction.inference, expected[int(key)], atol=1e-5)

    with beam.Pipeline(options=_direct()) as pipeline:
        out = (pipeline | beam.Create([(str(i), t) for i, t in enumerate(texts)])
               | RunInference(handler))
        assert_that(out, check)
    assert sorted(_BATCHES, reverse=True)[:3] == [32, 32, 32] and sum(_BATCHES) == 100


def _direct():  # noqa: ANN202
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(["--runner=DirectRunner"])


MARKUP_TEXTS = ["why does [/] crash", "is [bold]this[/bold] bold", "a [link=http://x.test]link[/link]",
                "a :smile: face"]


def test_search_prints_stored_text_literally(quick_snapshot, capsys) -> None:
    """Corpus text is data: rich markup, links and emoji codes in it are printed as written."""
    root, _ = quick_snapshot(MARKUP_TEXTS, shards=1)
    capsys.readouterr()
    assert twinq(["search", "why does it crash", "--root", str(root), "--top-k", "4"]) == 0
    out = capsys.readouterr().out
    for text in MARKUP_TEXTS:
        assert text in out, out


class _SlowModel:
    """Encodes in a known time, so that the progress rate can be checked."""

    def encode(self, texts, **kwargs):  # noqa: ANN001, ANN003, ANN201
        import time

        import numpy as np

        time.sleep(0.05)
        return np.zeros((len(texts), 4), dtype=np.float32)


def test_embed_progress_rate_counts_the_first_batch(caplog) -> None:
    """One batch of 385 texts in 0.05 s is about 7,700/s, not 385000000000/s."""
    handler = EmbedHandler("unused", progress_total=385)
    with caplog.at_level("INFO", logger="twinq.pipelines.embed_handler"):
        handler.run_inference([f"q{i}" for i in range(385)], _SlowModel())
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("embedded")]
    rate = int(line.split("(")[1].split("/s")[0])
    assert line.startswith("embedded 385/~385 texts") and 0 < rate <= 385 / 0.05, line


def test_importing_beam_through_twinq_prints_no_apitools_notice() -> None:
    """Beam logs "apitools not found ..." on the root logger at import; twinq drops exactly it."""
    import logging
    import subprocess
    import sys

    from twinq.pipelines.beam_options import ApitoolsNotice as _ApitoolsNotice

    code = ("import logging; logging.basicConfig(); from twinq.pipelines.beam_options import "
            "pipeline_options, runner_path; runner_path('DirectRunner'); pipeline_options([]); "
            "import twinq.pipelines.index_transforms")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120).stderr
    assert "apitools" not in err, err
    notice = _ApitoolsNotice()
    record = logging.LogRecord("root", logging.WARNING, __file__, 1, "apitools not found, and x",
                               None, None)
    assert not notice.filter(record)
    record = logging.LogRecord("root", logging.WARNING, __file__, 1, "something else", None, None)
    assert notice.filter(record)


def test_a_corrupt_published_snapshot_turns_reuse_off_and_a_new_build_replaces_it(
        tmp_path: Path, tiny_bi_encoder_path: str, caplog, capsys) -> None:
    root = tmp_path / "root"
    corpus = str(_write_jsonl(tmp_path / "c.jsonl", _corpus(12)))
    options = dict(corpus=[corpus], root=root, shards=1, model=tiny_bi_encoder_path, canary=0)
    first = build_snapshot(BuildOptions(**options, publish=True))
    manifest = json.loads((first.path / snap.MANIFEST).read_text())
    (first.path / snap.MANIFEST).write_text(json.dumps({**manifest, "created_at": "soon"}))
    argv = ["index", "build", "--corpus", corpus, "--root", str(root), "--model",
            tiny_bi_encoder_path, "--shards", "1", "--canary", "0"]
    assert twinq(argv + ["--reuse-from", str(root)]) == 2  # named explicitly: an error
    assert "corrupt manifest: created_at" in capsys.readouterr().err
    with caplog.at_level("WARNING", logger="twinq.pipelines.index"):
        second = build_snapshot(BuildOptions(**options, publish=True))
    assert "not reusing vectors" in caplog.text and second.manifest["corpus"]["rows_reused"] == 0
    assert snap.load_snapshot(root).version == second.version
