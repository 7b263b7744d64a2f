"""The Beam DoFns and transforms of the index pipeline: read, clean, dedupe, reuse, shard, write.

Each is small and pure enough to test alone; `twinq.pipelines.index` wires them into a pipeline.
Between stages a row is a tuple or dict of strings and a vector is float32 bytes: Beam's
primitive coder encodes those natively, where dataclasses and numpy arrays went through pickle,
one call per row per stage (the largest fixed cost of an incremental build).

The graph uses only what every runner here executes correctly, Beam's DaskRunner included
(docs/dask_runner_probe.md): a DoFn with several kinds of output yields `(tag, value)` pairs that
`split` separates (the DaskRunner hands every output of a `with_outputs` ParDo to every consumer);
nothing is emitted from `finish_bundle` (the DaskRunner drops it: BatchElements, so RunInference,
lost each bundle's last batch), so embedding batches come from a GroupByKey (`EmbedBatches`); no
side inputs; counts travel as data (`COUNT` pairs, summed into one counts file), not as Beam
metrics (the DaskRunner returns none); and every write feeds one last step, `write_counts`
(the DaskRunner computes only the last transform and what it depends on).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


import twinq.pipelines.beam_options  # noqa: F401,E402 - first: it quiets Beam's import

import apache_beam as beam  # noqa: E402

from twinq.shared.corpus import Rejected, iter_records  # noqa: E402
from twinq.shared.text import normalize_text, stable_shard, text_key  # noqa: E402

log = logging.getLogger(__name__)
ROWS = "rows"
REJECTED = "rejected"
COUNT = "count"
"""Tags of a DoFn's `(tag, value)` outputs; a `COUNT` value is a (counter name, number) pair."""
REUSED = "reused"
TO_EMBED = "to_embed"
DUPLICATE_ID = "duplicate id with a different text"
"""The reject reason of a row whose id an earlier row already has, with another text."""


def _open(path: str) -> Any:
    """A corpus file: local, or in a store through the same layer as snapshot roots (one set
    of credentials for both; Beam's own S3 file system would want its own options)."""
    from twinq.shared.store import open_url

    return open_url(path) if "://" in path else open(path, "rb")


Row = tuple[str, str, str]
"""(id, clean text, metadata as a JSON object)."""
Placed = tuple[str, str, str, int, int]
"""A `Row` and where it was read: (id, text, metadata, file number, line)."""


def split(tagged: Any, label: str, tags: list[str]) -> dict[str, Any]:
    """The values of each tag of a PCollection of `(tag, value)` pairs, as one PCollection per
    tag (what `with_outputs` gives, on every runner)."""

    def only(tag: str):  # noqa: ANN202
        return lambda pair: [pair[1]] if pair[0] == tag else []

    return {tag: tagged | f"{label}.{tag}" >> beam.FlatMap(only(tag)) for tag in tags}


class ReadAndClean(beam.DoFn):
    """Read one numbered corpus file; emit `(ROWS, Placed)` for clean rows, `(REJECTED, json)`
    for rejects, and, once the file is read, `(COUNT, (name, n))` for "files_read", "rows_read"
    and "rows_rejected".

    Cleaning is NFKC plus collapsed whitespace; an empty text is a reject, never a crash.
    """

    def __init__(self, id_field: str | None, text_field: str | None) -> None:
        self._id_field, self._text_field = id_field, text_field

    def process(self, numbered: tuple[int, str]) -> Iterator[tuple[str, Any]]:
        file_no, path = numbered
        read = rejected = 0
        for record in iter_records(path, self._id_field, self._text_field, opener=_open):
            read += 1
            if isinstance(record, Rejected):
                rejected += 1
                yield REJECTED, record.to_json()
                continue
            text = normalize_text(record.text)
            if not text:
                rejected += 1
                reject = Rejected(path, record.line, "empty text after cleaning", record.id)
                yield REJECTED, reject.to_json()
                continue
            yield ROWS, (record.id, text,
                         json.dumps(record.metadata, ensure_ascii=False, default=str),
                         file_no, record.line)
        yield COUNT, ("files_read", 1)
        yield COUNT, ("rows_read", read)
        yield COUNT, ("rows_rejected", rejected)


