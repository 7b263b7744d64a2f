"""Readers for question corpora: CSV, TSV, JSONL and Parquet, one row or one reject at a time.

Readers never crash on a bad row: they yield a `Rejected` record with the reason, so that a
pipeline can count it, write it beside the manifest and go on. Whole-file problems (a missing
file, an unknown format, a missing id or text column, unreadable Parquet) raise `BadInput` before
any work starts.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from twinq.shared.errors import BadInput, one_line

Format = Literal["csv", "tsv", "jsonl", "parquet"]
Opener = Callable[[str], IO[bytes]]

COLUMN_SAMPLE_ROWS = 1000
"""JSONL rows differ in their keys: a file's columns are the union over its first rows."""
ID_CANDIDATES = ("_id", "id", "qid", "question_id")
TEXT_CANDIDATES = ("text", "question", "query", "title")
_EXTENSIONS: dict[str, Format] = {
    ".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet",
}


@dataclass(frozen=True)
class CorpusRow:
    """One question as read: raw text (cleaning happens later), its id, the other columns, and
    where it was in its file (the line, or the row number of a Parquet file), so that "the
    first occurrence" of an id is well defined."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    line: int = 0


@dataclass(frozen=True)
class Rejected:
    """A row that could not be used, with where it was and why."""

    source: str
    line: int
    reason: str
    raw: str = ""

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "line": self.line, "reason": self.reason,
                           "raw": self.raw[:500]}, ensure_ascii=False)


def local_open(path: str) -> IO[bytes]:
    return open(path, "rb")


def detect_format(path: str) -> Format:
    """Format from the file name; `.gz` is not supported on purpose (decompress first)."""
    ext = os.path.splitext(path.lower())[1]
    if ext not in _EXTENSIONS:
        raise BadInput(f"unknown corpus format for {path!r} (use .csv, .tsv, .jsonl or .parquet)")
    return _EXTENSIONS[ext]


def expand_paths(patterns: Iterable[str]) -> list[str]:
    """Expand globs of local paths and store URLs (s3://, gs://), keeping order; any pattern
    that matches nothing is an error."""
    from twinq.shared.store import expand_url

    paths: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            matches = expand_url(pattern)
            if not matches:
                raise BadInput(f"corpus file not found: {pattern}")
            paths.extend(matches)
            continue
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise BadInput(f"corpus file not found: {pattern}")
        for match in matches:
            if os.path.isdir(match):
                raise BadInput(f"corpus path is a folder, not a file: {match}")
        paths.extend(matches)
    if not paths:
        raise BadInput("no corpus given")
    return paths


def _text_stream(raw: IO[bytes]) -> io.TextIOWrapper:
    # utf-8-sig drops a BOM; invalid bytes become U+FFFD rather than failing the whole file.
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")


def read_columns(path: str, opener: Opener = local_open) -> list[str]:
    """Column names of a file: the header, the keys of the first JSONL objects, or the schema."""
    fmt = detect_format(path)
    try:
        with opener(path) as raw:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                return list(pq.ParquetFile(raw).schema_arrow.names)
            text = _text_stream(raw)
            if fmt in ("csv", "tsv"):
                header = next(csv.reader(text, delimiter="," if fmt == "csv" else "\t"), None)
                return [h.strip() for h in header] if header else []
            columns: list[str] = []
            seen = 0
            for line in text:
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    continue
                if isinstance(obj, dict):
                    columns.extend(k for k in obj if k not in columns)
                    seen += 1
                    if seen >= COLUMN_SAMPLE_ROWS:
                        break
            return columns
    except BadInput:
        raise
    except FileNotFoundError as exc:
        raise BadInput(f"corpus file not found: {path}") from exc
    except Exception as exc:  # pyarrow and the csv module raise assorted types
        raise BadInput(f"cannot read {path}: {type(exc).__name__}: {one_line(exc)}") from exc


def resolve_fields(
    columns: list[str], id_field: str | None, text_field: str | None, source: str
) -> tuple[str, str]:
    """Pick the id and text columns: the flags if given, else the first known name present.

    A file with no columns at all (empty, blank, or no line that parses) is an empty corpus,
    not a file that lacks an id column.
    """
    if not columns:
        raise BadInput(f"empty corpus: {source} has no rows (or none that parse)")

    def pick(wanted: str | None, candidates: tuple[str, ...], role: str) -> str:
        if wanted:
            if wanted not in columns:
                raise BadInput(f"{source}: no {role} column {wanted!r} (columns: {columns})")
            return wanted
        for name in candidates:
            if name in columns:
                return name
        raise BadInput(f"{source}: no {role} column; looked for {list(candidates)}, "
                       f"found {columns}; name it with --{role}-field")

    return pick(id_field, ID_CANDIDATES, "id"), pick(text_field, TEXT_CANDIDATES, "text")


def _row(obj: dict[str, Any], id_field: str, text_field: str, source: str, line: int
         ) -> CorpusRow | Rejected:
    doc_id, text = obj.get(id_field), obj.get(text_field)
    if doc_id is None or str(doc_id).strip() == "":
        return Rejected(source, line, f"missing id ({id_field})", json.dumps(obj, default=str)[:500])
    if isinstance(doc_id, (dict, list, bool)) or isinstance(doc_id, float):
        return Rejected(source, line, f"id is not a string or integer: {doc_id!r}"[:200])
    if not isinstance(text, str):
        reason = "missing text" if text is None else f"text is not a string ({type(text).__name__})"
        return Rejected(source, line, f"{reason} ({text_field})", json.dumps(obj, default=str)[:500])
    metadata = {k: v for k, v in obj.items() if k not in (id_field, text_field)}
    return CorpusRow(str(doc_id).strip(), text, metadata, line)


def _iter_delimited(text: IO[str], delimiter: str, id_field: str, text_field: str, source: str
                    ) -> Iterator[CorpusRow | Rejected]:
    reader = csv.reader(text, delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield Rejected(source, reader.line_num, f"malformed row: {exc}")
            continue
        if not values or values == [""]:
            continue
        if len(values) != len(header):
            yield Rejected(source, reader.line_num,
                           f"expected {len(header)} fields, found {len(values)}", delimiter.join(values))
            continue
        yield _row(dict(zip(header, values)), id_field, text_field, source, reader.line_num)


def _iter_jsonl(text: IO[str], id_field: str, text_field: str, source: str
                ) -> Iterator[CorpusRow | Rejected]:
    for number, line in enumerate(text, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Rejected(source, number, f"invalid JSON: {exc.msg}", line)
            continue
        except RecursionError:
            yield Rejected(source, number, "invalid JSON: nested too deeply", line[:200])
            continue
        if not isinstance(obj, dict):
            yield Rejected(source, number, "a JSON line must be an object", line)
            continue
        yield _row(obj, id_field, text_field, source, number)


def _parquet_batches(raw: IO[bytes]) -> Iterator[list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(raw).iter_batches(batch_size=8192):
        yield batch.to_pylist()


def _iter_parquet(raw: IO[bytes], id_field: str, text_field: str, source: str
                  ) -> Iterator[CorpusRow | Rejected]:
    """Rows of a Parquet file. A footer can be intact while a data page is corrupt: that is an
    unreadable file (`BadInput`, one line), found only when the page is read."""
    number = 0
    batches = _parquet_batches(raw)
    while True:
        try:
            rows = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # pyarrow raises OSError, ArrowInvalid, ...
            raise BadInput(f"cannot read {source} after row {number}: {type(exc).__name__}: "
                           f"{one_line(exc)}") from exc
        for obj in rows:
            number += 1
            yield _row(obj, id_field, text_field, source, number)


def iter_records(
    path: str,
    id_field: str | None = None,
    text_field: str | None = None,
    *,
    opener: Opener = local_open,
) -> Iterator[CorpusRow | Rejected]:
    """Yield every row of one corpus file as a `CorpusRow`, or a `Rejected` with its reason.

    Args:
        path: A local path, or any URL that `opener` understands.
        id_field: The id column. Defaults to the first of `ID_CANDIDATES` present.
        text_field: The text column. Defaults to the first of `TEXT_CANDIDATES` present.
        opener: Opens `path` for binary reading. Defaults to the local file system.

    Raises:
        BadInput: when the file cannot be read at all or lacks an id or text column.
    """
    fmt = detect_format(path)
    id_field, text_field = resolve_fields(read_columns(path, opener), id_field, text_field, path)
    with opener(path) as raw:
        if fmt == "parquet":
            yield from _iter_parquet(raw, id_field, text_field, path)
            return
        text = _text_stream(raw)
        if fmt == "jsonl":
            yield from _iter_jsonl(text, id_field, text_field, path)
        else:
            yield from _iter_delimited(text, "," if fmt == "csv" else "\t", id_field, text_field, path)
