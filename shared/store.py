"""Where snapshots live: a local folder or an object store, behind one small interface.

The snapshot format needs few things of its root: read and write small text objects (CURRENT,
HISTORY, manifests), upload and download whole files, list and delete version folders, and one
compare-and-swap to publish. `open_store` gives a `LocalStore` for a path and an `ObjectStore`
for a URL (`s3://bucket/prefix`, `gs://bucket/prefix`, any fsspec protocol).

Object stores go through fsspec (s3fs, gcsfs): endpoint and credentials come from the standard
environment and config of each (for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws/config...),
so MinIO and SeaweedFS work like AWS. Nothing here speaks HTTP itself.

Publishing never relies on rename, which object stores lack:
- local: write-temp-then-rename under an exclusive `flock`, so two publishers serialise;
- S3: `PutObject` with `If-Match: <etag>` (or `If-None-Match: *` for the first publish): of two
  racers that read the same CURRENT, the store accepts exactly one;
- other stores (GCS): a lease object created with create-only semantics (GCS
  `ifGenerationMatch=0`) around the read-compare-write; a lease older than `LEASE_STALE_S`
  belongs to a dead publisher and is broken.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from twinq.shared.errors import BadInput, SnapshotCorrupt, TwinqError, one_line

LEASE = ".publish-lease"
LEASE_STALE_S = 120.0
"""A publish takes milliseconds; a lease this old was left by a publisher that died."""
TIMEOUT_ENV = "TWINQ_STORE_TIMEOUT_S"
"""Connect and read timeout of one store request, seconds (default 20): a hung store must
fail a worker's poll in bounded time, so that it can say so and keep serving."""
_ATTEMPTS = 3


class StoreError(BadInput):
    """The store cannot be used: missing bucket, denied credentials, bad URL. Exit 2."""


class StoreUnreachable(StoreError):
    """The store did not answer (network, endpoint down). Transient: a worker keeps serving."""


class PublishConflict(TwinqError):
    """Another publisher changed CURRENT between our read and our write; nothing was written."""


def is_remote(root: str | Path) -> bool:
    """True for a URL root (`s3://...`), False for a local path (`/srv/twinq`, `file://...`)."""
    return isinstance(root, str) and "://" in root and not root.startswith("file://")


def open_store(root: str | Path) -> LocalStore | ObjectStore:
    """The store of a snapshot root: a path or a `file://` URL is local, other URLs remote."""
    if isinstance(root, str) and root.startswith("file://"):
        root = root[len("file://"):]
    return ObjectStore(root) if is_remote(root) else LocalStore(Path(root))


