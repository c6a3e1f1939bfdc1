"""What every command shares: the stderr console, one-line messages, error-to-exit-code mapping, JSON lines.

Every message that carries a user-supplied string (a path, a model name, an
error text) goes through `say`, which escapes it: `IMG [edited].png` is a file
name, not rich markup. Lines never wrap: one event, one line, in a terminal
or in a batch log.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import DerestoreError, ModelUnavailable

T = TypeVar("T")

# stdout carries data; logs and progress go to stderr.
console = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")), highlight=False, soft_wrap=True)

LABELS = {
    "error": "[bold red]error:[/]",
    "failed": "[red]failed:[/]",
    "note": "[yellow]note:[/]",
    "warning": "[yellow]warning:[/]",
    "interrupted": "[yellow]interrupted:[/]",
    "unmatched": "[red]unmatched:[/]",
    "ambiguous": "[red]ambiguous:[/]",
    "missing": "[yellow]missing:[/]",
    "corrupt": "[bold red]corrupt:[/]",
}


def say(label: str | None, message: str, *, style: str | None = None) -> None:
    """One line on stderr: an optional coloured label, then `message` as plain text (never markup)."""
    text = escape(message)
    if style:
        text = f"[{style}]{text}[/]"
    console.print(f"{LABELS[label]} {text}" if label else text, soft_wrap=True, overflow="ignore", crop=False)


def emit_json(record: dict[str, Any]) -> None:
    """One JSON object per line on stdout, valid UTF-8 whatever the file names, flushed so pipes see it at once."""
    from ..jsontext import dumps

    sys.stdout.write(dumps(record) + "\n")
    sys.stdout.flush()


def error_line(message: str) -> None:
    say("error", message)


def render_error(exc: DerestoreError) -> str:
    """The library's message, with the command-line way out where there is one."""
    message = str(exc)
    if isinstance(exc, ModelUnavailable) and exc.alternatives:
        options = " or ".join(f"-m {name}" for name in exc.alternatives)
        message += f"; the bundled {options} needs no download"
    return message


@contextmanager
def exit_on_error() -> Iterator[None]:
    """Turn derestore's exceptions into a one-line message and their exit code."""
    try:
        yield
    except DerestoreError as exc:
        error_line(render_error(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        error_line("interrupted")
        raise typer.Exit(130) from None


def guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    with exit_on_error():
        return fn(*args, **kwargs)


class _ConsoleHandler(logging.Handler):
    """derestore's log records (the library never prints) as one-line notes on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            label = "warning" if record.levelno >= logging.WARNING else None
            say(label, record.getMessage())
        except Exception:  # logging must never take the command down
            self.handleError(record)


def show_library_logs(quiet: bool = False) -> None:
    """Route the `derestore` logger to the console: info and up, or warnings and up when quiet."""
    logger = logging.getLogger("derestore")
    for handler in list(logger.handlers):
        if isinstance(handler, _ConsoleHandler):
            logger.removeHandler(handler)
    handler = _ConsoleHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
