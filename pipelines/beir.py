"""Read a BEIR query set: queries.jsonl and a qrels TSV (`twinq eval retrieval|decide`)."""

from __future__ import annotations

import json
from pathlib import Path

from twinq.shared.errors import BadInput


def load_beir(queries_path: str, qrels_path: str
              ) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """BEIR queries.jsonl (``_id``, ``text``) and a qrels TSV with a header row.

    Raises:
        BadInput: a missing file or a malformed line.
    """
    try:
        queries = {}
        for line in Path(queries_path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                queries[str(row["_id"])] = str(row["text"])
        qrels: dict[str, dict[str, float]] = {}
        for n, line in enumerate(Path(qrels_path).read_text(encoding="utf-8").splitlines()):
            parts = line.split("\t")
            if n == 0 and not parts[-1].strip().lstrip("-").isdigit():
                continue  # header
            if len(parts) >= 3:
                qrels.setdefault(parts[0], {})[parts[1]] = float(parts[2])
    except (OSError, ValueError, KeyError) as exc:
        raise BadInput(f"cannot read BEIR files: {exc}") from exc
    return queries, qrels
