"""The status page as a person sees it: rendered by headless Chromium against a live worker.

The screenshot is kept at runs/status-page.png (or $TWINQ_ARTIFACTS/status-page.png) for people
to look at.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.worker.conftest import TEXTS, running_worker, wait_until
from twinq.worker.client import TwinqClient
from twinq.worker.status import StatusServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
ARTIFACTS = Path(os.environ.get("TWINQ_ARTIFACTS", Path(__file__).resolve().parents[2] / "runs"))


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_status_page_renders_version_and_queue_depth(quick_snapshot: Any, make_settings: Any,
                                                     tiny_bi_encoder: Any, tmp_path: Path) -> None:
    root, version = quick_snapshot(TEXTS)
    settings = make_settings(root)
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker:
        server = StatusServer(worker, port=0).start()
        assert server.url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
        try:
            with TwinqClient(settings=settings) as client:
                for text in TEXTS[:3]:
                    client.ask(text)
            wait_until(lambda: worker.depths["length"] is not None)
            dom = _chromium(["--dump-dom", server.url + "/"], tmp_path / "profile-dom")
            assert dom.returncode == 0, dom.stderr[-2000:]
            assert version in dom.stdout
            assert "queue" in dom.stdout.lower() and "depth" in dom.stdout.lower()
            shot = tmp_path / "status-page.png"
            result = _chromium([f"--screenshot={shot}", "--window-size=1200,900", server.url + "/"],
                               tmp_path / "profile-shot")
            assert result.returncode == 0 and shot.stat().st_size > 10_000, result.stderr[-2000:]
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, ARTIFACTS / "status-page.png")
        finally:
            server.stop()
