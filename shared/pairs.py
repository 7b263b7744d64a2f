"""Readers for question-pair files: LCQMC, Quora/BiMPM, CSV, PAWS-X and positive-only pairs.

Training, evaluation and the benchmark builders all read pairs through `read_pairs`, so that
every file quirk (a UTF-8 BOM, invalid bytes, CSV-style doubled quotes, aligned positive-only
files) is handled once. The official formats are accepted unchanged:

- LCQMC / AFQMC: ``q1 \\t q2 \\t label``
- Quora / BiMPM: ``label \\t q1 \\t q2 \\t pair_id``
- CSV (BQ): header ``sentence1,sentence2,label``, possibly with a BOM
- PAWS-X: TSV with header ``id sentence1 sentence2 label``
- positive-only: two aligned files ``X_q1.txt`` / ``X_q2.txt`` (line i pairs with line i),
  given as two paths, as one of them, as a glob (``X_q*.txt``) or as the prefix ``X``;
  or ``q1 \\t q2`` lines.

Malformed lines are counted and skipped, never fatal: one bad row in 400k must not stop a run.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from twinq.shared.errors import BadInput

PairFormat = Literal["lcqmc", "quora", "csv", "pawsx", "positive-tsv", "aligned"]
FORMATS: tuple[str, ...] = ("lcqmc", "quora", "csv", "pawsx", "positive-tsv", "aligned")
_LABELS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}
_SNIFF_LINES = 50


@dataclass(frozen=True)
class LabelledPair:
    """Two questions and whether they mean the same thing.

    Attributes:
        q1: The first question, as read (not normalised).
        q2: The second question.
        label: 1 duplicate, 0 not, None when the source holds positives only and the
            label is implied (the trainer treats None as 1).
    """

    q1: str
    q2: str
    label: int | None


@dataclass
class PairFile:
    """What `read_pairs` found: the pairs, how many lines were rejected, and per-source facts."""

    pairs: list[LabelledPair] = field(default_factory=list)
    rejected: int = 0
    sources: list[dict[str, object]] = field(default_factory=list)

    @property
    def positive_only(self) -> bool:
        return bool(self.pairs) and all(p.label is None for p in self.pairs)


def _read_text(path: Path) -> str:
    """Whole file as text: BOM stripped, invalid UTF-8 replaced (the Quora dev file has ~150)."""
    return path.read_bytes().decode("utf-8-sig", errors="replace")


def _unquote(field_text: str) -> str:
    """Undo CSV-style quoting left in TSV fields: ``"a ""b"" c"`` -> ``a "b" c``."""
    s = field_text.strip()
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        return s[1:-1].replace('""', '"').strip()
    return s


def sniff_format(lines: Sequence[str]) -> PairFormat:
    """Guess a single file's format from its first lines (majority vote over rows).

    Raises:
        BadInput: when no known format fits.
    """
    rows = [ln for ln in lines[:_SNIFF_LINES] if ln.strip()]
    if not rows:
        raise BadInput("empty pair file")
    head = rows[0].lstrip("\ufeff").strip().lower()
    if head.replace(" ", "").startswith("sentence1,sentence2,label"):
        return "csv"
    if head.split("\t")[:4] == ["id", "sentence1", "sentence2", "label"]:
        return "pawsx"
    votes = {"quora": 0, "lcqmc": 0, "positive-tsv": 0}
    for row in rows:
        parts = row.rstrip("\r\n").split("\t")
        if len(parts) == 4 and parts[0].strip() in _LABELS:
            votes["quora"] += 1
        elif len(parts) == 3 and parts[2].strip() in _LABELS:
            votes["lcqmc"] += 1
        elif len(parts) == 2:
            votes["positive-tsv"] += 1
    best = max(votes, key=lambda k: votes[k])
    if votes[best] * 2 < len(rows):
        raise BadInput(f"unknown pair format (first line: {rows[0][:80]!r}); expected one of "
                       f"{', '.join(FORMATS)}")
    return best  # type: ignore[return-value]


def _parse_tsv(text: str, fmt: PairFormat) -> tuple[list[LabelledPair], int]:
    pairs: list[LabelledPair] = []
    rejected = 0
    lines = text.splitlines()
    if fmt == "pawsx":
        lines = lines[1:]
    for line in lines:
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            if fmt == "quora" and len(parts) >= 3:
                label, q1, q2 = _LABELS[parts[0].strip()], parts[1], parts[2]
            elif fmt == "lcqmc" and len(parts) == 3:
                q1, q2, label = parts[0], parts[1], _LABELS[parts[2].strip()]
            elif fmt == "pawsx" and len(parts) == 4:
                q1, q2, label = parts[1], parts[2], _LABELS[parts[3].strip()]
            elif fmt == "positive-tsv" and len(parts) == 2:
                q1, q2, label = parts[0], parts[1], None
            else:
                rejected += 1
                continue
        except KeyError:
            rejected += 1
            continue
        q1, q2 = _unquote(q1), _unquote(q2)
        if not q1 or not q2:
            rejected += 1
            continue
        pairs.append(LabelledPair(q1, q2, label))
    return pairs, rejected


def _parse_csv(text: str) -> tuple[list[LabelledPair], int]:
    pairs: list[LabelledPair] = []
    rejected = 0
    reader = csv.DictReader(io.StringIO(text))
    for row in reader:
        q1, q2 = (row.get("sentence1") or "").strip(), (row.get("sentence2") or "").strip()
        label = _LABELS.get((row.get("label") or "").strip())
        if not q1 or not q2 or label is None or None in row:
            rejected += 1
            continue
        pairs.append(LabelledPair(q1, q2, label))
    return pairs, rejected


def _parse_aligned(path1: Path, path2: Path) -> tuple[list[LabelledPair], int]:
    left = _read_text(path1).splitlines()
    right = _read_text(path2).splitlines()
    rejected = abs(len(left) - len(right))
    pairs: list[LabelledPair] = []
    for a, b in zip(left, right):
        a, b = _unquote(a), _unquote(b)  # the Quora files keep CSV quoting here too
        if not a or not b:
            rejected += 1
            continue
        pairs.append(LabelledPair(a, b, None))
    return pairs, rejected


def _aligned_partner(path: Path) -> tuple[Path, Path] | None:
    """(q1 file, q2 file) when `path` names one side of, or the prefix of, an aligned pair."""
    name = path.name
    for a, b in (("_q1", "_q2"), ("_q2", "_q1")):
        if path.stem.endswith(a):
            other = path.with_name(name.replace(a + path.suffix, b + path.suffix))
            if other.exists():
                return (path, other) if a == "_q1" else (other, path)
    q1, q2 = path.with_name(name + "_q1.txt"), path.with_name(name + "_q2.txt")
    if not path.exists() and q1.exists() and q2.exists():
        return q1, q2
    return None


def expand_sources(paths: Iterable[str | Path]) -> list[tuple[Path, ...]]:
    """Turn user paths into sources: 1-tuples for single files, 2-tuples for aligned files.

    Globs are expanded; both halves of an aligned pair may be listed, or either one, or the
    prefix, and each pair is read once.

    Raises:
        BadInput: a path that matches nothing.
    """
    found: list[Path] = []
    for raw in paths:
        raw = str(raw)
        if any(ch in raw for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(raw))
            if not matches:
                raise BadInput(f"no file matches {raw}")
            found.extend(matches)
        else:
            found.append(Path(raw).expanduser())
    sources: list[tuple[Path, ...]] = []
    seen: set[Path] = set()
    for path in found:
        if path in seen:
            continue
        partner = _aligned_partner(path)
        if partner:
            seen.update(partner)
            sources.append(partner)
        elif path.is_file():
            seen.add(path)
            sources.append((path,))
        else:
            raise BadInput(f"pair file not found: {path}")
    return sources


def read_pairs(paths: str | Path | Iterable[str | Path],
               fmt: PairFormat | None = None) -> PairFile:
    """Read pairs from one or more files, detecting each file's format unless `fmt` is given.

    Args:
        paths: Files, globs or aligned-file prefixes (see the module docstring).
        fmt: Force one format for single files. Defaults to None (detect per file).

    Returns:
        A `PairFile` with the pairs in file order, the rejected-line count and, per source,
        its paths, format, pair count, rejects and sha256 fingerprint.

    Raises:
        BadInput: a missing file or an unknown format.

    Example:
        >>> read_pairs(["data/quora/duplicate-pairs/train_q*.txt"]).positive_only
        True
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out = PairFile()
    for source in expand_sources(paths):
        if len(source) == 2:
            pairs, rejected = _parse_aligned(*source)
            kind: str = "aligned"
        else:
            text = _read_text(source[0])
            kind = fmt or sniff_format(text.splitlines())
            pairs, rejected = _parse_csv(text) if kind == "csv" else _parse_tsv(text, kind)  # type: ignore[arg-type]
        out.pairs.extend(pairs)
        out.rejected += rejected
        out.sources.append({"paths": [str(p) for p in source], "format": kind,
                            "pairs": len(pairs), "rejected": rejected,
                            "sha256": fingerprint(source)})
    return out


def fingerprint(paths: Iterable[Path]) -> str:
    """sha256 over the bytes of the given files, in order: what training.json records."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
