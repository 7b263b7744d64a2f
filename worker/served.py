"""The served snapshot: load, validate and swap a snapshot together with its bi-encoder.

A background thread polls `CURRENT`. A new version is loaded and validated (checksums, shard
counts, and the bi-encoder's vector dimension against the manifest's) beside the served one;
the consumer swaps it in between batches with `swap_pending()`, so one batch never mixes
versions. A version that fails is refused, the old one keeps serving, the refusal is counted
at most once per `RETRY_FAILED_VERSION_S`, and each distinct error is logged once.

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
from typing import TYPE_CHECKING, Any

from twinq.shared.errors import SnapshotNotFound, TwinqError
from twinq.shared.models import encode_normalised, load_bi_encoder
from twinq.shared.opened_snapshot import OpenedSnapshot, open_snapshot
from twinq.shared.snapshot import age_seconds, current_version
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

    def start(self, *, watch: bool = True) -> None:
        """Serve the published version, if it loads, then watch `CURRENT` from a thread.

        A missing or invalid snapshot does not stop the start: the worker answers `not_ready`
        until a valid version is published.
        """
        self.check_for_update()
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
        except Exception as exc:  # any bad CURRENT is a counted refusal, never a watcher crash
            self._refuse("CURRENT", exc)
            return None
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
        root = self.settings.root
        assert root is not None  # checked in __init__
        opened = open_snapshot(root, version, model=self.settings.model,
                               backend=self.settings.backend, load_encoder=self._encoder_for,
                               logger=self.log)
        return opened

    def _encoder_for(self, name: str) -> SentenceTransformer:
        """The bi-encoder `name`: the served or pending one when it is the same model, the one
        given at construction (tests), else loaded and warmed up."""
        current = self._served or self._pending
        if current is not None and current.bi_encoder_name == name:
            return current.bi_encoder
        if self._given_bi_encoder is not None:
            return self._given_bi_encoder
        start = time.perf_counter()
        model = load_bi_encoder(name, backend=self.settings.backend)
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
        if served is None:
            return {"version": None, "age_s": None, "rows": 0}
        return {"version": served.snapshot.version, "age_s": age_seconds(served.snapshot),
                "rows": served.snapshot.rows}
