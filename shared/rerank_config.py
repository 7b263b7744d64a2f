"""What a reranker folder's ``training.json`` tells serving, read and written in one place, and
the order in which a query's rerank knobs are resolved.

`twinq train reranker` writes these fields beside its model (``twinq train decide`` rewrites
them); the worker, the evaluators and the negative denoiser read them through `load_rerank_config`,
which checks every one:

    {"threshold": 0.42,
     "fusion": {"method": "linear", "weight": 0.3, "tuned": true, ...},
     "decision": {"method": "logistic", "features": ["rerank", "recall"], ...,
                  "min_probability": 0.7},
     "calibration": {"method": "logistic", "features": ["rerank"], ...},
     "rerank_depth": 20,
     "adaptive_rerank": {"max_logit": 4.76, "min_depth": 2, "dev": {...}},
     "settings": {"max_length": 64, ...}, ...}

Each knob of a query is resolved in one order, the request first, then the settings
(flags, ``TWINQ_*``, TOML), then the reranker's training.json, then the named default:

    >>> config = load_rerank_config("runs/ce")                      # doctest: +SKIP
    >>> config.resolve_fusion(settings, request.fusion, request.fusion_weight)  # doctest: +SKIP
    ('linear', 0.3)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twinq.shared.adaptive_depth import FUSION as ADAPTIVE_FUSION
from twinq.shared.adaptive_depth import AdaptiveRule
from twinq.shared.calibration import Calibration, finite_number
from twinq.shared.constants import DEFAULT_RERANK_DEPTH, MAX_RECALL_K
from twinq.shared.errors import ConfigError
from twinq.shared.fusion import fusion_methods

if TYPE_CHECKING:
    from twinq.shared.config import Settings

TRAINING_FILE = "training.json"
"""The file in a reranker folder that carries what training tuned for serving."""

DEFAULT_FUSION_METHOD = "none"
"""Fusion when neither the request, the settings nor training.json name one: rerank order."""

DEFAULT_FUSION_WEIGHT = 0.5
"""The fusion weight (0 = recall order, 1 = rerank order) when nothing tuned one, and the
weight fusion tuning breaks ties towards: the equal mix that helped in the first Quora runs."""

TUNED_FUSION_METHOD = "linear"
"""The method `twinq train reranker` tunes, and the evaluators' fused variant for a reranker
that has no training.json. `linear`, not `zscore` (the default until session 12): the two rank
level on Quora (docs/results.md section 6), and only `linear` lets adaptive reranking stop
early without changing the top hit (`twinq.shared.adaptive_depth`)."""

DEFAULT_PAIR_THRESHOLD = 0.5
"""Duplicate threshold on `CrossEncoder.predict`'s default output (a sigmoid) for a model that
twinq did not train: the sigmoid's midpoint."""


