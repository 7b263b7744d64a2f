"""The index pipeline: corpus files in, a validated (and optionally published) snapshot out.

    read -> clean -> group by text with the old vectors (dedupe + reuse in one shuffle)
         -> reuse old vectors | embed new texts (RunInference) -> shard -> write
    then, outside Beam: assemble the manifest -> validate (counts, loads, canary) -> publish

A build that fails at any point leaves CURRENT untouched: the manifest is written only after
validation passes, and publishing is an atomic rename.

About 355 lines, a little past the style guide's ~350: the Beam graph is in
`index_transforms.py`; what remains is the one build procedure and its failure handling.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinq.pipelines.beam_options import pipeline_options, runner_name
from twinq.shared import snapshot as snap
from twinq.shared.constants import SNAPSHOT_FORMAT_VERSION
from twinq.shared.corpus import expand_paths, read_columns, resolve_fields
from twinq.shared.errors import BadInput, SnapshotCorrupt, SnapshotInvalid
from twinq.shared.index_choice import parse_bytes
from twinq.shared.models import resolve_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build needs; the CLI fills it from flags."""

    corpus: list[str]
    root: Path
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
    backend: str = "torch"
    """Encoder backend; recorded in the manifest, and vectors are reused only from the same one."""
    batch_size: int = 1024
    """Texts per inference batch (see `twinq.pipelines.embed_handler.BATCH_SIZE`)."""
    canary: int = 200
    beam_args: list[str] = field(default_factory=list)


@dataclass
class BuildResult:
    version: str
    path: Path
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
    paths = expand_paths(opts.corpus)
    for path in paths:
        if "://" not in path:
            resolve_fields(read_columns(path), opts.id_field, opts.text_field, path)
    return paths


def _previous_data_files(opts: BuildOptions, model_name: str) -> tuple[str | None, list[str]]:
    """Shard Parquet files of the snapshot to reuse vectors from, if its model is ours.

    A corrupt published snapshot (CURRENT or its manifest) under the build's own root only
    turns reuse off, so that a fresh build can replace it; one named by --reuse-from is an error.
    """
    if opts.reuse_from is None:
        return None, []
    root = opts.root if opts.reuse_from == "auto" else Path(opts.reuse_from)
    try:
        version = snap.current_version(root) if root.exists() else None
        path = snap.version_dir(root, version) if version else None
        manifest = snap.read_manifest(path) if path else None
    except SnapshotInvalid as exc:
        if opts.reuse_from != "auto":
            raise SnapshotCorrupt(f"--reuse-from {root}: {exc}") from exc
        log.warning("not reusing vectors: the published snapshot is unusable (%s)", exc)
        return None, []
    if version is None or path is None or manifest is None:
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
    return version, [str(path / e["data_file"]) for e in manifest["shards"] if e["rows"]]


def _estimate_rows(paths: list[str]) -> int | None:
    """Line count of local text files: a cheap upper bound for progress ETAs."""
    total = 0
    for path in paths:
        if "://" in path or path.endswith((".parquet", ".pq")):
            return None
        with open(path, "rb") as fh:
            total += sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))
    return total


def run_beam(opts: BuildOptions, paths: list[str], path: Path, model_name: str,
             previous_files: list[str]) -> dict[str, int]:
    """Build and run the Beam pipeline; return its counters.

    Raises:
        BadInput: a corpus file turned out unreadable while the pipeline read it (a Parquet
            file whose footer is intact but a data page is not).
    """
    from twinq.pipelines import index_transforms as T  # first: it quiets Beam's import

    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

    from twinq.pipelines.embed_handler import EmbedHandler

    handler = KeyedModelHandler(EmbedHandler(opts.model, threads=opts.threads, backend=opts.backend,
                                             min_batch_size=opts.batch_size,
                                             max_batch_size=opts.batch_size,
                                             progress_total=_estimate_rows(paths)))
    budget = parse_bytes(opts.memory_budget)
    pipeline = beam.Pipeline(options=pipeline_options(opts.beam_args))
    read = (pipeline
            | "CorpusFiles" >> beam.Create(list(enumerate(paths)))
            | "ReadAndClean" >> beam.ParDo(T.ReadAndClean(opts.id_field, opts.text_field))
            .with_outputs(T.REJECTED, main="rows"))
    unique = (read.rows
              | "KeyById" >> beam.Map(lambda placed: (placed[0], placed))
              | "GroupById" >> beam.GroupByKey()
              | "FirstOfEachId" >> beam.ParDo(T.FirstOfEachId(paths))
              .with_outputs(T.REJECTED, main="rows"))
    keyed = unique.rows | "KeyByText" >> beam.Map(T.key_by_text(model_name))
    old = (pipeline
           | "PreviousShards" >> beam.Create(previous_files)
           | "ReadPrevious" >> beam.FlatMap(T.read_previous_embeddings))
    split = ({"new": keyed, "old": old}
             | "GroupByText" >> beam.CoGroupByKey()
             | "SplitReusable" >> beam.ParDo(T.SplitReusable())
             .with_outputs(T.SplitReusable.TO_EMBED, main="reused"))
    embedded = (split[T.SplitReusable.TO_EMBED]
                | "ToExample" >> beam.Map(lambda r: (json.dumps(r), r["text"]))
                | "Embed" >> RunInference(handler)
                | "AttachEmbedding" >> beam.Map(T.attach_embedding))
    _ = ((split.reused, embedded)
         | "AllRows" >> beam.Flatten()
         | "KeyByShard" >> beam.Map(T.shard_of(opts.shards))
         | "GroupShards" >> beam.GroupByKey()
         | "WriteShards" >> beam.ParDo(T.WriteShard(str(path), opts.index_factory, budget))
         | "ShardEntries" >> beam.io.WriteToText(str(path / "entries"), file_name_suffix=".jsonl"))
    _ = ((read[T.REJECTED], unique[T.REJECTED])
         | "AllRejects" >> beam.Flatten()
         | "WriteRejects" >> beam.io.WriteToText(str(path / snap.REJECTS), shard_name_template="",
                                                 num_shards=1))
    with _quiet_bad_input_logs():
        try:
            result = pipeline.run()
            result.wait_until_finish()
        except Exception as exc:
            bad = _bad_input_in(exc)
            if bad is None:
                raise
            raise BadInput(str(bad)) from exc
    counters: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace(T.NS))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        counters[counter.key.metric.name] = counters.get(counter.key.metric.name, 0) + int(value or 0)
    return counters


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


