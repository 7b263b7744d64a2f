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

import click
import typer

from shared.errors import BadInput, TwinqError


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group="twinq.commands")}


class LazyGroup(click.Group):
    """A click group whose sub-commands are entry points, loaded on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_entry_points())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        ep = _entry_points().get(name)
        if ep is None:
            return None
        try:
            target = ep.load()
        except ImportError as exc:  # a broken install must not hide the other commands
            return _unavailable(name, exc)
        if isinstance(target, typer.Typer):
            return typer.main.get_group(target)
        app = typer.Typer()
        app.command(name)(target)
        return typer.main.get_command(app)


def _unavailable(name: str, exc: ImportError) -> click.Command:
    def fail() -> None:
        raise TwinqError(f"command {name!r} is unavailable: {exc}")

    return click.Command(name, callback=fail, help=f"(unavailable: {exc})")


@click.group(cls=LazyGroup, help="twinq: find a new question's twins among already-answered questions.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("faiss.loader", "apache_beam", "httpx", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map twinq's errors to exit codes with a one-line reason on stderr."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cli.main(args=argv, prog_name="twinq", standalone_mode=False)
    except click.exceptions.Abort:
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return 2
    except BadInput as exc:
        print(f"twinq: error: {exc}", file=sys.stderr)
        return 2
    except TwinqError as exc:
        print(f"twinq: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
