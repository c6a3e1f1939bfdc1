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
    from .common import show_library_logs

    show_library_logs()


def _register_commands() -> None:
    from . import eval_cmd, export_cmd, tasks, weights_cmd

    tasks.register(app, tasks.task_records())
    eval_cmd.register(app)
    weights_cmd.register(app)
    export_cmd.register(app)


_register_commands()


def _click_usage_error() -> type[Exception]:
    """click's UsageError, reached through typer's public BadParameter (typer vendors click privately)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _stdout_closed() -> int:
    """The reader of stdout went away (`derestore models | head -1`): stop quietly, as git does."""
    import os
    import sys

    # Later flushes (at exit) would raise again: send them nowhere.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def main() -> None:
    """Run the app; a malformed command line gets one line and exit 2 instead of a help panel."""
    import os
    import signal
    import sys

    # Application-wide settings, which the library leaves to its host: on Apple's GPU, operations
    # torch lacks run on the CPU instead of failing (read when torch starts); derestore's own
    # pixel limit (--max-pixels) replaces Pillow's decompression-bomb warning.
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    import warnings

    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    # A scheduler's SIGTERM (scancel, timeouts) stops the run like Ctrl-C, from the very start:
    # the image in flight is abandoned, finished outputs and the run record are kept.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    from .common import error_line

    usage_error = _click_usage_error()
    try:
        code = app(standalone_mode=False)
    except usage_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `derestore` or `derestore weights` alone
            ctx = getattr(exc, "ctx", None)
            typer.echo(ctx.get_help() if ctx else "", err=True)
        else:
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx else "derestore"
            error_line(f"{exc.format_message()} (see `{where} --help`)")
        code = 2
    except typer.Abort:
        error_line("interrupted")
        code = 130
    except KeyboardInterrupt:
        error_line("interrupted")
        code = 130
    except BrokenPipeError:
        code = _stdout_closed()
    except SystemExit as exc:
        # rich answers a closed stdout (e.g. while printing --help) with SystemExit(1).
        code = _stdout_closed() if isinstance(exc.__context__, BrokenPipeError) else exc.code
    except Exception as exc:
        # A bug of derestore's: one line for a batch log, the traceback on request.
        if os.environ.get("DERESTORE_DEBUG"):
            raise
        text = " ".join(str(exc).split())[:500]
        error_line(f"internal error: {type(exc).__name__}: {text}; rerun with DERESTORE_DEBUG=1 for the "
                   "traceback, and please report it")
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