class FirstOfEachId(beam.DoFn):
    """After a GroupByKey by id: keep the first occurrence of each id (the earliest file given,
    then the earliest line), whatever order the runner delivers them in.

    A later row with another text is a reject ("duplicate id with a different text"), so that
    one id never names two questions; a later row with the same text is dropped and counted
    (`rows_repeated`), so that `ids` never lists an id twice.

    Outputs are `(ROWS, Row)`, `(REJECTED, json)`, and `COUNT` pairs for an id seen more than
    once (none for the usual id seen once, so that counting costs nothing per row).
    """

    def __init__(self, paths: list[str]) -> None:
        self._paths = paths

    def process(self, item: tuple[str, Iterable[Placed]]) -> Iterator[tuple[str, Any]]:
        doc_id, placed = item
        first, *later = sorted(placed, key=lambda p: (p[3], p[4]))
        yield ROWS, first[:3]
        repeated = conflicts = 0
        for row in later:
            if row[1] == first[1]:
                repeated += 1
                continue
            conflicts += 1
            kept = f"{self._paths[first[3]]}:{first[4]}"
            yield REJECTED, Rejected(
                self._paths[row[3]], row[4], DUPLICATE_ID,
                json.dumps({"id": doc_id, "text": row[1], "kept": kept}, ensure_ascii=False)
            ).to_json()
        if repeated:
            yield COUNT, ("rows_repeated", repeated)
        if conflicts:
            yield COUNT, ("rows_duplicate_id", conflicts)
            yield COUNT, ("rows_rejected", conflicts)


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

    Outputs are `(REUSED, record with its old vector)` (marked `"reused": True`, which
    `WriteShard` counts) and `(TO_EMBED, record)`.
    """

    def process(self, item: tuple[str, dict[str, Iterable[Any]]]) -> Iterator[tuple[str, Any]]:
        key, groups = item
        rows = list(groups["new"])
        if not rows:  # a text of the previous snapshot that this corpus no longer has
            return
        record = merge_duplicates((key, rows))
        old = next(iter(groups["old"]), None)
        if old is not None:
            yield REUSED, {**record, "embedding": old, "reused": True}
        else:
            yield TO_EMBED, record


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


EMBED_GROUPS = (8, 64)
"""Fewest and most groups the texts to embed are hashed into (`batch_key`): the units of
parallel embedding. Each group is embedded in batches of the build's batch size, cut after a
sort by length, so that a batch pads little."""


def embed_groups(estimated_rows: int | None, batch_size: int) -> int:
    """Groups for about `estimated_rows` texts: one per batch, within `EMBED_GROUPS` (the most
    when the size is unknown). Too many groups for the texts would make small batches."""
    fewest, most = EMBED_GROUPS
    if estimated_rows is None:
        return most
    return max(fewest, min(most, -(-estimated_rows // max(batch_size, 1))))


_LOADED: dict[str, tuple[tuple[Any, ...], Any]] = {}
"""What this process has loaded, by kind ("encoder", "snapshot", "cross-encoder"): the key it
was loaded from and the object. A runner may set a DoFn up once per bundle or partition (the
DaskRunner does, per partition); each thing loads once per process, as RunInference shares its
model, and one of each kind is kept at a time."""
_LOADED_LOCK = threading.Lock()


def once_per_process(kind: str, key: tuple[Any, ...], load: Any) -> Any:
    """This process's `kind` loaded from `key`: the one already loaded, else `load()` (which
    replaces an earlier one of that kind)."""
    with _LOADED_LOCK:
        held = _LOADED.get(kind)
        if held is None or held[0] != key:
            _LOADED[kind] = (key, load())
        return _LOADED[kind][1]


def batch_key(groups: int):  # noqa: ANN201 - returns a Beam-friendly callable
    """Key a record to embed by a stable hash of its text key, into one of `groups` groups."""

    def key(record: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return stable_shard(record["text_key"], groups), record

    return key


class EmbedBatches(beam.DoFn):
    """After a GroupByKey by `batch_key`: embed each group's texts in batches of `batch_size`
    and emit each record with its float32 vector bytes.

    It replaces RunInference, whose BatchElements emits each bundle's last batch from
    `finish_bundle`, which the DaskRunner drops. Batches are cut from the group sorted by
    length (and `encode` sorts each again), so that they pad little (see `embed_handler`).
    """

    def __init__(self, handler: Any, batch_size: int) -> None:
        self._handler, self._batch_size = handler, batch_size
        self._model: Any = None

    def setup(self) -> None:
        self._model = once_per_process("encoder", self._handler.model_key(),
                                       self._handler.load_model)

    def process(self, item: tuple[int, Iterable[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        records = sorted(item[1], key=lambda r: (len(r["text"]), r["text_key"]))
        for start in range(0, len(records), self._batch_size):
            batch = records[start:start + self._batch_size]
            predictions = self._handler.run_inference([r["text"] for r in batch], self._model)
            for record, prediction in zip(batch, predictions):
                yield {**record,
                       "embedding": prediction.inference.astype("<f4", copy=False).tobytes()}


ENTRIES = "entries"
"""Folder of the version where each shard's manifest entry is written, for the driver."""


