"""Run the bi-encoder and the cross-encoder with onnxruntime, in int8 by default.

Why this exists: on twinq's small CPUs, fp32 torch tops out near 250 real questions/s, and
sentence-transformers' own `backend="onnx"` export needs optimum, whose pins conflict with
transformers 5. So the models are exported here with `torch.onnx.export`, quantised with
onnxruntime's dynamic quantiser with one activation scale per row
(`twinq.shared.row_quantisation`), and served by a plain `InferenceSession`.

Exports are cached in `<model>/onnx/<kind>/` when the model folder is writable, else in
`~/.cache/twinq/onnx/<sha of the model path>/<kind>/`, and re-made only when the source
weights or the export recipe change (see `_fingerprint`). Example:
`OnnxBiEncoder.load(bundled_model_path()).encode(["How do I learn Python?"]).shape == (1, 384)`.
Each export is checked once against its fp32 graph on a fixed sample (`quantisation_check`);
the verdict is stored in meta.json, where `twinq.shared.models.resolve_backend` reads it.

About 400 lines, past the style guide's ~350, on purpose: export, quantisation, the cache key
and the two runtime wrappers must agree on one recipe (inputs, outputs, pooling), which is
easier to keep true in one file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from twinq.shared.errors import ModelLoadError

if TYPE_CHECKING:
    import onnxruntime as ort
    import torch

log = logging.getLogger(__name__)

Precision = Literal["int8", "fp32"]
Kind = Literal["bi-encoder", "cross-encoder"]

OPSET = 17
"""ONNX opset: 17 has LayerNormalization as one op and runs on every onnxruntime >= 1.14."""

RECIPE_VERSION = 3
"""Bump when the export or quantisation recipe changes, so that stale caches are re-made.
2: activations quantised per row (`twinq.shared.row_quantisation`), not per batch.
3: weights in 7 bits (``reduce_range``), so that no CPU's int8 kernel saturates."""

def recipe_fields(backend: str) -> dict[str, int]:
    """What a record of vectors or logits made in `backend` (a snapshot manifest's ``model``,
    training.json's ``serving_backend``) stores about the int8 recipe: its version for int8."""
    return {"int8_recipe": RECIPE_VERSION} if backend == "onnx" else {}


def stale_int8_recipe(record: Mapping[str, Any]) -> Any:
    """The older int8 recipe such a record names, or None when it is today's or not int8 (a
    record without one is from recipe 1). Why it matters: recipes compute other numbers (recipe
    1 scaled activations per batch, so its vectors sit at cosine ~0.99 from the same text
    embedded now; recipe 2's 8-bit weights saturate on CPUs without VNNI), and two recipes'
    outputs must not be mixed or fitted across."""
    if record.get("backend") != "onnx":
        return None
    recipe = record.get("int8_recipe") or 1
    return None if recipe == RECIPE_VERSION else recipe


INT8_RECIPE: dict[str, Any] = {"weight_type": "QInt8", "per_channel": True, "reduce_range": True,
                               "op_types": ["MatMul"], "activations": "per-row"}
"""How `onnxruntime.quantization.quantize_dynamic` is called, and why; then each activation's
scale is made per row (`twinq.shared.row_quantisation`), so that a row's result is the same in
any batch.

Measured with `benchmarks/bench_onnx.py --recipes` (bundled all-MiniLM-L6-v2, 2,000 real Quora
questions, one run; docs/performance.md): mean cosine to torch fp32 / speed vs onnx fp32 was
QInt8 per-channel 0.9944 / 2.07x, QInt8 per-tensor 0.9688 / 1.99x, QUInt8 per-channel
0.9945 / 0.93x, QUInt8 per-tensor 0.9855 / 0.93x (u8u8 has no fast VNNI kernel). QInt8
per-channel has the best quality among the recipes that are 2x faster; QUInt8 per-channel is
no better (+0.0001) and gains nothing over fp32. Only MatMul is quantised: the embedding Gathers
are lookups (no time to save) and quantising them lost a little quality. Those four were
compared with onnxruntime's per-batch activation scales; measured again with per-row scales
(recipe 2; docs/performance.md, session 17), QInt8 per-channel reached 0.9978 at 1.84x onnx
fp32 (QUInt8 per-channel 0.9980 at 1.02x, the per-tensor ones 0.9728 and 0.9890): per-row
scales cost 5 to 16% of the speed and cut the error against fp32
(`benchmarks/bench_batch_dependence.py`).

``reduce_range`` (recipe 3) keeps the weights in 7 bits, -64..64. On an x86 CPU without VNNI
(AVX2 only: AMD Zen 2 and 3, Intel before Cascade Lake), onnxruntime's uint8 x int8 kernel adds
pairs of products in 16 bits with saturation (``vpmaddubsw``): with 8-bit weights a pair can
reach 2 * 255 * 127 = 64,770 and is clipped to 32,767, so the same graph gives other, worse
numbers there than on a VNNI CPU (a hand-built MatMul gave -43 for 140; the demo reranker's
logit error against fp32 0.111 against 0.061, Spearman 0.985 against 0.995, measured on a Zen 3
EPYC). With 7-bit weights a pair stays within 2 * 255 * 64 = 32,640: every CPU computes the
same integers, so a decision fitted on one machine's logits holds on another's. The cost is
a coarser weight grid (on the same Zen 3 EPYC, the bi-encoder's mean cosine to fp32 0.9968
against 0.9971; docs/performance.md).
"""

