"""Open a published snapshot together with the bi-encoder that embeds its queries.

A snapshot's vectors are only comparable with query vectors from the model that built it (or
one of the same dimension that the operator chose with ``--model``). Every reader opens it
here, so every reader checks that: the worker's snapshot holder, `twinq search`, the
evaluators and training's fusion fit.

Example:
    >>> opened = open_snapshot("/srv/twinq")                        # doctest: +SKIP
    >>> vectors = encode_normalised(opened.bi_encoder, ["how do I reset my password?"])
    >>> hits = search_shards(opened.snapshot, vectors, k=10)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twinq.shared.errors import SnapshotInvalid
from twinq.shared.models import load_bi_encoder, resolve_model
from twinq.shared.snapshot import load_snapshot

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from twinq.shared.onnx_backend import OnnxBiEncoder
    from twinq.shared.snapshot import Snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenedSnapshot:
    """A snapshot and the bi-encoder that matches it (checked), to be used and swapped as one.

    Attributes:
        snapshot: The loaded, validated snapshot.
        bi_encoder: The model that embeds queries for it.
        bi_encoder_name: The model's stable name (`resolve_model`), as replies report it.
    """

    snapshot: Snapshot
    bi_encoder: SentenceTransformer | OnnxBiEncoder
    bi_encoder_name: str


def check_dimension(snapshot: Snapshot, bi_encoder: Any, name: str) -> None:
    """Refuse a bi-encoder whose vectors are not of the snapshot's dimension.

    Raises:
        SnapshotInvalid: in one line naming the version, the model and both dimensions.
    """
    dim = bi_encoder.get_embedding_dimension()
    held = snapshot.manifest["model"]["dimension"]
    if dim != held:
        raise SnapshotInvalid(f"{snapshot.version}: model {name} gives {dim}-dimensional vectors, "
                              f"the snapshot holds {held}")


def open_snapshot(root: str | Path, version: str | None = None, *, model: str | None = None,
                  backend: str = "torch", checksums: bool = True,
                  load_encoder: Callable[[str], Any] | None = None,
                  logger: logging.Logger | logging.LoggerAdapter[Any] | None = None
                  ) -> OpenedSnapshot:
    """Load the published (or the named) version and its bi-encoder, and check they agree.

    Args:
        root: Snapshot root.
        version: A version to open instead of the published one. Defaults to None.
        model: The bi-encoder to use instead of the one named in the manifest (a path, a hub
            name or a bundled alias); a different one is logged as a warning. Defaults to None.
        backend: Encoder backend for `load_bi_encoder`. Defaults to "torch".
        checksums: Verify the files' checksums. Defaults to True.
        load_encoder: Called with the stable model name to get the model, instead of
            `load_bi_encoder(name, backend=backend)` (the worker reuses a loaded one).
            Defaults to None.
        logger: Where the model-mismatch warning goes. Defaults to this module's.

    Returns:
        The snapshot with its checked bi-encoder.

    Raises:
        SnapshotNotFound: nothing is published, or the version does not exist.
        SnapshotInvalid: the version fails its checks, or the model's dimension is not the
            snapshot's.
        ModelLoadError: the model cannot be loaded.
    """
    snapshot = load_snapshot(root, version, checksums=checksums)
    built_with = snapshot.manifest["model"]["name"]
    wanted = resolve_model(model)[1] if model else built_with
    if wanted != built_with:
        (logger or log).warning("snapshot %s was built with %s but %s is used (--model)",
                                snapshot.version, built_with, wanted)
    encoder = (load_encoder(wanted) if load_encoder is not None
               else load_bi_encoder(wanted, backend=backend))
    check_dimension(snapshot, encoder, wanted)
    return OpenedSnapshot(snapshot, encoder, wanted)
