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
    app()
