"""The snapshot's two schemas: the Arrow schema of a shard's Parquet file, and the manifest's.

A manifest is read back from disk, so it is untrusted input: `check_manifest` types and
range-checks every field that a reader later parses, formats, compares or opens. A corrupt
manifest is then refused with one line when a version is published or loaded, instead of being
accepted and failing later in `/metrics`, the status page or `twinq index list`.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, NoReturn

from twinq.shared.constants import SNAPSHOT_FORMAT_VERSION
from twinq.shared.errors import SnapshotCorrupt

if TYPE_CHECKING:
    import pyarrow as pa

MAX_ROWS = 1 << 40
"""More rows than any shard or corpus can hold: a larger count is corruption, not data."""
MAX_DIMENSION = 65_536
MAX_SEQ_LENGTH = 1 << 20
MAX_SHARDS = 100_000
MAX_STRING = 4096
EARLIEST_BUILD = datetime(2000, 1, 1, tzinfo=timezone.utc)
CLOCK_SKEW = timedelta(days=1)
"""A `created_at` further in the future than this is nonsense, not another machine's clock."""
_SHARD_NAME = re.compile(r"shard-[0-9]{5,9}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SEARCH_PARAMS = re.compile(r"([A-Za-z_]+=[0-9]+(\.[0-9]+)?(,[A-Za-z_]+=[0-9]+(\.[0-9]+)?)*)?")


def schema(dim: int) -> pa.Schema:
    """id: the primary (smallest) id; ids: every id with this text; metadata: the other columns as
    a JSON object (corpora differ in their columns, so a JSON column keeps shards uniform)."""
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()),
        ("ids", pa.list_(pa.string())),
        ("text", pa.string()),
        ("text_key", pa.string()),
        ("metadata", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
    ])