_FILES = {"fp32": "model.onnx", "int8": "model_qint8.onnx"}
_SKIP_DIRS = {"onnx", ".git", "__pycache__"}
_SKIP_FILES = {"training.json", "decision_dev.json"}
"""twinq's own records beside a reranker's weights: rewritten after the export (the int8 guard's
verdict goes into training.json; `twinq train decide` refits it and rewrites the decision's dev
rows), and no input of the export. Before decision_dev.json was skipped, every `twinq train
decide` made the next load export and quantise the model again."""


def _fingerprint(source: Path, kind: Kind) -> str:
    """A digest of the source's files (name, size, mtime) plus the recipe: cheap and sufficient.
    Hashing 90 MB of weights would cost a second a load; a retrain or copy changes size or mtime."""
    digest = hashlib.sha256(f"{kind}|{RECIPE_VERSION}|{OPSET}|{json.dumps(INT8_RECIPE)}".encode())
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(f for f in files if f not in _SKIP_FILES):
            stat = (Path(root) / name).stat()
            rel = os.path.relpath(Path(root) / name, source)
            digest.update(f"{rel}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_dir(source: str | Path, kind: Kind, *, owned: bool = True) -> Path:
    """Where the exports of `source` live: inside it when writable and ours, else under ~/.cache.

    Args:
        source: The model folder.
        kind: "bi-encoder" or "cross-encoder"; one folder may serve both, with different heads.
        owned: False for folders that are not the user's (the Hugging Face hub cache).
            Defaults to True.
    """
    source = Path(source).resolve()
    if owned and os.access(source, os.W_OK):
        return source / "onnx" / kind
    sha = hashlib.sha256(str(source).encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "twinq" / "onnx" / sha / kind


def _export(model: torch.nn.Module, tokenizer: Any, output: str, path: Path) -> list[str]:
    """Trace `model` to ONNX with dynamic batch and sequence axes; returns the input names."""
    import torch

    names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
             if n in tokenizer.model_input_names]

    class _Wrapper(torch.nn.Module):  # positional inputs in, one named output out
        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return getattr(self.model(**dict(zip(names, tensors))), output)

    sample = tokenizer(["a short question", "a longer question about exporting models?"],
                       padding=True, return_tensors="pt")
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[output] = {0: "batch"} if output == "logits" else {0: "batch", 1: "sequence"}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent exports never share a file
    wrapper = _Wrapper()
    wrapper.model = model
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python branches
        # The legacy (TorchScript) exporter: BERT needs nothing the dynamo exporter adds, and
        # the latter needs onnxscript, which twinq does not install.
        torch.onnx.export(wrapper.eval(), tuple(sample[n] for n in names), str(tmp),
                          input_names=names, output_names=[output], dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False)
    os.replace(tmp, path)
    return names


def quantise(fp32: Path, int8: Path, *, per_row: bool = True,
             recipe: Mapping[str, Any] | None = None) -> None:
    """Write `int8` from the `fp32` graph: weights quantised once with `recipe` (default
    `INT8_RECIPE`, what twinq serves; benchmarks pass variants of it), then, with `per_row` (as
    served), each activation scaled per row at run time; without it, onnxruntime's own
    per-batch activations (for tests and benchmarks of the rewrite)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from twinq.shared.row_quantisation import per_row_activations

    recipe = INT8_RECIPE if recipe is None else recipe
    tmp = int8.with_name(f"{int8.name}.{os.getpid()}.tmp")
    quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType[recipe["weight_type"]],
                     per_channel=recipe["per_channel"], reduce_range=recipe["reduce_range"],
                     op_types_to_quantize=recipe["op_types"])
    if per_row:
        model = onnx.load(str(tmp))
        per_row_activations(model)
        onnx.save(model, str(tmp))
    os.replace(tmp, int8)


def _bi_encoder_meta(st: Any) -> dict[str, Any]:
    """What inference needs from a SentenceTransformer besides the graph; refuse what we can't mirror."""
    types = [type(m).__name__ for m in st]
    if types[:2] != ["Transformer", "Pooling"] or types[2:] not in ([], ["Normalize"]):
        raise ModelLoadError(f"the onnx backend supports Transformer+Pooling[+Normalize], "
                             f"not {types}; use backend='torch'")
    modes = st[1].pooling_mode
    modes = [modes] if isinstance(modes, str) else list(modes)
    unsupported = set(modes) - {"mean", "cls", "max", "mean_sqrt_len_tokens"}
    if unsupported:
        raise ModelLoadError(f"pooling {sorted(unsupported)} is not mirrored by the onnx backend; "
                             "use backend='torch'")
    return {"max_seq_length": int(st.max_seq_length), "pooling_modes": modes,
            "normalize": types[2:] == ["Normalize"], "dimension": int(st.get_embedding_dimension()),
            "do_lower_case": bool(getattr(st[0], "do_lower_case", False))}


def _cross_encoder_meta(ce: Any) -> dict[str, Any]:
    fn = ce.activation_fn
    return {"max_seq_length": int(ce.max_seq_length), "num_labels": int(ce.num_labels),
            "activation_fn": f"{type(fn).__module__}.{type(fn).__qualname__}"}


def ensure_exported(source: str | Path, kind: Kind, *, owned: bool = True) -> tuple[Path, dict[str, Any]]:
    """Export and quantise `source` unless a fresh cache exists; returns (folder, metadata).

    Raises:
        ModelLoadError: when the model cannot be loaded in torch or is not supported here.
    """
    source = Path(source).resolve()
    folder = cache_dir(source, kind, owned=owned)
    fingerprint = _fingerprint(source, kind)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint and all((folder / f).is_file() for f in _FILES.values()):
            return folder, _checked(folder, meta, kind, meta_path)
        log.info("onnx cache for %s is stale; exporting again", source)
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    from sentence_transformers import CrossEncoder, SentenceTransformer

    kwargs = {"device": "cpu", "trust_remote_code": False, "model_kwargs": {"use_safetensors": True}}
    try:
        loaded = (SentenceTransformer if kind == "bi-encoder" else CrossEncoder)(str(source), **kwargs)
    except Exception as exc:  # the library raises many kinds; the caller wants one
        raise ModelLoadError(f"cannot load {source} for onnx export: {exc}") from exc
    if kind == "bi-encoder":
        meta, model, output = _bi_encoder_meta(loaded), loaded[0].model, "last_hidden_state"
    else:
        meta, model, output = _cross_encoder_meta(loaded), loaded.model, "logits"
    meta["input_names"] = _export(model.eval(), loaded.tokenizer, output, folder / _FILES["fp32"])
    quantise(folder / _FILES["fp32"], folder / _FILES["int8"])
    loaded.tokenizer.save_pretrained(str(folder / "tokenizer"))
    meta.update(fingerprint=fingerprint, kind=kind, source=str(source), output=output,
                int8_recipe=INT8_RECIPE, opset=OPSET)
    meta = _checked(folder, meta, kind, meta_path)  # writes meta.json last: the folder is complete
    log.info("exported %s %s to %s in %.1fs", kind, source, folder, time.perf_counter() - start)
    return folder, meta


def _checked(folder: Path, meta: dict[str, Any], kind: Kind, meta_path: Path) -> dict[str, Any]:
    """`meta` with the int8 guard's verdict (`twinq.shared.quantisation_check`), run once per
    export and stored in meta.json; a stored verdict is judged again if the thresholds moved."""
    from twinq.shared import quantisation_check as qc

    check = meta.get("quantisation_check")
    if check is not None and check.get("sample_version") == qc.SAMPLE_VERSION:
        return {**meta, "quantisation_check": qc.rejudged(check)}
    cls = OnnxBiEncoder if kind == "bi-encoder" else OnnxCrossEncoder
    fp32, int8 = cls(folder, meta, precision="fp32"), cls(folder, meta, precision="int8")
    meta = {**meta, "quantisation_check": qc.run_check(kind, fp32, int8)}
    tmp = meta_path.with_name(f"meta.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
    return meta


def make_session(path: str | Path, threads: int | None = None, *, spin: bool = False
                 ) -> ort.InferenceSession:
    """An onnxruntime CPU session with every graph optimisation on.

    Args:
        path: The .onnx file.
        threads: Intra-op threads. Defaults to the cores in this process's affinity mask.
        spin: Let idle pool threads busy-wait. Off by default: on a small shared CPU, spinning
            threads steal the cores the work needs (it halved int8 throughput here under load).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def length_sorted_batches(encoded: dict[str, list[list[int]]], names: Sequence[str], pad_id: int,
                          batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yield (row indices, padded int64 feeds), longest rows first, so batches carry little padding.

    Args:
        encoded: Unpadded tokenizer output, one list of ids per row and input name.
        names: The graph's input names.
        pad_id: The tokenizer's pad token id (used for input_ids; masks and types pad with 0).
        batch_size: Rows per batch.
    """
    lengths = np.fromiter((len(ids) for ids in encoded["input_ids"]), dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = int(lengths[rows].max())
        feeds = {n: np.full((len(rows), width), pad_id if n == "input_ids" else 0, dtype=np.int64)
                 for n in names}
        for name, array in feeds.items():
            for r, row in enumerate(rows):
                array[r, :lengths[row]] = encoded[name][row]
        yield rows, feeds


def pool(hidden: np.ndarray, mask: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Pool token embeddings as sentence-transformers' Pooling does for right-padded input."""
    weights = mask[..., None].astype(np.float32)
    counts = np.clip(weights.sum(axis=1), 1e-9, None)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[np.arange(len(hidden)), mask.argmax(axis=1)])
        elif mode == "max":
            parts.append(np.where(weights > 0, hidden, -np.inf).max(axis=1))
        elif mode == "mean":
            parts.append((hidden * weights).sum(axis=1) / counts)
        else:  # mean_sqrt_len_tokens
            parts.append((hidden * weights).sum(axis=1) / np.sqrt(counts))
    return np.concatenate(parts, axis=1).astype(np.float32)


class _OnnxModel:
    """What both encoders share: the cache, the session, the tokenizer and the batching."""

    kind: Kind

    def __init__(self, folder: Path, meta: dict[str, Any], *, precision: Precision = "int8",
                 threads: int | None = None, max_length: int | None = None) -> None:
        from transformers import AutoTokenizer

        self.folder, self.meta, self.precision = folder, meta, precision
        self.session = make_session(folder / _FILES[precision], threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        self.max_seq_length: int = int(max_length or meta["max_seq_length"])
        self.input_names: list[str] = list(meta["input_names"])
        self.device = "cpu"

    @classmethod
    def load(cls, source: str | Path, *, precision: Precision = "int8", threads: int | None = None,
             max_length: int | None = None, owned: bool = True) -> Any:
        """Export (or reuse the cached export of) the model folder `source`, then open it.

        Args:
            source: A sentence-transformers model folder.
            precision: "int8" (dynamic quantisation) or "fp32". Defaults to "int8".
            threads: onnxruntime intra-op threads. Defaults to the cores this process may use.
            max_length: Token limit overriding the model's own. Defaults to None.
            owned: False when `source` is not the user's folder (the hub cache): the export then
                goes under ~/.cache/twinq/onnx. Defaults to True.
        """
        folder, meta = ensure_exported(source, cls.kind, owned=owned)
        return cls(folder, meta, precision=precision, threads=threads, max_length=max_length)

    def _run(self, encoded: dict[str, list[list[int]]], batch_size: int
             ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]]:
        pad_id = self.tokenizer.pad_token_id or 0
        for rows, feeds in length_sorted_batches(encoded, self.input_names, pad_id, batch_size):
            yield rows, feeds, self.session.run(None, feeds)[0]


class OnnxBiEncoder(_OnnxModel):
    """A drop-in for `SentenceTransformer.encode` on Transformer + Pooling (+ Normalize) models."""

    kind: Kind = "bi-encoder"

    def get_embedding_dimension(self) -> int:
        return int(self.meta["dimension"])

    get_sentence_embedding_dimension = get_embedding_dimension

    def encode(self, sentences: str | Sequence[str], batch_size: int = 64,
               normalize_embeddings: bool = True, convert_to_numpy: bool = True,
               show_progress_bar: bool = False, **ignored: Any) -> np.ndarray:
        """Embed `sentences` in input order; one string gives one vector.

        Args:
            sentences: Texts to embed.
            batch_size: Texts per forward pass. Defaults to 64.
            normalize_embeddings: L2-normalise (always done when the model ends in Normalize).
                Defaults to True.
            convert_to_numpy: Accepted for compatibility; the result is always numpy.
            show_progress_bar: Accepted for compatibility; ignored.
            **ignored: Other sentence-transformers arguments, ignored.

        Returns:
            float32 array of shape (len(sentences), dimension), or (dimension,) for one string.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else [str(s) for s in sentences]
        out = np.zeros((len(texts), self.get_embedding_dimension()), dtype=np.float32)
        if texts:
            if self.meta["do_lower_case"]:
                texts = [t.lower() for t in texts]
            encoded = self.tokenizer(texts, truncation="longest_first", max_length=self.max_seq_length)
            for rows, feeds, hidden in self._run(encoded, batch_size):
                out[rows] = pool(hidden, feeds["attention_mask"], self.meta["pooling_modes"])
            if normalize_embeddings or self.meta["normalize"]:
                out /= np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-12, None)
        return out[0] if single else out


class OnnxCrossEncoder(_OnnxModel):
    """A drop-in for `CrossEncoder.predict` on sequence-classification models."""

    kind: Kind = "cross-encoder"

    def __init__(self, folder: Path, meta: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(folder, meta, **kwargs)
        self.num_labels = int(meta["num_labels"])
        self.activation_fn = _activation(meta["activation_fn"])
        """The torch module `CrossEncoder.predict` would apply (Sigmoid for one label by default)."""

    def predict(self, pairs: Sequence[Sequence[str]], batch_size: int = 32,
                show_progress_bar: bool = False, activation_fn: Callable | None = None,
                apply_softmax: bool = False, **ignored: Any) -> np.ndarray:
        """Score (query, candidate) pairs in input order, like `CrossEncoder.predict`.

        Args:
            pairs: Text pairs; one pair gives one score.
            batch_size: Pairs per forward pass. Defaults to 32.
            show_progress_bar: Accepted for compatibility; ignored.
            activation_fn: Applied to the logits. Defaults to the model's own, which
                sentence-transformers 6 sets to Sigmoid for one label unless the saved config says
                otherwise (pass `torch.nn.Identity()` for raw logits).
            apply_softmax: Softmax over labels when there are several. Defaults to False.
            **ignored: Other sentence-transformers arguments, ignored.

        Returns:
            float32 array of shape (len(pairs),) for one label, else (len(pairs), num_labels).
        """
        single = len(pairs) == 2 and all(isinstance(p, str) for p in pairs)
        items = [pairs] if single else list(pairs)
        logits = np.zeros((len(items), self.num_labels), dtype=np.float32)
        if items:
            encoded = self.tokenizer([str(p[0]) for p in items], [str(p[1]) for p in items],
                                     truncation="longest_first", max_length=self.max_seq_length)
            for rows, _, batch in self._run(encoded, batch_size):
                logits[rows] = batch
        scores = _apply(activation_fn or self.activation_fn, logits)
        if apply_softmax and self.num_labels > 1:
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
        if self.num_labels == 1:
            scores = scores[:, 0]
        return scores[0] if single else scores


def _activation(path: str) -> Callable:
    """Instantiate the activation recorded at export (a torch.* class: remote code is off)."""
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)()


def _apply(fn: Callable, logits: np.ndarray) -> np.ndarray:
    """Apply a torch activation to numpy logits, with numpy fast paths for the usual two."""
    name = type(fn).__name__
    if name == "Identity":
        return logits
    if name == "Sigmoid":
        return np.exp(-np.logaddexp(0.0, -logits)).astype(np.float32)  # no overflow warnings
    import torch

    with torch.inference_mode():
        return fn(torch.from_numpy(logits)).float().numpy()
