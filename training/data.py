"""Clean photographs in memory and seeded (degraded, clean) training crops made from them on the fly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from training.degrade import MARGIN, degrade

DATA = Path(__file__).parent / "data" / "photos"


def load_photos(split: str, root: Path = DATA) -> list[np.ndarray]:
    """RGB float32 [0, 1] photographs of `split` ("train" or "test"), sorted by file name."""
    files = sorted((root / split).glob("*.png"))
    if not files:
        raise SystemExit(f"no photographs in {root / split}: run `python -m training.prepare_data` first")
    return [cv2.cvtColor(cv2.imread(str(f), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255 for f in files]


@dataclass(frozen=True)
class Batch:
    degraded: np.ndarray  # (N, 3, P, P) float32
    clean: np.ndarray


def crop_pair(task: str, photo: np.ndarray, patch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random crop (random scale, flips) degraded with MARGIN pixels of context, then trimmed."""
    scale = rng.uniform(0.5, 1.0)
    img = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 0.98 else photo
    side = patch + 2 * MARGIN
    h, w = img.shape[:2]
    if h < side or w < side:
        img = cv2.resize(img, (max(w, side), max(h, side)), interpolation=cv2.INTER_CUBIC)
        h, w = img.shape[:2]
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    clean = img[y:y + side, x:x + side]
    if rng.random() < 0.5:
        clean = clean[:, ::-1]
    clean = np.ascontiguousarray(clean)
    bad = degrade(task, clean, rng, top=y / h, bottom=(y + side) / h)
    sl = slice(MARGIN, MARGIN + patch)
    return bad[sl, sl], clean[sl, sl]


def make_batch(task: str, photos: list[np.ndarray], size: int, patch: int, rng: np.random.Generator) -> Batch:
    pairs = [crop_pair(task, photos[int(rng.integers(len(photos)))], patch, rng) for _ in range(size)]
    bad = np.stack([p[0] for p in pairs]).transpose(0, 3, 1, 2)
    clean = np.stack([p[1] for p in pairs]).transpose(0, 3, 1, 2)
    return Batch(np.ascontiguousarray(bad), np.ascontiguousarray(clean))
