"""The Beam DoFns and transforms of the index pipeline: read, clean, dedupe, reuse, shard, write.

Each is small and pure enough to test alone; `twinq.pipelines.index` wires them into a pipeline.
Between stages a row is a tuple or dict of strings and a vector is float32 bytes: Beam's
primitive coder encodes those natively, where dataclasses and numpy arrays went through pickle,
one call per row per stage (the largest fixed cost of an incremental build).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class _ApitoolsNotice(logging.Filter):
    """Drops the one record Beam's BigQuery client package logs on the root logger when it is
    imported without apitools ("apitools not found, ..."): an optional GCP dependency that twinq
    never uses, printed on every build. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and str(record.msg).startswith("apitools not found"))


if not any(isinstance(f, _ApitoolsNotice) for f in logging.getLogger().filters):
    logging.getLogger().addFilter(_ApitoolsNotice())  # before Beam's first import, below

import apache_beam as beam  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.metrics import Metrics  # noqa: E402

from twinq.shared.corpus import Rejected, iter_records  # noqa: E402
from twinq.shared.text import normalize_text, stable_shard, text_key  # noqa: E402

log = logging.getLogger(__name__)
REJECTED = "rejected"
NS = "twinq_build"
DUPLICATE_ID = "duplicate id with a different text"
"""The reject reason of a row whose id an earlier row already has, with another text."""


def _open(path: str) -> Any:
    return FileSystems.open(path, compression_type="uncompressed")


Row = tuple[str, str, str]
"""(id, clean text, metadata as a JSON object)."""
Placed = tuple[str, str, str, int, int]
"""A `Row` and where it was read: (id, text, metadata, file number, line)."""


class ReadAndClean(beam.DoFn):
    """Read one numbered corpus file; emit clean `Placed` rows, and rejects to `rejected`.

    Cleaning is NFKC plus collapsed whitespace; an empty text is a reject, never a crash.
    """

    def __init__(self, id_field: str | None, text_field: str | None) -> None:
        self._id_field, self._text_field = id_field, text_field
        self._read = Metrics.counter(NS, "rows_read")
        self._rejected = Metrics.counter(NS, "rows_rejected")

    def process(self, numbered: tuple[int, str]) -> Iterator[Any]:
        file_no, path = numbered
        for record in iter_records(path, self._id_field, self._text_field, opener=_open):
            self._read.inc()
            if isinstance(record, Rejected):
                self._rejected.inc()
                yield beam.pvalue.TaggedOutput(REJECTED, record.to_json())
                continue
            text = normalize_text(record.text)
            if not text:
                self._rejected.inc()
                reject = Rejected(path, record.line, "empty text after cleaning", record.id)
                yield beam.pvalue.TaggedOutput(REJECTED, reject.to_json())
                continue
            yield (record.id, text, json.dumps(record.metadata, ensure_ascii=False, default=str),
                   file_no, record.line)


class FirstOfEachId(beam.DoFn):
    """After a GroupByKey by id: keep the first occurrence of each id (the earliest file given,
    then the earliest line), whatever order the runner delivers them in.

    A later row with another text is a reject ("duplicate id with a different text"), so that
    one id never names two questions; a later row with the same text is dropped and counted
    (`rows_repeated`), so that `ids` never lists an id twice.
    """

    def __init__(self, paths: list[str]) -> None:
        self._paths = paths
        self._conflicts = Metrics.counter(NS, "rows_duplicate_id")
        self._repeated = Metrics.counter(NS, "rows_repeated")
        self._rejected = Metrics.counter(NS, "rows_rejected")

    def process(self, item: tuple[str, Iterable[Placed]]) -> Iterator[Any]:
        doc_id, placed = item
        first, *later = sorted(placed, key=lambda p: (p[3], p[4]))
        yield first[:3]
        for row in later:
            if row[1] == first[1]:
                self._repeated.inc()
                continue
            self._conflicts.inc()
            self._rejected.inc()
            kept = f"{self._paths[first[3]]}:{first[4]}"
            yield beam.pvalue.TaggedOutput(REJECTED, Rejected(
                self._paths[row[3]], row[4], DUPLICATE_ID,
                json.dumps({"id": doc_id, "text": row[1], "kept": kept}, ensure_ascii=False)
            ).to_json())


