"""Feed `twinq dedupe`'s clusters back into a build: `twinq index build --clusters FILE`.

The driver reads clusters.parquet once (`load_clusters`; it is small: one row per cluster, one
id per clustered question) and checks it before any work, so that a malformed file stops the
build with one line and exit 2 and nothing written. The map member id -> (cluster id,
canonical id) travels to the workers inside the DoFn that sets the metadata
(`index_transforms.ClusterMetadata`), as `DropUpdated` carries its ids: no side input, which
the DaskRunner mishandles.

With `--clusters`, the metadata keys `cluster_id` and `canonical_id` belong to the clusters file
on every row: a clustered row gets both (a corpus column of either name is overwritten), and an
unclustered row loses a corpus column of either name (else the worker would collapse it with
clusters it is not part of). Both cases are counted (`metadata_overwritten`) and logged.

Vectors are still reused: the reuse key is the text (`text_key`), never the metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinq.shared.collapse import CANONICAL_KEY, CLUSTER_KEY
from twinq.shared.errors import BadInput, one_line

COLUMNS = ("cluster_id", "canonical_id", "member_ids")
"""The columns of clusters.parquet that a build reads (`dedupe_report.cluster_schema`)."""
MATCHED = "cluster_members_matched"
OVERWRITTEN = "cluster_metadata_overwritten"
SPLIT = "cluster_rows_split"
"""Count names of `ClusterMetadata` (summed with the build's other counts): ids of a
cluster found in the corpus; rows whose own `cluster_id`/`canonical_id` were replaced or
removed; rows whose merged ids belong to more than one cluster (the first id's cluster wins)."""


@dataclass(frozen=True)
class Clusters:
    """A checked clusters file."""

    source: str
    sha256: str
    clusters: int
    members: dict[str, tuple[str, str]]
    """member id -> (cluster id, canonical id)."""

    def manifest_entry(self, counts: dict[str, int]) -> dict[str, Any]:
        """The manifest's `clusters` object, with the build's counts of `ClusterMetadata`."""
        matched = counts.get(MATCHED, 0)
        return {"path": self.source, "sha256": self.sha256, "clusters": self.clusters,
                "members": len(self.members), "members_matched": matched,
                "members_not_found": len(self.members) - matched,
                "metadata_overwritten": counts.get(OVERWRITTEN, 0),
                "rows_split": counts.get(SPLIT, 0)}


def _read(source: str) -> bytes:
    try:
        if "://" in source:
            from twinq.shared.store import open_url

            with open_url(source) as fh:
                return fh.read()
        return Path(source).read_bytes()
    except FileNotFoundError as exc:
        raise BadInput(f"--clusters {source}: not found") from exc
    except Exception as exc:  # a store's errors come in many types
        raise BadInput(f"--clusters {source}: cannot read: {one_line(exc)}") from exc


def load_clusters(source: str) -> Clusters:
    """Read and check a clusters file (local path or store URL).

    Raises:
        BadInput: the file is missing or unreadable, not Parquet, lacks a column of `COLUMNS`,
            or is inconsistent: a null or empty id, a cluster id used twice, a canonical id
            outside its members, or a member in two clusters (or twice in one).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = _read(source)
    bad = f"--clusters {source}:"
    try:
        names = pq.read_schema(io.BytesIO(data)).names
    except Exception as exc:  # pyarrow raises assorted types
        raise BadInput(f"{bad} not a Parquet file ({one_line(exc, 120)})") from exc
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise BadInput(f"{bad} missing column(s) {', '.join(missing)} (a clusters.parquet of "
                       "`twinq dedupe` has cluster_id, canonical_id and member_ids)")
    try:
        table = pq.read_table(io.BytesIO(data), columns=list(COLUMNS))
        rows = table.to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise BadInput(f"{bad} cannot read: {one_line(exc, 120)}") from exc
    members: dict[str, tuple[str, str]] = {}
    seen: set[str] = set()
    for n, row in enumerate(rows):
        cluster, canonical, ids = row["cluster_id"], row["canonical_id"], row["member_ids"]
        where = f"{bad} row {n}"
        if not (isinstance(cluster, str) and cluster and isinstance(canonical, str) and canonical):
            raise BadInput(f"{where}: cluster_id and canonical_id must be non-empty strings")
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise BadInput(f"{where}: member_ids must be a list of non-empty strings")
        if cluster in seen:
            raise BadInput(f"{where}: cluster_id {cluster!r:.60} is used by two rows")
        seen.add(cluster)
        if canonical not in ids:
            raise BadInput(f"{where}: canonical_id {canonical!r:.60} is not among its member_ids")
        for member in ids:
            if member in members:
                other = members[member][0]
                raise BadInput(f"{where}: member {member!r:.60} is in cluster {other!r:.40}"
                               + (" twice" if other == cluster else f" and {cluster!r:.40}"))
            members[member] = (cluster, canonical)
    return Clusters(source, hashlib.sha256(data).hexdigest(), len(rows), members)


def with_cluster(record: dict[str, Any], members: dict[str, tuple[str, str]]
                 ) -> tuple[dict[str, Any], dict[str, int]]:
    """The record (a merged row: `id`, `ids`, `metadata` as JSON text) with its cluster's
    `cluster_id` and `canonical_id` in the metadata, and the counts to add.

    The cluster is the first of the row's ids (the primary id first) that is a member. A
    record neither clustered nor carrying either key comes back as it is, unparsed.
    """
    ids = record.get("ids") or [record["id"]]
    found = [members[i] for i in ids if i in members]
    metadata_text = record["metadata"] or "{}"
    counts: dict[str, int] = {}
    if found:
        counts[MATCHED] = len(found)
        if len({cluster for cluster, _ in found}) > 1:
            counts[SPLIT] = 1
    elif f'"{CLUSTER_KEY}"' not in metadata_text and f'"{CANONICAL_KEY}"' not in metadata_text:
        return record, counts
    metadata = json.loads(metadata_text)
    if not isinstance(metadata, dict):  # corpus metadata is always an object; be safe
        metadata = {}
    if CLUSTER_KEY in metadata or CANONICAL_KEY in metadata:
        counts[OVERWRITTEN] = 1
    metadata.pop(CLUSTER_KEY, None)
    metadata.pop(CANONICAL_KEY, None)
    if found:
        metadata[CLUSTER_KEY], metadata[CANONICAL_KEY] = found[0]
    elif not counts:  # a key's name appeared only inside a value
        return record, counts
    return {**record, "metadata": json.dumps(metadata, ensure_ascii=False)}, counts
