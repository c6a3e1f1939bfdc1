"""Ray's cost and gain on one machine: the same run with `ray="local"` and without, same images.

    python benchmarks/ray_throughput.py                       # 8 × 1024×768, -m lite-derain, this machine
    python benchmarks/ray_throughput.py --count 64 --workers 2 --device cuda   # e.g. on a GPU machine

Both runs go through `derestore.run` in this process, on the same synthetic
rainy photos, after one untimed run of one image that pays the model's first
use (caches) for both. Reported for each: megapixels per second end to end
(model load and, for Ray, its start included) and in steady state (from the
first result to the last), the time to the first result, and for Ray the
start-up cost it adds (`ray_startup_s`: its time to the first result minus the
plain run's; `ray_init_s`: the part before the replicas are created, i.e.
ray.init and sizing the cluster). Then the largest difference between the two
runs' outputs, in 8-bit levels. One JSON object on stdout.

Unless --no-namespace, it re-runs itself in a network namespace of its own with
only loopback up (root or user namespaces needed), so the Ray instance binds
to 127.0.0.1 and nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rainy_photo(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth scene with texture and bright diagonal streaks, uint8 H×W×3."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    scene = np.stack([0.5 + 0.35 * np.sin(x / (40 + 9 * c) + y / (55 + 5 * c) + seed + c) for c in range(3)], -1)
    scene += 0.04 * rng.standard_normal(scene.shape).astype(np.float32)
    streaks = (rng.random((height, width)) < 0.002).astype(np.float32)
    kernel_len = 15
    for shift in range(1, kernel_len):  # smear the seeds along a slant: rain streaks
        dx = shift // 3
        streaks[shift:, dx:] = np.maximum(streaks[shift:, dx:], streaks[:-shift, :width - dx] * 0.9)
    return (np.clip(scene + 0.5 * streaks[..., None], 0, 1) * 255).round().astype(np.uint8)


def timed_run(inputs: Path, output: Path, options: dict[str, object]) -> dict[str, object]:
    import derestore
    from derestore.tiled_engine import cpu_threads
    from derestore.runner import Finished, Loaded

    marks: dict[str, float] = {}
    done: list[float] = []
    pixels = 0

    def on_event(event: object) -> None:
        nonlocal pixels
        now = time.perf_counter()
        if isinstance(event, Loaded):
            marks["loaded"] = now
        elif isinstance(event, Finished) and event.result.status == "ok":
            done.append(now)
            pixels += (event.result.width or 0) * (event.result.height or 0)

    started = time.perf_counter()
    report = derestore.run([str(inputs)], output, threads=cpu_threads(), on_event=on_event, **options)
    ended = time.perf_counter()
    if report.failed or report.interrupted or not done:
        raise SystemExit(f"run failed: {report.counts()}")
    per_image = pixels / 1e6 / len(done)
    return {
        "images": len(done),
        "seconds": round(ended - started, 3),
        "mp_per_s": round(pixels / 1e6 / (ended - started), 3),
        "steady_mp_per_s": round(per_image * (len(done) - 1) / (done[-1] - done[0]), 3) if len(done) > 1 else None,
        "loaded_s": round(marks["loaded"] - started, 3),
        "first_result_s": round(done[0] - started, 3),
        "cluster": report.cluster,
    }


def max_difference(a: Path, b: Path) -> int:
    import cv2

    worst = 0
    for path in sorted(a.glob("*.png")):
        x = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.int32)
        y = cv2.imread(str(b / path.name), cv2.IMREAD_UNCHANGED).astype(np.int32)
        worst = max(worst, int(np.abs(x - y).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT")
    parser.add_argument("--model", default="lite-derain")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tile", default=None)
    parser.add_argument("--workers", type=int, default=None, help="Ray replicas (default: derestore's choice)")
    parser.add_argument("--no-namespace", action="store_true", help="run Ray on this machine's network as it is")
    args = parser.parse_args()

    if not args.no_namespace and not os.environ.get("DERESTORE_BENCH_NAMESPACE"):
        inner = shlex.join([sys.executable, *sys.argv])
        os.environ["DERESTORE_BENCH_NAMESPACE"] = "1"
        command = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child",
                   "sh", "-c", f"ip link set lo up && exec {inner}"]
        raise SystemExit(subprocess.call(command))

    import cv2

    width, height = (int(v) for v in args.size.lower().split("x"))
    options: dict[str, object] = {"model": args.model, "device": args.device, "tile": args.tile}
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        for i in range(args.count):
            cv2.imwrite(str(root / "in" / f"rain{i:03d}.png"), rainy_photo(width, height, i)[..., ::-1])
        (root / "warm").mkdir()
        cv2.imwrite(str(root / "warm" / "warm.png"), rainy_photo(width, height, 999)[..., ::-1])
        timed_run(root / "warm", root / "warm-out", options)  # first use of the model: caches, not timed
        plain = timed_run(root / "in", root / "plain", options)
        ray = timed_run(root / "in", root / "ray", {**options, "ray": "local", "ray_workers": args.workers})
        import torch

        result = {
            "machine": f"{os.cpu_count()} CPUs, " + (torch.cuda.get_device_name() if torch.cuda.is_available()
                                                    else "no GPU"),
            "model": args.model, "images": args.count, "size": args.size,
            "plain": plain, "ray_local": ray,
            "ray_startup_s": round(ray["first_result_s"] - plain["first_result_s"], 3),
            "ray_init_s": round(ray["loaded_s"] - plain["loaded_s"], 3),
            "max_difference_levels": max_difference(root / "plain", root / "ray"),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
