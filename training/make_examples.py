"""Make `examples/` (degraded held-out photographs with their clean originals) and the README figure.

    python -m training.make_examples            # examples/*.png, examples/clean/*.png
    python -m training.make_examples --figure   # also docs/lite-examples.jpg: input | lite output

The photographs are held-out (test split) wallpapers, GPL-2+ (see examples/README.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from training.data import DATA
from training.degrade import degrade

ROOT = Path(__file__).resolve().parent.parent
# task: (example name, held-out photo, crop origin as a fraction of the free space, seed)
EXAMPLES = {
    "derain": ("rain", "mate-backgrounds-LadyBird.png", (0.5, 0.5), 1),
    "desnow": ("snow", "plasma-workspace-wallpapers-ColdRipple.png", (0.5, 0.5), 2),
    "dehaze": ("haze", "plasma-workspace-wallpapers-FallenLeaf.png", (0.3, 0.6), 3),
    "deblur": ("blur", "mate-backgrounds-LadyBird.png", (0.8, 0.2), 4),
    "denoise": ("noise", "plasma-workspace-wallpapers-FallenLeaf.png", (0.7, 0.4), 5),
}
SIZE = (384, 256)  # width, height


def crop(photo: np.ndarray, origin: tuple[float, float]) -> np.ndarray:
    h, w = photo.shape[:2]
    x, y = int((w - SIZE[0]) * origin[0]), int((h - SIZE[1]) * origin[1])
    return photo[y:y + SIZE[1], x:x + SIZE[0]]


def make(out: Path) -> None:
    (out / "clean").mkdir(parents=True, exist_ok=True)
    for task, (name, photo, origin, seed) in EXAMPLES.items():
        img = cv2.imread(str(DATA / "test" / photo), cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"{DATA / 'test' / photo} is missing: run `python -m training.prepare_data` first")
        clean = cv2.cvtColor(crop(img, origin), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
        top = origin[1] * (img.shape[0] - SIZE[1]) / img.shape[0]
        bad = degrade(task, clean, np.random.default_rng(seed), top=top, bottom=top + SIZE[1] / img.shape[0])
        for folder, pic in ((out, bad), (out / "clean", clean)):
            cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(np.round(pic * 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
        print(out / f"{name}.png")


def figure(examples: Path, dest: Path) -> None:
    """Rows of input | lite output, made with derestore's own API and the bundled models."""
    import derestore

    rows = []
    for task, (name, *_rest) in EXAMPLES.items():
        model = derestore.load(model=f"lite-{task}", device="cpu")
        bgr = cv2.imread(str(examples / f"{name}.png"), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32).transpose(2, 0, 1) / 255
        restored, _ = model.restore_array(rgb, tile=0)
        out = cv2.cvtColor(np.round(restored.transpose(1, 2, 0) * 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
        row = np.hstack([bgr, np.full((bgr.shape[0], 8, 3), 255, np.uint8), out])
        cv2.putText(row, f"{name}: input", (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2)
        cv2.putText(row, f"lite-{task}", (bgr.shape[1] + 16, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2)
        rows.append(row)
        rows.append(np.full((8, row.shape[1], 3), 255, np.uint8))
    dest.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dest), np.vstack(rows[:-1]), [cv2.IMWRITE_JPEG_QUALITY, 85])
    print(dest)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "examples")
    p.add_argument("--figure", action="store_true")
    args = p.parse_args(argv)
    make(args.out)
    if args.figure:
        figure(args.out, ROOT / "docs" / "lite-examples.jpg")


if __name__ == "__main__":
    main()
