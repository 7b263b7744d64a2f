"""The index pipeline: corpus files in, a validated (and optionally published) snapshot out.

    read -> clean -> group by text with the old vectors (dedupe + reuse in one shuffle)
         -> reuse old vectors | embed new texts (grouped in batches) -> shard -> write
         -> write the counts (the last step, fed by every write)
    then, outside Beam: assemble the manifest, check the counts -> validate (counts, loads,
    canary) -> publish

A build that fails at any point leaves CURRENT untouched: the manifest is written only after
validation passes, and publishing is a compare-and-swap of CURRENT.

The root may be a local folder or a store URL (`s3://...`): each Beam worker writes its shards
and their manifest entries straight to the root (`WriteShard`), so nothing assumes that the
driver and the workers share a disk; the driver reads the entries back from the root.

The graph runs on every runner here, Beam's DaskRunner included: it avoids what that runner
gets wrong (docs/dask_runner_probe.md; see `index_transforms`), and its counts are data, not
Beam metrics, checked end to end (`_check_counts`).

About 450 lines, past the style guide's ~350: the Beam graph is in `index_transforms.py`; what
remains is the one build procedure, its failure handling and its count checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinq.pipelines.beam_options import pipeline_options, runner_name, runner_path
from twinq.pipelines.build_clusters import Clusters, load_clusters
from twinq.pipelines.build_updates import FoldedUpdates, read_updates, trim_updates
from twinq.shared import snapshot as snap
from twinq.shared.config import Settings
from twinq.shared.constants import SNAPSHOT_FORMAT_VERSION
from twinq.shared.corpus import expand_paths, read_columns, resolve_fields
from twinq.shared.errors import BadInput, SnapshotCorrupt, SnapshotInvalid, SnapshotNotFound
from twinq.shared.index_choice import parse_bytes
from twinq.shared.models import resolve_backend, resolve_model
from twinq.shared.onnx_backend import RECIPE_VERSION, recipe_fields, stale_int8_recipe
from twinq.shared.snapshot_sync import download_files
from twinq.shared.store import is_remote, open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build needs; the CLI fills it from flags."""

    corpus: list[str]
    root: str | Path
    """A local folder or a store URL (`s3://bucket/prefix`)."""
    shards: int = 4
    model: str | None = None
    id_field: str | None = None
    text_field: str | None = None
    publish: bool = False
    memory_budget: str = "4G"
    """Memory budget per shard index (strict); drives the index type."""
    index_factory: str | None = None
    reuse_from: str | None = "auto"
    """A snapshot root whose published vectors may be reused; "auto" = this root; None = off."""
    threads: int | None = None
    backend: str = "auto"
    """Encoder backend; "auto" is resolved once, in the driver (`resolve_backend`: onnx int8
    where the int8 guard passes, else onnx fp32, else torch), and the resolved one is what
    every worker embeds with, what the manifest records (with the guard's numbers) and what
    reused vectors must have been embedded with."""
    batch_size: int = 1024
    """Texts per inference batch (see `twinq.pipelines.embed_handler.BATCH_SIZE`)."""
    canary: int = 200
    beam_args: list[str] = field(default_factory=list)
    updates: Settings | None = None
    """Fold the live update stream of these settings' Redis in (`build_updates`); None: off."""
    trim_updates: bool = False
    """After publishing, trim the update stream below the oldest watermark still served."""
    clusters: str | None = None
    """`twinq dedupe`'s clusters.parquet (a path or store URL): each clustered row gets its
    `cluster_id` and `canonical_id` as metadata (`build_clusters`); None: off."""


@dataclass
class BuildResult:
    version: str
    path: Path | str
    """Where the version lives: its local folder, or its URL in a store."""
    manifest: dict[str, Any]
    published: bool


