"""Measure the per-architecture figures in derestore/tuning.py (not a test).

    python benchmarks/tuning.py restormer mprnet m3snet derestormer drsformer dtpnet nafnet16

For each architecture (random weights, default published configuration), in a
fresh subprocess: CPU forward time at 256×256, contiguous vs channels_last,
alternated `--repeat` times (median), and the peak-RSS growth from a 256² to a
384² forward, i.e. activation bytes per input pixel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(name: str, repeat: int, threads: int) -> dict[str, object]:
    import spandrel
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import build_state, status_bytes

    from derestore.loading import install_architectures

    install_architectures()
    torch.set_num_threads(threads)
    descriptor = spandrel.ModelLoader().load_from_state_dict(build_state(name)).eval()
    model = descriptor.model
    peaks = []
    with torch.inference_mode():
        for side in (256, 384):  # memory first, before any channels_last copy exists
            descriptor(torch.rand(1, 3, side, side))
            peaks.append(status_bytes("VmHWM"))
        x = torch.rand(1, 3, 256, 256)
        times: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
        for _ in range(repeat):
            for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
                model.to(memory_format=fmt)
                t0 = time.perf_counter()
                descriptor(x.contiguous(memory_format=fmt))
                times[layout].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "arch": descriptor.architecture.id,
            "contiguous_s": round(med["contiguous"], 3), "channels_last_s": round(med["channels_last"], 3),
            "speedup": round(med["contiguous"] / med["channels_last"], 2),
            "bytes_per_pixel": round((peaks[1] - peaks[0]) / (384**2 - 256**2))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["restormer", "mprnet", "m3snet", "derestormer", "drsformer",
                                                  "dtpnet", "nafnet16"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeat, args.threads)))
        return
    rows = []
    for name in args.models:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--repeat", str(args.repeat),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\nCHANNELS_LAST =", {r["arch"]: r["speedup"] > 1.05 for r in rows})
    print("BYTES_PER_PIXEL =", {r["arch"]: r["bytes_per_pixel"] for r in rows})


if __name__ == "__main__":
    main()