def sha256_stream(fh: IO[bytes]) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: fh.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class LocalStore:
    """A snapshot root on a local (or shared, POSIX) filesystem."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def url(self) -> str:
        return str(self.root)

    def local_path(self, key: str = "") -> Path:
        """The file behind `key`: local roots are read in place, never copied."""
        return self.root / key if key else self.root

    def check(self, *, create: bool = False) -> None:
        """Refuse a root that cannot be used (a file, an unwritable folder); create it if asked."""
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{self.root}: cannot create: {one_line(exc.strerror or exc)}") from exc
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root}: not a folder")

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise SnapshotCorrupt(f"{key}: unreadable: {one_line(exc.strerror or exc)}") from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write to a temporary sibling, fsync, rename: readers see the old or the new file."""
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def swap_bytes(self, key: str, data: bytes, expected: bytes | None) -> None:
        """Replace `key` only if it still holds `expected` (None: absent).

        Raises:
            PublishConflict: it holds something else; nothing was written.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY)  # the root folder is the lock: no lock file left
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.read_bytes(key) != expected:
                raise PublishConflict(f"{key} changed while publishing")
            self.write_bytes(key, data)
        finally:
            os.close(fd)

    def put_file(self, local: Path, key: str) -> None:
        path = self.root / key
        if path.resolve() == local.resolve():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        shutil.copyfile(local, tmp)
        os.replace(tmp, path)

    def get_file(self, key: str, local: Path) -> None:
        shutil.copyfile(self.root / key, local)

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        with (self.root / key).open("rb") as fh:
            yield fh

    def exists(self, key: str) -> bool:
        return (self.root / key).exists()

    def list(self, key: str) -> list[str]:
        """Names directly under `key` (files and folders), sorted; [] when absent."""
        path = self.root / key
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def remove_tree(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)

    def remove(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def make_dir(self, key: str) -> None:
        (self.root / key).mkdir(parents=True, exist_ok=True)

    def sha256(self, key: str) -> str:
        with self.open(key) as fh:
            return sha256_stream(fh)


class ObjectStore:
    """A snapshot root in an object store, through fsspec.

    Keys are '/'-joined below the root's prefix. Listings are never cached: CURRENT and the
    version list must be read fresh by every poll.
    """

    remote = True

    def __init__(self, url: str) -> None:
        self.protocol, _, rest = url.partition("://")
        self.base = rest.strip("/")
        if not self.base or "/" in self.base and not self.base.split("/", 1)[0]:
            raise StoreError(f"{url}: expected {self.protocol}://bucket[/prefix]")
        self.bucket = self.base.split("/", 1)[0]
        self.fs = filesystem(self.protocol, url)

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.base}"

    def _path(self, key: str) -> str:
        return _join(self.base, key)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Store errors as twinq's: unreachable (transient) or unusable (bucket, credentials)."""
        try:
            yield
        except (FileNotFoundError, PublishConflict, SnapshotCorrupt):
            raise
        except PermissionError as exc:
            raise StoreError(f"{self.url}: access denied {what}: {one_line(exc)}") from exc
        except Exception as exc:  # botocore/aiohttp raise assorted types
            name = type(exc).__name__
            text = one_line(exc)
            if any(s in name + text for s in ("Connect", "Timeout", "timed out", "Endpoint",
                                               "Connection", "unreachable", "Temporary")):
                raise StoreUnreachable(f"{self.url}: store unreachable {what}: {text}") from exc
            raise StoreError(f"{self.url}: {what}: {name}: {text}") from exc

    def check(self, *, create: bool = False) -> None:
        """Fail fast, with one line, on a missing bucket, denied credentials or no endpoint.

        Listing the prefix needs the credentials to be valid; `create` is ignored (buckets are
        made by their owners, not by a build).
        """
        with self._errors("listing the root"):
            try:
                self.fs.ls(self.base, detail=False, refresh=True)
            except FileNotFoundError:
                if not self.fs.exists(self.bucket):
                    raise StoreError(f"{self.url}: bucket {self.bucket!r} does not exist") from None

    def read_bytes(self, key: str) -> bytes | None:
        with self._errors(f"reading {key}"):
            try:
                return self.fs.cat_file(self._path(key))
            except FileNotFoundError:
                return None

    def write_bytes(self, key: str, data: bytes) -> None:
        """One PUT: object stores replace an object atomically."""
        with self._errors(f"writing {key}"):
            self.fs.pipe_file(self._path(key), data)

    def swap_bytes(self, key: str, data: bytes, expected: bytes | None) -> None:
        """Replace `key` only if it still holds `expected` (None: absent).

        Raises:
            PublishConflict: it holds something else, or another publisher won the race.
        """
        if self.protocol in ("s3", "s3a"):
            self._swap_s3(key, data, expected)
        else:
            with self._lease(key):
                if self.read_bytes(key) != expected:
                    raise PublishConflict(f"{key} changed while publishing")
                self.write_bytes(key, data)

    def _swap_s3(self, key: str, data: bytes, expected: bytes | None) -> None:
        path = self._path(key)
        with self._errors(f"publishing {key}"):
            if expected is None:
                condition: dict[str, Any] = {"mode": "create"}
            else:
                try:
                    info = self.fs.info(path, refresh=True)
                except FileNotFoundError:
                    raise PublishConflict(f"{key} was removed while publishing") from None
                condition = {"IfMatch": info["ETag"]}
                if self.fs.cat_file(path) != expected:
                    raise PublishConflict(f"{key} changed while publishing")
            try:
                self.fs.pipe_file(path, data, **condition)
            except OSError as exc:
                if _precondition_failed(exc):
                    raise PublishConflict(f"{key} changed while publishing") from exc
                raise

    @contextlib.contextmanager
    def _lease(self, key: str) -> Iterator[None]:
        """Hold `<key>.publish-lease`, created only-if-absent; break it when stale."""
        path = self._path(f"{key}{LEASE}")
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "at": time.time()})
        with self._errors(f"leasing {key}"):
            try:
                self.fs.pipe_file(path, body.encode(), mode="create")
            except (OSError, FileExistsError) as exc:
                if not isinstance(exc, FileExistsError) and not _precondition_failed(exc):
                    raise
                held = self.read_bytes(f"{key}{LEASE}") or b"{}"
                try:
                    age = time.time() - float(json.loads(held).get("at", 0))
                except (ValueError, AttributeError):
                    age = LEASE_STALE_S + 1
                if age <= LEASE_STALE_S:
                    raise PublishConflict(f"another publisher holds {key}{LEASE}") from exc
                self.fs.rm_file(path)
                self.fs.pipe_file(path, body.encode(), mode="create")
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                self.fs.rm_file(path)

    def put_file(self, local: Path, key: str) -> None:
        with self._errors(f"uploading {key}"):
            self.fs.put_file(str(local), self._path(key))

    def get_file(self, key: str, local: Path) -> None:
        with self._errors(f"downloading {key}"):
            self.fs.get_file(self._path(key), str(local))

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        with self._errors(f"reading {key}"), self.fs.open(self._path(key), "rb") as fh:
            yield fh

    def exists(self, key: str) -> bool:
        with self._errors(f"looking up {key}"):
            return bool(self.fs.exists(self._path(key)))

    def list(self, key: str) -> list[str]:
        """Names directly under `key` (objects and "folders"), sorted; [] when absent."""
        with self._errors(f"listing {key or '/'}"):
            try:
                entries = self.fs.ls(self._path(key), detail=False, refresh=True)
            except FileNotFoundError:
                return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})

    def remove_tree(self, key: str) -> None:
        """Delete every object under `key`, then its folders, innermost first.

        Stores with real folders (SeaweedFS's filer) keep an emptied folder, which a listing
        would show as a version forever; deleting its "folder/" key removes it. On AWS those
        keys do not exist and the deletes are no-ops.
        """
        path = self._path(key)
        with self._errors(f"removing {key}"):
            try:
                found = self.fs.find(path, withdirs=True, detail=True)
            except FileNotFoundError:
                found = {}
            folders = sorted((p for p, info in found.items() if info.get("type") == "directory"),
                             key=len, reverse=True)
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=True)
            for folder in [*folders, path]:
                with contextlib.suppress(FileNotFoundError, OSError):
                    self.fs.rm_file(folder.rstrip("/") + "/")

    def remove(self, key: str) -> None:
        with self._errors(f"removing {key}"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(key))

    def make_dir(self, key: str) -> None:
        """Object stores have no folders: a version exists once its first object does."""

    def sha256(self, key: str) -> str:
        with self.open(key) as fh:
            return sha256_stream(fh)


