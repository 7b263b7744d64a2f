"""The files every evaluator leaves: the numbers as report.json, the table as report.md, and a
figure drawn with the pyplot this returns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report_files(out: Path, report: dict[str, Any], markdown: str) -> Any:
    """Write report.json and report.md into `out` (created), and return pyplot for the figure.

    Every evaluator leaves the same three things: the numbers as JSON, the table as Markdown,
    and a PNG; the Agg backend draws without a display.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown)
    return plt