def merge_duplicates(item: tuple[str, Iterable[Row]]) -> dict[str, Any]:
    """One record per distinct text: the smallest id is primary, every id is kept."""
    key, rows = item
    rows = sorted(rows)
    return {"text_key": key, "id": rows[0][0], "ids": [r[0] for r in rows], "text": rows[0][1],
            "metadata": rows[0][2]}


class SplitReusable(beam.DoFn):
    """After one CoGroupByKey by text key (this corpus's rows with the previous snapshot's
    vectors): merge the duplicates, then reuse the stored vector or send the text to the model.

    Deduplication and reuse share that one shuffle: a separate GroupByKey for duplicates cost
    a whole extra pass over every row, a large share of an incremental build.
    """

    TO_EMBED = "to_embed"

    def __init__(self) -> None:
        self._reused = Metrics.counter(NS, "rows_reused")

    def process(self, item: tuple[str, dict[str, Iterable[Any]]]) -> Iterator[Any]:
        key, groups = item
        rows = list(groups["new"])
        if not rows:  # a text of the previous snapshot that this corpus no longer has
            return
        record = merge_duplicates((key, rows))
        old = next(iter(groups["old"]), None)
        if old is not None:
            self._reused.inc()
            yield {**record, "embedding": old}
        else:
            yield beam.pvalue.TaggedOutput(self.TO_EMBED, record)


def read_previous_embeddings(data_file: tuple[str, str]) -> Iterator[tuple[str, bytes]]:
    """(text_key, float32 vector bytes) pairs from one shard of the previous snapshot, given
    as (root, key): a worker reads it from the root itself, local or a store.

    Raises:
        SnapshotCorrupt: the shard cannot be read (one line; the build exits 2).
    """
    import pyarrow.parquet as pq

    from twinq.shared.errors import SnapshotCorrupt, one_line
    from twinq.shared.snapshot import embeddings_of
    from twinq.shared.store import open_store

    root, key = data_file
    data_file = f"{root}/{key}"
    try:
        with open_store(root).open(key) as fh:
            table = pq.read_table(fh, columns=["text_key", "embedding"])
        vectors = embeddings_of(table).astype("<f4", copy=False)
    except Exception as exc:  # pyarrow raises assorted types
        raise SnapshotCorrupt(f"cannot reuse vectors from {data_file}: {one_line(exc)} "
                              "(build with --reuse-from none)") from exc
    yield from zip(table.column("text_key").to_pylist(), map(bytes, vectors))


def attach_embedding(item: tuple[str, Any]) -> dict[str, Any]:
    """Back from RunInference(KeyedModelHandler): put the float32 vector bytes on the record."""
    record_json, prediction = item
    return {**json.loads(record_json), "embedding": prediction.inference.astype("<f4").tobytes()}


ENTRIES = "entries"
"""Folder of the version where each shard's manifest entry is written, for the driver."""


class WriteShard(beam.DoFn):
    """Write one shard's Parquet and FAISS files and its manifest entry straight to the root.

    Every write is keyed by the shard number, so a retried or repeated bundle (a runner may run
    a step twice) rewrites the same objects with the same content. The driver reads the entries
    from the root: no output of a Beam sink is trusted to arrive (the DaskRunner's
    `WriteToText` wrote an empty file).
    """

    def __init__(self, root: str, version: str, index_factory: str | None,
                 max_index_bytes: int) -> None:
        self._root, self._version = root, version
        self._factory, self._budget = index_factory, max_index_bytes
        self._embedded = Metrics.counter(NS, "rows_indexed")

    def process(self, item: tuple[int, Iterable[dict[str, Any]]]) -> Iterator[str]:
        shard, records = item
        entry = store_shard_records(self._root, self._version, shard, list(records),
                                    self._factory, self._budget)
        self._embedded.inc(entry["rows"])
        yield json.dumps(entry)


