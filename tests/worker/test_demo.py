"""`twinq demo` end to end, as a newcomer runs it: build, train, serve, ask, shut down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.worker.conftest import pid_alive, port_open, stop_left_over_redis, wait_until

# The default (not --fast) demo: its 30-step fast reranker cannot fix the near-miss questions that
# recall alone gets wrong, and this test checks what a newcomer sees: every paraphrase's twin at
# rank 1, every off-topic question refused with "no twin found" below probability 0.3, the
# near-miss questions refused but for at most one, and most paraphrases answered. Training is
# seeded end to end (tests/pipelines/test_train.py checks that the same seed gives the same
# weights on one machine), but another CPU trains a slightly different model: see the floors
# below.
pytestmark = pytest.mark.slow


# It trains the demo reranker: 5 to 7 minutes alone on fast 2-core machines, 15 on a slow one
# (`make demo` 1,001 s on a 2-core AMD EPYC Zen 2, 2026-12-01), longer beside the other lane.
# The demo subprocess is stopped 100 s earlier: an overrun is reported as the demo's timeout,
# not as pytest-timeout's.
TIMEOUT_S = 3000


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's workdir, shared by this file's tests: the served demo below reuses the
    reranker the first test trained (cached by the demo), instead of training one more."""
    return tmp_path_factory.mktemp("demo")


