"""The snapshot format: layout, manifest, validation, atomic publish, rollback and gc.

    ROOT/CURRENT                    the published version; replaced by compare-and-swap
    ROOT/HISTORY                    published versions, oldest first (for rollback)
    ROOT/snapshots/<version>/       manifest.json, shard-NNNNN.faiss, shard-NNNNN.parquet,
                                    rejects.jsonl

ROOT is a local folder or an object-store URL (`s3://bucket/prefix`, `gs://...`): the root's
own files go through `twinq.shared.store`, so everything here works on both. Shards are loaded
from a local folder: the root's own for a local root, a verified download for a store
(`twinq.shared.snapshot_sync`).

A version is complete only when its manifest exists and validates; nothing else is ever
published or served.

About 520 lines, past the style guide's ~350, on purpose: the format is one contract, and its
write side, read side and checks change together; split, a change to the layout would have to
be made in three files at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twinq.shared.errors import (BadInput, ShardMismatch, SnapshotCorrupt, SnapshotInvalid,
                           SnapshotNotFound, one_line)
from twinq.shared.snapshot_schema import check_manifest, plain_file_name, schema
from twinq.shared.snapshot_sync import default_cache_dir, sync_version
from twinq.shared.store import LocalStore, ObjectStore, PublishConflict, is_remote, open_store

if TYPE_CHECKING:
    import faiss
    import pyarrow as pa

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
HISTORY = "HISTORY"
SNAPSHOTS = "snapshots"
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
BUILDING = "BUILDING"
SERVE_COLUMNS = ["id", "ids", "text", "metadata"]
_VERSION = re.compile(r"[0-9]{8}T[0-9]{6}Z(-[0-9]+)?")
"""Matched with `fullmatch`, ASCII digits only: `$` would let "20261128T031500Z\n" through."""
CANARY_MIN_RANK1 = {"exact": 0.99, "compressed": 0.90}
"""Share of canary rows that must find themselves at rank 1: exact/HNSW vs. quantised indexes."""


@dataclass
class Shard:
    """One loaded shard: its FAISS index and the served columns of its Parquet file."""

    name: str
    index: faiss.Index
    table: pa.Table

    def row(self, i: int) -> dict[str, Any]:
        return {c: self.table.column(c)[i].as_py() for c in SERVE_COLUMNS}


@dataclass
class Snapshot:
    """A loaded, validated snapshot, ready to search."""

    version: str
    path: Path
    manifest: dict[str, Any]
    shards: list[Shard]

    @property
    def rows(self) -> int:
        return sum(s.index.ntotal for s in self.shards)

    @property
    def created_at(self) -> float:
        return datetime.fromisoformat(self.manifest["created_at"]).timestamp()


def check_version(version: str) -> str:
    """Refuse anything but a timestamp name, so that '../x' can never escape the root."""
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise BadInput(f"invalid snapshot version {version!r} (expected e.g. 20261128T031500Z)")
    return version


def version_key(version: str) -> str:
    """The version's folder, relative to the root (a key prefix in an object store)."""
    return f"{SNAPSHOTS}/{check_version(version)}"


def snapshots_dir(root: str | Path) -> Path:
    """The versions folder of a local root."""
    return Path(root) / SNAPSHOTS


def version_dir(root: str | Path, version: str) -> Path:
    """A version's folder under a local root (a store root has no local folder: see
    `twinq.shared.snapshot_sync`)."""
    if is_remote(root):
        raise BadInput(f"{root}: a store root has no local version folder")
    return snapshots_dir(root) / check_version(version)


def shard_files(i: int) -> tuple[str, str]:
    return f"shard-{i:05d}.faiss", f"shard-{i:05d}.parquet"


def new_version(root: str | Path, now: datetime | None = None) -> str:
    """A sortable UTC timestamp name that does not exist yet under `root`."""
    base = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    taken = set(open_store(root).list(SNAPSHOTS))
    version, n = base, 1
    while version in taken:
        version, n = f"{base}-{n}", n + 1
    return version


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mark_building(root: str | Path, version: str) -> None:
    """Claim a new version for a running build, so that gc leaves it alone."""
    store = open_store(root)
    if store.list(version_key(version)):
        raise FileExistsError(f"{version_key(version)} exists already")
    store.make_dir(version_key(version))
    store.write_bytes(f"{version_key(version)}/{BUILDING}",
                      json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())