def store_shard_records(root: str, version: str, shard: int, records: list[dict[str, Any]],
                        index_factory: str | None, max_index_bytes: int, dim: int | None = None
                        ) -> dict[str, Any]:
    """`write_shard_records` into the version under `root`, with its entry beside it: in place
    for a local root, through a temporary folder and an upload for a store."""
    import tempfile

    from twinq.shared import snapshot as snap
    from twinq.shared.store import is_remote, open_store

    store = open_store(root)
    if is_remote(root):
        with tempfile.TemporaryDirectory(prefix="twinq-shard-") as tmp:
            entry = write_shard_records(Path(tmp), shard, records, index_factory, max_index_bytes,
                                        dim=dim)
            snap.upload_shard(root, version, Path(tmp), entry)
    else:
        entry = write_shard_records(snap.version_dir(root, version), shard, records,
                                    index_factory, max_index_bytes, dim=dim)
    store.write_bytes(f"{snap.version_key(version)}/{ENTRIES}/{entry['name']}.json",
                      json.dumps(entry).encode())
    return entry


def write_rejects(root: str, version: str):  # noqa: ANN201 - returns a Beam-friendly callable
    """Write every rejected row (JSON lines) as the version's one rejects file, in one write."""

    def write(lines: list[str]) -> int:
        from twinq.shared import snapshot as snap
        from twinq.shared.store import open_store

        order = sorted(lines, key=lambda line: (json.loads(line)["source"], json.loads(line)["line"]))
        body = "".join(f"{line}\n" for line in order)
        open_store(root).write_bytes(f"{snap.version_key(version)}/{snap.REJECTS}", body.encode())
        return len(lines)

    return write


def write_shard_records(path: Path, shard: int, records: list[dict[str, Any]],
                        index_factory: str | None, max_index_bytes: int, dim: int | None = None
                        ) -> dict[str, Any]:
    """Sort rows by id (stable row numbers across runners), pick the index type, write both files."""
    import numpy as np
    import pyarrow as pa

    from twinq.shared.index_choice import IndexChoice, choose_index_key
    from twinq.shared.snapshot import write_shard
    from twinq.shared.snapshot_schema import schema

    records.sort(key=lambda r: r["id"])
    dim = dim or len(records[0]["embedding"]) // 4
    flat = np.frombuffer(b"".join(r["embedding"] for r in records), dtype="<f4")
    columns = {name: [r[name] for r in records] for name in schema(dim).names if name != "embedding"}
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)
    table = pa.table(columns, schema=schema(dim))
    if index_factory:
        choice = IndexChoice(index_factory, "--index-factory given", "")
    else:
        choice = choose_index_key(len(records), dim, max_index_bytes)[0]
    return write_shard(path, shard, table, choice.key, choice.reason, choice.search_params)


def shard_of(num_shards: int):  # noqa: ANN201 - returns a Beam-friendly callable
    def key(record: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return stable_shard(record["id"], num_shards), record

    return key


class DropUpdated(beam.DoFn):
    """Drop the corpus rows whose id a live update replaces or deletes
    (`twinq.pipelines.build_updates`); the upserted rows join the pipeline after this."""

    def __init__(self, ids: frozenset[str]) -> None:
        self._ids = ids
        self._dropped = Metrics.counter(NS, "rows_replaced_by_updates")

    def process(self, row: Row) -> Iterator[Row]:
        if row[0] in self._ids:
            self._dropped.inc()
            return
        yield row


def key_by_text(model_name: str):  # noqa: ANN201
    def key(row: Row) -> tuple[str, Row]:
        return text_key(row[1], model_name), row

    return key
