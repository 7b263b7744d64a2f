"""Push the last build's numbers to a Prometheus Pushgateway, for the nightly-build dashboard."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)
JOB = "twinq_index_build"
BUILD_METRICS = frozenset({
    "twinq_build_rows", "twinq_build_stage_seconds", "twinq_build_last_success_timestamp_seconds",
    "twinq_build_last_failure_timestamp_seconds", "twinq_build_success",
})


def build_registry(manifest: dict[str, Any] | None) -> Any:
    """A registry holding the build gauges; `manifest` None records a failed build."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    success = Gauge("twinq_build_success", "1 if the last build published or validated, else 0",
                    registry=registry)
    if manifest is None:
        success.set(0)
        Gauge("twinq_build_last_failure_timestamp_seconds", "Unix time of the last failed build",
              registry=registry).set(time.time())
        return registry
    success.set(1)
    Gauge("twinq_build_last_success_timestamp_seconds", "Unix time of the last good build",
          registry=registry).set(time.time())
    rows = Gauge("twinq_build_rows", "Rows by kind in the last build", ["kind"], registry=registry)
    corpus = manifest["corpus"]
    for kind, key in (("read", "rows_read"), ("rejected", "rows_rejected"),
                      ("embedded", "rows_embedded"), ("reused", "rows_reused"),
                      ("indexed", "rows_indexed")):
        rows.labels(kind).set(corpus.get(key) or 0)
    stages = Gauge("twinq_build_stage_seconds", "Seconds per build stage", ["stage"], registry=registry)
    for stage, seconds in manifest["build"]["stages_s"].items():
        stages.labels(stage).set(seconds)
    return registry


def push_build_metrics(url: str, manifest: dict[str, Any] | None) -> None:
    """Push, logging (not raising) on failure: a monitoring outage must not fail a good build.

    A failed build uses push-add, which replaces only the metrics it sends, so the last success
    timestamp survives and the "no good build in 36 h" alert stays truthful.
    """
    from prometheus_client import push_to_gateway, pushadd_to_gateway

    push = push_to_gateway if manifest is not None else pushadd_to_gateway
    try:
        push(url, job=JOB, registry=build_registry(manifest))
    except OSError as exc:
        log.warning("could not push build metrics to %s: %s", url, exc)
