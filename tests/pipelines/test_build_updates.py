"""The nightly build folds the live update stream in (real Redis, real Beam, tiny model)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REDIS_URL
from twinq.pipelines import index as index_module
from twinq.pipelines.build_updates import read_updates, trim_updates
from twinq.pipelines.index import BuildOptions, build_snapshot
from twinq.shared import constants as C
from twinq.shared import snapshot as snap
from twinq.shared.cli import main as twinq
from twinq.shared.config import Settings, load_settings
from twinq.shared.errors import BadInput
from twinq.shared.protocol import Update, updates_stream
from twinq.shared.queue import RedisQueue, UpdateLog, stream_id_key


@pytest.fixture
def settings(redis_client: Any) -> Settings:
    tag = uuid.uuid4().hex[:10]
    return load_settings(env={}, overrides={"redis_url": REDIS_URL,
                                            "stream": f"twinq:test:{tag}:queries"})


def _log(settings: Settings) -> UpdateLog:
    return RedisQueue.for_asker(settings, REDIS_URL).updates(updates_stream(settings))


def _add(settings: Settings, op: str, doc_id: str, text: str | None = None) -> str:
    return _log(settings).append(Update(op, doc_id, text, {"by": "test"} if text else None
                                        ).to_fields())


def _corpus(path: Path) -> str:
    rows = [{"id": f"q{i}", "text": f"how do I change setting number {i}?"} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(root: Path) -> dict[str, str]:
    loaded = snap.load_snapshot(root)
    return {doc_id: shard.table.column("text")[i].as_py()
            for shard in loaded.shards for i in range(shard.table.num_rows)
            for doc_id in shard.table.column("ids")[i].as_py()}


def test_a_build_folds_upserts_and_deletes_up_to_its_watermark(
        settings: Settings, tmp_path: Path, tiny_bi_encoder_path: str) -> None:
    _add(settings, "upsert", "q3", "first new text of q3")
    _add(settings, "upsert", "q3", "how do I export my invoices?")  # the last one wins
    _add(settings, "delete", "q5")
    _add(settings, "upsert", "new1", "can I pay with a gift card?")
    _add(settings, "delete", "never-existed")  # harmless
    _log(settings).append({"op": "rename", "id": "x"})  # refused, skipped
    last = _add(settings, "upsert", "gone", "to be deleted")
    last = _add(settings, "delete", "gone")
    result = build_snapshot(BuildOptions(corpus=[_corpus(tmp_path / "c.jsonl")],
                                         root=tmp_path / "root", shards=2,
                                         model=tiny_bi_encoder_path, publish=True,
                                         updates=settings))
    assert result.manifest["updates"] == {"watermark": last, "applied": 7}
    rows = _rows(tmp_path / "root")
    assert rows["q3"] == "how do I export my invoices?" and rows["new1"] == "can I pay with a gift card?"
    assert "q5" not in rows and "gone" not in rows and "never-existed" not in rows
    assert len(rows) == 10 == result.manifest["corpus"]["ids_indexed"]


def test_updates_racing_a_build_stay_above_its_watermark(
        settings: Settings, tmp_path: Path, tiny_bi_encoder_path: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    before = _add(settings, "upsert", "early", "how do I close my account?")
    late: list[str] = []
    check_inputs = index_module._check_inputs

    def corpus_read_while_updates_arrive(opts: BuildOptions) -> list[str]:
        late.append(_add(settings, "upsert", "late", "how do I reopen my account?"))
        return check_inputs(opts)

    monkeypatch.setattr(index_module, "_check_inputs", corpus_read_while_updates_arrive)
    result = build_snapshot(BuildOptions(corpus=[_corpus(tmp_path / "c.jsonl")],
                                         root=tmp_path / "root", shards=1,
                                         model=tiny_bi_encoder_path, publish=True,
                                         updates=settings))
    assert result.manifest["updates"]["watermark"] == before
    assert "early" in _rows(tmp_path / "root") and "late" not in _rows(tmp_path / "root")
    # The late update is above the watermark: a worker serving this snapshot applies it live,
    # and the stream keeps it (trimming stops at the watermark).
    assert stream_id_key(late[0]) > stream_id_key(before)
    trim_updates(settings, before)
    assert [e.entry_id for e in _log(settings).read("0-0", 10)] == [before, late[0]]


def test_trim_stops_at_the_oldest_watermark_a_worker_serves(settings: Settings,
                                                            redis_client: Any) -> None:
    ids = [_add(settings, "upsert", f"q{i}", f"text {i}") for i in range(5)]
    worker = C.HEARTBEAT_PREFIX + f"test-{uuid.uuid4().hex[:6]}"
    redis_client.hset(worker, mapping={"watermark": ids[1], "state": "idle",
                                       "update_stream": updates_stream(settings)})
    try:
        assert trim_updates(settings, ids[3]) == 1  # only ids[0]: below what the worker serves
        redis_client.hset(worker, "watermark", "")  # a snapshot without updates: keep all
        assert trim_updates(settings, ids[3]) == 0
    finally:
        redis_client.delete(worker)
    assert [e.entry_id for e in _log(settings).read("0-0", 10)] == ids[1:]


def test_an_empty_stream_folds_nothing(settings: Settings) -> None:
    folded = read_updates(settings)
    assert folded.watermark is None and folded.manifest_entry() is None


def test_updates_need_redis(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TWINQ_REDIS_URL", raising=False)
    with pytest.raises(BadInput, match="needs a Redis URL"):
        read_updates(load_settings(env={}))
    code = twinq(["index", "build", "--corpus", _corpus(tmp_path / "c.jsonl"), "--root",
                  str(tmp_path / "r"), "--updates", "--redis-url", "redis://127.0.0.1:1/0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "update stream" in err
    assert twinq(["index", "build", "--corpus", _corpus(tmp_path / "c.jsonl"), "--root",
                  str(tmp_path / "r"), "--trim-updates"]) == 2