@dataclass(frozen=True)
class RerankConfig:
    """The serving fields of a reranker's training.json; all None for a model without one.

    Attributes:
        fusion_method: The tuned fusion method, or None.
        fusion_weight: Its weight, or None.
        decision: The twin decision model (top-hit probability and its default threshold
            `min_probability`), or None.
        calibration: The pair calibration of the logit (`twinq eval pairs`, the denoiser), or None.
        pair_threshold: training.json's ``threshold``: the best dev accuracy threshold on
            `CrossEncoder.predict`'s default output, or None.
        rerank_depth: The depth fusion and the decision were fitted at, or None (rerankers
            trained before it was written).
        max_length: The tokenizer cut-off it was trained with (``settings.max_length``), or None.
        adaptive: The adaptive reranking rule fitted on dev (`twinq.shared.adaptive_depth`), or
            None (rerankers fitted before it: every query reranks at full depth).
        fusion_info: How the fusion was tuned (training.json's other ``fusion`` keys); written
            back, never used to serve.
        path: The file read, or None.
    """

    fusion_method: str | None = None
    fusion_weight: float | None = None
    decision: Calibration | None = None
    calibration: Calibration | None = None
    pair_threshold: float | None = None
    rerank_depth: int | None = None
    max_length: int | None = None
    adaptive: AdaptiveRule | None = None
    fusion_info: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def fusion(self) -> dict[str, Any] | None:
        """``{"method", "weight"}`` as training.json holds them (without the tuning report), or
        None when it names no fusion."""
        if self.fusion_method is None:
            return None
        weight = DEFAULT_FUSION_WEIGHT if self.fusion_weight is None else self.fusion_weight
        return {"method": self.fusion_method, "weight": weight}

    @property
    def min_probability(self) -> float | None:
        """The decision model's default "no twin" threshold, or None without a decision model."""
        return None if self.decision is None else self.decision.min_probability

    # ---- resolution: request > settings > training.json > named default ----------------------

    def resolve_fusion(self, settings: Settings | None = None, method: str | None = None,
                       weight: float | None = None, *, fallback: str = DEFAULT_FUSION_METHOD
                       ) -> tuple[str, float]:
        """The fusion method and weight a query is answered with.

        Args:
            settings: The worker's settings (``fusion``, ``fusion_weight``); None for none.
            method: The request's method, or None. Defaults to None.
            weight: The request's weight, or None. Defaults to None.
            fallback: The method when nobody names one. Defaults to `DEFAULT_FUSION_METHOD`
                (the evaluators pass `TUNED_FUSION_METHOD`).

        Returns:
            (method, weight): each the request's, else the settings' (when set, "none"
            included), else training.json's, else `fallback` and `DEFAULT_FUSION_WEIGHT`.
        """
        method = method or (settings.fusion if settings else None) or self.fusion_method or fallback
        weight = next(w for w in (weight, settings.fusion_weight if settings else None,
                                  self.fusion_weight, DEFAULT_FUSION_WEIGHT) if w is not None)
        return str(method), float(weight)

    def resolve_min_probability(self, settings: Settings | None = None,
                                requested: float | None = None) -> float | None:
        """The duplicate probability a top hit needs to count as a twin.

        Returns:
            The request's, else the settings', else the decision model's default; None when
            there is no decision model (nothing to decide with).
        """
        if self.decision is None:
            return None
        for value in (requested, settings.min_probability if settings else None,
                      self.decision.min_probability):
            if value is not None:
                return float(value)
        return None

    def resolve_depth(self, settings: Settings | None = None, requested: int | None = None,
                      recall_k: int | None = None) -> int:
        """Candidates reranked for a query: the request's, else the settings', else
        training.json's, else `DEFAULT_RERANK_DEPTH`; never more than `recall_k`.

        (`Settings.rerank_depth` always has a value, so a worker never reaches training.json's.)
        """
        depth = next(d for d in (requested, settings.rerank_depth if settings else None,
                                 self.rerank_depth, DEFAULT_RERANK_DEPTH) if d is not None)
        return depth if recall_k is None else min(depth, recall_k)

    def resolve_adaptive(self, settings: Settings | None = None,
                         requested: bool | None = None, fusion: str | None = None
                         ) -> AdaptiveRule | None:
        """The adaptive reranking rule a query is answered with, or None for full depth.

        On or off is the request's ``adaptive``, else the settings' ``adaptive_rerank``, else
        on; what "on" applies is training.json's rule, so a reranker without one (fitted before
        it) reranks every query at full depth whatever is asked. The rule's bound holds for
        `linear` fusion only: a query fused another way (`fusion`, the resolved method) is
        reranked at full depth.
        """
        enabled = next(v for v in (requested, settings.adaptive_rerank if settings else None,
                                   True) if v is not None)
        if fusion is not None and fusion != ADAPTIVE_FUSION:
            return None
        return self.adaptive if enabled else None

    def check_settings(self, settings: Settings) -> None:
        """Refuse settings this reranker cannot honour.

        Raises:
            ConfigError: a `min_probability` without a decision model to apply it to.
        """
        if settings.min_probability is not None and self.decision is None:
            raise ConfigError("min_probability needs a reranker with a decision model (a "
                              "training.json written by `twinq train reranker`)")

    # ---- writing -------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The serving fields in training.json's layout and order; None fields are left out."""
        data: dict[str, Any] = {}
        if self.pair_threshold is not None:
            data["threshold"] = self.pair_threshold
        if self.fusion is not None:
            data["fusion"] = {**self.fusion, **self.fusion_info}
        if self.decision is not None:
            data["decision"] = self.decision.to_dict()
        if self.calibration is not None:
            data["calibration"] = self.calibration.to_dict()
        if self.rerank_depth is not None:
            data["rerank_depth"] = self.rerank_depth
        if self.adaptive is not None:
            data["adaptive_rerank"] = self.adaptive.to_dict()
        return data


