"""Beam options for twinq's pipelines (the build and dedupe): the runner, named and pinned.

An unpinned runner may pick Prism, which downloads a binary; so a command line that names no
runner gets DirectRunner, and the name recorded in a manifest or summary is the one that ran.

Beam resolves a short runner name only from its own list; the DaskRunner is not on it (Beam 2.77
accepts it only as `apache_beam.runners.dask.dask_runner.DaskRunner`), so `--runner DaskRunner`
is mapped to that path here, while `runner_name` still reports the name as given. A short name
that is neither Beam's nor ours is refused here, by name, before any work.
"""

from __future__ import annotations

import logging
from typing import Any

from twinq.shared.errors import BadInput


class ApitoolsNotice(logging.Filter):
    """Drops the one record Beam's BigQuery client package logs on the root logger when it is
    imported without apitools ("apitools not found, ..."): an optional GCP dependency that twinq
    never uses, printed on every build. Every other record passes. Installed when this module
    is imported, which every twinq pipeline does before its first Beam import."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and str(record.msg).startswith("apitools not found"))


if not any(isinstance(f, ApitoolsNotice) for f in logging.getLogger().filters):
    logging.getLogger().addFilter(ApitoolsNotice())

DEFAULT_RUNNER = "DirectRunner"
EXTRA_RUNNERS = {"daskrunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}
"""Short names (lower case) Beam does not resolve itself, and the class each names."""


def runner_name(beam_args: list[str]) -> str:
    """The runner `beam_args` name (`--runner X` or `--runner=X`), else `DEFAULT_RUNNER`."""
    for i, arg in enumerate(beam_args):
        if arg.startswith("--runner="):
            return arg.split("=", 1)[1]
        if arg == "--runner" and i + 1 < len(beam_args):
            return beam_args[i + 1]
    return DEFAULT_RUNNER


def runner_path(name: str) -> str:
    """The name Beam is given for the runner `name`: ours mapped to a class path, Beam's as is.

    Raises:
        BadInput: `name` is a short name that neither Beam nor twinq knows.
    """
    from apache_beam.options.pipeline_options import StandardOptions

    lower = name.lower()
    for key in (lower, lower + "runner"):
        if key in EXTRA_RUNNERS:
            return EXTRA_RUNNERS[key]
    if "." in name:  # a class path: Beam imports it
        return name
    known = {n.lower() for n in StandardOptions.KNOWN_RUNNER_NAMES} | {"pythonrpcdirectrunner"}
    if lower in known or lower + "runner" in known:
        return name
    names = sorted(StandardOptions.KNOWN_RUNNER_NAMES + ["DaskRunner"])
    raise BadInput(f"unknown Beam runner {name!r}: use one of {', '.join(names)}, or a runner "
                   "class's full path")


def pipeline_options(beam_args: list[str]) -> Any:
    """`PipelineOptions` of `beam_args`, with `DEFAULT_RUNNER` pinned when none is named and a
    short name of `EXTRA_RUNNERS` replaced by its class path.

    Raises:
        BadInput: an unknown short runner name (see `runner_path`).
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    args: list[str] = []
    named = False
    i = 0
    while i < len(beam_args):
        arg = beam_args[i]
        if arg.startswith("--runner="):
            named = True
            args.append(f"--runner={runner_path(arg.split('=', 1)[1])}")
        elif arg == "--runner" and i + 1 < len(beam_args):
            named = True
            args.append(f"--runner={runner_path(beam_args[i + 1])}")
            i += 1
        else:
            args.append(arg)
        i += 1
    if not named:
        args.append(f"--runner={DEFAULT_RUNNER}")
    if any(a == f"--runner={path}" for path in EXTRA_RUNNERS.values() for a in args):
        # registers DaskOptions (--dask_client_address, --dask_npartitions, ...) before parsing,
        # so that Beam does not warn that it discards them as unknown
        try:
            import apache_beam.runners.dask.dask_runner  # noqa: F401
            import distributed  # noqa: F401
        except ImportError as exc:
            raise BadInput(f"--runner DaskRunner needs dask.distributed ({exc}): pip install "
                           "'twinq[dask]'") from exc
    return PipelineOptions(args)
