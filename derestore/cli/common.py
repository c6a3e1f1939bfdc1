"""What every command shares: the stderr console, one-line messages, error-to-exit-code mapping, JSON lines.

Every message that carries a user-supplied string (a path, a model name, an
error text) goes through `say`, which escapes it: `IMG [edited].png` is a file
name, not rich markup. Lines never wrap: one event, one line, in a terminal
or in a batch log.
"""

from __future__ import annotations

import logging
import os
import re
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


# The library names options as keyword arguments (`tile=512`); the command line as flags.
FLAGS = {
    "batch_size": "--batch-size", "compile": "--compile", "crop_border": "--crop-border", "csv": "--csv",
    "device": "--device", "ext": "--ext", "fail_fast": "--fail-fast", "from_list": "--from-list", "gt": "--gt",
    "keep_tree": "--keep-tree", "layout": "--layout", "match": "--match", "max_pixels": "--max-pixels",
    "model": "--model", "output": "-o", "overlap": "--overlap", "precision": "--precision", "pred": "--pred",
    "protocol": "--protocol", "ray": "--ray", "ray_workers": "--ray-workers", "report": "--report",
    "shard": "--shard", "skip_existing": "--skip-existing", "suffix": "--suffix", "tile": "--tile",
    "tiling": "--tiling", "weights": "--weights", "workers": "--workers", "video_codec": "--video-codec",
    "crf": "--crf", "bitrate": "--bitrate", "frames_dir": "--frames-dir", "temporal": "--temporal",
    "seed": "--seed", "resamples": "--resamples", "backend": "--backend", "stats": "--stats",
    "stats_window": "--stats-window",
}
_KEYWORD = re.compile(r"(?<![\w.-])(" + "|".join(sorted(FLAGS, key=len, reverse=True)) + r")=(True\b)?(?=(.?))")


def in_flag_terms(text: str) -> str:
    """`tile=-3: …` → `--tile -3: …`, `keep_tree=True` → `--keep-tree`, `model= or weights=` → `--model or --weights`."""
    def flag(match: re.Match[str]) -> str:
        follows = match[3]
        glue = "" if match[2] or not follows or follows in " ,;)" else " "
        return FLAGS[match[1]] + glue

    return _KEYWORD.sub(flag, text)


def say(label: str | None, message: str, *, style: str | None = None) -> None:
    """One line on stderr: an optional coloured label, then `message` as plain text (never markup).

    Labelled lines (errors, failures, notes) come from the library: their option names
    are given in flag terms."""
    text = escape(in_flag_terms(message) if label else message)
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
