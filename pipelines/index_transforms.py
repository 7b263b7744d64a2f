"""The Beam DoFns and transforms of the index pipeline: read, clean, dedupe, reuse, shard, write.

Each is small and pure enough to test alone; `pipelines.index` wires them into a pipeline.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from shared.corpus import CorpusRow, Rejected, iter_records
from shared.text import normalize_text, stable_shard, text_key

log = logging.getLogger(__name__)
REJECTED = "rejected"
NS = "twinq_build"


def _open(path: str) -> Any:
    return FileSystems.open(path, compression_type="uncompressed")


class ReadAndClean(beam.DoFn):
    """Read one corpus file; emit clean rows, and rejects to the `rejected` output.

    Cleaning is NFKC plus collapsed whitespace; an empty text is a reject, never a crash.
    """

    def __init__(self, id_field: str | None, text_field: str | None) -> None:
        self._id_field, self._text_field = id_field, text_field
        self._read = Metrics.counter(NS, "rows_read")
        self._rejected = Metrics.counter(NS, "rows_rejected")

    def process(self, path: str) -> Iterator[Any]:
        for record in iter_records(path, self._id_field, self._text_field, opener=_open):
            self._read.inc()
            if isinstance(record, Rejected):
                self._rejected.inc()
                yield beam.pvalue.TaggedOutput(REJECTED, record.to_json())
                continue
            text = normalize_text(record.text)
            if not text:
                self._rejected.inc()
                yield beam.pvalue.TaggedOutput(
                    REJECTED, Rejected(path, -1, "empty text after cleaning", record.id).to_json())
                continue
            yield CorpusRow(record.id, text, record.metadata)


def merge_duplicates(item: tuple[str, Iterable[CorpusRow]]) -> dict[str, Any]:
    """One record per distinct text: the smallest id is primary, every id is kept."""
    key, rows = item
    rows = sorted(rows, key=lambda r: r.id)
    return {"text_key": key, "id": rows[0].id, "ids": [r.id for r in rows], "text": rows[0].text,
            "metadata": json.dumps(rows[0].metadata, ensure_ascii=False, default=str)}


class SplitReusable(beam.DoFn):
    """After a CoGroupByKey with the previous snapshot: reuse its vector, or send to the model."""

    TO_EMBED = "to_embed"

    def __init__(self) -> None:
        self._reused = Metrics.counter(NS, "rows_reused")

    def process(self, item: tuple[str, dict[str, list[Any]]]) -> Iterator[Any]:
        _, groups = item
        for record in groups["new"]:
            if groups["old"]:
                self._reused.inc()
                yield {**record, "embedding": groups["old"][0]}
            else:
                yield beam.pvalue.TaggedOutput(self.TO_EMBED, record)


def read_previous_embeddings(data_file: str) -> Iterator[tuple[str, Any]]:
    """(text_key, float32 vector) pairs from one shard of the previous snapshot.

    Vectors travel as numpy rows, not Python lists: 384 boxed floats per row made reading,
    pickling through the join and rebuilding Arrow columns a large share of an incremental build.
    """
    import pyarrow.parquet as pq

    from shared.snapshot import embeddings_of

    table = pq.read_table(data_file, columns=["text_key", "embedding"])
    yield from zip(table.column("text_key").to_pylist(), embeddings_of(table))


def attach_embedding(item: tuple[str, Any]) -> dict[str, Any]:
    """Back from RunInference(KeyedModelHandler): put the float32 vector on the record."""
    record_json, prediction = item
    return {**json.loads(record_json), "embedding": prediction.inference}


class WriteShard(beam.DoFn):
    """Write one shard's Parquet and FAISS files; emit its manifest entry as JSON."""

    def __init__(self, version_path: str, index_factory: str | None, max_index_bytes: int) -> None:
        self._path, self._factory, self._budget = version_path, index_factory, max_index_bytes
        self._embedded = Metrics.counter(NS, "rows_indexed")

    def process(self, item: tuple[int, Iterable[dict[str, Any]]]) -> Iterator[str]:
        shard, records = item
        entry = write_shard_records(Path(self._path), shard, list(records), self._factory, self._budget)
        self._embedded.inc(entry["rows"])
        yield json.dumps(entry)


def write_shard_records(path: Path, shard: int, records: list[dict[str, Any]],
                        index_factory: str | None, max_index_bytes: int, dim: int | None = None
                        ) -> dict[str, Any]:
    """Sort rows by id (stable row numbers across runners), pick the index type, write both files."""
    import numpy as np
    import pyarrow as pa

    from shared.index_choice import IndexChoice, choose_index_key
    from shared.snapshot import write_shard
    from shared.snapshot_schema import schema

    records.sort(key=lambda r: r["id"])
    dim = dim or len(records[0]["embedding"])
    vectors = np.asarray([r["embedding"] for r in records], dtype=np.float32).reshape(-1, dim)
    columns = {name: [r[name] for r in records] for name in schema(dim).names if name != "embedding"}
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
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


def key_by_text(model_name: str):  # noqa: ANN201
    def key(row: CorpusRow) -> tuple[str, CorpusRow]:
        return text_key(row.text, model_name), row

    return key
