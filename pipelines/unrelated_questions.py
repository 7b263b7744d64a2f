"""Out-of-domain questions: queries that have no twin in any corpus twinq serves.

The bundled list (`pipelines/unrelated/questions.txt`) is split by a stable hash into two
halves: training takes one as easy negatives, the twin decision is calibrated on the other,
so the decision is never fitted on an unrelated question the reranker trained on.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from twinq.pipelines.splits import question_key
from twinq.shared.errors import BadInput

if TYPE_CHECKING:
    from collections.abc import Sequence


def bundled_unrelated() -> Path:
    """The hand-written list of out-of-domain questions that ships with twinq."""
    return Path(str(files("twinq.pipelines") / "unrelated" / "questions.txt"))


def read_unrelated(path: str | None) -> list[str]:
    """Out-of-domain questions, one per line; None means the bundled list, "none" none.

    Raises:
        BadInput: a file that cannot be read.
    """
    if path == "none":
        return []
    source = Path(path) if path else bundled_unrelated()
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read unrelated questions {source}: {exc}") from exc
    return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


def split_unrelated(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training half, calibration half), by a stable hash of each text: the decision is
    calibrated on unrelated questions the reranker never trained on."""
    halves: tuple[list[str], list[str]] = ([], [])
    for text in texts:
        digest = hashlib.blake2b(question_key(text).encode("utf-8"), digest_size=8).digest()
        halves[digest[0] & 1].append(text)
    return halves
