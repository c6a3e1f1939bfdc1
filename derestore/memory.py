"""How much more memory this process may use: the host's available RAM, capped by its cgroup's limit.

A SLURM job (`--mem`) or a container (`docker --memory`, Kubernetes limits)
runs inside a memory cgroup whose limit is far below what `/proc/meminfo`
reports as available; planning tiles from the host figure gets the job killed.
Both cgroup versions are read: v2 (`memory.max`, `memory.current`) and v1
(`memory.limit_in_bytes`, `memory.usage_in_bytes`), for the process's own
group and every ancestor (a parent's limit binds its children).
"""

from __future__ import annotations

import os
from pathlib import Path

# cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages), not as "max".
_UNLIMITED = 1 << 60


def available_bytes(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes this process may still allocate: the smallest of the host's available RAM and the headroom
    of each memory cgroup that contains it."""
    figures = [host_available(proc)]
    figures += [limit - used for limit, used in cgroup_limits(proc, cgroup_root)]
    known = [f for f in figures if f is not None]
    return max(0, min(known)) if known else 0


def host_available(proc: Path = Path("/proc")) -> int | None:
    """MemAvailable from /proc/meminfo, else what sysconf reports where the platform has it."""
    try:
        with open(proc / "meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    names = getattr(os, "sysconf_names", {})
    if "SC_AVPHYS_PAGES" in names and "SC_PAGE_SIZE" in names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def cgroup_limits(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> list[tuple[int, int]]:
    """(limit, usage) in bytes of every memory cgroup, v2 or v1, from the process's own up to the root."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            # v2: mounted at the root itself, or at .../unified beside v1 hierarchies
            for base in (cgroup_root, cgroup_root / "unified"):
                found += _walk(base, path, "memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            found += _walk(cgroup_root / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes")
    return found


def _walk(base: Path, path: str, limit_file: str, usage_file: str) -> list[tuple[int, int]]:
    found = []
    group = base / path.lstrip("/")
    while True:
        limit, used = _read_number(group / limit_file), _read_number(group / usage_file)
        if limit is not None and used is not None and limit < _UNLIMITED:
            found.append((limit, used))
        if group == base or base not in group.parents:
            return found
        group = group.parent


def _read_number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return _UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None
