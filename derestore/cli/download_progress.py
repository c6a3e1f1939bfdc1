"""Checkpoint download progress on the terminal: what the CLI does with the hub's progress callback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .common import console

DownloadProgress = Callable[[str, int, int | None], None]


def _ignore(name: str, done: int, total: int | None) -> None:
    """Progress where nobody watches (a pipe, a batch log): nothing is drawn."""


@contextmanager
def download_progress() -> Iterator[DownloadProgress]:
    """Yield a `progress(name, done, total)` callback for `hub.fetch` / `derestore.load`.

    On a terminal (stderr is a TTY) it draws one transient bar per checkpoint,
    started at the first call, so a cached checkpoint draws nothing; the bar
    shares the console of the log lines, which print above it. Elsewhere the
    callback does nothing.
    """
    if not console.is_terminal or console.is_dumb_terminal:
        yield _ignore
        return
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, TaskID] = {}

    def update(name: str, done: int, total: int | None) -> None:
        if name not in tasks:
            bar.start()
            tasks[name] = bar.add_task(escape(name), total=total)  # a registry name is not markup
        bar.update(tasks[name], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()