def plain_file_name(name: Any) -> bool:
    """True for a bare file name: no folder part, so a hostile manifest ("../../x", "/etc/x")
    cannot make a reader open anything outside its version folder."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and "\x00" not in name and len(name) <= 255)


class _Fields:
    """Typed reads of the manifest's JSON objects; the first bad field raises `SnapshotCorrupt`
    naming the folder, the field's path and the value (as a short, one-line repr)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def fail(self, field: str, problem: str) -> NoReturn:
        # A field path can hold a key read from the manifest (a build stage's name): shown as a
        # short repr when it is not plain printable text, so the error stays one short line.
        shown = field if field.isprintable() and len(field) <= 80 else _short(field)
        raise SnapshotCorrupt(f"{self.folder}: corrupt manifest: {shown} {problem}")

    def get(self, obj: dict[str, Any], key: str, field: str, optional: bool) -> Any:
        if key not in obj and not optional:
            self.fail(field, "is missing")
        return obj.get(key)

    def obj(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field, f"must be a JSON object, not {_kind(value)}")
        return value

    def integer(self, obj: dict[str, Any], key: str, field: str, low: int, high: int, *,
                optional: bool = False) -> int | None:
        value = self.get(obj, key, field, optional)
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(field, f"must be an integer, not {_kind(value)}")
        if not low <= value <= high:
            self.fail(field, f"is {_short(value)}, outside {low}..{high}")
        return value

    def text(self, obj: dict[str, Any], key: str, field: str, *, optional: bool = False,
             pattern: re.Pattern[str] | None = None, empty: bool = False) -> str | None:
        value = self.get(obj, key, field, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            self.fail(field, f"must be a string, not {_kind(value)}")
        if (not value and not empty) or len(value) > MAX_STRING or not value.isprintable():
            self.fail(field, f"is {_short(value)}, not a usable string")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(field, f"is {_short(value)}, not of the form {pattern.pattern}")
        return value

    def boolean(self, obj: dict[str, Any], key: str, field: str) -> None:
        value = obj.get(key)
        if value is not None and not isinstance(value, bool):
            self.fail(field, f"must be true or false, not {_kind(value)}")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null", int: "an integer", float: "a number"}.get(type(value), "?")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
"""A Redis stream id, `<ms>-<seq>`: the update watermark of a snapshot."""


def check_manifest(manifest: Any, folder: str, *, now: datetime | None = None
                   ) -> dict[str, Any]:
    """Check every field of a manifest read from `folder`; return it unchanged.

    Raises:
        SnapshotCorrupt: on the first field that is missing, of the wrong type or out of range.
    """
    f = _Fields(folder)
    top = f.obj(manifest, "the manifest")
    version = f.integer(top, "format_version", "format_version", -(1 << 31), 1 << 31)
    if version != SNAPSHOT_FORMAT_VERSION:
        raise SnapshotCorrupt(f"{folder}: format_version {version} unsupported "
                              f"(this twinq reads {SNAPSHOT_FORMAT_VERSION})")
    if f.text(top, "version", "version") != folder:
        f.fail("version", f"is {_short(top['version'])}, not its folder's name {folder!r}")
    _check_created_at(f, f.text(top, "created_at", "created_at") or "", now)
    _check_model(f, f.obj(f.get(top, "model", "model", False), "model"))
    corpus = f.obj(f.get(top, "corpus", "corpus", False), "corpus")
    rows = _check_corpus(f, corpus)
    shards = f.get(top, "shards", "shards", False)
    if not isinstance(shards, list) or not 1 <= len(shards) <= MAX_SHARDS:
        f.fail("shards", f"must be an array of 1..{MAX_SHARDS} shard entries")
    total = sum(_check_shard(f, entry, f"shards[{i}]") for i, entry in enumerate(shards))
    if total != rows:
        f.fail("corpus.rows_indexed", f"is {rows}, but its shards list {total} rows")
    for key in ("build", "validation"):
        if top.get(key) is not None:
            f.obj(top[key], key)
    if top.get("updates") is not None:  # live updates folded in up to this stream id (#22)
        updates = f.obj(top["updates"], "updates")
        f.text(updates, "watermark", "updates.watermark", pattern=_STREAM_ID)
        f.integer(updates, "applied", "updates.applied", 0, MAX_ROWS, optional=True)
    stages = (top.get("build") or {}).get("stages_s")
    if stages is not None:
        for stage, seconds in f.obj(stages, "build.stages_s").items():
            if (not isinstance(seconds, (int, float)) or isinstance(seconds, bool)
                    or not math.isfinite(seconds) or seconds < 0):
                f.fail(f"build.stages_s.{stage}", f"is {_short(seconds)}, not seconds")
    return manifest


def _check_created_at(f: _Fields, value: str, now: datetime | None) -> None:
    """An ISO 8601 time with its UTC offset, between 2000 and tomorrow: the worker turns it
    into the age gauge of `/metrics` and the status page at every scrape."""
    try:
        created = datetime.fromisoformat(value)
        created.timestamp()
    except (ValueError, OverflowError):
        f.fail("created_at", f"is {_short(value)}, not an ISO 8601 time")
    if created.tzinfo is None:
        f.fail("created_at", f"is {_short(value)}, without a UTC offset")
    latest = (now or datetime.now(timezone.utc)) + CLOCK_SKEW
    if not EARLIEST_BUILD <= created <= latest:
        f.fail("created_at", f"is {_short(value)}, outside 2000 .. tomorrow")


def _check_model(f: _Fields, model: dict[str, Any]) -> None:
    f.text(model, "name", "model.name")
    f.integer(model, "dimension", "model.dimension", 1, MAX_DIMENSION)
    f.integer(model, "max_seq_length", "model.max_seq_length", 1, MAX_SEQ_LENGTH, optional=True)
    f.text(model, "backend", "model.backend", optional=True)
    f.integer(model, "int8_recipe", "model.int8_recipe", 1, 1000, optional=True)
    f.boolean(model, "normalized", "model.normalized")


def _check_corpus(f: _Fields, corpus: dict[str, Any]) -> int:
    """The counts, typed; return `rows_indexed` (the only one a reader relies on)."""
    for key in ("rows_read", "rows_rejected", "rows_reused", "rows_embedded", "ids_indexed",
                "rows_duplicate_id", "rows_repeated"):
        f.integer(corpus, key, f"corpus.{key}", 0, MAX_ROWS, optional=True)
    f.text(corpus, "fingerprint", "corpus.fingerprint", optional=True)
    f.text(corpus, "reused_from", "corpus.reused_from", optional=True)
    sources = corpus.get("sources")
    if sources is not None and not (isinstance(sources, list)
                                    and all(isinstance(s, str) for s in sources)):
        f.fail("corpus.sources", "must be an array of strings")
    return f.integer(corpus, "rows_indexed", "corpus.rows_indexed", 0, MAX_ROWS) or 0


def _check_shard(f: _Fields, value: Any, field: str) -> int:
    """One shard entry; return its row count."""
    entry = f.obj(value, field)
    f.text(entry, "name", f"{field}.name", pattern=_SHARD_NAME)
    rows = f.integer(entry, "rows", f"{field}.rows", 0, MAX_ROWS) or 0
    for key in ("index_file", "data_file"):
        name = f.get(entry, key, f"{field}.{key}", False)
        if not plain_file_name(name):
            f.fail(f"{field}.{key}", f"names {_short(name)}, not a file of the version folder")
    f.text(entry, "faiss_factory", f"{field}.faiss_factory")
    f.text(entry, "factory_reason", f"{field}.factory_reason", optional=True, empty=True)
    f.text(entry, "search_params", f"{field}.search_params", optional=True, empty=True,
           pattern=_SEARCH_PARAMS)
    sha = f.obj(f.get(entry, "sha256", f"{field}.sha256", False), f"{field}.sha256")
    for kind in ("index", "data"):
        f.text(sha, kind, f"{field}.sha256.{kind}", pattern=_SHA256)
    return rows
