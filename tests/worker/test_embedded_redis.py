"""The embedded Valkey server used when no Redis URL is configured."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from twinq.shared.errors import TwinqError
from twinq.worker.embedded_redis import EmbeddedRedis, read_url_file


def test_embedded_redis_starts_records_and_cleans_up(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    server = EmbeddedRedis(port=None, record=True)
    url = server.start()
    try:
        assert url.startswith("redis://127.0.0.1:")
        assert read_url_file() == url
        client = redis.Redis.from_url(url)
        client.xadd("s", {"payload": "{}"})
        assert client.xlen("s") == 1
        client.close()
    finally:
        server.stop()
    assert read_url_file() is None
    with pytest.raises(TwinqError):
        server.url


def test_embedded_redis_reports_a_taken_port() -> None:
    with EmbeddedRedis(port=None) as first:
        port = int(first.url.rsplit(":", 1)[1])
        with pytest.raises(TwinqError, match="cannot start embedded Redis"):
            EmbeddedRedis(port=port).start()
