"""CPU cost of one forward pass per architecture, next to the published implementations' figures.

    .venv/bin/python benchmarks/arch_cost.py [--size 256] [--runs 3] [--threads 2]

Each network lives in its own subprocess (its own allocator and RSS), fp32,
batch 1, size×size, torch threads as given. The forwards are taken in turns,
one network after the other, so that a change in background load hits every
network alike. Reported: the first call, the median of `runs` further calls,
the process RSS before the forwards (torch plus model) and the peak RSS
during them (VmHWM, reset just before them through /proc/self/clear_refs;
Linux only).

DeRestormer is measured twice: as derestore loads it (each DO-Conv folded
into a plain convolution) and in its training form (DO-Conv kernels composed
on every call, as the published code runs), which gives the fold's speed-up.
Restormer and MPRNet (spandrel_extra_arches) are there for reference. The
published figures come from shared/reference/archs/*/facts.md: the reference
code on CPU, 2 threads, torch 2.14.1, on another machine; compare ratios
between rows rather than seconds across machines.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import time

# name → (module, class, keyword arguments) of the default (published) network
NETWORKS = {
    "DeRestormer (folded)": ("derestore.archs.derestormer", "DeRestormer", {}),
    "DeRestormer (training form)": ("derestore.archs.derestormer", "DeRestormer", {}),
    "DRSformer": ("derestore.archs.drsformer", "DRSformer", {}),
    "DRSformer 200L/SPA": ("derestore.archs.drsformer", "DRSformer", {"mefc": False}),
    "DTPNet": ("derestore.archs.dtpnet", "DTPNet", {}),
    "Restormer": ("spandrel_extra_arches.architectures.Restormer", "Restormer", {}),
    "MPRNet": ("spandrel_extra_arches.architectures.MPRNet", "MPRNet", {}),
}
# name → (seconds: first call, later calls; peak RSS MiB; RSS before the forward MiB), from facts.md
PUBLISHED = {
    "DeRestormer (training form)": ((13.7, 12.1, 11.3), 1613, 984),
    "DRSformer": ((18.6, 18.6, 17.6), 2112, 843),
    "DRSformer 200L/SPA": ((13.6, 11.7, 11.9), 2113, 833),
    "DTPNet": ((9.5, 9.3, 9.1), 1486, 930),
}


def build(name: str):
    """The network `name`, fp32, eval mode; DeRestormer's DO-Convs folded as derestore loads it."""
    module, cls, kwargs = NETWORKS[name]
    model = getattr(importlib.import_module(module), cls)(**kwargs)
    if name == "DeRestormer (folded)":
        from derestore.archs.derestormer import fold_do_convs

        fold_do_convs(model)
    return model.eval()


def mebibytes(field: str) -> float:
    from throughput import status_bytes  # this script's folder is on sys.path

    return status_bytes(field) / 2**20


def worker(name: str, size: int, threads: int) -> None:
    """One network in this process, driven over stdin/stdout: `run` → seconds of one forward, `end` → peak RSS."""
    import gc

    import torch

    torch.set_num_threads(threads)
    model = build(name)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    gc.collect()
    print(mebibytes("VmRSS"), flush=True)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    for command in sys.stdin:
        if command.strip() == "end":
            print(mebibytes("VmHWM"), flush=True)
            return
        with torch.inference_mode():
            start = time.perf_counter()
            model(x)
            print(time.perf_counter() - start, flush=True)


def compose_seconds(threads: int, repeats: int = 5) -> float:
    """Median time to compute all of DeRestormer's DO-Conv kernels once: the work the fold removes."""
    import torch

    from derestore.archs.derestormer import DeRestormer, DOConv2d

    torch.set_num_threads(threads)
    convs = [m for m in DeRestormer().modules() if isinstance(m, DOConv2d)]
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for conv in convs:
                conv.kernel()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def published_cells(name: str) -> str:
    figures = PUBLISHED.get(name)
    if figures is None:
        return f"{'—':>10}{'—':>9}{'—':>9}"
    (first, *later), peak, before = figures
    return f"{statistics.median(later):>9.1f}s{peak:>9.0f}{before:>9.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3, help="timed calls after the first one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="only the networks whose name contains this")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.size, args.threads)
        return

    import torch

    names = [n for n in NETWORKS if not args.only or args.only.lower() in n.lower()]
    print(f"torch {torch.__version__}, CPU, {args.threads} threads, fp32, 1×3×{args.size}×{args.size}; "
          f"first call, then the median of {args.runs} calls taken in turns across the networks; RSS in MiB\n")
    # Idle workers must not spin their OpenMP threads while another one measures.
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    workers = {}
    for name in names:
        cmd = [sys.executable, __file__, "--worker", name, "--size", str(args.size), "--threads", str(args.threads)]
        workers[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        workers[name].rss_before = float(workers[name].stdout.readline())  # type: ignore[attr-defined]

    def ask(name: str, command: str) -> float:
        workers[name].stdin.write(command + "\n")
        workers[name].stdin.flush()
        return float(workers[name].stdout.readline())

    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.runs + 1):
        for name in names:
            times[name].append(ask(name, "run"))
    print(f"{'network':<29}{'first':>8}{'median':>9}{'RSS pre':>9}{'peak':>8}{'+fwd':>7}"
          f"  | published:{'median':>8}{'peak':>9}{'RSS pre':>9}")
    for name in names:
        before, peak = workers[name].rss_before, ask(name, "end")  # type: ignore[attr-defined]
        workers[name].wait()
        first, median = times[name][0], statistics.median(times[name][1:])
        print(f"{name:<29}{first:>7.1f}s{median:>8.1f}s{before:>9.0f}{peak:>8.0f}{peak - before:>7.0f}"
              f"  |          {published_cells(name)}")
    if {"DeRestormer (folded)", "DeRestormer (training form)"} <= set(names):
        folded = statistics.median(times["DeRestormer (folded)"][1:])
        unfolded = statistics.median(times["DeRestormer (training form)"][1:])
        print(f"\nDO-Conv folding: {unfolded / folded:.2f}× faster ({unfolded:.1f} s → {folded:.1f} s per forward); "
              f"what it saves, composing every DO-Conv kernel: {compose_seconds(args.threads):.3f} s per forward")


if __name__ == "__main__":
    main()
