"""The one way to load settings: defaults, then a TOML file, then `TWINQ_*` variables, then flags.

Example:
    >>> settings = load_settings(overrides={"top_k": 5})
    >>> settings.top_k
    5
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from shared import constants as C
from shared.errors import ConfigError

Backend = Literal["torch", "onnx", "onnx-fp32", "openvino"]
FusionMethod = Literal["none", "zscore", "rrf"]
ENV_PREFIX = "TWINQ_"
CONFIG_ENV = "TWINQ_CONFIG"


@dataclass(frozen=True)
class Settings:
    """Every setting twinq reads. Each field maps to `TWINQ_<FIELD>` and a TOML key `<field>`."""

    root: str | None = None
    """Snapshot root directory."""
    redis_url: str | None = None
    """`redis://` or `rediss://` URL; None starts an embedded server where that makes sense."""
    stream: str = C.STREAM
    group: str = C.GROUP
    dead_stream: str = C.DEAD_STREAM
    reply_prefix: str = C.REPLY_PREFIX
    model: str | None = None
    """Bi-encoder: a local path, a hub name, or None for the bundled all-MiniLM-L6-v2."""
    reranker: str | None = None
    """Cross-encoder: a local path or hub name; None means recall order only."""
    backend: Backend = "torch"
    threads: int | None = None
    """Torch intra-op threads per process; None lets torch decide."""
    top_k: int = C.DEFAULT_TOP_K
    recall_k: int = C.DEFAULT_RECALL_K
    rerank_depth: int = C.DEFAULT_RERANK_DEPTH
    fusion: FusionMethod | None = None
    """Fusion of recall and rerank scores; None takes the reranker's training.json (else none)."""
    fusion_weight: float | None = None
    """Weight of the rerank z-score in `zscore` fusion; None takes the reranker's tuned value."""
    min_probability: float | None = None
    """Default duplicate probability a top hit needs to count as a twin (else `no_twin`); None
    takes the reranker's decision model (its 95%-precision point on dev)."""
    rerank_symmetric: bool = False
    """Score (query, candidate) and (candidate, query) and average: on Quora +0.2 nDCG@10 for
    rerank alone but nothing measurable fused, at twice the rerank cost (docs/results.md §4)."""
    batch_size: int = C.BATCH_SIZE
    block_ms: int = C.BLOCK_MS
    visibility_timeout_ms: int = C.VISIBILITY_TIMEOUT_MS
    max_deliveries: int = C.MAX_DELIVERIES
    reply_ttl_s: int = C.REPLY_TTL_S
    max_stream_length: int = C.MAX_STREAM_LENGTH
    max_query_chars: int = C.MAX_QUERY_CHARS
    query_cache_ttl_s: int = 0
    """Seconds a cached reply lives; 0 turns the query cache off."""
    metrics_host: str = C.METRICS_HOST
    metrics_port: int | None = None
    shutdown_grace_s: float = C.SHUTDOWN_GRACE_S
    reload_poll_s: float = C.RELOAD_POLL_S

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.top_k <= C.MAX_TOP_K, f"top_k must be in 1..{C.MAX_TOP_K}"),
            (1 <= self.recall_k <= C.MAX_RECALL_K, f"recall_k must be in 1..{C.MAX_RECALL_K}"),
            (self.top_k <= self.recall_k, f"top_k ({self.top_k}) must not exceed recall_k ({self.recall_k})"),
            (self.rerank_depth <= self.recall_k,
             f"rerank_depth ({self.rerank_depth}) must not exceed recall_k ({self.recall_k})"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.max_deliveries >= 1, "max_deliveries must be at least 1"),
            (self.reply_prefix.endswith(":"), "reply_prefix must end with ':'"),
            (self.threads is None or self.threads >= 1, "threads must be at least 1"),
            (self.backend in get_args(Backend), f"backend must be one of {get_args(Backend)}"),
            (self.fusion is None or self.fusion in get_args(FusionMethod),
             f"fusion must be one of {get_args(FusionMethod)}"),
            (isinstance(self.rerank_symmetric, bool), "rerank_symmetric must be true or false"),
            (self.min_probability is None or 0.0 <= self.min_probability <= 1.0,
             "min_probability must be in 0..1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` applied; None values are ignored (an unset flag)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}


def _coerce(name: str, raw: str) -> Any:
    """Turn an environment string into the field's type."""
    kind = str(Settings.__dataclass_fields__[name].type)
    if kind == "bool":
        if raw.lower() not in _BOOLEANS:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not one of {sorted(_BOOLEANS)}")
        return _BOOLEANS[raw.lower()]
    try:
        if "int" in kind and "float" not in kind:
            return int(raw)
        if "float" in kind:
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a number") from exc
    return raw


def load_settings(
    config_file: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings in order: defaults, TOML file, `TWINQ_*` environment, then flags.

    Args:
        config_file: A TOML file; defaults to `$TWINQ_CONFIG` when that is set.
        env: The environment to read. Defaults to `os.environ`.
        overrides: Flag values; None entries mean "not given" and are skipped.

    Raises:
        ConfigError: on an unknown key, a missing file or an invalid combination.
    """
    env = os.environ if env is None else env
    names = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}
    config_file = config_file or env.get(CONFIG_ENV)
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown setting(s) in {path}: {', '.join(sorted(unknown))}")
        values.update(data)
    for name in names:
        raw = env.get(f"{ENV_PREFIX}{name.upper()}")
        if raw is not None and raw != "":
            values[name] = _coerce(name, raw)
    for name, value in (overrides or {}).items():
        if name not in names:
            raise ConfigError(f"unknown setting: {name}")
        if value is not None:
            values[name] = value
    return Settings(**values)


def env_variables() -> list[str]:
    """Every `TWINQ_*` variable that `load_settings` reads, for the docs and `--help`."""
    return [CONFIG_ENV] + [f"{ENV_PREFIX}{f.name.upper()}" for f in fields(Settings)]
