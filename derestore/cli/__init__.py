"""The `derestore` command line: a thin layer over the Python API.

Each sub-module registers its commands with `register(app)`; heavy imports
(torch, numpy, cv2) happen inside the command functions so `--help` stays fast.
"""

from __future__ import annotations

import typer

from .. import __version__

app = typer.Typer(
    name="derestore",
    help=(
        "Restore degraded photographs (rain, snow, haze, blur, noise) with published networks.\n\n"
        "Example: derestore derain photos/ -o restored/"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"derestore {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Restore degraded photographs with published networks."""


def _register_commands() -> None:
    from . import eval_cmd, tasks, weights_cmd

    tasks.register(app, tasks.task_records())
    eval_cmd.register(app)
    weights_cmd.register(app)


_register_commands()


def main() -> None:
    """Run the app; a malformed command line gets one line and exit 2 instead of a help panel."""
    import sys

    try:
        from typer._click import exceptions  # typer ≥ 0.24 vendors click
    except ImportError:
        from click import exceptions

    from .common import error_line

    try:
        code = app(standalone_mode=False)
    except exceptions.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `derestore` or `derestore weights` alone
            typer.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
        else:
            where = exc.ctx.command_path if exc.ctx else "derestore"
            error_line(f"{exc.format_message()} (see `{where} --help`)")
        code = 2
    except exceptions.Abort:
        error_line("interrupted")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