@contextlib.contextmanager
def timed(stages: dict[str, float], name: str) -> Iterator[None]:
    """Record a phase's wall time in `stages` and log its start and end."""
    log.info("%s ...", name)
    start = time.perf_counter()
    outcome = "failed after"
    try:
        yield
        outcome = "done in"
    finally:
        stages[name] = round(time.perf_counter() - start, 3)
        log.info("%s %s %.1fs", name, outcome, stages[name])


def _check_inputs(opts: BuildOptions) -> list[str]:
    if opts.shards < 1:
        raise BadInput("--shards must be at least 1")
    parse_bytes(opts.memory_budget)
    runner_path(runner_name(opts.beam_args))  # an unknown runner: refused before any work
    open_store(opts.root).check(create=True)  # a missing bucket or bad credentials: before any work
    paths = expand_paths(opts.corpus)
    for path in paths:
        if "://" not in path:
            resolve_fields(read_columns(path), opts.id_field, opts.text_field, path)
    return paths


def _previous_data_files(opts: BuildOptions, model_name: str
                         ) -> tuple[str | None, list[tuple[str, str]]]:
    """Shard Parquet files of the snapshot to reuse vectors from, if its model is ours.

    A corrupt published snapshot (CURRENT or its manifest) under the build's own root only
    turns reuse off, so that a fresh build can replace it; one named by --reuse-from is an error.
    """
    if opts.reuse_from is None:
        return None, []
    root = opts.root if opts.reuse_from == "auto" else opts.reuse_from
    try:
        version = snap.current_version(root)
        manifest = snap.read_manifest_at(root, version) if version else None
    except (SnapshotInvalid, SnapshotNotFound) as exc:
        if opts.reuse_from != "auto":
            raise SnapshotCorrupt(f"--reuse-from {root}: {exc}") from exc
        log.warning("not reusing vectors: the published snapshot is unusable (%s)", exc)
        return None, []
    if version is None or manifest is None:
        if opts.reuse_from != "auto":
            raise BadInput(f"--reuse-from {root}: no published snapshot there")
        return None, []
    if manifest["model"]["name"] != model_name:
        log.info("not reusing %s: built with %s, not %s", version, manifest["model"]["name"], model_name)
        return None, []
    backend = manifest["model"].get("backend", "torch")
    if backend != opts.backend:
        log.info("not reusing %s: embedded with the %s backend, not %s", version, backend, opts.backend)
        return None, []
    old_recipe = stale_int8_recipe(manifest["model"])
    if old_recipe is not None:
        log.info("not reusing %s: embedded with int8 recipe %d, not %d", version, old_recipe,
                 RECIPE_VERSION)
        return None, []
    prefix = snap.version_key(version)
    return version, [(str(root), f"{prefix}/{e['data_file']}") for e in manifest["shards"] if e["rows"]]


def _estimate_rows(paths: list[str]) -> int | None:
    """Line count of local text files: a cheap upper bound for progress ETAs."""
    total = 0
    for path in paths:
        if "://" in path or path.endswith((".parquet", ".pq")):
            return None
        with open(path, "rb") as fh:
            total += sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))
    return total