@pytest.mark.timeout(TIMEOUT_S)
def test_demo_answers_every_sample_question_and_leaves_nothing_running(workdir: Path,
                                                                       tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    # Under xdist it has a lane of its own, its two torch threads waiting passively
    # (tests/conftest.py says why and what it measured).
    result = subprocess.run([sys.executable, "-m", "twinq.shared.cli", "demo", "--workdir",
                             str(workdir), "--report", str(report)],
                            capture_output=True, text=True, timeout=TIMEOUT_S - 100)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(report.read_text())
    corpus = Path(__file__).resolve().parents[2] / "pipelines" / "demo" / "faq.jsonl"
    group_of = {row["id"]: row["group"] for row in map(json.loads, corpus.read_text().splitlines())}
    wrong, near_misses_answered, confident, answered = [], [], 0, 0
    for q, r in zip(data["questions"], data["replies"]):
        assert r["ok"] and r["models"]["cross_encoder"]
        # adaptive reranking scores at least the top 2 (the decision's margins need them)
        assert all(hit["rerank_score"] is not None for hit in r["results"][:2])
        top = r["results"][0]
        if q["group"] is not None:  # a paraphrase: its twin first
            if group_of[top["id"]] != q["group"]:
                wrong.append((q["query"], q["group"], group_of[top["id"]]))
            confident += top["duplicate_probability"] >= 0.5
            answered += not r["no_twin"]
            assert top["metadata"]["answer"]
        elif q["kind"] == "near-miss":
            if not r["no_twin"]:
                near_misses_answered.append((q["query"], top["text"], top["duplicate_probability"]))
        elif not r["no_twin"] or top["duplicate_probability"] >= 0.3:
            wrong.append((q["query"], q["kind"], top["text"], top["duplicate_probability"]))
    assert not wrong, wrong
    # The goal is every near miss refused. "Can I pause my Acme Plus membership ...?" sits at the
    # threshold: refused in session 13 (0.675 < 0.693), answered on session 14's 2-core EPYC with
    # the same seed (0.657 > 0.636), and by one seed of two for each recipe measured there
    # (docs/results.md section 5). A second answered near miss is a regression.
    assert len(near_misses_answered) <= 1, near_misses_answered
    # A guard against regressions, not the goal of 16 (issue 18 stays open on it). With the FAQ's
    # pairs alone: 12/16 at p >= 0.5 and 9/16 above the default threshold in sessions 10 and 12,
    # 10 to 11 and 4 to 5 in session 11. Trained on the other domains' groups too
    # (pipelines/paraphrases), session 13 measured 14 at 0.5 in three runs, and 8, 8 and 6
    # answered. The 6 trained on one thread: the same model to a few 1e-3, but the threshold,
    # the most precise point on 35 answerable dev queries, went from 0.693 to 0.731 on one
    # swapped pair. Hence a floor under "answered" that such a swap cannot break; 4 was session
    # 11's regression. Same seed, session 14's EPYC: 15 at 0.5 and 10 answered at 0.636;
    # session 15's Xeon: 14 and 8 at 0.690, every near miss refused; session 16's EPYC with
    # int8 recipe 2 (per-row activations): 14 and 8 at 0.728, every near miss refused;
    # session 18's AVX2-only EPYC: 15 and 8 at 0.733 with recipe 2 (whose 8-bit weights saturate
    # there), 13 and 8 at 0.717 with recipe 3 (7-bit weights, the same integers on every CPU).
    assert confident >= 12 and answered >= 5, (confident, answered)
    assert sum(q["group"] is None for q in data["questions"]) >= 10
    assert "found their twin at rank 1" in result.stdout
    # Nothing keeps running: no worker, no Redis, no open port.
    redis_port = int(data["redis_url"].rsplit(":", 1)[1].split("/")[0])
    assert not pid_alive(data["worker_pid"])
    assert not port_open(redis_port) and not port_open(data["status_port"])


@pytest.mark.timeout(TIMEOUT_S)
def test_served_demo_stopped_by_sigterm_stops_its_worker_and_redis(workdir: Path,
                                                                    tmp_path: Path) -> None:
    """`make serve` stopped by `kill` or a process manager. Python's default for SIGTERM exits
    without cleanups, which left the worker and the embedded Redis running (session 22). After
    the test above, the demo finds its reranker cached and serves in seconds; alone, it trains
    it first. tests/worker/test_demo_stop.py stops a demo mid-step, by SIGTERM and SIGHUP."""
    report, out = tmp_path / "report.json", tmp_path / "out.log"
    process = subprocess.Popen([sys.executable, "-m", "twinq.shared.cli", "demo", "--serve",
                                "--workdir", str(workdir), "--report", str(report)],
                               stdout=out.open("w"), stderr=subprocess.STDOUT)
    data: dict[str, Any] = {}
    redis_port = 0
    def serving() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the demo exited ({process.returncode}):\n{out.read_text()[-3000:]}")
        return "Ctrl-C stops the worker and Redis" in out.read_text()

    try:
        wait_until(serving, timeout_s=TIMEOUT_S - 100, step_s=0.5)
        data = json.loads(report.read_text())
        redis_port = int(data["redis_url"].rsplit(":", 1)[1].split("/")[0])
        # What must stop is running: the test can fail.
        assert pid_alive(data["worker_pid"]) and port_open(redis_port)
        assert port_open(data["status_port"])
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        # Measured, then cleaned up, so that a failure leaves nothing running either.
        left = {"worker": bool(data) and pid_alive(data["worker_pid"]),
                "redis": bool(redis_port) and stop_left_over_redis(redis_port)}
        if left["worker"]:
            os.kill(data["worker_pid"], signal.SIGKILL)
    assert code == 0 and "shutting down" in out.read_text(), out.read_text()[-3000:]
    assert not any(left.values()), left
    assert not port_open(data["status_port"])


@pytest.mark.parametrize("log, expected", [
    ("train:  60%|######    | 251/417 [03:05<01:32,  1.79step/s]\rtrain:  61%|######    | 255/417 [", (255, 417)),
    ("INFO twinq.pipelines.embed_handler: embedded 128/~385 texts (300/s, ETA 1s)\n", (128, 385)),
    ("loading the model\n", None),
])
def test_demo_reads_progress_from_a_steps_log(tmp_path: Path, log: str, expected: object) -> None:
    from twinq.worker.demo import _progress

    path = tmp_path / "step.log"
    path.write_text(log)
    assert _progress(path) == expected