def write_training_json(model_dir: str | Path, report: Mapping[str, Any]) -> Path:
    """Write `report` (training.json's whole content) into `model_dir`; return the path."""
    path = Path(model_dir) / TRAINING_FILE
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _number(value: Any, where: str) -> float:
    try:
        return finite_number(value, where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _integer(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where} must be an integer in {low}..{high}, got {value!r}")
    return value


def _fusion(data: dict[str, Any], path: Path) -> tuple[str | None, float | None, dict[str, Any]]:
    fusion = data.get("fusion")
    if fusion is None:
        return None, None, {}
    method = fusion.get("method") if isinstance(fusion, dict) else None
    if method not in fusion_methods():
        raise ConfigError(f"{path}: fusion.method must be one of {fusion_methods()}")
    weight = _number(fusion.get("weight", DEFAULT_FUSION_WEIGHT), f"{path}: fusion.weight")
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"{path}: fusion.weight must be in 0..1, got {weight}")
    return method, weight, {k: v for k, v in fusion.items() if k not in ("method", "weight")}


def _models(data: dict[str, Any], path: Path) -> dict[str, Calibration | None]:
    models: dict[str, Calibration | None] = {}
    for key in ("decision", "calibration"):
        if data.get(key) is None:
            if key == "decision":
                raise ConfigError(f"{path}: no decision model (key 'decision'); train the reranker "
                                  "again with `twinq train reranker` to get one")
            models[key] = None
            continue
        try:
            models[key] = Calibration.from_dict(data[key])
        except ValueError as exc:
            raise ConfigError(f"{path}: {key}: {exc}") from exc
    if models["decision"] is not None and models["decision"].min_probability is None:
        raise ConfigError(f"{path}: decision: min_probability is missing")
    return models


def load_rerank_config(model_dir: str | Path | None) -> RerankConfig:
    """Read and check the serving fields of a reranker's training.json.

    Args:
        model_dir: The reranker's folder (a hub name or None has no file).

    Returns:
        The config; all None when the folder has no training.json (a cross-encoder not
        trained by twinq: it reranks, but reports no probability).

    Raises:
        ConfigError: when the file exists but is malformed, or lacks the decision model that
            every twinq-trained reranker carries, naming the file and the bad key in one line.
            A broken file is not ignored: it would silently change every score reported.
    """
    if model_dir is None or not (Path(model_dir) / TRAINING_FILE).is_file():
        return RerankConfig()
    path = Path(model_dir) / TRAINING_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    method, weight, info = _fusion(data, path)
    models = _models(data, path)
    threshold = data.get("threshold")
    depth = data.get("rerank_depth")
    settings = data.get("settings")
    max_length = settings.get("max_length") if isinstance(settings, dict) else None
    adaptive = data.get("adaptive_rerank")
    if isinstance(adaptive, dict) and "margin" in adaptive:
        # Session 11's cosine-margin rule went with z-score fusion; it is not applied.
        logging.getLogger(__name__).warning(
            "%s: adaptive_rerank is an older cosine-margin rule, not applied (full depth); "
            "`twinq train decide --reranker %s` fits the current one", path, model_dir)
        adaptive = None
    if adaptive is not None:
        try:
            adaptive = AdaptiveRule.from_dict(adaptive)
        except ValueError as exc:
            raise ConfigError(f"{path}: adaptive_rerank: {exc}") from exc
    _warn_if_fitted_on_older_int8(data.get("serving_backend"), path, model_dir)
    return RerankConfig(
        fusion_method=method, fusion_weight=weight, decision=models["decision"],
        calibration=models["calibration"],
        pair_threshold=None if threshold is None else _number(threshold, f"{path}: threshold"),
        rerank_depth=None if depth is None else _integer(depth, f"{path}: rerank_depth", 0,
                                                          MAX_RECALL_K),
        max_length=None if max_length is None else _integer(max_length,
                                                            f"{path}: settings.max_length",
                                                            1, 1_000_000),
        adaptive=adaptive, fusion_info=info, path=path)


def _warn_if_fitted_on_older_int8(record: Any, path: Path, model_dir: str | Path) -> None:
    """A warning when the decision and fusion were fitted on int8 logits of an older
    quantisation recipe (`twinq.shared.onnx_backend.RECIPE_VERSION`): recipe 1 scaled
    activations per batch (logits three times as far from fp32 as recipe 2's), recipe 2's 8-bit
    weights saturate on CPUs without VNNI; the reranker still serves, and a refit of a minute
    or so fits the decision on the logits served now."""
    from twinq.shared.onnx_backend import RECIPE_VERSION, stale_int8_recipe

    fitted = stale_int8_recipe(record) if isinstance(record, dict) else None
    if fitted is not None:
        logging.getLogger(__name__).warning(
            "%s: the twin decision was fitted on int8 scores of quantisation recipe %s; this "
            "version serves recipe %d: `twinq train decide "
            "--reranker %s` refits it on the scores served now", path, fitted, RECIPE_VERSION,
            model_dir)
