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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from twinq.shared import constants as C
from twinq.shared.fusion import fusion_methods
from twinq.shared.errors import ConfigError

Backend = Literal["auto", "torch", "onnx", "onnx-fp32", "openvino"]
ENV_PREFIX = "TWINQ_"
CONFIG_ENV = "TWINQ_CONFIG"


@dataclass(frozen=True)
class Settings:
    """Every setting twinq reads. Each field maps to `TWINQ_<FIELD>` and a TOML key `<field>`."""

    root: str | None = None
    """Snapshot root: a local folder, or a store URL (`s3://bucket/prefix`, `gs://...`)."""
    cache_dir: str | None = None
    """Where a worker keeps its verified copies of a store root's versions (at most two);
    None: `$XDG_CACHE_HOME/twinq`, else `~/.cache/twinq`."""
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
    backend: Backend = "auto"
    """Encoder backend. "auto": the bi-encoder runs in the backend the snapshot was built with
    (its manifest), the reranker in onnx int8 where its int8 guard passed, else onnx fp32, else
    torch (`twinq.shared.models.resolve_backend`). Any other value is used for both models,
    and a snapshot built with another backend is refused (vectors never mix)."""
    threads: int | None = None
    """Torch intra-op threads per process; None lets torch decide."""
    top_k: int = C.DEFAULT_TOP_K
    recall_k: int = C.DEFAULT_RECALL_K
    rerank_depth: int = C.DEFAULT_RERANK_DEPTH
    fusion: str | None = None  # a name in twinq.shared.fusion.FUSIONS
    """Fusion of recall and rerank scores; None takes the reranker's training.json (else none)."""
    fusion_weight: float | None = None
    """Weight of the rerank score in `linear` and `zscore` fusion (0 recall order, 1 rerank
    order); None takes the reranker's tuned value."""
    min_probability: float | None = None
    """Default duplicate probability a top hit needs to count as a twin (else `no_twin`); None
    takes the reranker's decision model (its 95%-precision point on dev)."""
    rerank_symmetric: bool = False
    """Score (query, candidate) and (candidate, query) and average: on Quora +0.2 nDCG@10 for
    rerank alone but nothing measurable fused, at twice the rerank cost (docs/results.md §4)."""
    adaptive_rerank: bool = True
    """Rerank the first 2 candidates, then only those that could still become the top hit under
    `linear` fusion, by the rule stored in the reranker's training.json
    (`twinq.shared.adaptive_depth`); false reranks every query at full depth. Other fusion
    methods, and a reranker without the rule, rerank at full depth either way."""
    collapse_clusters: bool = True
    """Default of a request's `collapse`: keep one hit per duplicate cluster (the best-ranked),
    the others as its `also_asked`. Only rows built with `--clusters` carry a cluster id, so on
    any other snapshot this changes nothing."""
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
        """Refuse any value outside its range at once, naming the field: a bad setting found
        later fails every request (or silently drops every reply) instead of failing once."""
        for message in _problems(self):
            raise ConfigError(message)

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` applied; None values are ignored (an unset flag)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


INT_RANGES: dict[str, tuple[int, int]] = {
    "threads": (1, 1024),
    "top_k": (1, C.MAX_TOP_K),
    "recall_k": (1, C.MAX_RECALL_K),
    "rerank_depth": (0, C.MAX_RECALL_K),
    "batch_size": (1, 1024),
    "block_ms": (1, 60_000),
    "visibility_timeout_ms": (100, 86_400_000),
    "max_deliveries": (1, 100),
    "reply_ttl_s": (1, 86_400),
    "max_stream_length": (1, 1_000_000_000),
    "max_query_chars": (1, 50_000),
    "query_cache_ttl_s": (0, 86_400),
    "metrics_port": (0, 65_535),
}
"""Inclusive range of every integer setting (None, where allowed, means "unset"). `block_ms`
0 would block XREADGROUP forever; `reply_ttl_s` 0 would expire every reply at once."""

FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "fusion_weight": (0.0, 1.0),
    "min_probability": (0.0, 1.0),
    "shutdown_grace_s": (0.0, 3600.0),
    "reload_poll_s": (0.01, 3600.0),
}
"""Inclusive range of every number setting; NaN and infinities fall outside every range."""

TEXT_SETTINGS = ("stream", "group", "dead_stream", "reply_prefix", "metrics_host")
"""Settings that must be a non-empty string."""

OPTIONAL_TEXT_SETTINGS = ("root", "cache_dir", "redis_url", "model", "reranker")
"""Settings that are None (unset) or a non-empty string."""

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number_problem(name: str, value: Any, low: float, high: float, integer: bool) -> str | None:
    """Why `value` is not a valid `name` (None if it is); None values are checked elsewhere."""
    kind_ok = _is_int(value) if integer else (_is_int(value) or isinstance(value, float))
    if not kind_ok:
        return f"{name} must be {'an integer' if integer else 'a number'}, got {value!r:.40}"
    if not low <= value <= high:
        span = f"{low}..{high}" if integer else f"{low:g}..{high:g}"
        return f"{name} must be in {span}, got {value!r}"
    return None


def _range_problems(s: Settings) -> Iterator[str]:
    ranges: dict[str, tuple[float, float]] = {**INT_RANGES, **FLOAT_RANGES}
    for name, (low, high) in ranges.items():
        value = getattr(s, name)
        if value is None and Settings.__dataclass_fields__[name].default is None:
            continue
        problem = _number_problem(name, value, low, high, integer=name in INT_RANGES)
        if problem:
            yield problem


def _text_problems(s: Settings) -> Iterator[str]:
    for name in (*TEXT_SETTINGS, *OPTIONAL_TEXT_SETTINGS):
        value = getattr(s, name)
        if value is None and name in OPTIONAL_TEXT_SETTINGS:
            continue
        if not isinstance(value, str) or not value.strip():
            yield f"{name} must be a non-empty string, got {value!r:.40}"
    if isinstance(s.redis_url, str) and not s.redis_url.startswith(REDIS_SCHEMES):
        yield f"redis_url must start with one of {', '.join(REDIS_SCHEMES)}"
    if s.stream == s.dead_stream:
        yield f"stream and dead_stream must differ (both {s.stream!r})"


def _prefix_problems(s: Settings) -> Iterator[str]:
    """The reply prefix fences what a request may name as its reply key: it must not be empty,
    and must not cover the worker's own keys (streams, done markers, heartbeats, cache)."""
    prefix = s.reply_prefix
    if len(prefix) < 2 or not prefix.endswith(":"):
        yield f"reply_prefix must be a name ending with ':', got {prefix!r:.40}"
        return
    own = (s.stream, s.dead_stream, C.DONE_PREFIX, C.HEARTBEAT_PREFIX, C.CACHE_PREFIX)
    covered = [key for key in own if key.startswith(prefix)]
    if covered:
        yield f"reply_prefix {prefix!r} must not cover the worker's own keys ({covered[0]!r})"


def _choice_problems(s: Settings) -> Iterator[str]:
    if s.backend not in get_args(Backend):
        yield f"backend must be one of {get_args(Backend)}, got {s.backend!r:.40}"
    if s.fusion is not None and s.fusion not in fusion_methods():
        yield f"fusion must be one of {fusion_methods()}"
    if not isinstance(s.rerank_symmetric, bool):
        yield "rerank_symmetric must be true or false"
    if not isinstance(s.adaptive_rerank, bool):
        yield f"adaptive_rerank must be true or false, got {s.adaptive_rerank!r:.40}"
    if not isinstance(s.collapse_clusters, bool):
        yield "collapse_clusters must be true or false"


def _relation_problems(s: Settings) -> Iterator[str]:
    if s.top_k > s.recall_k:
        yield f"top_k ({s.top_k}) must not exceed recall_k ({s.recall_k})"
    if s.rerank_depth > s.recall_k:
        yield f"rerank_depth ({s.rerank_depth}) must not exceed recall_k ({s.recall_k})"


def _problems(s: Settings) -> Iterator[str]:
    """Every reason `s` is invalid, one line each naming the field; relations between fields
    are checked only once each field is in range."""
    single = [*_range_problems(s), *_text_problems(s), *_choice_problems(s)]
    yield from single
    if not single:
        yield from _prefix_problems(s)
        yield from _relation_problems(s)


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
