"""Local statistics (derestore/local_stats.py): tiled vs whole, quality, and the cost of the wider context.

    .venv/bin/python benchmarks/local_stats.py quality   [--model lite-derain] [--photos DIR] [--tiles 128,256,512]
    .venv/bin/python benchmarks/local_stats.py exactness [--height 512 --width 640 --tile 256]
    .venv/bin/python benchmarks/local_stats.py cost      [--size 256 --runs 2 --window 96 --photo 3000x4000]

quality: a bundled lite model on the held-out photographs (`python -m training.prepare_data`
writes them to training/data/photos/test), whole photos (up to 768 px), one seeded
degradation each (training/evaluate.py's seeds); PSNR under the `restormer` protocol for
derain (Y channel), `rgb` otherwise. Runs: whole image and tiles, global statistics (the
engine as it is: blended tiles, overlap from the registry) and local statistics (tiles of
`tile` pixels, each run with `local_stats.context` pixels of context and cut at the middle
of the shared strips, as the engine is to do it).

exactness: small random-weight instances of every architecture on a smooth test image,
local statistics over a 96-pixel window (one that a 640×512 image can hold several of)
and over the architecture's default window; max |tiled − whole| in 8-bit levels.

cost: the published network shapes (the fixtures' weight fill), each in a fresh process per
statistics: one 256² forward (median seconds of `runs`) and the activation bytes per input
pixel (peak-RSS growth from 256² to 384², as benchmarks/tuning.py measures them), local
statistics over `--window` pixels (a default window would cover these maps, where the local
path gives way to the global computation); and the pixels a tiled run forwards per pixel
of a `--photo`, today and with the context of the default window.

Everything runs on the CPU in fp32 with the threads given (default 2).
"""

from __future__ import annotations

import argparse
import functools
import glob
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))

from derestore import local_stats, metrics
from derestore.engine import Engine
from derestore.tiling import SizeRule, axis_starts, padded_size, reflect_pad

ARCHS = ("NAFNet", "Restormer", "MPRNet", "M3SNet", "DRSformer", "DTPNet", "DeRestormer")
MARGIN = 16  # the convolutional share of the registry's overlap hint (32): the engine keeps overlap // 2


# --------------------------------------------------------------------------- tiling with context


