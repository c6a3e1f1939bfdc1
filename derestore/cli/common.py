"""What every command shares: the stderr console, error-to-exit-code mapping, JSON lines."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console

from ..errors import DerestoreError

T = TypeVar("T")

# stdout carries data; logs and progress go to stderr.
console = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)


def emit_json(record: dict[str, Any]) -> None:
    """One JSON object per line on stdout, flushed so pipes see it at once."""
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def error_line(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)


@contextmanager
def exit_on_error() -> Iterator[None]:
    """Turn derestore's exceptions into a one-line message and their exit code."""
    try:
        yield
    except DerestoreError as exc:
        error_line(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        error_line("interrupted")
        raise typer.Exit(130) from None


def guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    with exit_on_error():
        return fn(*args, **kwargs)