def abandon_build(root: str | Path, version: str) -> None:
    """Drop a failed build's claim: what it wrote stays, unpublished, until `gc` removes it."""
    open_store(root).remove(f"{version_key(version)}/{BUILDING}")


def _build_alive(store: LocalStore | ObjectStore, version: str) -> bool:
    try:
        info = json.loads(store.read_bytes(f"{version_key(version)}/{BUILDING}") or b"")
    except (OSError, ValueError, RecursionError, SnapshotCorrupt):
        return False
    if not isinstance(info, dict):
        return False
    if info.get("host") != socket.gethostname():
        return True  # another machine's build: we cannot tell, so keep it
    try:
        os.kill(int(info["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError):
        return False
    except PermissionError:
        return True
    return True


def write_shard(path: Path, i: int, table: pa.Table, key: str, reason: str, params: str
                ) -> dict[str, Any]:
    """Write one shard's Parquet file and FAISS index; return its manifest entry."""
    import faiss
    import numpy as np
    import pyarrow.parquet as pq

    from twinq.shared.index_choice import build_index

    index_file, data_file = shard_files(i)
    # No dictionary for the float vectors: Parquet would try one first and, on small shards,
    # keep pages of it (2,323 bytes/row at 500 rows instead of ~1,420; docs/scaling.md).
    pq.write_table(table, path / data_file, compression="zstd",
                   use_dictionary=[c for c in table.column_names if c != "embedding"])
    vectors = embeddings_of(table)
    index = build_index(vectors, key)
    faiss.write_index(index, str(path / index_file))
    return {
        "name": f"shard-{i:05d}", "rows": table.num_rows, "index_file": index_file,
        "data_file": data_file, "faiss_factory": key, "factory_reason": reason,
        "search_params": params,
        "sha256": {"index": sha256_file(path / index_file), "data": sha256_file(path / data_file)},
    }


def upload_shard(root: str | Path, version: str, folder: Path, entry: dict[str, Any]) -> None:
    """Put a shard's two files, written by `write_shard` into `folder`, under the version in
    `root` (nothing to do when `folder` is the version's own local folder)."""
    store = open_store(root)
    for name in (entry["index_file"], entry["data_file"]):
        store.put_file(folder / name, f"{version_key(version)}/{name}")


def embeddings_of(table: pa.Table) -> Any:
    """The `embedding` column as a contiguous float32 matrix."""
    import numpy as np

    column = table.column("embedding").combine_chunks()
    dim = len(column[0]) if len(column) else 0
    flat = column.values.to_numpy(zero_copy_only=False) if len(column) else np.zeros(0, np.float32)
    return np.ascontiguousarray(flat.reshape(-1, dim) if dim else flat.reshape(0, 0), dtype=np.float32)


def write_manifest(root: str | Path, version: str, manifest: dict[str, Any]) -> None:
    """Write the manifest that completes a version; one that readers would refuse is never
    written (`check_manifest`)."""
    check_manifest(manifest, version)
    store = open_store(root)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    store.write_bytes(f"{version_key(version)}/{MANIFEST}", text.encode())
    store.remove(f"{version_key(version)}/{BUILDING}")


def _decode(data: bytes | None, label: str) -> str | None:
    """A small file of the root (CURRENT, HISTORY, a manifest) as text, or None when absent.

    Raises:
        SnapshotCorrupt: the file is not UTF-8.
    """
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start:exc.start + 1]
        raise SnapshotCorrupt(f"{label}: not UTF-8 text (byte {byte!r} at offset "
                              f"{exc.start})") from exc


def _read_text(path: Path, label: str) -> str | None:
    """A local file as text, or None when absent (see `_decode`)."""
    return _decode(LocalStore(path.parent).read_bytes(path.name), label)


def parse_manifest(text: str | None, version: str) -> dict[str, Any]:
    """A manifest's text, fully checked (`check_manifest`).

    Raises:
        SnapshotInvalid: no manifest yet (an incomplete build).
        SnapshotCorrupt: the manifest is not JSON or breaks the schema.
    """
    if text is None:
        raise SnapshotInvalid(f"{version}: no manifest (incomplete build)")
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SnapshotCorrupt(f"{version}/{MANIFEST}: not valid JSON: {one_line(exc)}") from exc
    return check_manifest(manifest, version)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the local version folder `path` (see `parse_manifest`)."""
    return parse_manifest(_read_text(path / MANIFEST, f"{path.name}/{MANIFEST}"), path.name)


def read_manifest_at(root: str | Path, version: str) -> dict[str, Any]:
    """The manifest of `version` under `root`, local or in a store (see `parse_manifest`).

    Raises:
        SnapshotNotFound: the version does not exist under `root`.
    """
    store = open_store(root)
    key = version_key(version)
    data = store.read_bytes(f"{key}/{MANIFEST}")
    if data is None and not store.exists(key):
        raise SnapshotNotFound(f"snapshot {version} not found under {store.url}")
    return parse_manifest(_decode(data, f"{version}/{MANIFEST}"), version)


def _member(path: Path, name: Any) -> Path:
    """A file of the version folder `path`, as its manifest names it: a plain file name only,
    so that a hostile manifest ("../../x", "/etc/x") cannot make a worker read outside it."""
    if not plain_file_name(name):
        raise SnapshotCorrupt(f"{path.name}: manifest names {name!r:.80}, not a file of the "
                              "version folder")
    return path / name


def _open_shard(path: Path, entry: dict[str, Any], dim: int, *, mmap: bool, checksums: bool
                ) -> Shard:
    """Load one shard of a checked manifest, refusing files that are missing, altered, of
    another dimension or with other column types than the snapshot schema's."""
    import faiss
    import pyarrow.parquet as pq

    from twinq.shared.index_choice import apply_search_params

    index_path = _member(path, entry["index_file"])
    data_path = _member(path, entry["data_file"])
    for file, kind in ((index_path, "index"), (data_path, "data")):
        try:
            if not file.is_file():
                raise SnapshotCorrupt(f"{path.name}/{file.name}: missing")
            if checksums and sha256_file(file) != entry["sha256"][kind]:
                raise SnapshotCorrupt(f"{path.name}/{file.name}: checksum mismatch "
                                      "(corrupted on disk)")
        except OSError as exc:
            raise SnapshotCorrupt(f"{path.name}/{file.name}: unreadable: "
                                  f"{one_line(exc.strerror or exc)}") from exc
    try:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(index_path), flags)
        table = pq.read_table(data_path, columns=SERVE_COLUMNS, memory_map=True)
        table.validate(full=True)  # UTF-8 too: a served row is decoded at query time
        apply_search_params(index, entry.get("search_params") or "")
    except Exception as exc:  # faiss and pyarrow raise assorted types
        raise SnapshotCorrupt(f"{path.name}/{entry['name']}: cannot load: {one_line(exc)}") from exc
    wanted = schema(dim)
    for name in SERVE_COLUMNS:
        if not table.schema.field(name).type.equals(wanted.field(name).type):
            raise SnapshotCorrupt(f"{path.name}/{data_path.name}: column {name} is "
                                  f"{table.schema.field(name).type}, not {wanted.field(name).type}")
    if index.d != dim:
        raise SnapshotCorrupt(f"{path.name}/{index_path.name}: {index.d}-dimensional vectors, "
                              f"the manifest says {dim}")
    if index.ntotal != table.num_rows or table.num_rows != entry["rows"]:
        raise ShardMismatch(f"{path.name}/{entry['name']}: index has {index.ntotal} vectors, "
                            f"parquet {table.num_rows} rows, manifest {entry['rows']}")
    return Shard(entry["name"], index, table)


def _open_shards(path: Path, manifest: dict[str, Any], *, mmap: bool, checksums: bool
                 ) -> list[Shard]:
    dim = manifest["model"]["dimension"]
    return [_open_shard(path, e, dim, mmap=mmap, checksums=checksums) for e in manifest["shards"]]


def run_canary(path: Path, manifest: dict[str, Any], sample: int = 200, seed: int = 0
               ) -> dict[str, Any]:
    """Self-query `sample` random rows per snapshot: each should be its own top hit."""
    import faiss
    import numpy as np
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    total = sum(e["rows"] for e in manifest["shards"])
    found = asked = 0
    exact = True
    for entry in manifest["shards"]:
        if entry["rows"] == 0:
            continue
        n = max(1, round(sample * entry["rows"] / max(total, 1)))
        rows = np.sort(rng.choice(entry["rows"], min(n, entry["rows"]), replace=False))
        vectors = embeddings_of(pq.read_table(_member(path, entry["data_file"]),
                                              columns=["embedding"]))[rows]
        index = faiss.read_index(str(_member(path, entry["index_file"])))
        from twinq.shared.index_choice import apply_search_params

        apply_search_params(index, entry.get("search_params", ""))
        scores, ids = index.search(vectors, 2)
        # A row "finds itself" at rank 1 if it is the top id or ties the top score exactly.
        hit = (ids[:, 0] == rows) | ((ids[:, 1] == rows) & np.isclose(scores[:, 0], scores[:, 1]))
        found += int(hit.sum())
        asked += len(rows)
        exact &= not ("PQ" in entry["faiss_factory"] or "SQ" in entry["faiss_factory"])
    rate = found / asked if asked else 1.0
    need = CANARY_MIN_RANK1["exact" if exact else "compressed"]
    return {"asked": asked, "rank1": found, "rank1_rate": round(rate, 4), "required": need,
            "passed": rate >= need}


def validate(path: Path, manifest: dict[str, Any], *, canary: int = 200) -> dict[str, Any]:
    """Check counts, checksums, that every shard loads, and the self-query canary.

    Raises:
        SnapshotInvalid: on the first problem found.
    """
    rows = sum(shard.index.ntotal for shard in _open_shards(path, manifest, mmap=True,
                                                            checksums=True))
    if rows != manifest["corpus"]["rows_indexed"]:
        raise SnapshotInvalid(f"{path.name}: shards hold {rows} rows, manifest says "
                              f"{manifest['corpus']['rows_indexed']}")
    report = run_canary(path, manifest, canary) if canary else {"asked": 0, "passed": True}
    if not report["passed"]:
        raise SnapshotInvalid(f"{path.name}: canary found {report['rank1']}/{report['asked']} rows "
                              f"at rank 1, below {report['required']:.0%}")
    return report


def load_snapshot(root: str | Path, version: str | None = None, *, mmap: bool = True,
                  checksums: bool = True, cache_dir: Path | None = None) -> Snapshot:
    """Open the published (or the named) complete version for serving.

    A store root's version is first downloaded into `cache_dir` (default: the user's cache
    folder), every file checked against its manifest checksum (`sync_version`).

    Raises:
        SnapshotNotFound: nothing is published, or the version does not exist.
        SnapshotInvalid: the version is incomplete or fails its checks.
    """
    version = version or current_version(root)
    if version is None:
        raise SnapshotNotFound(f"no snapshot published under {root}")
    if is_remote(root):
        path = sync_version(root, version, cache_dir or default_cache_dir(), keep_all=True)
        checksums = False  # verified while downloading
    else:
        path = version_dir(root, version)
        if not path.is_dir():
            raise SnapshotNotFound(f"snapshot {version} not found under {root}")
    return load_version(path, mmap=mmap, checksums=checksums)


def load_version(path: Path, *, mmap: bool = True, checksums: bool = True) -> Snapshot:
    """Open the complete version in the local folder `path` (see `load_snapshot`)."""
    manifest = read_manifest(path)
    return Snapshot(path.name, path, manifest,
                    _open_shards(path, manifest, mmap=mmap, checksums=checksums))


def current_version(root: str | Path) -> str | None:
    """The published version named by CURRENT, or None when nothing is published.

    Raises:
        SnapshotCorrupt: CURRENT is unreadable, not UTF-8, or names no valid version.
    """
    text = _decode(open_store(root).read_bytes(CURRENT), CURRENT)
    version = (text or "").strip()
    if not version:
        return None
    try:
        return check_version(version)
    except BadInput as exc:
        raise SnapshotCorrupt(f"{CURRENT}: {exc}") from exc


def _history(store: LocalStore | ObjectStore) -> list[str]:
    """Published versions, oldest first; lines that are not version names are skipped."""
    text = _decode(store.read_bytes(HISTORY), HISTORY) or ""
    return [v for v in text.split() if _VERSION.fullmatch(v)]


def verify_files(root: str | Path, version: str, manifest: dict[str, Any]) -> None:
    """Every shard file of `version` is present and matches its manifest checksum.

    A local version is also loaded (FAISS and Parquet readers accept it); a store's files are
    hashed as they stream, without a copy on disk.

    Raises:
        SnapshotInvalid: a file is missing or altered.
    """
    if not is_remote(root):
        _open_shards(version_dir(root, version), manifest, mmap=True, checksums=True)
        return
    store = open_store(root)
    for entry in manifest["shards"]:
        for kind, name in (("index", entry["index_file"]), ("data", entry["data_file"])):
            key = f"{version_key(version)}/{name}"
            try:
                digest = store.sha256(key)
            except FileNotFoundError:
                raise SnapshotCorrupt(f"{version}/{name}: missing") from None
            if digest != entry["sha256"][kind]:
                raise SnapshotCorrupt(f"{version}/{name}: checksum mismatch (corrupted in the store)")


def publish(root: str | Path, version: str, *, record: bool = True, verify: bool = True) -> None:
    """Point CURRENT at a complete version, atomically. Workers pick it up between batches.

    CURRENT is replaced by compare-and-swap against the value read here: of two builds racing
    to publish, one wins and the other gets `PublishConflict` (see `twinq.shared.store`).

    Args:
        verify: check every file's checksum first; a build that has just validated the
            version skips it. Defaults to True.

    Raises:
        SnapshotNotFound / SnapshotInvalid: when the version is absent or incomplete.
        PublishConflict: another publisher changed CURRENT meanwhile; nothing was written.
    """
    store = open_store(root)
    manifest = read_manifest_at(root, version)
    if verify:
        verify_files(root, version, manifest)
    expected = store.read_bytes(CURRENT)
    history = _history(store) + [version] if record else []  # read first: fail before any write
    try:
        store.swap_bytes(CURRENT, (version + "\n").encode(), expected)
    except PublishConflict as exc:
        raise PublishConflict(f"{exc}: another build published first; {version} stays "
                              f"complete and unpublished (twinq index publish {version})") from exc
    if record:
        store.write_bytes(HISTORY, ("\n".join(history[-100:]) + "\n").encode())
    log.info("published %s", version)


def rollback(root: str | Path) -> str:
    """Publish the version that was published before the current one; return its name."""
    store = open_store(root)
    current = current_version(root)
    history = _history(store)
    while history and history[-1] == current:
        history.pop()
    for version in reversed(history):
        if version != current and store.exists(f"{version_key(version)}/{MANIFEST}"):
            publish(root, version, record=False)
            kept = history[: history.index(version) + 1]
            store.write_bytes(HISTORY, ("\n".join(kept) + "\n").encode())
            return version
    raise SnapshotNotFound("no earlier published snapshot to roll back to")


@dataclass(frozen=True)
class VersionInfo:
    version: str
    complete: bool
    published: bool
    rows: int | None
    created_at: str | None
    building: bool


def list_versions(root: str | Path) -> list[VersionInfo]:
    """Every version folder, oldest first, with whether it is complete and published."""
    current = current_version(root)
    store = open_store(root)
    infos = []
    for name in store.list(SNAPSHOTS):
        if not _VERSION.fullmatch(name):
            continue
        try:
            manifest = read_manifest_at(root, name)
            rows, created, complete = manifest["corpus"]["rows_indexed"], manifest["created_at"], True
        except (SnapshotInvalid, SnapshotNotFound):
            rows, created, complete = None, None, False
        infos.append(VersionInfo(name, complete, name == current, rows, created,
                                 not complete and _build_alive(store, name)))
    return infos


def gc(root: str | Path, keep: int) -> list[str]:
    """Delete old complete versions beyond the newest `keep`, and every abandoned incomplete one.

    The published version is never deleted, nor is a version whose build is still running.
    """
    if keep < 1:
        raise BadInput("gc --keep must be at least 1")
    infos = list_versions(root)
    complete = [i for i in infos if i.complete]
    keep_set = {i.version for i in complete[-keep:]} | {i.version for i in infos if i.published}
    store = open_store(root)
    removed = []
    for info in infos:
        if info.version in keep_set or info.building:
            continue
        store.remove_tree(version_key(info.version))
        removed.append(info.version)
    return removed


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def age_seconds(snapshot: Snapshot, clock: Any = time.time) -> float:
    return max(0.0, clock() - snapshot.created_at)
