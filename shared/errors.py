"""Small, flat exceptions. Library code raises them; only boundaries (CLI, worker) translate."""

from __future__ import annotations


class TwinqError(Exception):
    """Base class for every error twinq raises on purpose."""


class BadInput(TwinqError):
    """The user's input (a file, a flag, a corpus) cannot be used. The CLI exits 2."""


class ConfigError(BadInput):
    """A setting, or a combination of settings, is invalid."""


class SnapshotNotFound(TwinqError):
    """No published or named snapshot exists under the root."""


class SnapshotInvalid(TwinqError):
    """A snapshot failed validation: missing files, wrong counts, checksums or a failed canary."""


class ShardMismatch(SnapshotInvalid):
    """A shard's FAISS index and its Parquet file disagree."""


class SnapshotCorrupt(SnapshotInvalid, BadInput):
    """A file under a snapshot root (CURRENT, HISTORY, a manifest, a shard file) cannot be
    decoded or breaks the manifest schema. The CLI treats it as bad input (exit 2, one line);
    a worker refuses the version like any invalid one and keeps serving the old."""


class ProtocolError(TwinqError):
    """A queue message does not follow the protocol. Carries the error code for the reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ModelLoadError(TwinqError):
    """A model could not be resolved or loaded (offline hub, bad path, unsafe format)."""


def one_line(detail: object, limit: int = 200) -> str:
    """A library's error detail as one short line, for a twinq error message: pyarrow, faiss
    and json messages may span lines or quote whole inputs, and the CLI promises one line."""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(detail)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
