"""Held-out evaluation of the lite models against the degraded input and a classical filter.

    python -m training.evaluate                 # every task, results in training/results.json
    python -m training.evaluate --task derain

For each held-out photograph (never seen in training) and each of `--variants`
seeded degradations, scores the degraded input, the classical baseline and the
lite model (through derestore's own loading and inference path) against the
clean photo: PSNR/SSIM on RGB (derestore's `rgb` protocol). Each classical
filter's strength is chosen per task as the setting with the best mean PSNR on
this same set, which flatters the baseline, not the model.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from derestore import metrics
from training.data import load_photos
from training.degrade import TASKS, degrade

Filter = Callable[[np.ndarray, float], np.ndarray]  # uint8 RGB, strength -> uint8 RGB


def median(img: np.ndarray, k: float) -> np.ndarray:
    return cv2.medianBlur(img, int(k))


def nl_means(img: np.ndarray, h: float) -> np.ndarray:
    return cv2.fastNlMeansDenoisingColored(img, None, h, h, 7, 21)


def stretch(img: np.ndarray, pct: float) -> np.ndarray:
    lo, hi = np.percentile(img, [pct, 100 - pct], axis=(0, 1))
    out = (img.astype(np.float32) - lo) / np.maximum(hi - lo, 1) * 255
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def unsharp(img: np.ndarray, amount: float) -> np.ndarray:
    soft = cv2.GaussianBlur(img, (0, 0), 2.0).astype(np.float32)
    out = img.astype(np.float32) * (1 + amount) - soft * amount
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


BASELINES: dict[str, tuple[str, Filter, tuple[float, ...]]] = {
    "derain": ("median filter", median, (3, 5, 7)),
    "desnow": ("median filter", median, (3, 5, 7)),
    "dehaze": ("contrast stretch", stretch, (0.5, 1, 2, 5)),
    "deblur": ("unsharp mask", unsharp, (0.5, 1.0, 2.0)),
    "denoise": ("non-local means", nl_means, (5, 10, 15, 25)),
}


def to_u8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def pairs(task: str, variants: int, side: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(clean, degraded) uint8 RGB pairs from the held-out photos, seeded by position."""
    out = []
    for i, photo in enumerate(load_photos("test")):
        h, w = photo.shape[:2]
        y, x = (h - min(h, side)) // 2, (w - min(w, side)) // 2
        clean = np.ascontiguousarray(photo[y:y + side, x:x + side])
        for v in range(variants):
            rng = np.random.default_rng(10_000 + 100 * i + v)
            out.append((to_u8(clean), to_u8(degrade(task, clean, rng))))
    return out


def mean_scores(gt: list[np.ndarray], pred: list[np.ndarray]) -> dict[str, float]:
    scores = [metrics.score(g, p, protocol="rgb") for g, p in zip(gt, pred)]
    return {"psnr": round(float(np.mean([s.psnr for s in scores])), 2),
            "ssim": round(float(np.mean([s.ssim for s in scores])), 4)}


def evaluate(task: str, variants: int, side: int, weights: Path) -> dict[str, object]:
    import derestore

    data = pairs(task, variants, side)
    gt = [c for c, _ in data]
    bad = [d for _, d in data]
    name, fn, strengths = BASELINES[task]
    tried = {s: mean_scores(gt, [fn(d, s) for d in bad]) for s in strengths}
    best = max(tried, key=lambda s: tried[s]["psnr"])
    model = derestore.load(weights=weights, device="cpu")
    started = time.perf_counter()
    restored = [to_u8(model.restore_array(d.transpose(2, 0, 1).astype(np.float32) / 255, tile=0)[0].transpose(1, 2, 0))
                for d in bad]
    seconds = time.perf_counter() - started
    return {"task": task, "pairs": len(data), "side": side,
            "input": mean_scores(gt, bad),
            "baseline": {"name": name, "strength": best, **tried[best]},
            "lite": mean_scores(gt, restored),
            "lite_seconds_per_image": round(seconds / len(data), 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, action="append", help="repeatable; default: every task")
    p.add_argument("--variants", type=int, default=3, help="degradations per held-out photo")
    p.add_argument("--side", type=int, default=384, help="centre crop of each photo")
    p.add_argument("--weights-dir", type=Path, default=Path(__file__).resolve().parent.parent / "derestore" / "lite")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results.json")
    args = p.parse_args(argv)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for task in args.task or TASKS:
        res = evaluate(task, args.variants, args.side, args.weights_dir / f"lite-{task}.safetensors")
        results[task] = res
        print(json.dumps(res), flush=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
