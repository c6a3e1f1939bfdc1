"""`derestore models` and `derestore weights download|import|verify|path|rm`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer

from .common import emit_json, error_line, exit_on_error, render_error, say

if TYPE_CHECKING:
    from ..registry import ModelRecord, Registry

weights_app = typer.Typer(
    name="weights",
    help=(
        "Download, import, verify and remove checkpoints in the cache "
        "($DERESTORE_HOME, default the platform's user cache dir).\n\n"
        "Example: derestore weights download restormer-derain"
    ),
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
    app.add_typer(weights_app, name="weights")


def _registry() -> Registry:
    from ..registry import load_registry

    return load_registry()


def _records(registry: Registry, names: list[str]) -> list[ModelRecord]:
    """All records for `names`, checked before any work starts (unknown name → exit 2)."""
    return [registry.model(name) for name in names]


def _human(size: int | None) -> str:
    if not size:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return "?"


def models(
    task: Optional[str] = typer.Option(None, "-t", "--task", help="Only this task's models. Example: --task derain"),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per model on stdout."),
) -> None:
    """List the registry's checkpoints: task, default, cached, size, licence, how each downloads.

    [bold]bundled[/]: ships inside derestore, works offline. [bold]automatic[/]: fetched on first use. [bold]manual import[/]: open the share link in a
    browser, then `derestore weights import NAME FILE`. [bold]import only[/]: no published
    weights. pinned = the registry fixes the file's content (sha256 or git blob id); unpinned files are checked against
    the digest recorded at their first download.
    """
    with exit_on_error():
        from .. import api

        registry = _registry()
        infos = api.list_models(task, registry=registry)
        if json_out:
            for info in infos:
                emit_json(info)
            return
        _print_table(infos)
        for name, published in registry.bundled_fallbacks().items():
            if task is None or task == name:
                say("note", f"{name} defaults to the bundled {registry.tasks[name].default}: its published "
                            f"checkpoints ({', '.join(r.name for r in published)}) need a manual download; "
                            "import one with `derestore weights import NAME FILE` and pass -m NAME")


def _print_table(infos: list[dict[str, Any]]) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("task", "name", "arch", "dataset", "default", "stats", "cached", "size", "licence", "pinned",
                   "download"):
        table.add_column(column, no_wrap=column in ("name", "task"))
    for info in infos:
        if info["pinned"]:
            pinned = "yes"
        else:
            pinned = "recorded" if info["sha256"] else "no"
        cells = (
            info["task"],
            info["name"],
            info["arch"],
            info["dataset"],
            "✓" if info["default"] else "",
            f"local {info['stats_window']}" if info["stats"] == "local" else "global",
            "✓" if info["cached"] else "",
            _human(info["size"]),
            info["license"].split(";", 1)[0],
            pinned,
            info["download"],
        )
        table.add_row(*(Text(cell) for cell in cells))  # registry strings are text, never markup
    # stdout carries the data; a pipe gets one line per model, never a table squeezed and wrapped.
    out = Console(width=None if sys.stdout.isatty() else 10_000, highlight=False)
    out.print(table)


def _check_loads_for(record: ModelRecord):  # noqa: ANN202 - returns a Callable[[Path], None]
    def check(path: Path) -> None:
        from ..loading import check_loads

        check_loads(path, arch=record.arch)

    return check


@weights_app.command("download")
def download(
    names: List[str] = typer.Argument(..., help="Registry model names (see `derestore models`).", show_default=False),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per model on stdout."),
) -> None:
    """Fetch checkpoints into the cache now (e.g. before going offline); prints each file's path.

    Example: derestore weights download restormer-derain nafnet-sidd-w64
    """
    from .. import hub
    from ..errors import DerestoreError
    from .download_progress import download_progress

    with exit_on_error():
        records = _records(_registry(), names)
    failed = 0
    for record in records:
        try:
            with download_progress() as progress:
                path = hub.fetch(record, progress=progress, check=_check_loads_for(record))
        except DerestoreError as exc:
            failed += 1
            error_line(render_error(exc))
            if json_out:
                emit_json({"name": record.name, "status": "failed", "error": str(exc)})
            continue
        if json_out:
            entry = hub.cache_entry(record)
            emit_json({"name": record.name, "status": "ok", "path": str(path),
                       "sha256": entry.sha256 if entry else None, "size": path.stat().st_size,
                       "source": entry.source if entry else None})
        else:
            typer.echo(str(path))
    if failed:
        raise typer.Exit(3)


@weights_app.command("import")
def import_(
    name: str = typer.Argument(..., help="Registry model name the file is for.", show_default=False),
    file: Path = typer.Argument(..., help="The checkpoint you downloaded by hand.", show_default=False),
) -> None:
    """Copy a checkpoint fetched in a browser into the cache, checked by content.

    A pinned model must match its sha256; otherwise the file must load as the model's
    architecture. The file's own name does not matter. Bundled models (lite-*) cannot be
    replaced: run a task with --weights FILE instead.

    Example: derestore weights import derestormer-snow100k ~/Downloads/Snow100K.pth
    """
    import shlex

    from .. import hub
    from ..errors import UsageError

    with exit_on_error():
        record = _registry().model(name)
        if record.bundled:
            raise UsageError(
                f"{record.name} ships with derestore and is always read from the installation, so an imported "
                f"file would never be used; run `derestore {record.task} INPUTS --weights {shlex.quote(str(file))}` "
                "instead, or add the file to a DERESTORE_REGISTRY file under another name"
            )
        path = hub.import_file(record, file, check_loads=_check_loads_for(record))
        say(None, f"imported {file} as {record.name}")
        typer.echo(str(path))


@weights_app.command("verify")
def verify(
    names: Optional[List[str]] = typer.Argument(None, help="Model names; default: every cached model.", show_default=False),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per model on stdout."),
) -> None:
    """Re-hash cached checkpoints; a corrupt one is deleted so the next use downloads it again."""
    from .. import hub

    with exit_on_error():
        registry = _registry()
        if names:
            records = _records(registry, names)
        else:
            records = [r for r in registry.models.values() if hub.cache_entry(r) is not None]
    bad = 0
    for record in records:
        result = hub.verify(record)
        if json_out:
            emit_json({"name": result.name, "status": result.status, "path": str(result.path),
                       "expected": result.expected, "actual": result.actual})
        if result.status == "ok":
            if not json_out:
                typer.echo(f"ok       {record.name}  {result.path}")
            continue
        bad += 1
        if result.status == "missing":
            say("missing", f"{record.name} is not in the cache; "
                           f"`derestore weights download {record.name}` fetches it")
        else:
            say("corrupt", f"{result.path}: sha256 {result.actual}, expected "
                           f"{result.expected}; deleted, it is downloaded again on next use")
    if not records:
        say(None, "no cached checkpoints to verify")
    if bad:
        raise typer.Exit(3)


@weights_app.command("path")
def path(name: str = typer.Argument(..., help="Registry model name.", show_default=False)) -> None:
    """Print the cached checkpoint's path (exit 3 if it is not cached).

    Example: ls -l "$(derestore weights path restormer-derain)"
    """
    from .. import hub
    from ..errors import ModelUnavailable

    with exit_on_error():
        record = _registry().model(name)
        found = hub.cached_path(record)
        if found is None:
            raise ModelUnavailable(
                f"{name} is not in the cache (it would be {hub.target_path(record)}); "
                f"run `derestore weights download {name}`"
            )
        typer.echo(str(found))


@weights_app.command("rm")
def rm(names: List[str] = typer.Argument(..., help="Registry model names.", show_default=False)) -> None:
    """Delete cached checkpoints with their metadata and partial downloads."""
    from .. import hub

    with exit_on_error():
        records = _records(_registry(), names)
        for record in records:
            removed = hub.remove(record)
            if removed:
                say(None, f"removed {record.name} ({len(removed)} files in {hub.model_dir(record)})")
            else:
                say(None, f"{record.name} was not in the cache")
