"""Checkpoint registry: `weights.toml` (built-in plus `DERESTORE_REGISTRY` files) as typed records.

Pure data: nothing here touches the network or torch.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UsageError

ENV_REGISTRY = "DERESTORE_REGISTRY"

_TILING_FIELDS = ("tile", "overlap", "square")


@dataclass(frozen=True)
class Paper:
    psnr: float | None = None
    ssim: float | None = None


@dataclass(frozen=True)
class ModelRecord:
    """One checkpoint: where it comes from, how to check it, how to run it."""

    name: str
    task: str
    arch: str
    dataset: str = ""
    sources: tuple[str, ...] = ()
    filename: str = ""
    sha256: str | None = None
    size: int | None = None
    license: str = ""
    manual: str | None = None
    manual_url: str | None = None
    manual_code: str | None = None
    container: str = "auto"
    tile: int | None = None
    overlap: int | None = None
    square: bool | None = None
    paper: Paper | None = None
    notes: str = ""
    origin: str = ""  # which registry file defined it
    git_blob_sha1: str | None = None  # content pin from a git history (sha1 of "blob <len>\0" + bytes)
    bundled: str | None = None  # a file shipped inside the package, relative to it: never downloaded

    @property
    def file_name(self) -> str:
        """File name used in the cache and for mirrors."""
        if self.filename:
            return self.filename
        for src in self.sources:
            tail = src.rstrip("/").rsplit("/", 1)[-1]
            if tail and not src.startswith("gdrive:"):
                return tail
        return f"{self.name}.pth"

    @property
    def automatic(self) -> bool:
        """True when at least one source can be fetched without a browser (or the file ships with derestore)."""
        return bool(self.sources or self.bundled)


@dataclass(frozen=True)
class TaskRecord:
    name: str
    default: str
    summary: str = ""


@dataclass(frozen=True)
class Registry:
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    models: dict[str, ModelRecord] = field(default_factory=dict)
    files: tuple[str, ...] = ()

    def model(self, name: str) -> ModelRecord:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise UsageError(
                f"unknown model '{name}'; known models: {known} (see `derestore models`)"
            ) from None

    def default_for(self, task: str) -> ModelRecord:
        try:
            record = self.tasks[task]
        except KeyError:
            raise UsageError(
                f"unknown task '{task}'; known tasks: {', '.join(sorted(self.tasks))}"
            ) from None
        return self.model(record.default)

    def for_task(self, task: str) -> list[ModelRecord]:
        return [m for m in self.models.values() if m.task == task]

    def bundled_fallbacks(self) -> dict[str, list[ModelRecord]]:
        """Tasks that default to a bundled model because none of their published checkpoints downloads
        by itself, with those checkpoints."""
        fallbacks = {}
        for name, task in self.tasks.items():
            published = [r for r in self.for_task(name) if not r.bundled]
            if self.models[task.default].bundled and published and not any(r.sources for r in published):
                fallbacks[name] = published
        return fallbacks


def builtin_path() -> Path:
    return Path(str(resources.files("derestore").joinpath("weights.toml")))


def _model_record(name: str, raw: dict[str, Any], origin: str) -> ModelRecord:
    where = f"{origin}: [models.{name}]"
    for key in ("task", "arch"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise UsageError(f"{where} lacks '{key}'; add e.g. {key} = \"…\"")
    sources = raw.get("sources", [])
    if isinstance(sources, str) or not all(isinstance(s, str) for s in sources):
        raise UsageError(f"{where}: 'sources' must be a list of strings")
    sha = raw.get("sha256") or None
    if sha is not None:
        sha = sha.lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise UsageError(f"{where}: sha256 '{raw['sha256']}' is not 64 hex digits")
    blob = raw.get("git_blob_sha1") or None
    if blob is not None:
        blob = blob.lower()
        if len(blob) != 40 or any(c not in "0123456789abcdef" for c in blob):
            raise UsageError(f"{where}: git_blob_sha1 '{raw['git_blob_sha1']}' is not 40 hex digits")
    paper = raw.get("paper")
    hints: dict[str, Any] = {}
    for key in _TILING_FIELDS:
        if key in raw:
            hints[key] = raw[key]
    for key in ("tile", "overlap"):
        if key in hints and (not isinstance(hints[key], int) or hints[key] < 0):
            raise UsageError(f"{where}: '{key}' must be a non-negative integer")
    return ModelRecord(
        name=name,
        task=raw["task"],
        arch=raw["arch"],
        dataset=raw.get("dataset", ""),
        sources=tuple(sources),
        filename=raw.get("filename", ""),
        sha256=sha,
        size=raw.get("size") or None,
        license=raw.get("license", ""),
        manual=raw.get("manual") or None,
        manual_url=raw.get("manual_url") or None,
        manual_code=raw.get("manual_code") or None,
        container=raw.get("container", "auto"),
        paper=Paper(**paper) if isinstance(paper, dict) else None,
        notes=raw.get("notes", ""),
        origin=origin,
        git_blob_sha1=blob,
        bundled=raw.get("bundled") or None,
        **hints,
    )


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(
            f"registry file {path} does not exist; fix {ENV_REGISTRY} or create it"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"registry file {path} is not valid TOML: {exc}") from None


def load_registry(extra: list[str] | None = None) -> Registry:
    """The built-in registry with the files in `extra` (default: `$DERESTORE_REGISTRY`) merged over it.

    A later file replaces whole model/task records of the same name, so a user's
    entry never inherits stale fields (e.g. a sha256) from the one it overrides.
    """
    if extra is None:
        extra = [p for p in os.environ.get(ENV_REGISTRY, "").split(os.pathsep) if p]
    paths = [builtin_path()] + [Path(p).expanduser() for p in extra]
    tasks: dict[str, TaskRecord] = {}
    models: dict[str, ModelRecord] = {}
    for path in paths:
        data = _read(path)
        for name, raw in data.get("models", {}).items():
            models[name] = _model_record(name, raw, str(path))
        for name, raw in data.get("tasks", {}).items():
            previous = tasks.get(name)
            default = raw.get("default") or (previous.default if previous else "")
            summary = raw.get("summary") or (previous.summary if previous else "")
            tasks[name] = TaskRecord(name=name, default=default, summary=summary)
    for task in tasks.values():
        if task.default not in models:
            raise UsageError(
                f"task '{task.name}' defaults to unknown model '{task.default}'; "
                "fix its `default` in the registry"
            )
    return Registry(tasks=tasks, models=models, files=tuple(str(p) for p in paths))
