"""Checkpoint registry: `weights.toml` (built-in plus `DERESTORE_REGISTRY` files) as typed records.

Pure data: nothing here touches the network or torch.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UsageError

ENV_REGISTRY = "DERESTORE_REGISTRY"

# A model name names a cache folder and appears in commands and messages: no path or markup characters.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


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
    stats_window: int | None = None  # local-statistics window in pixels, 0 = global (local_stats); None: the arch's
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


def _suggest(name: str, known: Iterable[str]) -> str:
    """"did you mean 'a', 'b' or 'c'? " for the closest names (else names containing `name`), or ""."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3) or [k for k in known if name and name in k][:3]
    if not close:
        return ""
    quoted = [f"'{c}'" for c in close]
    return f"did you mean {', '.join(quoted[:-1])} or {quoted[-1]}? " if len(quoted) > 1 else f"did you mean {quoted[0]}? "


@dataclass(frozen=True)
class Registry:
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    models: dict[str, ModelRecord] = field(default_factory=dict)
    files: tuple[str, ...] = ()

    def model(self, name: str) -> ModelRecord:
        try:
            return self.models[name]
        except KeyError:
            raise UsageError(
                f"unknown model '{name}'; {_suggest(name, self.models)}`derestore models` lists them all"
            ) from None

    def task(self, name: str) -> TaskRecord:
        try:
            return self.tasks[name]
        except KeyError:
            raise UsageError(f"unknown task '{name}'; known tasks: {', '.join(sorted(self.tasks))}") from None

    def default_for(self, task: str) -> ModelRecord:
        return self.model(self.task(task).default)

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


# ---------------------------------------------------------------- validation
# A registry file is user input: every field is checked for its type, so a typo
# is one line naming file, record and field instead of a TypeError later on.


def _describe(value: object) -> str:
    """The TOML type of `value`, with the value itself when short, for "got …" in messages."""
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
             (list, "an array"), (dict, "a table"))
    kind = next((k for t, k in kinds if isinstance(value, t)), "a date")
    if isinstance(value, (list, dict)):
        return kind
    shown = repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    return f"{kind} ({shown[:40]}{'…' if len(shown) > 40 else ''})"


class _Where:
    """A record in a registry file, to name in error messages."""

    def __init__(self, path: str, *keys: str) -> None:
        self.path = path
        self.keys = keys
        # As TOML spells it: a key with odd characters (spaces, a newline) is quoted, so the message stays one line.
        self.record = "[" + ".".join(k if _BARE_KEY.fullmatch(k) else json.dumps(k) for k in keys) + "]"

    def error(self, message: str) -> UsageError:
        return UsageError(f"registry file {self.path}: {self.record} {message}")

    def wrong(self, key: str, value: object, expected: str) -> UsageError:
        return self.error(f"{key} must be {expected}, got {_describe(value)}")


def _unknown_key(where: _Where, key: str, known: list[str]) -> UsageError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    return where.error(f"has unknown key {key!r}; {hint}")


def _text(where: _Where, key: str, value: object) -> str:
    if not isinstance(value, str):
        raise where.wrong(key, value, "a string")
    return value


def _count(where: _Where, key: str, value: object, *, minimum: int) -> int:
    # bool is an int in Python: `size = true` must not pass as 1
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise where.wrong(key, value, "a positive integer" if minimum > 0 else "an integer ≥ 0")
    return value


