"""`twinq ask`, `twinq submit` and the embedded-Redis path of `twinq worker`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from twinq.shared.errors import BadInput
from tests.conftest import REDIS_URL
from tests.worker.conftest import TEXTS, free_port, running_worker, wait_until
from twinq.worker.cli import ask_command, read_questions, serve, submit_command, worker_command
from twinq.worker.consumer import Consumer

ANSWERS = [{"answer": f"Answer number {i}."} for i in range(len(TEXTS))]


def app() -> typer.Typer:
    cli = typer.Typer()
    for name, fn in (("ask", ask_command), ("submit", submit_command), ("worker", worker_command)):
        cli.command(name)(fn)
    return cli


def env_for(settings: Any) -> dict[str, str]:
    return {"TWINQ_STREAM": settings.stream, "TWINQ_GROUP": settings.group,
            "TWINQ_REDIS_URL": REDIS_URL, "COLUMNS": "200"}


@pytest.fixture
def faq(quick_snapshot: Any, make_settings: Any, tiny_bi_encoder: Any) -> Any:
    root, version = quick_snapshot(TEXTS, metadata=ANSWERS)
    settings = make_settings(root)
    with running_worker(settings, bi_encoder=tiny_bi_encoder):
        yield settings, version


def test_ask_command_prints_the_top_answer_and_a_table(faq: Any) -> None:
    settings, version = faq
    result = CliRunner().invoke(app(), ["ask", TEXTS[2], "--top-k", "3"], env=env_for(settings))
    assert result.exit_code == 0, result.output
    assert "Answer number 2." in result.output and TEXTS[2] in result.output
    assert "rerank" in result.output and version in result.output


def test_ask_command_json_and_bad_request_exit_codes(faq: Any) -> None:
    settings, version = faq
    runner = CliRunner()
    result = runner.invoke(app(), ["ask", TEXTS[0], "--json", "--no-rerank"],
                           env=env_for(settings))
    reply = json.loads(result.output)
    assert result.exit_code == 0 and reply["snapshot"] == version
    assert reply["results"][0]["metadata"] == ANSWERS[0]
    bad = runner.invoke(app(), ["ask", "q", "--top-k", "9", "--recall-k", "3"],
                        env=env_for(settings))
    assert isinstance(bad.exception, BadInput)
    assert "bad_request: top_k (9) must not exceed recall_k (3)" in str(bad.exception)
    empty = runner.invoke(app(), ["ask", "   "], env=env_for(settings))
    assert isinstance(empty.exception, BadInput)
    assert runner.invoke(app(), ["ask", "q", "--top-k", "0"]).exit_code == 2


def test_submit_command_writes_replies_in_order(faq: Any, tmp_path: Path) -> None:
    settings, _ = faq
    queries = tmp_path / "queries.jsonl"
    queries.write_text("\n".join([json.dumps({"id": "in-1", "query": TEXTS[5]}),
                                  json.dumps({"question": TEXTS[6]}), json.dumps(TEXTS[7]), ""]))
    out = tmp_path / "out" / "results.jsonl"
    result = CliRunner().invoke(app(), ["submit", "--file", str(queries), "--out", str(out),
                                        "--top-k", "1", "--chunk-size", "2"],
                                env=env_for(settings))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["results"][0]["text"] for r in rows] == TEXTS[5:8]
    assert rows[0]["input_id"] == "in-1" and rows[0]["query"] == TEXTS[5]
    assert "3 answered, 0 errors, 0 timeouts" in result.output


@pytest.mark.parametrize("content, words", [
    ('{"query": ""}\n', "non-empty"), ("{nope\n", "not JSON"), ("\n\n", "no questions")])
def test_read_questions_refuses_bad_files(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    with pytest.raises(BadInput, match=words):
        read_questions(path)


def test_read_questions_reads_text_files(tmp_path: Path) -> None:
    path = tmp_path / "q.txt"
    path.write_text("first question\n\n second one \n")
    assert read_questions(path) == [{"query": "first question"}, {"query": "second one"}]
    with pytest.raises(BadInput, match="no such file"):
        read_questions(tmp_path / "missing.txt")


def test_worker_command_requires_a_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TWINQ_ROOT", raising=False)
    result = CliRunner().invoke(app(), ["worker"])
    assert isinstance(result.exception, BadInput) and "--root" in str(result.exception)


def test_serve_with_embedded_redis_is_found_by_ask(quick_snapshot: Any, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from twinq.shared.config import load_settings

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    root, version = quick_snapshot(TEXTS, metadata=ANSWERS)
    started: list[Consumer] = []

    class Recorded(Consumer):
        def run(self) -> int:
            started.append(self)
            return super().run()

    settings = load_settings(env={}, overrides={"root": str(root), "block_ms": 20})
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(serve(
        settings, worker_id="embedded", consumer_cls=Recorded, embedded_port=free_port(),
        signals=False)))
    thread.start()
    try:
        wait_until(lambda: started, timeout_s=60)
        env = {"TWINQ_REDIS_URL": "", "XDG_RUNTIME_DIR": str(tmp_path / "run")}
        result = CliRunner().invoke(app(), ["ask", TEXTS[1], "--json"], env=env)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["snapshot"] == version
    finally:
        if started:
            started[0].request_stop()
        thread.join(timeout=30)
    assert codes == [0]
    assert not (tmp_path / "run" / "twinq" / "redis-url").exists()


def _reply(text: str, answer: str, **decision: Any) -> dict[str, Any]:
    hit = {"rank": 1, "id": "a", "text": text, "score": 1.0, "recall_score": 0.9,
           "rerank_score": 2.0, "duplicate_probability": 0.2, "metadata": {"answer": answer},
           "ids": ["a"]}
    return {"id": "r", "ok": True, "results": [hit], "snapshot": "v", "worker": "w",
            "models": {"bi_encoder": "m", "cross_encoder": "c", "backend": "torch"},
            "timings_ms": {k: 1.0 for k in ("queue", "embed", "search", "rerank", "total")},
            "error": None, **decision}


def test_ask_prints_stored_text_literally(capsys: pytest.CaptureFixture[str]) -> None:
    from twinq.worker.cli import _print_reply

    _print_reply(_reply("why [/] and [bold]this[/bold]?", "see [link=http://x]here[/link]",
                        no_twin=False, min_probability=0.1))
    out = capsys.readouterr().out
    assert "[/]" in out and "[bold]this[/bold]" in out and "[link=http://x]here[/link]" in out


def test_ask_says_no_twin_found_instead_of_an_answer(capsys: pytest.CaptureFixture[str]) -> None:
    from twinq.worker.cli import _print_reply

    _print_reply(_reply("Can I use the app in French?", "Settings > Language.", no_twin=True,
                        min_probability=0.6))
    out = capsys.readouterr().out
    assert "no twin found" in out and "0.60" in out and "Answer" not in out
    assert "best match's duplicate probability, 0.20, is below 0.60" in " ".join(out.split())
    _print_reply({**_reply("q", "a", no_twin=True, min_probability=0.6), "results": []})
    assert "no twin found: nothing matched" in capsys.readouterr().out


@pytest.mark.parametrize("text, width, expected", [
    ("short answer", 80, "short answer"),
    ("one two three four", 12, "one two…"),
    ("abcdefghijklmnop", 8, "abcdefg…"),
])
def test_clip_cuts_at_a_word_and_marks_it(text: str, width: int, expected: str) -> None:
    from twinq.worker.cli import clip

    assert clip(text, width) == expected and len(clip(text, width)) <= width


def test_help_shows_no_type_beside_flags() -> None:
    from typer.testing import CliRunner

    from twinq.pipelines.cli_train import train_app

    result = CliRunner().invoke(train_app, ["reranker", "--help"])
    assert result.exit_code == 0 and "<bool>" not in result.output and "--no-swap" in result.output
