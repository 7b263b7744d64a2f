"""The `twinq` front door. It gathers sub-commands from the `twinq.commands` entry points, so
that `shared` never imports `pipelines` or `worker`, and it imports only the command invoked
(`twinq ask` does not pay for Beam's import).

Exit codes: 0 success, 2 bad usage or bad input (one-line reason), 1 anything else.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import typer
from typer.core import TyperGroup

from twinq.shared.errors import BadInput, TwinqError


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group="twinq.commands")}


def _unavailable(name: str, exc: ImportError) -> Any:
    def fail() -> None:
        raise TwinqError(f"command {name!r} is unavailable: {exc}")

    app = typer.Typer(rich_markup_mode=None)
    app.command(name, help=f"(unavailable: {exc})")(fail)
    return typer.main.get_command(app)


class LazyGroup(TyperGroup):
    """A typer group whose sub-commands are entry points, loaded on first use."""

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted(_entry_points())

    def get_command(self, ctx: Any, name: str) -> Any:
        ep = _entry_points().get(name)
        if ep is None:
            return None
        try:
            target = ep.load()
        except ImportError as exc:  # a broken install must not hide the other commands
            return _unavailable(name, exc)
        if isinstance(target, typer.Typer):
            group = typer.main.get_group(target)
            group.name = name
            return group
        app = typer.Typer(rich_markup_mode=None)
        app.command(name)(target)
        return typer.main.get_command(app)


app = typer.Typer(cls=LazyGroup, no_args_is_help=True, add_completion=False,
                  rich_markup_mode=None,  # plain click help: no <bool> beside flags
                  pretty_exceptions_enable=False,
                  help="twinq: find a new question's twins among already-answered questions.")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("faiss.loader", "apache_beam", "httpx", "sentence_transformers", "transformers",
                  "botocore", "aiobotocore", "s3fs", "fsspec", "distributed"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map twinq's errors to exit codes with a one-line reason on stderr.

    Standalone mode lets click handle `--help` and usage errors itself (exit 0 and 2).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        typer.main.get_command(app).main(args=argv, prog_name="twinq", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BadInput as exc:
        print(f"twinq: error: {exc}", file=sys.stderr)
        return 2
    except TwinqError as exc:
        print(f"twinq: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
