"""Fetch openly licensed photographs and prepare a train/test split.

Usage: python -m training.prepare_data [--out training/data]

Sources: the wallpaper packages of Debian (`apt-get download` + `dpkg -x`) and the colour
photographs bundled in scikit-image's wheel (`pip download`, read as a zip); nothing is installed.
Photos are downscaled so that training crops see real detail at a size a CPU can read quickly.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

PACKAGES = ("plasma-workspace-wallpapers", "mate-backgrounds", "gnome-backgrounds", "ukui-wallpapers",
            "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04")
SKIMAGE = "scikit-image==0.26.0"
# The wheel's colour photographs; their licences are stated in skimage/data/_fetchers.py.
SKIMAGE_PHOTOS = {
    "astronaut.png": "public domain (NASA)",
    "chelsea.png": "CC0 (Stefan van der Walt)",
    "coffee.png": "CC0 (Rachel Michetti)",
    "rocket.jpg": "public domain (SpaceX)",
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
RESOLUTION = re.compile(r"\d+x\d+")
RESOLUTION_SUFFIX = re.compile(r"_\d+x\d+$")
MAX_SIDE = 768
MIN_SIDE = 256
# One photograph in eight (chosen by a hash of its name, so the split never shifts) is test-only.
TEST_ONE_IN = 8


@dataclass(frozen=True)
class Photo:
    package: str
    source: str
    split: str
    path: Path


def download(package: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        sys.exit(f"apt-get download {package} left no .deb in {debs}: check the apt sources")
    return found[-1]


def extract(deb: Path, root: Path) -> Path:
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def skimage_photos(out: Path) -> Path:
    """Extracts SKIMAGE_PHOTOS from scikit-image's wheel into `out/extract/scikit-image`."""
    root = out / "extract" / "scikit-image"
    if not root.exists():
        wheels = out / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        if not list(wheels.glob("scikit_image-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "-d", str(wheels), SKIMAGE], check=True)
        wheel = sorted(wheels.glob("scikit_image-*.whl"))[-1]
        tmp = root.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name in SKIMAGE_PHOTOS:
                (tmp / name).write_bytes(z.read(f"skimage/data/{name}"))
        tmp.replace(root)
    (out / "licences" / "scikit-image.txt").write_text(
        "".join(f"{name}: {licence}\n" for name, licence in SKIMAGE_PHOTOS.items()))
    return root


def split_of(key: str) -> str:
    digest = int(hashlib.sha256(key.encode()).hexdigest(), 16)
    return "test" if digest % TEST_ONE_IN == 0 else "train"


def picture_key(path: Path) -> str:
    """Names the picture, not the file: KDE ships one picture as many `contents/images/WxH.jpg`."""
    if RESOLUTION.fullmatch(path.stem) and "contents" in path.parts:
        return path.parts[path.parts.index("contents") - 1]
    return RESOLUTION_SUFFIX.sub("", path.stem)


def is_photo_like(img: np.ndarray) -> bool:
    """Rejects flat vector-style art: photographs have texture almost everywhere."""
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32)
    lap = np.abs(cv2.Laplacian(grey, cv2.CV_32F))
    return float((lap > 4).mean()) > 0.12


def largest_per_picture(root: Path) -> dict[str, Path]:
    best: dict[str, tuple[int, Path]] = {}
    for src in sorted(root.rglob("*")):
        if src.suffix.lower() not in IMAGE_SUFFIXES or src.is_symlink() or not src.is_file():
            continue
        key = picture_key(src.relative_to(root))
        size = src.stat().st_size
        if key not in best or size > best[key][0]:
            best[key] = (size, src)
    return {key: src for key, (_, src) in best.items()}


def prepare(out: Path) -> list[Photo]:
    photos: list[Photo] = []
    licence_dir = out / "licences"
    licence_dir.mkdir(parents=True, exist_ok=True)
    roots = {}
    for package in PACKAGES:
        roots[package] = extract(download(package, out / "debs"), out / "extract" / package)
        for cp in roots[package].glob("usr/share/doc/*/copyright"):
            shutil.copy(cp, licence_dir / f"{package}.copyright")
    roots["scikit-image"] = skimage_photos(out)
    for package, root in roots.items():
        for key, src in sorted(largest_per_picture(root).items()):
            img = cv2.imread(str(src), cv2.IMREAD_COLOR)
            if img is None or min(img.shape[:2]) < MIN_SIDE:
                continue
            scale = MAX_SIDE / max(img.shape[:2])
            if scale < 1:
                img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            if not is_photo_like(img):
                continue
            split = split_of(f"{package}/{key}")
            dest = out / "photos" / split / f"{package}-{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(dest), img)
            photos.append(Photo(package, str(src.relative_to(root)), split, dest))
    return photos


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    args = parser.parse_args(argv)
    photos = prepare(args.out)
    index = args.out / "photos" / "index.tsv"
    index.write_text("".join(f"{p.split}\t{p.package}\t{p.source}\t{p.path.name}\n" for p in photos))
    for split in ("train", "test"):
        print(split, sum(p.split == split for p in photos))


if __name__ == "__main__":
    main()