def _collect_entries(path: Path, shards: int) -> list[dict[str, Any]]:
    """Gather the shard entries Beam wrote, and write empty shards for hash buckets left empty."""
    from twinq.pipelines.index_transforms import write_shard_records

    entries: dict[int, dict[str, Any]] = {}
    for part in sorted(path.glob("entries*.jsonl")):
        for line in part.read_text().splitlines():
            entry = json.loads(line)
            entries[int(entry["name"].split("-")[1])] = entry
        part.unlink()
    if not entries:
        rejects = path / snap.REJECTS
        rejected = len(rejects.read_text().splitlines()) if rejects.exists() else 0
        raise BadInput(f"empty corpus: no valid rows were found ({rejected} rejected)")
    dim = _dim(path, list(entries.values()))
    for i in range(shards):
        if i not in entries:
            entries[i] = write_shard_records(path, i, [], "Flat", 0, dim=dim)
    return [entries[i] for i in range(shards)]


def _fingerprint(path: Path, entries: list[dict[str, Any]]) -> str:
    """Content fingerprint: every (id, text key) pair, order-independent across runners."""
    import pyarrow.parquet as pq

    pairs: list[str] = []
    for entry in entries:
        table = pq.read_table(path / entry["data_file"], columns=["ids", "text_key"])
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
    paths = _check_inputs(opts)
    stages: dict[str, float] = {}
    source, model_name = resolve_model(opts.model)
    reused_version, previous_files = _previous_data_files(opts, model_name)
    opts.root.mkdir(parents=True, exist_ok=True)
    version = snap.new_version(opts.root)
    path = snap.version_dir(opts.root, version)
    snap.mark_building(path)
    start = time.perf_counter()
    try:
        with timed(stages, "pipeline"):
            counters = run_beam(opts, paths, path, model_name, previous_files)
        with timed(stages, "assemble"):
            entries = _collect_entries(path, opts.shards)
            dim = _dim(path, entries)
            manifest = {
                "format_version": SNAPSHOT_FORMAT_VERSION, "version": version,
                "created_at": snap.now_iso(),
                "model": {"name": model_name, "dimension": dim, "normalized": True,
                          "max_seq_length": _max_seq_length(source), "backend": opts.backend},
                "corpus": {
                    "sources": paths, "rows_read": counters.get("rows_read", 0),
                    "rows_rejected": counters.get("rows_rejected", 0),
                    "rows_indexed": sum(e["rows"] for e in entries),
                    "ids_indexed": None, "rows_reused": counters.get("rows_reused", 0),
                    "rows_embedded": 0, "reused_from": reused_version,
                    "rows_duplicate_id": counters.get("rows_duplicate_id", 0),
                    "rows_repeated": counters.get("rows_repeated", 0),
                    "fingerprint": _fingerprint(path, entries),
                },
                "shards": entries,
                "build": {"runner": runner_name(opts.beam_args), "beam_args": opts.beam_args,
                          "stages_s": stages},
            }
            corpus = manifest["corpus"]
            corpus["rows_embedded"] = corpus["rows_indexed"] - corpus["rows_reused"]
            corpus["ids_indexed"] = (corpus["rows_read"] - corpus["rows_rejected"]
                                     - corpus["rows_repeated"])
            _log_duplicate_ids(corpus)
        with timed(stages, "validate"):
            manifest["validation"] = snap.validate(path, manifest, canary=opts.canary)
        stages["total"] = round(time.perf_counter() - start, 3)
        snap.write_manifest(path, manifest)
    except BadInput:
        shutil.rmtree(path, ignore_errors=True)
        raise
    except BaseException:
        (path / snap.BUILDING).unlink(missing_ok=True)  # abandoned: `gc` removes it
        raise
    if opts.publish:
        with timed(stages, "publish"):
            snap.publish(opts.root, version)
    return BuildResult(version, path, manifest, opts.publish)


def _log_duplicate_ids(corpus: dict[str, Any]) -> None:
    if corpus["rows_duplicate_id"]:
        log.warning("%d rows reuse an earlier row's id with a different text: the first "
                    "occurrence of each id is indexed, the others are in %s",
                    corpus["rows_duplicate_id"], snap.REJECTS)
    if corpus["rows_repeated"]:
        log.info("%d rows repeat an earlier row (same id, same text): indexed once",
                 corpus["rows_repeated"])


def _dim(path: Path, entries: list[dict[str, Any]]) -> int:
    import pyarrow.parquet as pq

    return pq.read_schema(path / entries[0]["data_file"]).field("embedding").type.list_size
