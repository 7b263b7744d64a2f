"""The `twinq` front door. It gathers sub-commands from the `twinq.commands` entry points, so
that `shared` never imports `pipelines` or `worker`.

Exit codes: 0 success, 2 bad usage or bad input (one-line reason), 1 anything else.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import entry_points

import click
import typer

from shared.errors import BadInput, TwinqError

app = typer.Typer(help="twinq: find a new question's twins among already-answered questions.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _register() -> None:
    for ep in sorted(entry_points(group="twinq.commands"), key=lambda e: e.name):
        target = ep.load()
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=ep.name)
        else:
            app.command(ep.name)(target)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map twinq's errors to exit codes with a one-line reason on stderr."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register()
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="twinq", standalone_mode=False)
    except click.exceptions.Abort:
        return 1
    except click.ClickException as exc:
        exc.show()
        return 2
    except BadInput as exc:
        print(f"twinq: error: {exc}", file=sys.stderr)
        return 2
    except TwinqError as exc:
        print(f"twinq: error: {exc}", file=sys.stderr)
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
