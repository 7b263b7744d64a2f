"""The wheel installs everything under `twinq.*` and nothing under the folders' own names.

`shared`, `worker` and `pipelines` are common words: a wheel that put them at the top of
site-packages would collide with any other project that did the same.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_owns_only_the_twinq_name(tmp_path: Path) -> None:
    # Built from a copy: an in-tree build would leave build/ and egg-info in the checkout.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("shared", "worker", "pipelines"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True,
                   timeout=300)
    wheel, = (tmp_path / "dist").glob("twinq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"twinq"}
    for package in ("shared", "worker", "pipelines"):
        assert f"twinq/{package}/__init__.py" in names
    assert "twinq/__init__.py" not in names  # a namespace: the repository has no twinq/ folder
    assert "twinq/pipelines/demo/faq.jsonl" in names  # package data travels with the code
    assert "twinq/pipelines/demo/pairs.tsv" in names  # the demo trains on it
    assert "twinq/pipelines/unrelated/questions.txt" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "twinq = twinq.shared.cli:main" in text
    assert "= shared." not in text and "= worker." not in text and "= pipelines." not in text