def run_beam(opts: BuildOptions, paths: list[str], version: str, model_name: str,
             previous_files: list[tuple[str, str]], folded: FoldedUpdates | None = None,
             clusters: Clusters | None = None) -> None:
    """Build and run the Beam pipeline: shards, rejects and counts land under the version.

    The graph keeps to what every runner here runs correctly, the DaskRunner included (see
    `index_transforms`): its counts are data, written by the last step (`write_counts`), read
    and checked by `_check_counts`.

    Raises:
        BadInput: a corpus file turned out unreadable while the pipeline read it (a Parquet
            file whose footer is intact but a data page is not).
    """
    from twinq.pipelines import index_transforms as T  # first: it quiets Beam's import

    import apache_beam as beam

    from twinq.pipelines.embed_handler import EmbedHandler

    estimated_rows = _estimate_rows(paths)
    handler = EmbedHandler(opts.model, threads=opts.threads, backend=opts.backend,
                           progress_total=estimated_rows)
    budget = parse_bytes(opts.memory_budget)
    pipeline = beam.Pipeline(options=pipeline_options(opts.beam_args))
    read = T.split(pipeline
                   | "CorpusFiles" >> beam.Create(list(enumerate(paths)))
                   | "ReadAndClean" >> beam.ParDo(T.ReadAndClean(opts.id_field, opts.text_field)),
                   "Read", [T.ROWS, T.REJECTED, T.COUNT])
    unique = T.split(read[T.ROWS]
                     | "KeyById" >> beam.Map(lambda placed: (placed[0], placed))
                     | "GroupById" >> beam.GroupByKey()
                     | "FirstOfEachId" >> beam.ParDo(T.FirstOfEachId(paths)),
                     "Unique", [T.ROWS, T.REJECTED, T.COUNT])
    rows, counted = unique[T.ROWS], [read[T.COUNT], unique[T.COUNT]]
    upserts: list[tuple[str, str, str]] = []
    if folded is not None and folded.watermark is not None:
        upserts = [(i, text, meta) for i, (text, meta) in sorted(folded.upserts.items())]
        kept = T.split(rows | "DropUpdated" >> beam.ParDo(T.DropUpdated(folded.touched)),
                       "Kept", [T.ROWS, T.COUNT])
        rows = ((kept[T.ROWS], pipeline | "Upserts" >> beam.Create(upserts))
                | "WithUpserts" >> beam.Flatten())
        counted.append(kept[T.COUNT])
    keyed = rows | "KeyByText" >> beam.Map(T.key_by_text(model_name))
    old = (pipeline
           | "PreviousShards" >> beam.Create(previous_files)
           | "ReadPrevious" >> beam.FlatMap(T.read_previous_embeddings))
    split = T.split({"new": keyed, "old": old}
                    | "GroupByText" >> beam.CoGroupByKey()
                    | "SplitReusable" >> beam.ParDo(T.SplitReusable()),
                    "Split", [T.REUSED, T.TO_EMBED])
    embedded = (split[T.TO_EMBED]
                | "KeyByBatch" >> beam.Map(T.batch_key(T.embed_groups(estimated_rows,
                                                                      opts.batch_size)))
                | "GroupBatches" >> beam.GroupByKey()
                | "Embed" >> beam.ParDo(T.EmbedBatches(handler, opts.batch_size)))
    all_rows = (split[T.REUSED], embedded) | "AllRows" >> beam.Flatten()
    if clusters is not None:  # after the merge, so that any of a row's ids finds its cluster
        clustered = T.split(all_rows | "ClusterMetadata" >> beam.ParDo(
                                T.ClusterMetadata(clusters.members)),
                            "Clustered", [T.ROWS, T.COUNT])
        all_rows = clustered[T.ROWS]
        counted.append(clustered[T.COUNT])
    shard_counts = (all_rows
                    | "KeyByShard" >> beam.Map(T.shard_of(opts.shards))
                    | "GroupShards" >> beam.GroupByKey()
                    | "WriteShards" >> beam.ParDo(T.WriteShard(str(opts.root), version,
                                                               opts.index_factory, budget)))
    reject_counts = ((read[T.REJECTED], unique[T.REJECTED],
                      pipeline | "NoRejects" >> beam.Create([None]))
                     | "AllRejects" >> beam.Flatten()
                     | "KeyRejectsAsOne" >> beam.Map(lambda line: (T.ONE, line))
                     | "OneRejectsList" >> beam.GroupByKey()
                     | "WriteRejects" >> beam.FlatMap(T.write_rejects(str(opts.root), version)))
    given = [("corpus_files", len(paths)), ("rows_upserted", len(upserts))]
    _ = ((*counted, shard_counts, reject_counts, pipeline | "Given" >> beam.Create(given))
         | "AllCounts" >> beam.Flatten()
         | "KeyCountsAsOne" >> beam.Map(lambda pair: (T.ONE, pair))
         | "OneCountsList" >> beam.GroupByKey()
         | "WriteCounts" >> beam.Map(T.write_counts(   # last: see above
             str(opts.root), f"{snap.version_key(version)}/{T.ENTRIES}/{T.COUNTS}")))
    with _quiet_bad_input_logs():
        try:
            result = pipeline.run()
            result.wait_until_finish()
        except Exception as exc:
            bad = _bad_input_in(exc)
            if bad is None:
                raise
            raise BadInput(str(bad)) from exc


