"""`derestore models` and `derestore weights download|import|verify|path|rm`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer

from .common import console, emit_json, exit_on_error

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


def download_kind(record: ModelRecord) -> str:
    """How a checkpoint reaches the cache, in the words `derestore models` shows."""
    if record.bundled:
        return "bundled"
    if any(not s.startswith("gdrive:") for s in record.sources):
        return "automatic"
    if record.sources:
        return "automatic (Google Drive)"
    if record.manual_url:
        return "manual import"
    return "import only"


def _human(size: int | None) -> str:
    if not size:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return "?"


def _model_info(registry: Registry, record: ModelRecord) -> dict[str, Any]:
    from .. import hub

    path = hub.cached_path(record)
    entry = hub.cache_entry(record) if path else None
    task = registry.tasks.get(record.task)
    return {
        "task": record.task,
        "name": record.name,
        "arch": record.arch,
        "dataset": record.dataset,
        "default": bool(task and task.default == record.name),
        "cached": path is not None,
        "path": str(path) if path else None,
        "size": record.size or (entry.size if entry else None) or (path.stat().st_size if path and record.bundled else None),
        "license": record.license,
        "pinned": hub.pinned(record),
        "sha256": record.sha256 or (entry.sha256 if entry else None),
        "download": download_kind(record),
        "sources": list(record.sources),
        "manual_url": record.manual_url,
        "manual_code": record.manual_code,
        "notes": record.notes,
    }


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
        registry = _registry()
        if task is not None and task not in registry.tasks:
            from ..errors import UsageError

            raise UsageError(f"unknown task '{task}'; known tasks: {', '.join(sorted(registry.tasks))}")
        records = sorted(registry.models.values(), key=lambda r: (r.task, r.name))
        infos = [_model_info(registry, r) for r in records if task is None or r.task == task]
        if json_out:
            for info in infos:
                emit_json(info)
            return
        _print_table(infos)
        for name, published in registry.bundled_fallbacks().items():
            if task is None or task == name:
                console.print(f"note: {name} defaults to the bundled {registry.tasks[name].default}: its published "
                              f"checkpoints ({', '.join(r.name for r in published)}) need a manual download; "
                              "import one with `derestore weights import NAME FILE` and pass -m NAME")


def _print_table(infos: list[dict[str, Any]]) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("task", "name", "arch", "dataset", "default", "cached", "size", "licence", "pinned", "download"):
        table.add_column(column, no_wrap=column in ("name", "task"))
    for info in infos:
        if info["pinned"]:
            pinned = "yes"
        else:
            pinned = "recorded" if info["sha256"] else "no"
        table.add_row(
            info["task"],
            info["name"],
            info["arch"],
            info["dataset"],
            "✓" if info["default"] else "",
            "✓" if info["cached"] else "",
            _human(info["size"]),
            info["license"].split(";", 1)[0],
            pinned,
            info["download"],
        )
    # stdout carries the data; a pipe gets a wide table instead of one squeezed to 80 columns.
    out = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
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

    with exit_on_error():
        records = _records(_registry(), names)
    failed = 0
    for record in records:
        try:
            path = hub.fetch(record)
        except DerestoreError as exc:
            failed += 1
            console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
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
    architecture. The file's own name does not matter.

    Example: derestore weights import derestormer-snow100k ~/Downloads/Snow100K.pth
    """
    from .. import hub

    with exit_on_error():
        record = _registry().model(name)
        path = hub.import_file(record, file, check_loads=_check_loads_for(record))
        console.print(f"imported {file} as {record.name}")
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
            console.print(f"[yellow]missing:[/] {record.name} is not in the cache; "
                          f"`derestore weights download {record.name}` fetches it", soft_wrap=True)
        else:
            console.print(f"[bold red]corrupt:[/] {result.path}: sha256 {result.actual}, expected "
                          f"{result.expected}; deleted, it is downloaded again on next use", soft_wrap=True)
    if not records:
        console.print("no cached checkpoints to verify")
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
                console.print(f"removed {record.name} ({len(removed)} files in {hub.model_dir(record)})")
            else:
                console.print(f"{record.name} was not in the cache")
