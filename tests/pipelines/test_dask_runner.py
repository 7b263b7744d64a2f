"""`twinq index build --runner DaskRunner` on a real dask.distributed cluster, into an S3 root.

A scheduler and two worker processes (one thread each) run on 127.0.0.1 (`tests/dask_cluster`),
the S3 server is SeaweedFS (`s3_root`). The same corpus, built by the DirectRunner into a local
folder, is the reference: the Dask build must give the same ids in every shard, the same
vectors (within 1e-5), the same rejects and the same counts in the manifest; every text must be
embedded and every shard written by a Dask worker (counted inside each worker process), none by
the driver, and both workers must have embedded a share. The tiny test model embeds a batch in
a millisecond, and for such tasks Dask rightly keeps the work where its input is (one worker
did all of it in CI once); so each batch is given a real model's cost (`EMBED_COST_S`), and
the test shows that the pipeline has no step that keeps the work on one worker when it costs
time, as the real model's does in `benchmarks/bench_distributed.py`.

`twinq dedupe` then runs on the same cluster over the S3 snapshot, its workers leaving the scored
pairs in S3 (`--work-dir`), and must give the same pairs and clusters as on the DirectRunner.

The corpus holds one of each case the counts cover: a malformed line, a text empty after
cleaning, a row repeated verbatim, an id reused with another text, and one text under two ids.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

FILES = 4
ROWS_PER_FILE = 30
SHARDS = 4
EMBED_COST_S = 0.25
"""Seconds added to each embedding batch of 16 texts (all-MiniLM-L6-v2 on one core: ~0.1 s)."""
COUNT_KEYS = ("rows_read", "rows_rejected", "rows_indexed", "ids_indexed", "rows_embedded",
              "rows_reused", "rows_duplicate_id", "rows_repeated", "fingerprint")


def _require_distributed() -> None:
    try:
        import distributed  # noqa: F401
    except ImportError:
        reason = "needs dask.distributed (pip install 'dask[distributed]', in the `test` extra)"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{reason}; CI is set, so it is required", pytrace=False)
        pytest.skip(reason)


def _corpus(folder: Path) -> list[Path]:
    """FILES JSONL files of demo questions, plus one row of each counted case."""
    faq = Path(__file__).resolve().parents[2] / "pipelines" / "demo" / "faq.jsonl"
    rows = [json.loads(line) for line in faq.read_text().splitlines()][:FILES * ROWS_PER_FILE]
    lines = [[json.dumps({"id": r["id"], "text": r["text"], "topic": r["topic"]})
              for r in rows[i * ROWS_PER_FILE:(i + 1) * ROWS_PER_FILE]] for i in range(FILES)]
    lines[0] += ['{"id": "broken", "text": ',                                  # malformed
                 json.dumps({"id": "blank", "text": " \t "})]                  # empty text
    lines[1].append(json.dumps({"id": rows[0]["id"], "text": rows[0]["text"]}))  # repeated
    lines[2].append(json.dumps({"id": rows[1]["id"], "text": "another question, same id"}))
    lines[3].append(json.dumps({"id": "same-text", "text": rows[40]["text"]}))  # merged
    paths = []
    for i, body in enumerate(lines):
        paths.append(folder / f"part-{i}.jsonl")
        paths[-1].write_text("".join(f"{line}\n" for line in body))
    return paths


EXPECTED = {"rows_read": FILES * ROWS_PER_FILE + 5, "rows_rejected": 3, "rows_duplicate_id": 1,
            "rows_repeated": 1, "rows_indexed": FILES * ROWS_PER_FILE,
            "ids_indexed": FILES * ROWS_PER_FILE + 1}


def _shards(root: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Each shard's ids (primary, then all) and vectors, read from the root's store."""
    import pyarrow.parquet as pq

    from twinq.shared import snapshot as snap
    from twinq.shared.store import open_store

    store, out = open_store(root), []
    for entry in manifest["shards"]:
        with store.open(f"{snap.version_key(manifest['version'])}/{entry['data_file']}") as fh:
            table = pq.read_table(fh)
        out.append({"id": table.column("id").to_pylist(), "ids": table.column("ids").to_pylist(),
                    "vectors": snap.embeddings_of(table)})
    return out


def _rejects(root: str, version: str) -> list[str]:
    from twinq.shared import snapshot as snap
    from twinq.shared.store import open_store

    body = open_store(root).read_bytes(f"{snap.version_key(version)}/{snap.REJECTS}") or b""
    return body.decode().splitlines()


