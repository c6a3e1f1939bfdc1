"""Cost of `derestore eval` comparing M models against M single evaluations (not a test).

    .venv/bin/python benchmarks/eval_compare_speed.py --count 40 --models 3 --repeat 3

Writes `count` ground truths of 1024x768 and `models` prediction folders (PNG), then
times, interleaved and best of `repeat`: M single runs of `api.evaluate(gt, pred)` and
one `api.evaluate(gt, [pred, ...])`. The comparison decodes each ground truth once for
all models (single runs: once per model) and adds the bootstrap; everything else is
the same per-pair work. Also checks that the comparison's per-image values equal the
single runs' exactly.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from derestore import api
from derestore.evaluate import Comparison, Summary, default_workers, read_pixels


def make_folders(folder: Path, count: int, models: int, height: int, width: int) -> tuple[Path, list[Path]]:
    """Smooth random scenes (GT) and, per model, noisy blurred versions of them, as 8-bit RGB PNGs."""
    gt = folder / "gt"
    preds = [folder / f"model{m}" for m in range(models)]
    for d in (gt, *preds):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = cv2.resize(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8), (width, height),
                          interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(gt / f"{i:04d}.png"), base)
        for m, pred in enumerate(preds):
            noisy = cv2.GaussianBlur(base, (0, 0), 0.6 + 0.2 * m).astype(np.float32) + rng.normal(0, 3 + m, base.shape)
            cv2.imwrite(str(pred / f"{i:04d}.png"), np.clip(noisy, 0, 255).astype(np.uint8))
    return gt, preds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder for the generated images (default: a temp folder)")
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--protocol", default="restormer")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--repeat", type=int, default=3, help="runs of each route; the best counts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp)
        print(f"writing {args.count} images x {args.models + 1} folders of 1024x768 to {folder} ...", file=sys.stderr)
        gt, preds = make_folders(folder, args.count, args.models, 768, 1024)
        options = {"protocol": args.protocol, "workers": args.workers}

        def singles() -> list[Summary]:
            return [api.evaluate(gt, p, **options) for p in preds]

        def comparison() -> Comparison:
            return api.evaluate(gt, preds, **options)

        best = {"singles": (float("inf"), float("inf")), "comparison": (float("inf"), float("inf"))}
        outcome = {}
        for _ in range(args.repeat):
            for label, route in (("singles", singles), ("comparison", comparison)):
                start, cpu = time.perf_counter(), time.process_time()
                outcome[label] = route()
                wall, used = time.perf_counter() - start, time.process_time() - cpu
                best[label] = (min(best[label][0], wall), min(best[label][1], used))

        start = time.perf_counter()
        for path in sorted(gt.iterdir()):
            read_pixels(path)
        decode = (time.perf_counter() - start) / args.count

        exact = all(
            [r.score for r in single.results] == [r.score for r in cmp_summary.results]
            for single, cmp_summary in zip(outcome["singles"], outcome["comparison"].summaries)
        )
        print(f"{args.count} images of 1024x768 RGB, {args.models} models, protocol {args.protocol}, "
              f"workers {args.workers}, {cv2.getNumThreads()} OpenCV threads, best of {args.repeat}")
        print(f"{'route':34s} {'wall s':>7s} {'CPU s':>7s}")
        print(f"{f'{args.models} single evaluations':34s} {best['singles'][0]:7.2f} {best['singles'][1]:7.2f}")
        print(f"{'one comparison':34s} {best['comparison'][0]:7.2f} {best['comparison'][1]:7.2f}")
        print(f"comparison / singles, wall: {best['comparison'][0] / best['singles'][0]:.2f}; "
              f"one ground-truth decode: {decode * 1000:.0f} ms")
        print(f"per-image values of the comparison equal the single runs': {exact}")


if __name__ == "__main__":
    main()
