"""Speed of `derestore eval` against BasicSR's psnr_ssim.py on 100 pairs of 1024x768 (not a test).

BasicSR is run from its own, unmodified source: install it without its heavy
dependencies into a throwaway venv and point --basicsr at the package folder:

    python3 -m venv /tmp/bsr && /tmp/bsr/bin/pip install --no-deps basicsr==1.4.2
    .venv/bin/python benchmarks/metrics_speed.py --basicsr /tmp/bsr/lib/python3.11/site-packages/basicsr

Both sides are timed end to end (read both PNGs, score, mean) and on preloaded
arrays (scoring only). BasicSR's routes: `test_y_channel=True` (Y, the route
deraining repositories use) against derestore's `restormer`, and the RGB route
against derestore's `rgb` (the same definition, so the means must agree).
On a shared machine, `--repeat N` runs every route N times, interleaved, and
keeps each route's best wall and CPU time, so a burst of load elsewhere does
not decide the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import types
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from derestore import metrics
from derestore.evaluate import default_workers, evaluate, pair_paths


def make_pairs(folder: Path, count: int, height: int, width: int) -> tuple[Path, Path]:
    """Smooth random scenes (GT) and noisy, slightly blurred predictions, as 8-bit RGB PNGs."""
    gt_dir, pred_dir = folder / "gt", folder / "pred"
    gt_dir.mkdir(parents=True, exist_ok=True)
    pred_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = cv2.resize(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8), (width, height),
                          interpolation=cv2.INTER_CUBIC)
        pred = cv2.GaussianBlur(base, (0, 0), 0.8).astype(np.float32) + rng.normal(0, 4, base.shape)
        cv2.imwrite(str(gt_dir / f"{i:04d}.png"), base)
        cv2.imwrite(str(pred_dir / f"{i:04d}.png"), np.clip(pred, 0, 255).astype(np.uint8))
    return gt_dir, pred_dir


def load_basicsr(package: Path) -> types.ModuleType:
    """basicsr/metrics/psnr_ssim.py without importing the rest of basicsr (its models, data, lmdb...)."""

    def load(name: str, path: Path) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    for name, folder in (("basicsr", package), ("basicsr.utils", package / "utils"), ("basicsr.metrics", package / "metrics")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(folder)]
        sys.modules[name] = stub
    color = load("basicsr.utils.color_util", package / "utils" / "color_util.py")
    sys.modules["basicsr.utils"].bgr2ycbcr = color.bgr2ycbcr
    load("basicsr.utils.registry", package / "utils" / "registry.py")
    load("basicsr.metrics.metric_util", package / "metrics" / "metric_util.py")
    return load("basicsr.metrics.psnr_ssim", package / "metrics" / "psnr_ssim.py")


def time_derestore(gt: Path, pred: Path, protocol: str, workers: int) -> tuple[float, float, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    summary = evaluate(pair_paths(gt, pred), protocol=protocol, workers=workers)
    return time.perf_counter() - start, time.process_time() - cpu, summary.means.psnr, summary.means.ssim


def time_basicsr(bsr: types.ModuleType, gt: Path, pred: Path, y_channel: bool) -> tuple[float, float, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    psnrs, ssims = [], []
    for g in sorted(gt.glob("*.png")):
        a, b = cv2.imread(str(g), cv2.IMREAD_UNCHANGED), cv2.imread(str(pred / g.name), cv2.IMREAD_UNCHANGED)
        psnrs.append(bsr.calculate_psnr(b, a, crop_border=0, test_y_channel=y_channel))
        ssims.append(bsr.calculate_ssim(b, a, crop_border=0, test_y_channel=y_channel))
    return time.perf_counter() - start, time.process_time() - cpu, float(np.mean(psnrs)), float(np.mean(ssims))


def time_scoring_only(arrays: list[tuple[np.ndarray, np.ndarray]], fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    for a, b in arrays:
        fn(a, b)
    return (time.perf_counter() - start) / len(arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--basicsr", type=Path, help="path to the basicsr package folder (see above)")
    parser.add_argument("--data", type=Path, help="folder for the generated pairs (default: a temp folder)")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--repeat", type=int, default=1, help="runs of every route; the best counts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp)
        gt, pred = folder / "gt", folder / "pred"
        if not (gt.is_dir() and len(list(gt.glob("*.png"))) == args.count):
            print(f"writing {args.count} pairs of 1024x768 to {folder} ...", file=sys.stderr)
            gt, pred = make_pairs(folder, args.count, 768, 1024)
        print(f"{args.count} pairs of 1024x768 RGB, {cv2.getNumThreads()} OpenCV threads, "
              f"derestore workers: {args.workers}, best of {args.repeat}")

        routes = {f"derestore --protocol {p}": partial(time_derestore, gt, pred, p, args.workers)
                  for p in ("restormer", "rgb", "rcdnet", "gopro")}
        routes["derestore --protocol restormer --workers 1"] = partial(time_derestore, gt, pred, "restormer", 1)
        bsr = None
        if args.basicsr is not None:
            bsr = load_basicsr(args.basicsr)
            routes["BasicSR calculate_psnr/ssim, test_y_channel"] = partial(time_basicsr, bsr, gt, pred, True)
            routes["BasicSR calculate_psnr/ssim, RGB"] = partial(time_basicsr, bsr, gt, pred, False)
        best: dict[str, tuple[float, float, float, float]] = {}
        for _ in range(args.repeat):
            for label, route in routes.items():
                wall, cpu, mean_psnr, mean_ssim = route()
                old = best.get(label, (wall, cpu))
                best[label] = (min(wall, old[0]), min(cpu, old[1]), mean_psnr, mean_ssim)
        print(f"{'route':44s} {'wall s':>7s} {'CPU s':>7s} {'mean PSNR':>11s} {'mean SSIM':>10s}")
        for label, row in best.items():
            print(f"{label:44s} {row[0]:7.2f} {row[1]:7.2f} {row[2]:11.6f} {row[3]:10.6f}")
        if bsr is None:
            print("BasicSR not timed: pass --basicsr PATH (see --help)")
            return
        ours_y, ours_rgb = best["derestore --protocol restormer"], best["derestore --protocol rgb"]
        y, rgb = best["BasicSR calculate_psnr/ssim, test_y_channel"], best["BasicSR calculate_psnr/ssim, RGB"]
        print(f"speed-up, wall (CPU): restormer vs BasicSR Y {y[0] / ours_y[0]:.1f}x "
              f"({y[1] / ours_y[1]:.1f}x), rgb vs BasicSR RGB {rgb[0] / ours_rgb[0]:.1f}x "
              f"({rgb[1] / ours_rgb[1]:.1f}x)")
        print(f"rgb vs BasicSR RGB (same definition): |dPSNR| {abs(rgb[2] - ours_rgb[2]):.1e} dB, "
              f"|dSSIM| {abs(rgb[3] - ours_rgb[3]):.1e}")

        # Scoring only, one pair at a time, arrays already in memory.
        arrays = []
        for g in sorted(gt.glob("*.png"))[:10]:
            arrays.append((cv2.imread(str(g)), cv2.imread(str(pred / g.name))))
        rgb_arrays = [(np.ascontiguousarray(a[:, :, ::-1]), np.ascontiguousarray(b[:, :, ::-1])) for a, b in arrays]
        for protocol, y_channel, label in (("restormer", True, "Y"), ("rgb", False, "RGB")):
            ours = time_scoring_only(rgb_arrays, partial(metrics.score, protocol=protocol))
            theirs = time_scoring_only(arrays, lambda a, b, y=y_channel: (
                bsr.calculate_psnr(b, a, 0, test_y_channel=y), bsr.calculate_ssim(b, a, 0, test_y_channel=y)))
            print(f"per pair, scoring only, one pair at a time: derestore {protocol} {ours * 1000:.0f} ms, "
                  f"BasicSR {label} {theirs * 1000:.0f} ms ({theirs / ours:.1f}x)")

if __name__ == "__main__":
    main()
