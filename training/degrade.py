"""Synthetic degradations: clean float32 RGB in [0, 1] (H, W, 3) -> degraded image of the same shape.

Every function is pure given its `numpy.random.Generator`, so a seed reproduces a pair exactly.
Results are quantised to 8 bits because that is what users' files (and the test sets) hold.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Image = np.ndarray
TASKS = ("derain", "desnow", "dehaze", "deblur", "denoise")
# Context added around a training crop before degrading it, so blurs see real neighbours.
MARGIN = 24


def quantise(img: Image) -> Image:
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.float32) / 255.0


def line_kernel(length: float, angle_deg: float, width: float) -> np.ndarray:
    """A normalised streak of `length` pixels at `angle_deg`, softened across by `width`."""
    size = int(np.ceil(length)) | 1
    size = max(size, 3)
    k = np.zeros((size, size), np.float32)
    c = size // 2
    dx, dy = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    half = (length - 1) / 2
    for t in np.linspace(-half, half, max(2, int(length * 2))):
        x, y = c + t * dx, c + t * dy
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        fx, fy = x - x0, y - y0
        for xx, yy, w in ((x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                          (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)):
            if 0 <= xx < size and 0 <= yy < size:
                k[yy, xx] += w
    if width > 0.3:
        k = cv2.GaussianBlur(k, (0, 0), width)
    return k / k.sum()


def rain_layer(shape: tuple[int, int], rng: np.random.Generator, *, density: float, length: float,
               width: float, angle: float, strength: float) -> Image:
    """Rain100/Rain200-style streaks: sparse seeds smeared by a line kernel, one grey layer."""
    h, w = shape
    seeds = (rng.random((h, w)) < density).astype(np.float32) * rng.uniform(0.5, 1.0, (h, w)).astype(np.float32)
    streaks = cv2.filter2D(seeds, -1, line_kernel(length, angle, width), borderType=cv2.BORDER_REFLECT)
    streaks = streaks / max(float(streaks.max()), 1e-6)
    return np.clip(streaks * strength, 0, 1)


def add_rain(img: Image, rng: np.random.Generator) -> Image:
    h, w = img.shape[:2]
    heavy = rng.random() < 0.4
    angle = 90 + rng.uniform(-30, 30)  # near-vertical, as most benchmark rain falls
    layers = 2 if heavy else 1
    rain = np.zeros((h, w), np.float32)
    for _ in range(layers):
        rain += rain_layer(
            (h, w), rng,
            density=rng.uniform(0.004, 0.02) if heavy else rng.uniform(0.001, 0.01),
            length=rng.uniform(15, 40) if heavy else rng.uniform(8, 30),
            width=rng.uniform(0.5, 1.5) if heavy else rng.uniform(0.0, 1.0),
            angle=angle + rng.uniform(-5, 5),
            strength=rng.uniform(0.6, 1.0) if heavy else rng.uniform(0.4, 0.9),
        )
    out = img + rain[..., None]
    if heavy:
        # Heavy rain scatters light into a uniform veil (Rain100H / Rain200H compositing).
        t = rng.uniform(0.7, 0.9)
        airlight = rng.uniform(0.75, 1.0)
        out = out * t + airlight * (1 - t)
    return quantise(out)


def snow_mask(shape: tuple[int, int], rng: np.random.Generator, *, count: float, radius: float,
              blur_len: float, angle: float) -> np.ndarray:
    """Opacity of one depth layer of flakes: soft discs, smeared by the fall during the exposure."""
    h, w = shape
    n = rng.poisson(count * h * w / 1e4)
    mask = np.zeros((h, w), np.float32)
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    radii = np.maximum(0.5, rng.normal(radius, radius * 0.3, n))
    alphas = rng.uniform(0.5, 1.0, n)
    for y, x, r, a in zip(ys, xs, radii, alphas):
        cv2.circle(mask, (int(x), int(y)), max(1, int(round(r))), float(a), -1, lineType=cv2.LINE_AA)
    mask = cv2.GaussianBlur(mask, (0, 0), max(0.5, radius * 0.5))
    if blur_len > 2:
        mask = cv2.filter2D(mask, -1, line_kernel(blur_len, angle, 0), borderType=cv2.BORDER_REFLECT)
    return np.clip(mask, 0, 1)


def add_snow(img: Image, rng: np.random.Generator) -> Image:
    h, w = img.shape[:2]
    angle = 90 + rng.uniform(-40, 40)
    out = img
    if rng.random() < 0.6:
        t = rng.uniform(0.75, 0.95)
        out = out * t + rng.uniform(0.7, 1.0) * (1 - t)
    # Far, small flakes first; near, large and blurred ones over them.
    for count, radius, blur in ((rng.uniform(5, 40), rng.uniform(0.6, 1.2), rng.uniform(0, 6)),
                                (rng.uniform(1, 10), rng.uniform(1.5, 3.0), rng.uniform(0, 10)),
                                (rng.uniform(0, 2), rng.uniform(3.0, 7.0), rng.uniform(0, 14))):
        mask = snow_mask((h, w), rng, count=count, radius=radius, blur_len=blur, angle=angle)[..., None]
        colour = rng.uniform(0.85, 1.0)
        out = out * (1 - mask) + colour * mask
    return quantise(out)


def depth_proxy(img: Image, top: float, bottom: float) -> np.ndarray:
    """Relative depth in [0, 1]: higher in the frame and brighter/smoother regions are farther.

    `top`/`bottom` are the crop's vertical extent in the full photo (0 = top edge), so a crop
    keeps the depth ordering of the picture it came from.
    """
    h, w = img.shape[:2]
    rows = np.linspace(top, bottom, h, dtype=np.float32)[:, None]
    vertical = 1.0 - rows
    grey = img.mean(axis=2)
    smooth = cv2.GaussianBlur(grey, (0, 0), max(h, w) / 16)
    d = 0.7 * vertical + 0.3 * smooth
    return np.broadcast_to(d, (h, w)).astype(np.float32)


def add_haze(img: Image, rng: np.random.Generator, top: float = 0.0, bottom: float = 1.0) -> Image:
    """Atmospheric scattering: I = J t + A (1 - t), t = exp(-beta d)."""
    depth = depth_proxy(img, top, bottom)
    beta = rng.uniform(0.6, 2.5)
    depth = rng.uniform(0.2, 0.5) + depth * rng.uniform(0.6, 1.2)
    t = np.exp(-beta * depth)[..., None]
    airlight = rng.uniform(0.7, 1.0) * (1 + rng.uniform(-0.05, 0.05, 3))
    return quantise(img * t + airlight * (1 - t))


def shake_kernel(rng: np.random.Generator, size: int) -> np.ndarray:
    """Camera-shake point-spread function: a random walk with inertia, rasterised and normalised."""
    steps = 64
    pos = np.zeros(2)
    vel = rng.normal(0, 1, 2)
    vel /= np.linalg.norm(vel) + 1e-8
    path = []
    for _ in range(steps):
        vel = 0.85 * vel + rng.normal(0, 0.35, 2)
        if rng.random() < 0.03:  # occasional jerk of the hand
            vel += rng.normal(0, 1.5, 2)
        pos = pos + vel
        path.append(pos.copy())
    path = np.array(path)
    path -= path.mean(axis=0)
    extent = np.abs(path).max() + 1e-6
    path *= (size / 2 - 1) / extent * rng.uniform(0.4, 1.0)
    k = np.zeros((size, size), np.float32)
    c = size // 2
    for x, y in path:
        xi, yi = int(round(c + x)), int(round(c + y))
        if 0 <= xi < size and 0 <= yi < size:
            k[yi, xi] += 1
    k = cv2.GaussianBlur(k, (0, 0), 0.5)
    return k / k.sum()


def add_blur(img: Image, rng: np.random.Generator) -> Image:
    size = int(rng.integers(7, 24)) | 1
    out = cv2.filter2D(img, -1, shake_kernel(rng, size), borderType=cv2.BORDER_REFLECT)
    out = out + rng.normal(0, rng.uniform(0, 2.0) / 255, img.shape).astype(np.float32)
    return quantise(out)


def add_noise(img: Image, rng: np.random.Generator) -> Image:
    if rng.random() < 0.6:
        sigma = rng.uniform(2, 50) / 255
        noise = rng.normal(0, sigma, img.shape)
    else:
        # Signal-dependent (Poisson-Gaussian) sensor noise: variance a * x + b.
        a = rng.uniform(0.001, 0.03)
        b = rng.uniform(0.0, 0.02) ** 2
        noise = rng.normal(0, 1, img.shape) * np.sqrt(a * img + b)
    return quantise(img + noise.astype(np.float32))


DEGRADE: dict[str, Callable[..., Image]] = {
    "derain": add_rain,
    "desnow": add_snow,
    "dehaze": add_haze,
    "deblur": add_blur,
    "denoise": add_noise,
}


def degrade(task: str, clean: Image, rng: np.random.Generator, *, top: float = 0.0, bottom: float = 1.0) -> Image:
    """The degraded version of `clean` for `task`; `top`/`bottom` place a crop in its photo (haze)."""
    if task == "dehaze":
        return add_haze(clean, rng, top, bottom)
    return DEGRADE[task](clean, rng)
