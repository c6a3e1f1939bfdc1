"""Video: the cost of video I/O, memory over clip length, and temporal smoothing's flicker and PSNR.

    python benchmarks/video.py [--model lite-derain] [--size 320x240] [--seconds 4]

(1) overhead: the same synthetic rainy frames restored as a clip (decode → model → encode) and as PNG
    files (`derestore derain frames/`), wall time of each in this process;
(2) memory: peak resident memory of a clip of N seconds against one 10× longer (should stay flat);
(3) temporal: on the synthetic rainy clip of a static scene with clean ground truth, the flicker
    (mean |difference| of consecutive outputs in static regions, 8-bit levels) and PSNR against the
    clean frames, with and without `temporal=True`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from throughput import PeakRSS  # noqa: E402  (the benchmarks' shared memory sampler)


def scene(width: int, height: int) -> np.ndarray:
    """A static, photo-like background: smooth colour fields and some structure."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([0.45 + 0.3 * np.sin(x / (37 + 7 * c) + y / (53 + 5 * c) + c) for c in range(3)], -1)
    base += ((x // 48) % 2 == (y // 40) % 2)[..., None] * 0.1
    return np.clip(base, 0, 1)


def rain(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fresh bright streaks each frame, as falling rain looks."""
    h, w, _ = frame.shape
    out = frame.copy()
    for _ in range(w * h // 900):
        x0, y0, length = rng.integers(0, w), rng.integers(0, h), rng.integers(6, 18)
        for t in range(length):
            y, x = y0 + t, x0 + t // 4
            if 0 <= y < h and 0 <= x < w:
                out[y, x] = np.clip(out[y, x] * 0.4 + 0.6, 0, 1)
    return out


def write_clip(path: Path, frames: list[np.ndarray], fps: int = 25) -> None:
    h, w, _ = frames[0].shape
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv444p"
        stream.options = {"crf": "0"}  # lossless input: the comparison is about the restoration
        stream.codec_context.time_base = Fraction(1, fps)
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.round(f * 255).astype(np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lite-derain")
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    import derestore
    from derestore.engine import set_cpu_threads
    from derestore.tiled_engine import cpu_threads
    from derestore.video import flicker

    set_cpu_threads(cpu_threads())
    rng = np.random.default_rng(0)
    clean = scene(width, height)
    count = int(args.seconds * 25)
    rainy = [rain(clean, rng) for _ in range(count)]
    report: dict[str, object] = {"model": args.model, "size": args.size, "frames": count,
                                 "machine": "see README (2-core x86 VM, no GPU, when run there)"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_clip(root / "rainy.mp4", rainy)
        (root / "frames").mkdir()
        for i, f in enumerate(rainy):
            Image.fromarray(np.round(f * 255).astype(np.uint8)).save(root / "frames" / f"{i + 1:06d}.png")
        derestore.run([str(root / "frames" / "000001.png")], root / "warm", model=args.model)  # load caches

        t0 = time.perf_counter()
        as_images = derestore.run([str(root / "frames")], root / "png_out", model=args.model)
        t_images = time.perf_counter() - t0
        t0 = time.perf_counter()
        as_clip = derestore.run([str(root / "rainy.mp4")], root / "clip_out", model=args.model)
        t_clip = time.perf_counter() - t0
        assert as_images.ok == count and as_clip.ok == 1
        report["overhead"] = {"png_files_s": round(t_images, 2), "clip_s": round(t_clip, 2),
                              "clip_vs_png": round(t_clip / t_images, 3)}

        short = root / "short.mp4"
        write_clip(short, rainy[: max(25, count // 4)])
        long = root / "long.mp4"
        write_clip(long, (rainy * 10)[: 10 * max(25, count // 4)])
        peaks = {}
        for name, path in (("short", short), ("long_10x", long)):
            with PeakRSS() as rss:
                derestore.run([str(path)], root / f"mem_{name}", model=args.model)
            peaks[name] = round(rss.peak / 2**20)
        report["peak_rss_mb"] = peaks

        static = np.ones((height, width, 3), bool)  # the scene does not move: every pixel is static
        results = {}
        for temporal in (False, True):
            out = root / f"frames_{temporal}"
            derestore.run([str(root / "rainy.mp4")], out, model=args.model, frames_dir=True, temporal=temporal)
            frames = [np.asarray(Image.open(p)) for p in sorted((out / "rainy").glob("*.png"))]
            target = np.round(clean * 255).astype(np.uint8)
            results["temporal" if temporal else "per_frame"] = {
                "flicker_levels": round(flicker(frames, static), 3),
                "psnr_db": round(float(np.mean([psnr(f, target) for f in frames])), 3)}
        report["temporal"] = results
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