def _flag(where: _Where, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise where.wrong(key, value, "true or false")
    return value


def _texts(where: _Where, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise where.wrong(key, value, 'an array of strings (e.g. ["https://…"])')
    return tuple(value)


def _hex(where: _Where, key: str, value: object, digits: int) -> str | None:
    text = _text(where, key, value).strip().lower()
    if not text:
        return None
    if len(text) != digits or any(c not in "0123456789abcdef" for c in text):
        raise where.wrong(key, value, f"{digits} hex digits")
    return text


def _paper(where: _Where, value: object) -> Paper:
    if not isinstance(value, dict):
        raise where.wrong("paper", value, "a table like { psnr = 33.69, ssim = 0.94 }")
    known = ["psnr", "ssim"]
    for key, figure in value.items():
        if key not in known:
            raise _unknown_key(_Where(where.path, *where.keys, "paper"), key, known)
        if not isinstance(figure, (int, float)) or isinstance(figure, bool):
            raise where.wrong(f"paper.{key}", figure, "a number")
    return Paper(**{k: float(v) for k, v in value.items()})


_MODEL_FIELDS: dict[str, Any] = {
    "task": _text,
    "arch": _text,
    "dataset": _text,
    "sources": _texts,
    "filename": _text,
    "sha256": lambda w, k, v: _hex(w, k, v, 64),
    "size": lambda w, k, v: _count(w, k, v, minimum=1),
    "license": _text,
    "manual": lambda w, k, v: _text(w, k, v) or None,
    "manual_url": lambda w, k, v: _text(w, k, v) or None,
    "manual_code": lambda w, k, v: _text(w, k, v) or None,
    "container": _text,
    "tile": lambda w, k, v: _count(w, k, v, minimum=0),
    "overlap": lambda w, k, v: _count(w, k, v, minimum=0),
    "square": _flag,
    "stats_window": lambda w, k, v: _count(w, k, v, minimum=0),
    "paper": lambda w, k, v: _paper(w, v),
    "notes": _text,
    "git_blob_sha1": lambda w, k, v: _hex(w, k, v, 40),
    "bundled": lambda w, k, v: _text(w, k, v) or None,
}
_TASK_FIELDS: dict[str, Any] = {"default": _text, "summary": _text}


def _fields(where: _Where, raw: object, schema: dict[str, Any], example: str) -> dict[str, Any]:
    """`raw` checked against `schema`: every key known, every value of its type (converted)."""
    if not isinstance(raw, dict):
        raise where.error(f"must be a table (e.g. {example}), got {_describe(raw)}")
    out = {}
    for key, value in raw.items():
        if key not in schema:
            raise _unknown_key(where, key, list(schema))
        out[key] = schema[key](where, key, value)
    return out


def _model_record(name: str, raw: object, origin: str) -> ModelRecord:
    where = _Where(origin, "models", name)
    if not _MODEL_NAME.fullmatch(name):
        raise UsageError(
            f"registry file {origin}: model name {name!r} is not usable; name it with letters, digits, "
            "'.', '_', '-' and '+' only, not starting with '.'"
        )
    fields = _fields(where, raw, _MODEL_FIELDS, f'[models.{name}] with task = "derain", arch = "Restormer"')
    for key in ("task", "arch"):
        if not fields.get(key):
            raise where.error(f"lacks '{key}'; add e.g. {key} = \"…\"")
    return ModelRecord(name=name, origin=origin, **fields)


def _table(path: Path, data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise UsageError(
            f"registry file {path}: '{key}' must be a table of [{key}.NAME] records, got {_describe(value)}"
        )
    return value


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(
            f"registry file {path} does not exist; fix {ENV_REGISTRY} or create it"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"registry file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read registry file {path}: {exc.strerror or exc}; fix {ENV_REGISTRY}") from None


def load_registry(extra: list[str] | None = None) -> Registry:
    """The built-in registry with the files in `extra` (default: `$DERESTORE_REGISTRY`) merged over it.

    A later file replaces whole model records of the same name, so a user's
    entry never inherits stale fields (e.g. a sha256) from the one it overrides;
    a task entry may change only its default or its summary.
    Raises UsageError (one line: file, record, field) for any malformed file.
    """
    if extra is None:
        extra = [p for p in os.environ.get(ENV_REGISTRY, "").split(os.pathsep) if p]
    paths = [builtin_path()] + [Path(p).expanduser() for p in extra]
    tasks: dict[str, TaskRecord] = {}
    models: dict[str, ModelRecord] = {}
    defined_in: dict[str, str] = {}
    for path in paths:
        data = _read(path)
        for key in data:
            if key not in ("models", "tasks"):
                close = difflib.get_close_matches(key, ["models", "tasks"], n=1)
                hint = f"did you mean [{close[0]}.NAME]?" if close else "only [models.NAME] and [tasks.NAME] tables"
                raise UsageError(f"registry file {path}: unknown top-level key '{key}'; {hint}")
        for name, raw in _table(path, data, "models").items():
            models[name] = _model_record(name, raw, str(path))
        for name, raw in _table(path, data, "tasks").items():
            where = _Where(str(path), "tasks", name)
            fields = _fields(where, raw, _TASK_FIELDS, '[tasks.NAME] with default = "MODEL"')
            previous = tasks.get(name)
            default = fields.get("default") or (previous.default if previous else "")
            if not default:
                raise where.error("lacks 'default'; add default = \"MODEL\" naming the model the task runs")
            summary = fields.get("summary") or (previous.summary if previous else "")
            tasks[name] = TaskRecord(name=name, default=default, summary=summary)
            defined_in[name] = str(path)
    for task in tasks.values():
        if task.default not in models:
            raise UsageError(
                f"registry file {defined_in[task.name]}: [tasks.{task.name}] default names unknown model "
                f"'{task.default}'; {_suggest(task.default, models)}name a [models.NAME] record there"
            )
    return Registry(tasks=tasks, models=models, files=tuple(str(p) for p in paths))
