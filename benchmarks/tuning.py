"""Measure, per architecture, what derestore's `auto` choices rest on (not a test).

    python benchmarks/tuning.py restormer mprnet m3snet derestormer drsformer dtpnet nafnet16

For each architecture (random weights, default published configuration), in a
fresh subprocess, on this machine's CPU:

- the peak-RSS growth from a 256² to a 384² forward, i.e. activation bytes per
  input pixel (derestore/tuning.py's BYTES_PER_PIXEL table);
- the forward time at 256×256 (or `--size HxW`) in PyTorch, contiguous and
  channels_last, and in ONNX Runtime on the exported graph, alternated
  `--repeat` times (median);
- whether the export works and is exact (max abs difference from PyTorch on
  derestore's verification probe) and what it costs;
- derestore's own first-use measurement (`derestore.onnx_backend.choose` with
  an empty cache, timing at the `--size` width as the working tile): its
  verdict and how long the first run pays for it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(name: str, repeat: int, threads: int, size: tuple[int, int] = (256, 256)) -> dict[str, object]:
    import spandrel
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import build_state, status_bytes

    from derestore import onnx_backend
    from derestore.loading import install_architectures

    install_architectures()
    torch.set_num_threads(threads)
    descriptor = spandrel.ModelLoader().load_from_state_dict(build_state(name)).eval()
    model = descriptor.model
    row: dict[str, object] = {"model": name, "arch": descriptor.architecture.id}
    peaks = []
    with torch.inference_mode():
        for side in (256, 384):  # memory first, before any channels_last copy or ONNX session exists
            descriptor(torch.rand(1, 3, side, side))
            peaks.append(status_bytes("VmHWM"))
    row["bytes_per_pixel"] = round((peaks[1] - peaks[0]) / (384**2 - 256**2))

    t0 = time.perf_counter()
    try:
        data = onnx_backend.export(descriptor)
    except onnx_backend.ExportError as exc:
        row["export_error"], network = str(exc), None
    else:
        row["export_s"] = round(time.perf_counter() - t0, 2)
        network = onnx_backend.OnnxNetwork(data, onnx_backend.provider_for(torch.device("cpu"), []), descriptor)
        row["max_abs_diff"] = float(f"{onnx_backend.verify(descriptor, network):.2g}")

    x = torch.rand(1, 3, *size)
    row["size"] = f"{size[0]}x{size[1]}"
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    times: dict[str, list[float]] = {k: [] for k in [*layouts, *(["onnxruntime"] if network else [])]}
    with torch.inference_mode():
        for i in range(repeat + 1):  # the first round warms up
            for layout in times:
                if layout in layouts:
                    model.to(memory_format=layouts[layout])
                    run = lambda: descriptor(x.contiguous(memory_format=layouts[layout]))  # noqa: E731
                else:
                    run = lambda: network(x)  # noqa: E731
                t0 = time.perf_counter()
                run()
                if i:
                    times[layout].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    row.update({f"{k}_s": round(v, 3) for k, v in med.items()})
    row["channels_last_speedup"] = round(med["contiguous"] / med["channels_last"], 2)
    if network is not None:
        row["onnxruntime_speedup"] = round(min(med["contiguous"], med["channels_last"]) / med["onnxruntime"], 2)

    model.to(memory_format=torch.contiguous_format)
    with tempfile.TemporaryDirectory() as home:
        os.environ["DERESTORE_HOME"] = home
        choice = onnx_backend.choose(descriptor, torch.device("cpu"), backend="auto", sha256="0" * 64,
                                     channels_last=False, layout_auto=True, tile=size[1])
    verdict = choice.verdict
    row["first_use"] = {"backend": "onnxruntime" if choice.network else "torch",
                        "channels_last": choice.channels_last, "seconds": verdict.measure_seconds,
                        "timed": verdict.seconds}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["restormer", "mprnet", "m3snet", "derestormer", "drsformer",
                                                  "dtpnet", "nafnet16"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", default="256x256", help="HxW of the timed input")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    if args.one:
        print(json.dumps(measure(args.one, args.repeat, args.threads, size)))  # type: ignore[arg-type]
        return
    rows = []
    for name in args.models:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--repeat", str(args.repeat),
                              "--threads", str(args.threads), "--size", args.size], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\nBYTES_PER_PIXEL =", {r["arch"]: r["bytes_per_pixel"] for r in rows})


if __name__ == "__main__":
    main()
