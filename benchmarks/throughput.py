"""Throughput: derestore's pipeline against the papers' own inference protocol, side by side.

    python benchmarks/throughput.py --model nafnet16 --size 1024x768 --count 8
    python benchmarks/throughput.py --model restormer --size 1920x1080 --count 100 --device cuda

(a) baseline — what the published test scripts do: one image at a time, decode →
    whole image padded to the model's multiple (DeRestormer: its 256×256
    window partition) → fp32 forward → encode, all in sequence;
(b) derestore's pipeline (`derestore.restore`) with the options given.

Both run in this process on the same synthetic images with the same random
weights. Prints megapixels/second, peak device memory, peak RSS, the speed
ratio b/a and the PSNR of (b)'s outputs against (a)'s. The model is loaded
before (b)'s clock starts; its load time, first use (ONNX export and timing,
cached) included, is reported as `load_seconds`.

--processes also times both as whole processes, start-up included: (a) as a
script of its own, (b) as the `derestore` command (after one untimed run that
pays the first use, reported as `first_run_seconds`), alternated --repeat times.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def build_state(name: str) -> dict[str, torch.Tensor]:
    """Random-weight state dicts of the benchmarked architectures (default published configurations)."""
    torch.manual_seed(0)
    if name == "restormer":
        from spandrel_extra_arches.architectures.Restormer import Restormer

        net = Restormer()
    elif name == "mprnet":
        from spandrel_extra_arches.architectures.MPRNet import MPRNet

        net = MPRNet()
    elif name == "derestormer":
        from derestore.archs.derestormer import DeRestormer

        net = DeRestormer()
    elif name == "drsformer":
        from derestore.archs.drsformer import DRSformer

        net = DRSformer()
    elif name == "dtpnet":
        from derestore.archs.dtpnet import DTPNet

        net = DTPNet()
    elif name == "m3snet":
        from spandrel_extra_arches.architectures.M3SNet import M3SNet

        net = M3SNet()
    elif name.startswith("nafnet"):
        from spandrel.architectures.NAFNet import NAFNet

        width = int(name[len("nafnet"):] or 16)
        net = NAFNet(width=width, middle_blk_num=1, enc_blk_nums=[1, 1, 1, 1], dec_blk_nums=[1, 1, 1, 1])
    else:
        raise SystemExit(f"unknown model {name}; use restormer, mprnet, m3snet, derestormer, drsformer, dtpnet or nafnetW")
    return net.state_dict()


def synthetic_images(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """Photo-like test images: smooth colour fields, edges and fine texture."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(count):
        base = np.stack([0.5 + 0.35 * np.sin(x / (40 + 9 * c + i) + y / (55 + 5 * c) + c) for c in range(3)], -1)
        blocks = ((x // (60 + i)) % 2 == (y // 45) % 2)[..., None] * 0.15
        img = np.clip(base + blocks + 0.03 * rng.standard_normal(base.shape, dtype=np.float32), 0, 1)
        path = folder / f"img{i:04d}.png"
        cv2.imwrite(str(path), np.round(img[..., ::-1] * 255).astype(np.uint8))
        paths.append(path)
    return paths


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, …) in bytes (Linux only)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status (Linux only)")


class PeakRSS:
    """Samples this process's resident set size on a thread; `peak` is the maximum seen, in bytes."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def now() -> int:
        return status_bytes("VmRSS")

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


class DeviceBusy:
    """Samples the GPU's utilisation (NVML, through torch) on a thread; `mean` is the share of samples
    in which a kernel was running, in percent — how busy the device was over the wall time."""

    def __init__(self, device: torch.device, interval: float = 0.02) -> None:
        self.device, self.interval, self.samples, self._stop = device, interval, [], threading.Event()

    def __enter__(self) -> "DeviceBusy":
        if self.device.type == "cuda":
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception:  # no NVML bindings: nothing to report
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.device.type == "cuda":
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def run_baseline(files: list[Path], out: Path, descriptor, device: torch.device) -> None:
    """The published protocol: sequential, batch 1, fp32, whole image padded to the multiple."""
    from derestore.archs import PUBLISHED_WINDOWS

    multiple = descriptor.size_requirements.multiple_of
    windows = PUBLISHED_WINDOWS.get(descriptor.architecture.id)
    model = descriptor.model.to(device).float().eval()
    call = descriptor._call_fn
    for path in files:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float().div(255).to(device)
        h, w = x.shape[-2:]
        with torch.no_grad():
            if windows is not None:
                y = windows(lambda t: call(model, t), x, 256)
            else:
                ph, pw = (multiple - h % multiple) % multiple, (multiple - w % multiple) % multiple
                y = call(model, F.pad(x, (0, pw, 0, ph), mode="reflect"))[..., :h, :w]
        y = y.clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
        cv2.imwrite(str(out / path.name), np.round(y[..., ::-1] * 255).astype(np.uint8))


def psnr_dirs(a: Path, b: Path) -> float:
    mse = []
    for pa in sorted(a.glob("*.png")):
        x = cv2.imread(str(pa)).astype(np.float64)
        y = cv2.imread(str(b / pa.name)).astype(np.float64)
        mse.append(np.mean((x - y) ** 2))
    m = float(np.mean(mse))
    return math.inf if m == 0 else 10 * math.log10(255**2 / m)


def time_processes(ckpt: Path, root: Path, args: argparse.Namespace) -> dict[str, object]:
    """(a) and (b) as whole processes on the images of root/in, start-up included (see the docstring)."""
    def baseline(out: Path) -> list[str]:
        return [sys.executable, __file__, "--baseline-process", str(ckpt), str(root / "in"), str(out),
                "--device", args.device]

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "derestore", "denoise", str(root / "in"), "-o", str(out), "--weights",
                str(ckpt), "--tile", args.tile, "--overlap", str(args.overlap), "--batch-size", str(args.batch),
                "--device", args.device, "--precision", args.precision, "--layout", args.layout,
                "--backend", args.backend, "--stats", args.stats, "-q"]

    def timed(cmd: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        return time.perf_counter() - t0

    first = timed(command(root / "pb-first"))
    runs: dict[str, list[float]] = {"baseline": [], "derestore": []}
    for i in range(args.repeat):
        runs["baseline"].append(timed(baseline(root / f"pa{i}")))
        runs["derestore"].append(timed(command(root / f"pb{i}")))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"baseline_seconds": [round(t, 2) for t in runs["baseline"]],
            "derestore_seconds": [round(t, 2) for t in runs["derestore"]],
            "first_run_seconds": round(first, 2), "speedup": round(med["baseline"] / med["derestore"], 3),
            "psnr_b_vs_a_db": round(psnr_dirs(root / "pa0", root / "pb0"), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="nafnet16")
    ap.add_argument("--size", default="1024x768", help="WxH of the synthetic images")
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--tile", default="0", help="pixels, 0 = whole image, or auto")
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiling", default="blend")
    ap.add_argument("--layout", default="auto")
    ap.add_argument("--backend", default="auto", help="auto | torch | onnxruntime")
    ap.add_argument("--stats", default="global",
                    help="auto | local | global; global (default) runs the same network as the published protocol")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--processes", action="store_true", help="also time whole processes, start-up included")
    ap.add_argument("--repeat", type=int, default=1, help="--processes: runs of each, alternated (median)")
    ap.add_argument("--baseline-process", nargs=3, metavar=("CKPT", "IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_process:
        from derestore.engine import choose_device
        from derestore.loading import load_model

        ckpt, src, out = map(Path, args.baseline_process)
        out.mkdir(parents=True, exist_ok=True)
        run_baseline(sorted(src.glob("*.png")), out, load_model(ckpt).descriptor, choose_device(args.device))
        return

    import derestore
    from derestore.engine import choose_device, set_cpu_threads
    from derestore.tiled_engine import cpu_threads
    from derestore.loading import load_model

    set_cpu_threads(cpu_threads())  # as the command line does; the library leaves threads to its host

    width, height = (int(v) for v in args.size.lower().split("x"))
    device = choose_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = root / f"{args.model}.pth"
        torch.save({"params": build_state(args.model)}, ckpt)
        (root / "in").mkdir()
        files = synthetic_images(root / "in", args.count, width, height)
        mpix = args.count * width * height / 1e6
        report: dict[str, object] = {"model": args.model, "size": args.size, "count": args.count, "device": str(device)}

        if not args.skip_baseline:
            (root / "a").mkdir()
            descriptor = load_model(ckpt).descriptor
            run_baseline(files[:1], root / "a", descriptor, device)  # warm-up, as (b) gets one too
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with PeakRSS() as rss, DeviceBusy(device) as busy_a:
                t0 = time.perf_counter()
                run_baseline(files, root / "a", descriptor, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                ta = time.perf_counter() - t0
            report["baseline"] = {"seconds": round(ta, 3), "mpix_per_s": round(mpix / ta, 3),
                                  "peak_rss_mb": round(rss.peak / 2**20), "device_busy_pct": busy_a.mean,
                                  "peak_device_mb": round(torch.cuda.max_memory_allocated() / 2**20)
                                  if device.type == "cuda" else None}
            del descriptor

        t0 = time.perf_counter()
        typical = derestore.api.parse_tile(args.tile)
        model = derestore.load(weights=ckpt, device=args.device, precision=args.precision, batch_size=args.batch,
                               layout=args.layout, tune_kernels=True, backend=args.backend, stats=args.stats,
                               typical_tile=typical if isinstance(typical, int) else None)
        load_seconds = time.perf_counter() - t0
        tile = derestore.api.parse_tile(args.tile)
        rss_model = PeakRSS.now()  # the model is loaded; what follows is the pipeline's own memory
        (root / "b").mkdir()
        warm = list(derestore.restore([str(files[0])], root / "b", model=model, tile=tile,
                                      overlap=args.overlap, tiling=args.tiling))
        assert warm[0].status == "ok", warm[0].error
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss, DeviceBusy(device) as busy_b:
            t0 = time.perf_counter()
            results = list(derestore.restore([str(root / "in")], root / "b", model=model, tile=tile,
                                             overlap=args.overlap, tiling=args.tiling))
            if device.type == "cuda":
                torch.cuda.synchronize()
            tb = time.perf_counter() - t0
        assert all(r.status == "ok" for r in results), [r.error for r in results if r.error]
        report["derestore"] = {"seconds": round(tb, 3), "mpix_per_s": round(mpix / tb, 3),
                               "peak_rss_mb": round(rss.peak / 2**20),
                               "peak_rss_beyond_model_mb": round((rss.peak - rss_model) / 2**20),
                               "device_busy_pct": busy_b.mean,
                               "precision": model.engine.precision, "channels_last": model.engine.channels_last,
                               "backend": model.engine.backend, "load_seconds": round(load_seconds, 2),
                               "precision_probe": model.engine.verdict.__dict__ if model.engine.verdict else None,
                               "tile": args.tile, "batch": args.batch,
                               "peak_device_mb": round(torch.cuda.max_memory_allocated() / 2**20)
                               if device.type == "cuda" else None}
        if not args.skip_baseline:
            report["speedup"] = round(ta / tb, 3)
            report["psnr_b_vs_a_db"] = round(psnr_dirs(root / "a", root / "b"), 2)
        if args.processes:
            report["processes"] = time_processes(ckpt, root, args)
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