class WriteShard(beam.DoFn):
    """Write one shard's Parquet and FAISS files and its manifest entry straight to the root.

    Every write is keyed by the shard number, so a retried or repeated bundle (a runner may run
    a step twice) rewrites the same objects with the same content. The driver reads the entries
    from the root: no output of a Beam sink is trusted to arrive (the DaskRunner's
    `WriteToText` wrote an empty file). Emits `COUNT` pairs: the shard, its rows (distinct
    texts), the ids they carry and how many rows reused an old vector.
    """

    def __init__(self, root: str, version: str, index_factory: str | None,
                 max_index_bytes: int) -> None:
        self._root, self._version = root, version
        self._factory, self._budget = index_factory, max_index_bytes

    def process(self, item: tuple[int, Iterable[dict[str, Any]]]
                ) -> Iterator[tuple[str, int]]:
        shard, records = item
        records = list(records)
        entry = store_shard_records(self._root, self._version, shard, records,
                                    self._factory, self._budget)
        yield "shards_written", 1
        yield "rows_indexed", entry["rows"]
        yield "ids_indexed", sum(len(r["ids"]) for r in records)
        yield "rows_reused", sum(1 for r in records if r.get("reused"))


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


ONE = 0
"""The one key of a GroupByKey that gathers a whole PCollection into one element (no side
inputs and no CombineGlobally default, which the DaskRunner mishandles)."""


def write_rejects(root: str, version: str):  # noqa: ANN201 - returns a Beam-friendly callable
    """After a GroupByKey on `ONE`: write every rejected row (JSON lines) as the version's one
    rejects file, in one write, and count them. The group holds a `None` besides the rejects, so
    that a build without rejects still writes its (empty) file."""

    def write(item: tuple[int, Iterable[str | None]]) -> Iterator[tuple[str, int]]:
        from twinq.shared import snapshot as snap
        from twinq.shared.store import open_store

        lines = [line for line in item[1] if line is not None]
        order = sorted(lines, key=lambda line: (json.loads(line)["source"], json.loads(line)["line"]))
        body = "".join(f"{line}\n" for line in order)
        open_store(root).write_bytes(f"{snap.version_key(version)}/{snap.REJECTS}", body.encode())
        yield "rejects_written", len(lines)

    return write


COUNTS = "counts.json"
"""The build's counts, written under `ENTRIES` by the pipeline's last step."""


def write_counts(root: str, key: str):  # noqa: ANN201 - returns a Beam-friendly callable
    """After a GroupByKey on `ONE`: sum the (name, number) pairs and write them as JSON to `key`
    of the store at `root` (the build: the version's `ENTRIES/COUNTS`; dedupe: its work folder).

    The pipeline's last step, fed by every write (shards, rejects, pair files): a runner that
    skipped a branch leaves a count short or the file missing, which the driver checks."""

    def write(item: tuple[int, Iterable[tuple[str, int]]]) -> int:
        from twinq.shared.store import open_store

        counts: dict[str, int] = {}
        for name, number in item[1]:
            counts[name] = counts.get(name, 0) + int(number)
        open_store(root).write_bytes(key, json.dumps(counts, sort_keys=True).encode())
        return len(counts)

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
    (`twinq.pipelines.build_updates`); the upserted rows join the pipeline after this.
    Outputs are `(ROWS, row)` and `(COUNT, ("rows_replaced_by_updates", 1))`."""

    def __init__(self, ids: frozenset[str]) -> None:
        self._ids = ids

    def process(self, row: Row) -> Iterator[tuple[str, Any]]:
        if row[0] in self._ids:
            yield COUNT, ("rows_replaced_by_updates", 1)
            return
        yield ROWS, row


def key_by_text(model_name: str):  # noqa: ANN201
    def key(row: Row) -> tuple[str, Row]:
        return text_key(row[1], model_name), row

    return key


class ClusterMetadata(beam.DoFn):
    """With `--clusters`: set each merged row's `cluster_id` and `canonical_id` metadata from
    `twinq dedupe`'s clusters (`build_clusters.with_cluster`). The member map comes with the
    DoFn (it is small), not as a side input. Outputs are `(ROWS, record)` and, for rows that
    are clustered or lose a corpus column of either name, `COUNT` pairs."""

    def __init__(self, members: dict[str, tuple[str, str]]) -> None:
        self._members = members

    def process(self, record: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        from twinq.pipelines.build_clusters import with_cluster

        record, counts = with_cluster(record, self._members)
        yield ROWS, record
        for name, number in counts.items():
            yield COUNT, (name, number)
