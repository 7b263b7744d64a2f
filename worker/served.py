"""The served snapshot: load, validate and swap a snapshot together with its bi-encoder.

A background thread polls `CURRENT`. A new version is loaded and validated (checksums, shard
counts, the bi-encoder's vector dimension against the manifest's, and the backend: with the
default `auto` queries are embedded in the backend the snapshot was built with, and an explicit
backend other than that one is refused, since int8 and fp32 vectors never mix) beside the served one;
the consumer swaps it in between batches with `swap_pending()`, so one batch never mixes
versions. A version that fails is refused, the old one keeps serving, the refusal is counted
at most once per `RETRY_FAILED_VERSION_S`, and each distinct error is logged once.

A store root (`s3://...`) is served from a local cache: a new version is downloaded and every
file checked (`twinq.shared.snapshot_sync`), then loaded like a local one; the cache keeps the
served and the new version only. When the store does not answer, the worker keeps serving what
it has (at start, the newest cached version), says so once in the log, in `/readyz`'s detail
and in `twinq_snapshot_store_up`, and picks up again by itself at the next poll that succeeds.

Memory: FAISS maps only IVF indexes from disk (`IO_FLAG_MMAP` leaves their inverted lists on
disk, shared through the page cache); Flat and HNSW indexes are read into memory, and Parquet
columns are decoded into Arrow buffers. So between a load and its swap the worker holds two
copies of a Flat/HNSW snapshot: plan for twice its size at each hot reload.

Example:
    >>> holder = SnapshotHolder(settings)      # doctest: +SKIP
    >>> holder.start()                         # the published version, then a watcher
    >>> served = holder.served                 # what the engine answers with
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twinq.shared.errors import SnapshotNotFound, TwinqError
from twinq.shared.models import encode_normalised, load_bi_encoder
from twinq.shared.opened_snapshot import OpenedSnapshot, open_snapshot
from twinq.shared.snapshot import age_seconds, current_version
from twinq.shared.snapshot_sync import cache_root, cached_versions, default_cache_dir, sync_version
from twinq.shared.store import StoreError, is_remote, open_store
from twinq.worker.metrics import prefixed

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from twinq.shared.config import Settings
    from twinq.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

RETRY_FAILED_VERSION_S = 60.0
"""Seconds before a version that failed to load is tried again (its files may be repaired)."""


Served = OpenedSnapshot
"""What the holder serves: a snapshot with its checked bi-encoder, swapped as one."""


@dataclass
class StoreHealth:
    """Whether the snapshot store answered the last poll (always True for a local root)."""

    reachable: bool = True
    error: str | None = None
    since: float | None = None
    """Wall time of the first failed poll of the current outage."""


class SnapshotHolder:
    """Holds the served snapshot and the one loaded to replace it.

    Args:
        settings: Root, `model` override, backend and `reload_poll_s`.
        metrics: Where model loads, reloads and the snapshot gauges go. Defaults to none.
        bi_encoder: An already loaded bi-encoder (tests); its name is `settings.model` or the
            manifest's model name.
        worker_id: Prefix of log lines.

    Raises:
        SnapshotNotFound: no root is configured.
    """

    def __init__(self, settings: Settings, *, metrics: WorkerMetrics | None = None,
                 bi_encoder: SentenceTransformer | None = None, worker_id: str = "") -> None:
        if not settings.root:
            raise SnapshotNotFound("no snapshot root configured (--root or TWINQ_ROOT)")
        self.settings = settings
        self.metrics = metrics
        self.log = prefixed(log, worker_id or "-")
        self._given_bi_encoder = bi_encoder
        self._served: Served | None = None
        self._pending: Served | None = None
        self._failed: dict[str, float] = {}
        self._logged: set[tuple[str, str]] = set()
        self._warned_missing = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.remote = is_remote(settings.root)
        self.cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
        self._local_root: str | Path = (cache_root(self.cache_dir, open_store(settings.root).url)
                                        if self.remote else settings.root)
        self.store = StoreHealth()

    def start(self, *, watch: bool = True) -> None:
        """Serve the published version, if it loads, then watch `CURRENT` from a thread.

        A missing or invalid snapshot does not stop the start: the worker answers `not_ready`
        until a valid version is published. A store that does not answer does not either, when
        the cache holds a version to serve meanwhile.

        Raises:
            StoreError: the store cannot be read and the cache holds no version (exit 2).
        """
        self.check_for_update()
        if self._pending is None and not self.store.reachable:
            self._pending = self._from_cache()
        self.swap_pending()
        if watch:
            self._watcher = threading.Thread(target=self._watch, name="twinq-reload", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        """Stop the watcher. A load in progress is abandoned (the thread is a daemon): waiting
        for it could overrun the shutdown grace period."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=1.0)

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.reload_poll_s):
            try:
                self.check_for_update()
            except Exception:  # the watcher must outlive any one bad poll
                self.log.exception("snapshot watcher failed; will poll again")

    @property
    def served(self) -> Served | None:
        """The snapshot and bi-encoder answering now, or None before the first load."""
        return self._served

    @property
    def version(self) -> str | None:
        """The served snapshot version, or None."""
        served = self._served
        return served.snapshot.version if served else None

    @property
    def ready(self) -> bool:
        """True once a snapshot is served."""
        return self._served is not None

    def check_for_update(self) -> str | None:
        """Poll `CURRENT` once; load and validate a new version beside the served one.

        Returns:
            The version now pending a swap, or None.
        """
        try:
            version = current_version(self.settings.root)  # type: ignore[arg-type]
        except StoreError as exc:
            self._store_down(exc)
            return None
        except Exception as exc:  # any bad CURRENT is a counted refusal, never a watcher crash
            self._refuse("CURRENT", exc)
            return None
        self._store_up()
        if version is None:
            if self._served is None and not self._warned_missing:
                self._warned_missing = True
                self.log.warning("no snapshot published under %s; answering not_ready until "
                                 "one is", self.settings.root)
            return None
        if version in (self.version, self._pending and self._pending.snapshot.version):
            return None
        failed_at = self._failed.get(version)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_VERSION_S:
            return None
        try:
            served = self._load(version)
        except StoreError as exc:  # the download broke off: not the version's fault, retry soon
            self._store_down(exc)
            return None
        except Exception as exc:  # a version that cannot be served is refused, whatever broke
            self._refuse(version, exc)
            return None
        with self._lock:
            self._pending = served
        self.log.info("snapshot %s loaded and validated; swapping in after this batch", version)
        return version

    def _refuse(self, version: str, exc: Exception) -> None:
        """Count a failed load, and log each distinct error of a version once.

        A bad version is retried every `RETRY_FAILED_VERSION_S` (its files may be repaired) and
        a bad CURRENT is read at every poll: each retry counts in
        `twinq_reloads_total{result="failure"}` (at most once per retry period), but the same
        error is logged only the first time (`_logged`). An error that is not twinq's own is a
        bug: it is logged with its traceback, once.
        """
        now = time.monotonic()
        last = self._failed.get(version)
        if last is None or now - last >= RETRY_FAILED_VERSION_S:
            self._failed[version] = now
            if self.metrics:
                self.metrics.reloads.labels(result="failure").inc()
        if (version, str(exc)) in self._logged:
            self.log.debug("snapshot %s still refused: %s", version, exc)
            return
        self._logged.add((version, str(exc)))
        self.log.error("refused snapshot %s: %s; still serving %s", version, exc,
                       self.version or "nothing",
                       exc_info=not isinstance(exc, (TwinqError, OSError)))

    def _load(self, version: str) -> Served:
        """Open `version` (checksums verified) with its bi-encoder, reused when unchanged.

        Raises:
            SnapshotInvalid: the bi-encoder's vectors are not of the snapshot's dimension.
        """
        checksums = True
        if self.remote:  # download (verified) beside the served version; drop any older one
            sync_version(self.settings.root, version, self.cache_dir,  # type: ignore[arg-type]
                         keep=(self.version,) if self.version else ())
            checksums = False  # checked as the files arrived
        return open_snapshot(self._local_root, version, model=self.settings.model,
                             backend=self.settings.backend, checksums=checksums,
                             load_encoder=self._encoder_for, logger=self.log)

    def _from_cache(self) -> Served:
        """The newest cached version of the store root, for a start while the store is down.

        Raises:
            StoreError: the cache holds none (or none that loads).
        """
        for version in reversed(cached_versions(self.settings.root, self.cache_dir)):  # type: ignore[arg-type]
            try:
                served = open_snapshot(self._local_root, version, model=self.settings.model,
                                       backend=self.settings.backend,
                                       load_encoder=self._encoder_for, logger=self.log)
            except Exception as exc:  # a damaged cached copy: try an older one
                self._refuse(version, exc)
                continue
            self.log.warning("serving cached snapshot %s until %s answers", version,
                             self.settings.root)
            return served
        raise StoreError(f"{self.store.error}; and no cached version in {self.cache_dir} to "
                         "serve meanwhile")

    def _store_down(self, exc: StoreError) -> None:
        """Record an outage; log it once, and again only when it ends (`_store_up`)."""
        if self.store.reachable:
            self.store = StoreHealth(False, str(exc), time.time())
            if self.version is None:
                self.log.warning("%s; looking for a cached version to serve", exc)
            else:
                self.log.error("%s; still serving %s", exc, self.version)
        else:
            self.store.error = str(exc)
        if self.metrics:
            self.metrics.store_up.set(0)

    def _store_up(self) -> None:
        if not self.store.reachable:
            down_s = time.time() - (self.store.since or time.time())
            self.log.info("snapshot store %s answers again (after %.0f s)", self.settings.root,
                          down_s)
            self.store = StoreHealth()
        if self.metrics:
            self.metrics.store_up.set(1)

    def _encoder_for(self, name: str, backend: str) -> SentenceTransformer:
        """The bi-encoder `name` in the concrete `backend` (the snapshot's): the served or
        pending one when it is the same model in the same backend, the one given at
        construction (tests), else loaded and warmed up."""
        for current in (self._served, self._pending):
            if (current is not None and current.bi_encoder_name == name
                    and current.bi_encoder_backend == backend):
                return current.bi_encoder
        if self._given_bi_encoder is not None:
            return self._given_bi_encoder
        start = time.perf_counter()
        model = load_bi_encoder(name, backend=backend)
        # One throwaway encode: the first call pays for lazy initialisation (about a second on
        # a CPU), which must not land on the first user's request.
        encode_normalised(model, ["warm up"])
        if self.metrics:
            self.metrics.model_load.labels(model="bi_encoder").set(time.perf_counter() - start)
        return model

    def swap_pending(self) -> tuple[str | None, str] | None:
        """Serve the pending version, if any. Call only between batches.

        Returns:
            (old version, new version) when a swap happened, else None.
        """
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is None:
                return None
            old, self._served = self.version, pending
        snapshot = pending.snapshot
        if self.metrics:
            self.metrics.set_snapshot(snapshot.version, snapshot.rows,
                                      lambda: age_seconds(snapshot))
            if old is not None:
                self.metrics.reloads.labels(result="success").inc()
        self.log.info("now serving snapshot %s (%d rows; was %s)", snapshot.version,
                      snapshot.rows, old or "nothing")
        return old, snapshot.version

    def status(self) -> dict[str, Any]:
        """What the status page shows about the served snapshot."""
        served = self._served
        store = {"root": self.settings.root, "reachable": self.store.reachable,
                 "error": self.store.error, "down_since": self.store.since}
        if served is None:
            return {"version": None, "age_s": None, "rows": 0, "store": store}
        return {"version": served.snapshot.version, "age_s": age_seconds(served.snapshot),
                "rows": served.snapshot.rows, "store": store}