def _twinq(args: list[str]) -> subprocess.CompletedProcess:
    """The `twinq` command of this environment, as a separate driver process."""
    exe = shutil.which("twinq", path=str(Path(sys.executable).parent))
    assert exe, "the twinq console script is not installed next to this Python"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1",
                               "TOKENIZERS_PARALLELISM": "false"})


def _assert_same_snapshot(root_a: str, a: dict[str, Any], root_b: str, b: dict[str, Any]) -> None:
    import numpy as np

    assert {k: a["corpus"][k] for k in COUNT_KEYS} == {k: b["corpus"][k] for k in COUNT_KEYS}
    assert [e["rows"] for e in a["shards"]] == [e["rows"] for e in b["shards"]]
    for i, (sa, sb) in enumerate(zip(_shards(root_a, a), _shards(root_b, b), strict=True)):
        assert sa["id"] == sb["id"], f"shard {i}: ids differ"
        assert sa["ids"] == sb["ids"], f"shard {i}: merged ids differ"
        np.testing.assert_allclose(sa["vectors"], sb["vectors"], atol=1e-5, rtol=0,
                                   err_msg=f"shard {i}: vectors differ")
    assert _rejects(root_a, a["version"]) == _rejects(root_b, b["version"])


def test_dask_runner_short_name_maps_to_beams_class_and_unknown_names_are_refused() -> None:
    _require_distributed()
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.runners.dask.dask_runner import DaskOptions

    from twinq.pipelines.beam_options import pipeline_options, runner_name
    from twinq.shared.errors import BadInput

    args = ["--runner", "DaskRunner", "--dask_client_address", "tcp://127.0.0.1:8786",
            "--dask_npartitions", "4"]
    options = pipeline_options(args)
    assert options.view_as(StandardOptions).runner == \
        "apache_beam.runners.dask.dask_runner.DaskRunner"
    assert options.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True) \
        == {"address": "tcp://127.0.0.1:8786", "npartitions": 4}
    assert runner_name(args) == "DaskRunner"  # what the manifest records
    assert pipeline_options(["--runner=daskrunner"]).view_as(StandardOptions).runner == \
        "apache_beam.runners.dask.dask_runner.DaskRunner"
    assert pipeline_options(["--runner=FlinkRunner"]).view_as(StandardOptions).runner == \
        "FlinkRunner"
    assert pipeline_options([]).view_as(StandardOptions).runner == "DirectRunner"
    full = "apache_beam.runners.direct.direct_runner.DirectRunner"
    assert pipeline_options(["--runner", full]).view_as(StandardOptions).runner == full
    with pytest.raises(BadInput, match="unknown Beam runner 'Dusk'"):
        pipeline_options(["--runner", "Dusk"])


