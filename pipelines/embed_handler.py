"""Beam `ModelHandler` around a sentence-transformers bi-encoder.

`load_model` only loads (once per worker process: `index_transforms.EmbedBatches` caches it
under `model_key`); `run_inference` only encodes. The build batches by a GroupByKey
(`EmbedBatches`), not RunInference: the DaskRunner drops BatchElements' last batch of a bundle.

Less padding comes from large batches, not from Beam's length buckets: `encode` sorts a batch by
length before it cuts sub-batches, so a Beam batch of 1,024 pads about as little as a sort of the
whole corpus (measured: 248 texts/s, against 170 for batches of 128 and 246 for one global sort).
Beam buckets by length only on its stateful batching path (`max_batch_duration_secs`), which
moves DirectRunner onto its slower bundle-based executor: the whole build got slower, and an
incremental one waited out the buffering deadline (benchmarks/bench_index.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from twinq.shared.models import (ENCODE_BATCH_SIZE, encode_normalised, load_bi_encoder,
                                 resolve_model, set_threads)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

BATCH_SIZE = 1024
"""Texts per Beam batch: enough for `encode`'s own length sort to remove most padding."""


class EmbedHandler(ModelHandler[str, PredictionResult, "SentenceTransformer"]):
    """Embed question texts into L2-normalised float32 vectors."""

    def __init__(
        self,
        model: str | None = None,
        *,
        threads: int | None = None,
        backend: str = "torch",
        min_batch_size: int = BATCH_SIZE,
        max_batch_size: int = BATCH_SIZE,
        encode_batch_size: int = ENCODE_BATCH_SIZE,
        progress_total: int | None = None,
    ) -> None:
        """
        Args:
            model: A local path, hub name, or None for the bundled all-MiniLM-L6-v2.
            threads: Torch threads per SDK process. Defaults to torch's choice.
            backend: A concrete backend: "torch", "onnx" (onnxruntime int8), "onnx-fp32" or
                "openvino" (see `twinq.shared.models`). The build passes the one it resolved
                "auto" to in the driver, so that every worker embeds alike. Defaults to "torch".
            min_batch_size: Smallest batch Beam forms (but for a bundle's last). Defaults to
                `BATCH_SIZE`: a fixed size, as an offline job wants.
            max_batch_size: Largest batch Beam forms. Defaults to `BATCH_SIZE`.
            encode_batch_size: Sub-batch size inside `encode`, after its length sort.
                Defaults to `ENCODE_BATCH_SIZE`.
            progress_total: Expected number of texts, for progress lines with an ETA.
        """
        if min_batch_size > max_batch_size:
            raise ValueError(f"min_batch_size ({min_batch_size}) > max_batch_size ({max_batch_size})")
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size)
        self._model = model
        self._threads = threads
        self._backend = backend
        self._encode_batch_size = encode_batch_size
        self._progress_total = progress_total
        self._done = 0
        self._started = 0.0
        self._last_log = 0.0

    def load_model(self) -> SentenceTransformer:
        set_threads(self._threads)
        return load_bi_encoder(self._model, backend=self._backend)

    def run_inference(
        self,
        batch: Sequence[str],
        model: SentenceTransformer,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        start = time.perf_counter()
        vectors = encode_normalised(model, batch, self._encode_batch_size)
        self._report(len(batch), start)
        return [PredictionResult(text, vec.copy(), self.model_id())
                for text, vec in zip(batch, vectors)]

    def model_key(self) -> tuple[str | None, str, int | None]:
        """What `load_model` loads: model, backend and threads (a per-process cache's key)."""
        return self._model, self._backend, self._threads

    def model_id(self) -> str:
        return resolve_model(self._model)[1]

    def get_metrics_namespace(self) -> str:
        return "twinq_embed"

    def _report(self, n: int, batch_start: float) -> None:
        """Progress lines every ~5 s: texts embedded in this process, rate and ETA.

        The clock starts when the first batch starts: started when it ended, a corpus embedded
        in one batch divided its size by nothing and printed 385000000000/s.
        """
        now = time.perf_counter()
        self._started = self._started or batch_start
        self._done += n
        if now - self._last_log < 5:
            return
        self._last_log = now
        elapsed = now - self._started
        if elapsed <= 0:  # a clock too coarse to time this batch: no rate, no ETA
            log.info("embedded %d texts", self._done)
        elif self._progress_total:
            rate = self._done / elapsed
            left = max(self._progress_total - self._done, 0)
            log.info("embedded %d/~%d texts (%.0f/s, ETA %.0fs)", self._done, self._progress_total,
                     rate, left / rate)
        else:
            log.info("embedded %d texts (%.0f/s)", self._done, self._done / elapsed)
