"""Copy a store's snapshot version into a local cache, verified, keeping only a few on disk.

FAISS and the Parquet readers want local files (FAISS memory-maps only local ones), so a
worker serving from `s3://...` serves a verified local copy:

    CACHE/<store>/snapshots/<version>/            manifest.json and the shard files, verified
    CACHE/<store>/snapshots/.<version>.partial-*  a download in progress

So `CACHE/<store>` is itself a local snapshot root (without CURRENT): every reader of local
roots reads a cached version unchanged.

A version folder appears only complete: files are downloaded into a partial folder, each one
checked against the manifest's sha256, the manifest written last, and the folder renamed. A
corrupt or missing object in the store is refused, and nothing of it is kept.

This module depends on the store and the manifest schema only, not on `snapshot.py`, so that
the snapshot reader can use it without an import cycle.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from twinq.shared.errors import SnapshotCorrupt, SnapshotInvalid, SnapshotNotFound, one_line
from twinq.shared.snapshot_schema import check_manifest, plain_file_name
from twinq.shared.store import LocalStore, ObjectStore, open_store, sha256_stream

log = logging.getLogger(__name__)

_MANIFEST = "manifest.json"
_LOCK = ".lock"


def default_cache_dir() -> Path:
    """`$TWINQ_CACHE_DIR`, else `$XDG_CACHE_HOME/twinq`, else `~/.cache/twinq`."""
    if os.environ.get("TWINQ_CACHE_DIR"):
        return Path(os.environ["TWINQ_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "twinq"


def cache_root(cache_dir: Path, url: str) -> Path:
    """The local root caching the store root `url`: readable name plus a hash, so that two
    roots never share a folder."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url)[-60:]
    return cache_dir / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def shard_file_names(manifest: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(file name, checksum kind, expected sha256) of every shard file a manifest names."""
    files = []
    for entry in manifest["shards"]:
        for kind, field in (("index", "index_file"), ("data", "data_file")):
            name = entry[field]
            if not plain_file_name(name):
                raise SnapshotCorrupt(f"{manifest['version']}: manifest names {name!r:.80}, not a "
                                      "file of the version folder")
            files.append((name, kind, entry["sha256"][kind]))
    return files


def download_files(store: LocalStore | ObjectStore, prefix: str, manifest: dict[str, Any],
                   dest: Path) -> None:
    """Download every shard file of `manifest` from `prefix` into `dest`, checking each one.

    Raises:
        SnapshotCorrupt: a file is missing in the store or its checksum does not match.
    """
    version = manifest["version"]
    dest.mkdir(parents=True, exist_ok=True)
    for name, _, expected in shard_file_names(manifest):
        target = dest / name
        try:
            store.get_file(f"{prefix}/{name}", target)
        except FileNotFoundError:
            raise SnapshotCorrupt(f"{version}/{name}: missing in {store.url}") from None
        with target.open("rb") as fh:
            if sha256_stream(fh) != expected:
                raise SnapshotCorrupt(f"{version}/{name}: checksum mismatch (corrupted in the "
                                      "store or in transit)")


def sync_version(root: str | Path, version: str, cache_dir: Path, *,
                 keep: tuple[str, ...] = (), keep_all: bool = False) -> Path:
    """The local, verified copy of `version` of the store `root`; download it if needed.

    Afterwards the cache holds `version` and the versions named in `keep` (the one being
    served), nothing else: at most two versions on disk for a worker. `keep_all` prunes nothing
    (a one-off reader such as `twinq search` must not delete a worker's cached versions).

    Raises:
        SnapshotNotFound: the version is not in the store.
        SnapshotInvalid: it is incomplete, its manifest is corrupt, or a file fails its check.
        StoreError / StoreUnreachable: the store cannot be read.
    """
    store = open_store(root)
    base = cache_root(cache_dir, store.url) / "snapshots"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / _LOCK, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # workers sharing a cache sync one at a time
        return _sync_locked(store, base, version, None if keep_all else keep)


def _sync_locked(store: LocalStore | ObjectStore, base: Path, version: str,
                 keep: tuple[str, ...] | None) -> Path:
    folder = base / version
    if not (folder / _MANIFEST).is_file():
        prefix = f"snapshots/{version}"
        data = store.read_bytes(f"{prefix}/{_MANIFEST}")
        if data is None:
            if not store.list(prefix):
                raise SnapshotNotFound(f"snapshot {version} not found under {store.url}")
            raise SnapshotInvalid(f"{version}: no manifest (incomplete build)")
        try:
            manifest = check_manifest(json.loads(data.decode("utf-8")), version)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise SnapshotCorrupt(f"{version}/{_MANIFEST}: not valid JSON: {one_line(exc)}") from exc
        partial = base / f".{version}.partial-{uuid.uuid4().hex[:8]}"
        try:
            download_files(store, prefix, manifest, partial)
            (partial / _MANIFEST).write_bytes(data)
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        log.info("synced %s from %s into %s", version, store.url, folder)
    if keep is not None:
        prune(base, keep=(version, *keep))
    return folder


def prune(base: Path, keep: tuple[str, ...]) -> list[str]:
    """Remove cached versions not in `keep`, and partial downloads left by dead processes
    (the caller holds the cache's lock, so no other download is running)."""
    removed = []
    for path in sorted(base.iterdir()) if base.is_dir() else []:
        if path.name in keep or path.name == _LOCK:
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(path)
            removed.append(path.name)
    return removed


def cached_versions(root: str | Path, cache_dir: Path) -> list[str]:
    """Complete versions of `root` in the cache, oldest first (what a worker can serve offline)."""
    base = cache_root(cache_dir, open_store(root).url) / "snapshots"
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / _MANIFEST).is_file()
                  and not p.name.startswith("."))