def _dedupe_outputs(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(clusters.jsonl records, pairs.parquet rows) of a dedupe run."""
    import pyarrow.parquet as pq

    clusters = [json.loads(line) for line in (out / "clusters.jsonl").read_text().splitlines()]
    return clusters, pq.read_table(out / "pairs.parquet").to_pylist()


def _dedupe_reranker(tmp_path: Path, source: str) -> Path:
    """The tiny cross-encoder with a training.json whose pair calibration spreads its logits."""
    folder = tmp_path / "reranker"
    shutil.copytree(source, folder)
    (folder / "training.json").write_text(json.dumps({
        "calibration": {"method": "logistic", "features": ["rerank"], "mean": [0.0],
                        "scale": [1.0], "weights": [2.0], "bias": 0.5},
        "decision": {"method": "logistic", "features": ["rerank", "recall"],
                     "mean": [0.0, 0.5], "scale": [1.0, 0.2], "weights": [1.0, 1.0],
                     "bias": 0.0, "min_probability": 0.6}}))
    return folder


@pytest.mark.slow
def test_dask_runner_build_into_s3_matches_direct_runner(tmp_path: Path, s3_root: str,
                                                         tiny_bi_encoder_path: str,
                                                         tiny_cross_encoder_path: str) -> None:
    _require_distributed()
    from tests.dask_cluster import (LocalDaskCluster, install_work_tally, read_work_tally,
                                    warm_imports)
    from twinq.pipelines.index import BuildOptions, build_snapshot
    from twinq.shared import snapshot as snap

    corpus = _corpus(tmp_path)
    # AWS_* (set by s3_root) reach the workers through their environment, as on real machines
    with LocalDaskCluster(2, folder=tmp_path / "dask") as cluster:
        workers = cluster.worker_addresses()
        assert len(workers) == 2 and len(set(install_work_tally(
            cluster.client(), embed_cost_s=EMBED_COST_S).values())) == 2
        warm_imports(cluster.client(), ["twinq.pipelines.index_transforms",
                                        "twinq.pipelines.embed_handler", "sentence_transformers"])

        direct_root = str(tmp_path / "direct")
        direct = build_snapshot(BuildOptions(corpus=[str(p) for p in corpus], root=direct_root,
                                             shards=SHARDS, model=tiny_bi_encoder_path,
                                             canary=20, batch_size=16)).manifest
        assert {k: direct["corpus"][k] for k in EXPECTED} == EXPECTED

        args = ["index", "build", *(a for p in corpus for a in ("--corpus", str(p))),
                "--root", s3_root, "--shards", str(SHARDS), "--model", tiny_bi_encoder_path,
                "--canary", "20", "--batch-size", "16", "--publish",
                "--runner", "DaskRunner", "--dask_client_address", cluster.address,
                "--dask_npartitions", str(FILES)]
        done = _twinq(args)
        logs = "\n".join(cluster.log_tail(f"worker-{i}") for i in range(2))
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{logs}"
        tally = read_work_tally(cluster.client())

        version = snap.current_version(s3_root)
        on_dask = snap.read_manifest_at(s3_root, version)
        assert on_dask["build"]["runner"] == "DaskRunner"
        _assert_same_snapshot(direct_root, direct, s3_root, on_dask)

        # the workers embedded every text and wrote every non-empty shard (the driver writes
        # only the empty ones, after the pipeline), and each worker did part of it. Which one
        # embeds is the scheduler's choice: in most runs both do (79/41, 63/57), but on an idle
        # machine one in three put all 120 texts on one worker while the other wrote 3 of the 4
        # shards (session 12), so the spread is asserted over the build's work, not one step's.
        embedded = {w: tally[w].get("texts_embedded", 0) for w in workers}
        print(f"work per Dask worker: {tally}")
        assert all(embedded[w] or tally[w].get("shards_written", 0) for w in workers), \
            f"the work did not spread over both workers: {tally}"
        assert sum(embedded.values()) == on_dask["corpus"]["rows_embedded"], tally
        assert sum(tally[w].get("shards_written", 0) for w in workers) == sum(
            1 for e in on_dask["shards"] if e["rows"]), tally
        assert sum(tally[w].get("rows_written", 0) for w in workers) == \
            on_dask["corpus"]["rows_indexed"], tally

        # `twinq dedupe` on the same cluster, reading the S3 snapshot, its workers leaving the
        # scored pairs in S3 (--work-dir): the same pairs and clusters as the DirectRunner's
        from twinq.pipelines.dedupe import DedupeOptions, dedupe

        reranker = _dedupe_reranker(tmp_path, tiny_cross_encoder_path)
        flags = ["--reranker", str(reranker), "--neighbours", "5", "--recall-floor", "0.5",
                 "--batch-size", "8"]
        direct_out = tmp_path / "dedupe-direct"
        dedupe(DedupeOptions(root=s3_root, out=direct_out, reranker=str(reranker),
                             neighbours=5, recall_floor=0.5, batch_size=8,
                             beam_args=["--runner=DirectRunner"]))
        dask_out = tmp_path / "dedupe-dask"
        done = _twinq(["dedupe", "--root", s3_root, "--out", str(dask_out), *flags,
                       "--work-dir", f"{s3_root}-dedupe-work", "--", "--runner", "DaskRunner",
                       "--dask_client_address", cluster.address, "--dask_npartitions", "4"])
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
        clusters, pairs = _dedupe_outputs(dask_out)
        assert pairs and clusters, "the test corpus should give scored pairs and clusters"
        assert (clusters, pairs) == _dedupe_outputs(direct_out)
        summary = json.loads((dask_out / "summary.json").read_text())
        assert summary["counts"]["pairs_reranked"] == len(pairs)
        from twinq.shared.store import open_store

        left = open_store(f"{s3_root}-dedupe-work").list("")
        assert not [name for name in left if name.startswith("work-")], left
