"""Open a published snapshot together with the bi-encoder that embeds its queries.

A snapshot's vectors are only comparable with query vectors from the model that built it (or
one of the same dimension that the operator chose with ``--model``). Every reader opens it
here, so every reader checks that: the worker's snapshot holder, `twinq search`, the
evaluators and training's fusion fit. The same holds for the backend: int8 and fp32 vectors are
never mixed, so the `auto` backend embeds queries in the backend the manifest records (torch for
a manifest without one), and any other backend must be that one. int8 vectors also carry the
quantisation recipe they were made with (`int8_recipe`): queries always use today's, so a
snapshot from an older recipe is served with a warning until it is rebuilt, and a build never
reuses its vectors.

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
from twinq.shared.models import backend_of, load_bi_encoder, resolve_model
from twinq.shared.onnx_backend import RECIPE_VERSION, stale_int8_recipe
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
        bi_encoder_backend: The concrete backend it runs in: the snapshot's own.
    """

    snapshot: Snapshot
    bi_encoder: SentenceTransformer | OnnxBiEncoder
    bi_encoder_name: str
    bi_encoder_backend: str = "torch"


def snapshot_backend(snapshot: Snapshot) -> str:
    """The backend the snapshot's vectors were embedded with; torch for an old manifest."""
    return str(snapshot.manifest["model"].get("backend") or "torch")


def query_backend(snapshot: Snapshot, backend: str) -> str:
    """The backend to embed queries for `snapshot` with: its own for "auto", else `backend`.

    Raises:
        SnapshotInvalid: `backend` is not the one the snapshot was built with, in one line.
    """
    built_with = snapshot_backend(snapshot)
    if backend in ("auto", built_with):
        return built_with
    raise SnapshotInvalid(f"{snapshot.version}: its vectors were embedded with the {built_with} "
                          f"backend, not {backend} (vectors of two backends never mix): set backend to "
                          f"auto or {built_with}, or rebuild with --backend {backend}")


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
                  backend: str = "auto", checksums: bool = True,
                  load_encoder: Callable[[str, str], Any] | None = None,
                  logger: logging.Logger | logging.LoggerAdapter[Any] | None = None
                  ) -> OpenedSnapshot:
    """Load the published (or the named) version and its bi-encoder, and check they agree.

    Args:
        root: Snapshot root.
        version: A version to open instead of the published one. Defaults to None.
        model: The bi-encoder to use instead of the one named in the manifest (a path, a hub
            name or a bundled alias); a different one is logged as a warning. Defaults to None.
        backend: Encoder backend: "auto" (the default) takes the one the manifest records;
            any other must be that one.
        checksums: Verify the files' checksums. Defaults to True.
        load_encoder: Called with the stable model name and the concrete backend to get the
            model, instead of `load_bi_encoder(name, backend=backend)` (the worker reuses a
            loaded one). Defaults to None.
        logger: Where the model-mismatch warning goes. Defaults to this module's.

    Returns:
        The snapshot with its checked bi-encoder.

    Raises:
        SnapshotNotFound: nothing is published, or the version does not exist.
        SnapshotInvalid: the version fails its checks, the model's dimension is not the
            snapshot's, or `backend` is not the snapshot's.
        ModelLoadError: the model cannot be loaded.
    """
    snapshot = load_snapshot(root, version, checksums=checksums)
    built_with = snapshot.manifest["model"]["name"]
    wanted = resolve_model(model)[1] if model else built_with
    if wanted != built_with:
        (logger or log).warning("snapshot %s was built with %s but %s is used (--model)",
                                snapshot.version, built_with, wanted)
    concrete = query_backend(snapshot, backend)
    old = stale_int8_recipe(snapshot.manifest["model"])  # the manifest's backend is `concrete`
    if old is not None:
        (logger or log).warning(
            "snapshot %s: its vectors were made with int8 recipe %d, queries now with recipe %d; "
            "scores differ slightly until the next `twinq index` rebuilds it",
            snapshot.version, old, RECIPE_VERSION)
    encoder = (load_encoder(wanted, concrete) if load_encoder is not None
               else load_bi_encoder(wanted, backend=concrete))
    check_dimension(snapshot, encoder, wanted)
    return OpenedSnapshot(snapshot, encoder, wanted, concrete)