def _bad_input_in(exc: BaseException) -> BadInput | None:
    """The first `BadInput` a DoFn raised, as it raised it: Beam re-raises it with the step name
    appended (and may wrap it), so look through the chain for the innermost one."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BadInput):
            found = exc
        exc = exc.__cause__ or exc.__context__
    return found


class _BadInputRecords(logging.Filter):
    """Drops Beam's ERROR record (with its traceback) for a DoFn that raised `BadInput`: the
    build turns it into one line and exit 2, as for any bad input found before Beam starts."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and _bad_input_in(error) is not None)


@contextlib.contextmanager
def _quiet_bad_input_logs() -> Iterator[None]:
    beam_log = logging.getLogger("apache_beam.runners.common")
    quiet = _BadInputRecords()
    beam_log.addFilter(quiet)
    try:
        yield
    finally:
        beam_log.removeFilter(quiet)


def _collect_entries(root: str | Path, version: str, shards: int
                     ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Gather the shard entries and the counts the workers wrote (checked by `_check_counts`),
    and write empty shards for hash buckets left empty."""
    from twinq.pipelines.index_transforms import COUNTS, ENTRIES, store_shard_records

    store = open_store(root)
    prefix = f"{snap.version_key(version)}/{ENTRIES}"
    entries: dict[int, dict[str, Any]] = {}
    counts: dict[str, int] | None = None
    for name in store.list(prefix):
        body = json.loads(store.read_bytes(f"{prefix}/{name}") or b"null")
        if name == COUNTS:
            counts = body
        else:
            entries[int(body["name"].split("-")[1])] = body
    store.remove_tree(prefix)
    if counts is None:
        raise SnapshotInvalid("the pipeline finished without writing its counts (its last step): "
                              "the runner did not run the whole graph")
    _check_counts(counts, entries)
    if not entries:
        rejects = store.read_bytes(f"{snap.version_key(version)}/{snap.REJECTS}") or b""
        raise BadInput(f"empty corpus: no valid rows were found ({len(rejects.splitlines())} "
                       "rejected)")
    dim = _dim(root, version, list(entries.values()))
    for i in range(shards):
        if i not in entries:
            entries[i] = store_shard_records(str(root), version, i, [], "Flat", 0, dim=dim)
    return [entries[i] for i in range(shards)], counts


def _check_counts(counts: dict[str, int], entries: dict[int, dict[str, Any]]) -> None:
    """Every row read is accounted for at the end: rejected, a repeat, replaced or deleted by a
    live update, or an id in a shard (where the upserted ids are too); every shard and reject
    the steps counted was written.

    Raises:
        SnapshotInvalid: a count does not add up (a runner lost or repeated work).
    """
    c = {name: counts.get(name, 0) for name in (
        "corpus_files", "files_read", "rows_read", "rows_rejected", "rows_repeated",
        "rows_replaced_by_updates", "rows_upserted", "ids_indexed", "rows_indexed",
        "shards_written", "rejects_written")}
    problems = []
    if c["files_read"] != c["corpus_files"]:
        problems.append(f"{c['corpus_files']} corpus files, {c['files_read']} read")
    accounted = (c["rows_rejected"] + c["rows_repeated"] + c["rows_replaced_by_updates"]
                 + c["ids_indexed"] - c["rows_upserted"])
    if c["rows_read"] != accounted:
        problems.append(f"{c['rows_read']} rows read, but {c['rows_rejected']} rejected + "
                        f"{c['rows_repeated']} repeated + {c['rows_replaced_by_updates']} "
                        f"replaced by updates + {c['ids_indexed']} ids in shards - "
                        f"{c['rows_upserted']} upserted = {accounted}")
    if c["rejects_written"] != c["rows_rejected"]:
        problems.append(f"{c['rows_rejected']} rows rejected, {c['rejects_written']} in "
                        f"{snap.REJECTS}")
    if c["shards_written"] != len(entries):
        problems.append(f"{c['shards_written']} shards written, {len(entries)} entries found")
    if c["rows_indexed"] != sum(e["rows"] for e in entries.values()):
        problems.append(f"{c['rows_indexed']} rows written, "
                        f"{sum(e['rows'] for e in entries.values())} in the shard entries")
    if problems:
        raise SnapshotInvalid("the build's counts do not add up: " + "; ".join(problems))


def _fingerprint(root: str | Path, version: str, entries: list[dict[str, Any]]) -> str:
    """Content fingerprint: every (id, text key) pair, order-independent across runners."""
    import pyarrow.parquet as pq

    store = open_store(root)
    pairs: list[str] = []
    for entry in entries:
        with store.open(f"{snap.version_key(version)}/{entry['data_file']}") as fh:
            table = pq.read_table(fh, columns=["ids", "text_key"])
        for ids, key in zip(table.column("ids").to_pylist(), table.column("text_key").to_pylist()):
            pairs.append(f"{key}:{','.join(ids)}")
    return hashlib.sha256("\n".join(sorted(pairs)).encode()).hexdigest()[:32]


def _max_seq_length(source: str) -> int | None:
    try:
        return json.loads((Path(source) / "sentence_bert_config.json").read_text())["max_seq_length"]
    except (OSError, ValueError, KeyError):
        return None


def build_snapshot(opts: BuildOptions) -> BuildResult:
    """Run the whole build; publish only a snapshot that validated.

    Raises:
        BadInput: unusable input (missing file, unknown format, missing column, empty corpus).
        SnapshotInvalid: the built snapshot failed validation (nothing is published).
    """
    folded = read_updates(opts.updates) if opts.updates else None  # before the corpus is read
    paths = _check_inputs(opts)
    resolved = resolve_backend("bi-encoder", opts.model, opts.backend)  # once, for every worker
    opts = dataclasses.replace(opts, backend=resolved.backend)
    clusters = load_clusters(opts.clusters) if opts.clusters else None  # before any write
    stages: dict[str, float] = {}
    source, model_name = resolve_model(opts.model)
    reused_version, previous_files = _previous_data_files(opts, model_name)
    version = snap.new_version(opts.root)
    snap.mark_building(opts.root, version)
    start = time.perf_counter()
    try:
        with timed(stages, "pipeline"):
            run_beam(opts, paths, version, model_name, previous_files, folded, clusters)
        with timed(stages, "assemble"):
            entries, counters = _collect_entries(opts.root, version, opts.shards)
            dim = _dim(opts.root, version, entries)
            manifest = {
                "format_version": SNAPSHOT_FORMAT_VERSION, "version": version,
                "created_at": snap.now_iso(),
                "model": {"name": model_name, "dimension": dim, "normalized": True,
                          "max_seq_length": _max_seq_length(source), "backend": opts.backend,
                          "quantisation_check": resolved.check,
                          **recipe_fields(opts.backend)},
                "corpus": {
                    "sources": paths, "rows_read": counters.get("rows_read", 0),
                    "rows_rejected": counters.get("rows_rejected", 0),
                    "rows_indexed": sum(e["rows"] for e in entries),
                    "ids_indexed": counters.get("ids_indexed", 0),
                    "rows_reused": counters.get("rows_reused", 0),
                    "rows_embedded": 0, "reused_from": reused_version,
                    "rows_duplicate_id": counters.get("rows_duplicate_id", 0),
                    "rows_repeated": counters.get("rows_repeated", 0),
                    "fingerprint": _fingerprint(opts.root, version, entries),
                },
                "shards": entries,
                "build": {"runner": runner_name(opts.beam_args), "beam_args": opts.beam_args,
                          "stages_s": stages},
            }
            corpus = manifest["corpus"]
            corpus["rows_embedded"] = corpus["rows_indexed"] - corpus["rows_reused"]
            if folded is not None and folded.watermark is not None:
                manifest["updates"] = folded.manifest_entry()
            if clusters is not None:
                manifest["clusters"] = clusters.manifest_entry(counters)
                _log_clusters(manifest["clusters"])
            _log_duplicate_ids(corpus)
        with timed(stages, "validate"):
            manifest["validation"] = _validate(opts.root, version, manifest, opts.canary)
        stages["total"] = round(time.perf_counter() - start, 3)
        snap.write_manifest(opts.root, version, manifest)
    except BadInput:
        open_store(opts.root).remove_tree(snap.version_key(version))
        raise
    except BaseException:
        snap.abandon_build(opts.root, version)  # abandoned: `gc` removes it
        raise
    if opts.publish:
        with timed(stages, "publish"):
            snap.publish(opts.root, version, verify=False)  # validated just above
        if opts.trim_updates and opts.updates and folded and folded.watermark:
            trim_updates(opts.updates, folded.watermark)
    location = (f"{open_store(opts.root).url}/{snap.version_key(version)}" if is_remote(opts.root)
                else snap.version_dir(opts.root, version))
    return BuildResult(version, location, manifest, opts.publish)


def _validate(root: str | Path, version: str, manifest: dict[str, Any], canary: int
              ) -> dict[str, Any]:
    """`snap.validate` on the version's files: in place for a local root; for a store, on a
    verified download (the checksums are checked as the files arrive), as a worker would
    load it."""
    if not is_remote(root):
        return snap.validate(snap.version_dir(root, version), manifest, canary=canary)
    with tempfile.TemporaryDirectory(prefix="twinq-validate-") as tmp:
        folder = Path(tmp) / version
        download_files(open_store(root), snap.version_key(version), manifest, folder)
        return snap.validate(folder, manifest, canary=canary)


def _log_duplicate_ids(corpus: dict[str, Any]) -> None:
    if corpus["rows_duplicate_id"]:
        log.warning("%d rows reuse an earlier row's id with a different text: the first "
                    "occurrence of each id is indexed, the others are in %s",
                    corpus["rows_duplicate_id"], snap.REJECTS)
    if corpus["rows_repeated"]:
        log.info("%d rows repeat an earlier row (same id, same text): indexed once",
                 corpus["rows_repeated"])


def _log_clusters(entry: dict[str, Any]) -> None:
    log.info("clusters from %s: %d members of %d clusters matched in the corpus",
             entry["path"], entry["members_matched"], entry["clusters"])
    if entry["members_not_found"]:
        log.warning("%d cluster members of %s are not in the corpus (the clusters come from "
                    "another snapshot?)", entry["members_not_found"], entry["path"])
    if entry["metadata_overwritten"]:
        log.warning("%d rows had their own cluster_id/canonical_id metadata: replaced by "
                    "--clusters (removed where the row is in no cluster)",
                    entry["metadata_overwritten"])
    if entry["rows_split"]:
        log.warning("%d rows carry ids of two clusters (same text, merged): each took the "
                    "cluster of its first clustered id", entry["rows_split"])


def _dim(root: str | Path, version: str, entries: list[dict[str, Any]]) -> int:
    import pyarrow.parquet as pq

    with open_store(root).open(f"{snap.version_key(version)}/{entries[0]['data_file']}") as fh:
        return pq.read_schema(fh).field("embedding").type.list_size