def filesystem(protocol: str, url: str) -> Any:
    """A fresh fsspec filesystem for `protocol`, with twinq's timeouts and retries and no
    listing cache (CURRENT and version lists must be read fresh).

    Raises:
        StoreError: no filesystem package for the protocol (gcsfs for gs://), or a bad timeout.
    """
    import fsspec

    options: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        try:
            timeout = float(os.environ.get(TIMEOUT_ENV) or 20)
        except ValueError:
            raise StoreError(f"{TIMEOUT_ENV} must be a number of seconds") from None
        options["config_kwargs"] = {"connect_timeout": timeout, "read_timeout": timeout,
                                    "retries": {"max_attempts": _ATTEMPTS, "mode": "standard"}}
    try:
        fs = fsspec.filesystem(protocol, **options)
    except (ImportError, ValueError) as exc:
        extra = " (pip install 'twinq[gcs]')" if protocol in ("gs", "gcs") else ""
        raise StoreError(f"{url}: no filesystem for {protocol}://: {one_line(exc)}{extra}") from exc
    if hasattr(fs, "retries"):
        fs.retries = 1  # botocore retries (_ATTEMPTS); s3fs's own loop would add 5 more
    return fs


def expand_url(pattern: str) -> list[str]:
    """The objects a URL glob (`s3://bucket/corpus/*.jsonl`) matches, sorted, as URLs; a URL
    without wildcards, if it exists. Corpus files are read through the same layer as roots, so
    one set of credentials serves both."""
    protocol, _, path = pattern.partition("://")
    fs = filesystem(protocol, pattern)
    try:
        if any(c in path for c in "*?["):
            found = sorted(fs.glob(path))
        else:
            found = [path] if fs.isfile(path) else []
    except Exception as exc:  # botocore/aiohttp raise assorted types
        raise StoreError(f"{pattern}: cannot list: {type(exc).__name__}: {one_line(exc)}") from exc
    return [f"{protocol}://{p}" for p in found]


def open_url(url: str) -> IO[bytes]:
    """A store object (`s3://bucket/corpus.jsonl`) opened for binary reading."""
    protocol, _, path = url.partition("://")
    return filesystem(protocol, url).open(path, "rb")


def _precondition_failed(exc: BaseException) -> bool:
    """s3fs reports HTTP 412 as OSError(EINVAL, "...pre-conditions...did not hold"); gcsfs as
    an HttpError with code 412. Look through the chain for either."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if "412" in text or "PreconditionFailed" in text or "pre-condition" in text.lower():
            return True
        if getattr(exc, "code", None) == 412:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False