def _cuts(length: int, window: int, starts: list[int]) -> list[int]:
    """Where neighbouring windows hand over: the middle of each shared strip."""
    return [0] + [(a + window + b) // 2 for a, b in itertools.pairwise(starts)] + [length]


def tiled_with_context(descriptor, x: torch.Tensor, tile: int, context: int, multiple: int) -> tuple[torch.Tensor, float]:
    """`x` (already padded to `multiple`) restored in windows of tile + 2·context pixels, each kept
    `context` pixels in from its cut edges; returns the output and the forwarded pixels per pixel."""
    _, _, height, width = x.shape

    def side(length: int) -> int:
        return min(length, -(-(tile + 2 * context) // multiple) * multiple)

    th, tw = side(height), side(width)
    ys, xs = axis_starts(height, th, context, multiple), axis_starts(width, tw, context, multiple)
    cy, cx = _cuts(height, th, ys), _cuts(width, tw, xs)
    out = torch.zeros_like(x)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            with torch.no_grad(), local_stats.placed(descriptor.model, (height, width), [(y0, x0)]):
                o = descriptor(x[:, :, y0:y0 + th, x0:x0 + tw])
            out[:, :, cy[i]:cy[i + 1], cx[j]:cx[j + 1]] = o[:, :, cy[i] - y0:cy[i + 1] - y0, cx[j] - x0:cx[j + 1] - x0]
    return out, len(ys) * len(xs) * th * tw / (height * width)


def _engine_run(engine: Engine, chw: np.ndarray, tile: int, overlap: int) -> torch.Tensor:
    return torch.from_numpy(engine.restore(chw, tile=tile, overlap=overlap))[None]


def whole(descriptor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return descriptor(x)


# --------------------------------------------------------------------------- random-weight networks


def random_descriptor(arch: str, *, published: bool = False):
    """`arch` with the fixtures' deterministic weight fill (small shapes unless `published`)."""
    from spandrel import MAIN_REGISTRY

    from derestore.archs.fill import DERESTORMER_SCALE, fill_state_dict
    from derestore.loading import install_architectures

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        install_architectures()
    if arch == "NAFNet":
        from spandrel.architectures.NAFNet import NAFNet

        model = NAFNet(width=32, enc_blk_nums=[1, 1, 1, 28], dec_blk_nums=[1, 1, 1, 1]) if published else \
            NAFNet(width=8, enc_blk_nums=[1, 1, 1, 1], dec_blk_nums=[1, 1, 1, 1])
    elif arch == "Restormer":
        from spandrel_extra_arches.architectures.Restormer.__arch.restormer_arch import (
            Restormer,
        )

        model = Restormer() if published else Restormer(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                                                          heads=[1, 2, 2, 4])
    elif arch == "MPRNet":
        from spandrel_extra_arches.architectures.MPRNet.__arch.MPRNet import MPRNet

        model = MPRNet() if published else MPRNet(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=2,
                                                  reduction=2)
    elif arch == "M3SNet":
        from spandrel_extra_arches.architectures.M3SNet.__arch.M3SNet import M3SNet

        model = M3SNet() if published else M3SNet(width=8, enc_blk_nums=[1, 1, 1, 1], dec_blk_nums=[1, 1, 1, 1])
    elif arch == "DRSformer":
        from derestore.archs.drsformer import DRSformer

        model = DRSformer() if published else DRSformer(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2))
    elif arch == "DTPNet":
        from derestore.archs.dtpnet import DTPNet, DTPNetConfig

        model = DTPNet() if published else DTPNet(DTPNetConfig(dim=8, blocks=(1,) * 8, heads=(1, 1, 2, 2, 2, 1, 1, 1),
                                                               lstm_channels=8))
    else:
        from derestore.archs.derestormer import DeRestormer

        model = DeRestormer() if published else DeRestormer(dim=8, num_res=1, heads=(1, 1, 2))
    # At the full fill scale these networks amplify float rounding 10–300-fold (a 1e-6 change of the input
    # moves the output by up to 3e-4); at 0.6–0.7 they still change their input by std 0.2–0.3 but stay
    # well conditioned, as trained networks are.
    scale = DERESTORMER_SCALE if arch in ("DeRestormer", "DRSformer") else 0.7
    descriptor = MAIN_REGISTRY.load(fill_state_dict(model.state_dict(), scale))
    descriptor.model.eval()
    return descriptor


def smooth(height: int, width: int) -> torch.Tensor:
    from tests.conftest import smooth_image

    return torch.from_numpy(smooth_image(height, width).transpose(2, 0, 1).astype(np.float32))[None]


# --------------------------------------------------------------------------- commands


def quality(args: argparse.Namespace) -> None:
    import cv2

    from derestore.loading import load_model
    from derestore.registry import load_registry
    from training.degrade import degrade

    record = load_registry([]).model(args.model)
    task = record.task
    protocol = "restormer" if task == "derain" else "rgb"
    files = sorted(glob.glob(str(Path(args.photos) / "*.png")))[: args.limit]
    if not files:
        sys.exit(f"no photographs in {args.photos}: run `python -m training.prepare_data` first")
    descriptor = load_model(ROOT / "derestore" / record.bundled).descriptor
    engine = Engine.create(descriptor, device="cpu", precision="fp32", batch_size=4)
    tiles = [int(t) for t in args.tiles.split(",")]
    runs: dict[str, list[float]] = {}
    diffs: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    forwarded: dict[str, list[float]] = {}
    conversion = None
    for i, path in enumerate(files):
        clean = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
        bad = degrade(task, clean, np.random.default_rng(10_000 + 100 * i))
        gt = np.round(clean * 255).astype(np.uint8)
        chw = np.ascontiguousarray(bad.transpose(2, 0, 1))
        h, w = chw.shape[1:]
        outs: dict[str, torch.Tensor] = {}

        def timed(name: str, fn, outs=outs, h=h, w=w) -> None:
            started = time.perf_counter()
            out = fn()
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
            outs[name] = out[0, :, :h, :w].clamp(0, 1)

        # Global statistics: the engine as it is (whole image, and blended tiles with the registry's overlap).
        local_stats.apply(descriptor, stats="global")
        overlap = record.overlap or 32
        timed("global whole", functools.partial(_engine_run, engine, chw, 0, overlap))
        for t in tiles:
            timed(f"global tile {t}", functools.partial(_engine_run, engine, chw, t, overlap))
        # Local statistics: the image padded to the conversion's alignment, whole and in tiles with context.
        conversion = local_stats.apply(descriptor, stats="local", window=record.stats_window)
        context = local_stats.context(conversion, MARGIN)
        multiple = math.lcm(descriptor.size_requirements.multiple_of, conversion.align)
        xp = torch.from_numpy(reflect_pad(chw[None], *padded_size(h, w, SizeRule(multiple))))
        timed("local whole", functools.partial(whole, descriptor, xp))
        for t in tiles:
            name = f"local tile {t}"
            started = time.perf_counter()
            out, ratio = tiled_with_context(descriptor, xp, t, context, multiple)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
            outs[name] = out[0, :, :h, :w].clamp(0, 1)
            forwarded.setdefault(name, []).append(ratio)
        for name, out in outs.items():
            pred = np.round(out.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
            runs.setdefault(name, []).append(metrics.psnr(gt, pred, protocol=protocol))
            reference = outs[name.split(" ")[0] + " whole"]
            diffs.setdefault(name, []).append(float((out - reference).abs().max()) * 255)
        print(f"{Path(path).name} {h}×{w}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()), flush=True)
    print(f"\n{args.model} ({task}), {len(files)} held-out photos, protocol {protocol}; {conversion}")
    print(f"context {local_stats.context(conversion, MARGIN)} px\n")
    print("| run | mean PSNR (dB) | per image vs whole, same statistics (dB) | max abs diff vs whole (8-bit levels) "
          "| forwarded px / px | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, values in runs.items():
        reference = runs[name.split(" ")[0] + " whole"]
        delta = [a - b for a, b in zip(values, reference)]
        spread = "—" if values is reference else f"{min(delta):+.2f} … {max(delta):+.2f}"
        ratio = f"{statistics.mean(forwarded[name]):.2f}" if name in forwarded else "—"
        print(f"| {name} | {statistics.mean(values):.2f} | {spread} | {max(diffs[name]):.2f} | {ratio} "
              f"| {seconds[name]:.1f} |")


def exactness(args: argparse.Namespace) -> None:
    x = smooth(args.height, args.width)
    print(f"random weights, {args.height}×{args.width}, tile {args.tile}; max |tiled − whole| in 8-bit levels\n")
    print("| architecture | statistics | window | context px | max abs diff | forwarded px / px |")
    print("| --- | --- | --- | --- | --- | --- |")
    for arch in args.archs.split(","):
        descriptor = random_descriptor(arch)
        multiple = math.lcm(descriptor.size_requirements.multiple_of, 16)  # every conversion's `align` divides 16
        xp = torch.from_numpy(reflect_pad(x.numpy(), *padded_size(args.height, args.width, SizeRule(multiple, square=arch == "DeRestormer"))))
        engine = Engine.create(descriptor, device="cpu", precision="fp32")
        reference = whole(descriptor, xp)
        out = torch.from_numpy(engine.restore(xp[0].numpy(), tile=args.tile, overlap=32))[None]
        print(f"| {arch} | global (engine, overlap 32) | — | 16 | {float((out - reference).abs().max()) * 255:.2f} | — |")
        for window in (96, None):
            conversion = local_stats.apply(descriptor, window=window)
            context = local_stats.context(conversion, MARGIN)
            reference = whole(descriptor, xp)
            out, ratio = tiled_with_context(descriptor, xp, args.tile, context, multiple)
            print(f"| {arch} | local | {conversion.window} | {context} | {float((out - reference).abs().max()) * 255:.4f} "
                  f"| {ratio:.2f} |", flush=True)
        local_stats.apply(descriptor, stats="global")


def cost(args: argparse.Namespace) -> None:
    tiles = [int(t) for t in args.tiles.split(",")]
    height, width = (int(v) for v in args.photo.split("x"))
    print(f"published shapes, each in a fresh process per statistics: one {args.size}² forward (median of "
          f"{args.runs}) and the peak-RSS growth from {args.size}² to {args.size * 3 // 2}² per input pixel, local "
          f"statistics over {args.window} px windows (smaller than the map, so that the local path runs); "
          f"forwarded px / px of a {height}×{width} photo with the default window: tiles today (overlap 32) / "
          f"tiles with the context\n")
    print("| architecture | default window | context px | global s | local s | global B/px | local B/px | "
          + " | ".join(f"tile {t}" for t in tiles) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in tiles) + " |")
    for arch in args.archs.split(","):
        rows = {}
        for stats in ("global", "local"):
            command = [sys.executable, __file__, "measure", "--archs", arch, "--stats", stats, "--size", str(args.size),
                       "--runs", str(args.runs), "--threads", str(args.threads), "--window", str(args.window)]
            rows[stats] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        local = rows["local"]
        ratios = [f"{_forwarded(height, width, t, 16, local['multiple'], windows_of=t):.2f} / "
                  f"{_forwarded(height, width, t, local['context'], local['align']):.2f}" for t in tiles]
        print(f"| {arch} | {local['window']} | {local['context']} | {rows['global']['seconds']:.2f} | "
              f"{local['seconds']:.2f} | {rows['global']['bytes_per_pixel']:.0f} | {local['bytes_per_pixel']:.0f} | "
              + " | ".join(ratios) + " |", flush=True)


def measure(args: argparse.Namespace) -> None:
    """One architecture and statistics, in this (fresh) process: a JSON line for `cost`."""
    from throughput import status_bytes

    descriptor = random_descriptor(args.archs, published=True)
    default = local_stats.apply(descriptor)
    local_stats.apply(descriptor, stats=args.stats, window=args.window)
    peaks = []
    with torch.inference_mode():
        for side in (args.size, args.size * 3 // 2):  # memory first: the peak only grows
            descriptor(torch.rand(1, 3, side, side))
            peaks.append(status_bytes("VmHWM"))
        x = torch.rand(1, 3, args.size, args.size)
        runs = []
        for _ in range(args.runs):
            started = time.perf_counter()
            descriptor(x)
            runs.append(time.perf_counter() - started)
    multiple = descriptor.size_requirements.multiple_of
    print(json.dumps({"seconds": statistics.median(runs), "window": default.window,
                      "bytes_per_pixel": (peaks[1] - peaks[0]) / ((args.size * 3 // 2) ** 2 - args.size ** 2),
                      "context": local_stats.context(default, MARGIN), "multiple": multiple,
                      "align": math.lcm(multiple, default.align)}))


def _forwarded(height: int, width: int, tile: int, context: int, multiple: int, windows_of: int | None = None) -> float:
    """Pixels forwarded per image pixel: windows of `windows_of` (today: the tile, margin `context` inside
    it) or of tile + 2·context (local statistics)."""
    ph, pw = padded_size(height, width, SizeRule(multiple))
    count = 1.0
    for length in (ph, pw):
        side = min(length, -(-(windows_of or tile + 2 * context) // multiple) * multiple)
        count *= len(axis_starts(length, side, context if windows_of is None else 2 * context, multiple)) * side
    return count / (ph * pw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("quality", "exactness", "cost", "measure"))
    parser.add_argument("--model", default="lite-derain")
    parser.add_argument("--photos", default=str(ROOT / "training" / "data" / "photos" / "test"))
    parser.add_argument("--limit", type=int, default=12, help="at most this many photographs")
    parser.add_argument("--tiles", default="128,256,512")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stats", choices=local_stats.STATS, default="local", help="measure: the statistics")
    parser.add_argument("--window", type=int, default=96, help="cost: the window the forwards are timed with")
    parser.add_argument("--photo", default="3000x4000", help="cost: HxW of the photo the tiles are counted on")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"quality": quality, "exactness": exactness, "cost": cost, "measure": measure}[args.command](args)


if __name__ == "__main__":
    main()
