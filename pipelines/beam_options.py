"""Beam options for twinq's pipelines (the build and dedupe): the runner, named and pinned.

An unpinned runner may pick Prism, which downloads a binary; so a command line that names no
runner gets DirectRunner, and the name recorded in a manifest or summary is the one that ran.
"""

from __future__ import annotations

from typing import Any

DEFAULT_RUNNER = "DirectRunner"


def runner_name(beam_args: list[str]) -> str:
    """The runner `beam_args` name (`--runner X` or `--runner=X`), else `DEFAULT_RUNNER`."""
    for i, arg in enumerate(beam_args):
        if arg.startswith("--runner="):
            return arg.split("=", 1)[1]
        if arg == "--runner" and i + 1 < len(beam_args):
            return beam_args[i + 1]
    return DEFAULT_RUNNER


def pipeline_options(beam_args: list[str]) -> Any:
    """`PipelineOptions` of `beam_args`, with `DEFAULT_RUNNER` pinned when none is named."""
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append(f"--runner={DEFAULT_RUNNER}")
    return PipelineOptions(args)
