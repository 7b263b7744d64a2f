"""`twinq index build --clusters`: dedupe's clusters fed back as row metadata."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.pipelines.test_index import _all_rows, _corpus, _write_jsonl
from twinq.pipelines.build_clusters import load_clusters, with_cluster
from twinq.pipelines.dedupe_report import cluster_schema
from twinq.shared import snapshot as snap
from twinq.shared.cli import main as twinq
from twinq.shared.errors import BadInput


def _clusters(path: Path, clusters: list[tuple[str, str, list[str]]]) -> Path:
    """A clusters.parquet in dedupe's schema: (cluster id, canonical id, member ids)."""
    records = [{"cluster_id": c, "size": len(ids), "canonical_id": canonical,
                "canonical_text": "t", "member_ids": ids, "member_texts": ["t"] * len(ids),
                "member_scores": [None] + [0.9] * (len(ids) - 1), "min_score": 0.9, "edges": []}
               for c, canonical, ids in clusters]
    pq.write_table(pa.Table.from_pylist(records, schema=cluster_schema()), path)
    return path


def test_build_with_clusters_stores_them_as_metadata_and_reuses_every_vector(
        tmp_path: Path, tiny_bi_encoder_path: str) -> None:
    rows = _corpus(12)
    rows[4]["cluster_id"] = "the corpus's own"   # a member: overwritten
    rows[9]["canonical_id"] = "stale"            # in no cluster: removed
    rows.append({"id": "dup", "text": rows[6]["text"]})  # merged into q006's row (dup < q006)
    corpus = str(_write_jsonl(tmp_path / "c.jsonl", rows))
    clusters = _clusters(tmp_path / "clusters.parquet", [
        ("cA", "q001", ["q001", "q002", "q004"]),
        ("cB", "q006", ["q006", "q007", "gone"]),  # q006 is a merged id; "gone" is no row
    ])
    root = tmp_path / "root"
    argv = ["index", "build", "--corpus", corpus, "--root", str(root), "--model",
            tiny_bi_encoder_path, "--shards", "2", "--publish", "--canary", "5"]
    assert twinq(argv) == 0
    first = snap.current_version(root)
    assert twinq([*argv, "--clusters", str(clusters)]) == 0
    version = snap.current_version(root)
    manifest = snap.read_manifest_at(root, version)
    corpus_counts = manifest["corpus"]
    # Metadata is not part of the reuse key: every vector comes from the first build.
    assert (corpus_counts["rows_reused"], corpus_counts["rows_embedded"]) == (13 - 1, 0)
    assert corpus_counts["reused_from"] == first
    assert manifest["clusters"] == {
        "path": str(clusters), "sha256": hashlib.sha256(clusters.read_bytes()).hexdigest(),
        "clusters": 2, "members": 6, "members_matched": 5, "members_not_found": 1,
        "metadata_overwritten": 2, "rows_split": 0}
    metadata = {r["id"]: (r["ids"], json.loads(r["metadata"]))
                for r in _all_rows(snap.version_dir(root, version))}
    assert metadata["q001"][1] == {"answer": "a1", "cluster_id": "cA", "canonical_id": "q001"}
    assert metadata["q002"][1]["cluster_id"] == "cA"
    assert metadata["q004"][1] == {"answer": "a4", "cluster_id": "cA", "canonical_id": "q001"}
    assert metadata["dup"][0] == ["dup", "q006"]
    assert metadata["dup"][1] == {"cluster_id": "cB", "canonical_id": "q006"}
    assert metadata["q007"][1] == {"answer": "a7", "cluster_id": "cB", "canonical_id": "q006"}
    assert metadata["q009"][1] == {"answer": "a9"}
    assert metadata["q000"][1] == {"answer": "a0"}


@pytest.mark.parametrize("content, words", [
    (None, "not found"),
    (b"PAR1 not really", "not a Parquet file"),
    ("no-members", "missing column(s) member_ids"),
    ("two-clusters", "member 'q002' is in cluster 'cA' and 'cB'"),
    ("not-a-member", "canonical_id 'q009' is not among its member_ids"),
    ("same-id", "cluster_id 'cA' is used by two rows"),
])
def test_a_malformed_clusters_file_exits_2_and_publishes_nothing(
        tmp_path: Path, tiny_bi_encoder_path: str, capsys: pytest.CaptureFixture[str],
        content: bytes | str | None, words: str) -> None:
    path = tmp_path / "clusters.parquet"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "no-members":
        pq.write_table(pa.table({"cluster_id": ["cA"], "canonical_id": ["q001"]}), path)
    elif content is not None:
        second = {"two-clusters": ("cB", "q003", ["q003", "q002"]),
                  "not-a-member": ("cB", "q009", ["q003", "q005"]),
                  "same-id": ("cA", "q003", ["q003"])}[content]
        _clusters(path, [("cA", "q001", ["q001", "q002"]), second])
    corpus = str(_write_jsonl(tmp_path / "c.jsonl", _corpus(8)))
    root = tmp_path / "root"
    argv = ["index", "build", "--corpus", corpus, "--root", str(root), "--model",
            tiny_bi_encoder_path, "--publish", "--clusters", str(path)]
    assert twinq(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "--clusters" in err[0], err
    assert snap.current_version(root) is None and not snap.list_versions(root)


def test_with_cluster_takes_the_first_clustered_id_and_leaves_others_unparsed() -> None:
    members = {"b": ("c1", "a"), "c": ("c2", "c")}
    plain = {"id": "x", "ids": ["x"], "metadata": '{"note": "cluster_id is a word here"}'}
    assert with_cluster(plain, members) == (plain, {})
    split = {"id": "a", "ids": ["a", "b", "c"], "metadata": "{}", "embedding": b"v"}
    record, counts = with_cluster(split, members)
    assert json.loads(record["metadata"]) == {"cluster_id": "c1", "canonical_id": "a"}
    assert record["embedding"] == b"v" and split["metadata"] == "{}"
    assert counts == {"cluster_members_matched": 2, "cluster_rows_split": 1}


def test_load_clusters_reads_dedupe_output(tmp_path: Path) -> None:
    path = _clusters(tmp_path / "c.parquet", [("cA", "q1", ["q1", "q2"]), ("cB", "q3", ["q3"])])
    loaded = load_clusters(str(path))
    assert loaded.clusters == 2 and loaded.members == {
        "q1": ("cA", "q1"), "q2": ("cA", "q1"), "q3": ("cB", "q3")}
    with pytest.raises(BadInput, match="twice"):
        load_clusters(str(_clusters(tmp_path / "d.parquet", [("cA", "q1", ["q1", "q1"])])))
