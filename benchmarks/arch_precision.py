"""Half-precision accuracy of derestore's own architectures, measured against fp32.

    .venv/bin/python benchmarks/arch_precision.py [--size 128] [--images 4] [--threads 2]

Each network (DeRestormer, both DRSformer variants, DTPNet) is built in its
published configuration with the reference fixtures' weight fill
(`derestore.archs.fill`: scaled random weights) and loaded through spandrel
as derestore loads it. Photographs from training/data/photos/test (or, when
that folder is absent, smooth synthetic images, and the output says so),
downscaled and centre-cropped to size×size, are run in fp32 and in

  fp16, bf16                    weights and input cast (`model.half()`): every op in that type
  autocast fp16, autocast bf16  fp32 weights under `torch.autocast`: what derestore's engine runs

and the PSNR of each output against the fp32 output is printed: unclamped
with peak 1, so outputs outside [0, 1] count in full (the lowest over the
images, then the mean), and the lowest after clamping, as written to disk.
Issue 4's rule: a half type is supported when PSNR ≥ 45 dB; the descriptors'
flags follow the unclamped autocast rows.

This CPU has no fast fp16 kernels (a 64×64 DeRestormer forward takes minutes),
so fp16 convolutions and matrix products are computed in fp32 from their fp16
operands and rounded to fp16 (`Fp32Accumulation`): the numerics of GPU fp16
kernels, which accumulate in fp32. `--check-fp16 N` compares that with the
real CPU fp16 kernels on one N×N crop. bf16 always runs the real kernels.
CPU autocast keeps fewer ops in fp32 than CUDA autocast, so the autocast rows
err on the pessimistic side for GPU users.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

PHOTOS = Path(__file__).resolve().parent.parent / "training" / "data" / "photos" / "test"
# The folder also holds illustrations (flat colours, vector art); these are its photographs.
PHOTOGRAPHS = (
    "mate-backgrounds-LadyBird",
    "plasma-workspace-wallpapers-FallenLeaf",
    "plasma-workspace-wallpapers-ColdRipple",
    "plasma-workspace-wallpapers-Grey",
    "mate-backgrounds-Wood",
    "plasma-workspace-wallpapers-Volna",
)
BAR_DB = 45.0
MODES = ("fp16", "bf16", "autocast fp16", "autocast bf16")

aten = torch.ops.aten


class Fp32Accumulation(TorchDispatchMode):
    """fp16 convolutions and matrix products done in fp32 on the fp16 operands, rounded back to fp16."""

    OPS = {aten.convolution.default, aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.OPS:
            return func(*args, **kwargs)
        half = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dtype == torch.float16]
        if not half:
            return func(*args, **kwargs)

        def up(a: object) -> object:
            return a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a

        return func(*tree_map(up, args), **tree_map(up, kwargs)).half()


def published_models(scale: float | None = None, only: str | None = None) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, loaded fp32 model) per published configuration, filled with the fixture weights.

    `scale` replaces the fixtures' factor on ndim ≥ 2 entries; `only` keeps the
    networks whose name contains it.
    """
    import spandrel

    from derestore.archs import install
    from derestore.archs.derestormer import DeRestormer
    from derestore.archs.drsformer import DRSformer
    from derestore.archs.dtpnet import DTPNet
    from derestore.archs.fill import DERESTORMER_SCALE, fill_state_dict

    install()
    networks: list[tuple[str, Callable[[], torch.nn.Module], float]] = [
        ("DeRestormer", DeRestormer, DERESTORMER_SCALE),
        ("DRSformer", DRSformer, 1.0),
        ("DRSformer 200L/SPA", lambda: DRSformer(mefc=False), 1.0),
        ("DTPNet", DTPNet, 1.0),
    ]
    for name, build, fixture_scale in networks:
        if only and only.lower() not in name.lower():
            continue
        with torch.device("meta"):
            shapes = build().state_dict()
        filled = fill_state_dict(shapes, fixture_scale if scale is None else scale)
        descriptor = spandrel.ModelLoader().load_from_state_dict(filled)
        yield name, descriptor.model.eval()


def load_images(size: int, count: int) -> tuple[torch.Tensor, str]:
    """(count, 3, size, size) images in [0, 1] and a line saying where they came from."""
    picks = [PHOTOS / f"{name}.png" for name in PHOTOGRAPHS if (PHOTOS / f"{name}.png").is_file()][:count]
    if picks:
        crops = []
        for path in picks:
            img = Image.open(path).convert("RGB")
            scale = size / min(img.size)
            img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                             Image.Resampling.LANCZOS)
            left, top = (img.width - size) // 2, (img.height - size) // 2
            crops.append(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255)
        source = f"{len(picks)} photographs from {PHOTOS}: " + ", ".join(p.stem for p in picks)
    else:
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        crops = [np.clip(np.stack([0.5 + 0.4 * np.sin(x / (9 + 4 * c + i) + y / (13 + c) + c) for c in range(3)], -1)
                         + 0.03 * rng.standard_normal((size, size, 3), dtype=np.float32), 0, 1)
                 for i in range(count)]
        source = f"NO PHOTOGRAPHS FOUND ({PHOTOS} is absent): {count} smooth synthetic images"
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return batch, source


def run(model: torch.nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The model's output for one (1, 3, H, W) fp32 image in `mode`, as fp32."""
    dtype = torch.bfloat16 if mode.endswith("bf16") else torch.float16 if mode.endswith("fp16") else None
    emulate = Fp32Accumulation() if dtype == torch.float16 else contextlib.nullcontext()
    with torch.no_grad(), emulate:
        if dtype is None:
            return model(x)
        if mode.startswith("autocast"):
            with torch.autocast("cpu", dtype=dtype):
                return model(x).float()
        # A copy: casting in place and back would leave the weights rounded.
        return copy.deepcopy(model).to(dtype)(x.to(dtype)).float()


def lowest(scores: list[float]) -> float:
    """The worst score; NaN (a non-finite output) counts as the worst."""
    return min(scores, key=lambda s: -math.inf if math.isnan(s) else s)


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((out.double() - ref.double()) ** 2).mean())
    if not math.isfinite(mse):
        return float("nan")
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def check_fp16_emulation(model: torch.nn.Module, image: torch.Tensor, size: int) -> str:
    """PSNRs of real CPU fp16 kernels and of the emulation, against fp32 and each other, on one crop."""
    top = (image.shape[-2] - size) // 2
    x = image[..., top:top + size, top:top + size]
    ref = run(model, x, "fp32")
    emulated = run(model, x, "autocast fp16")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        real = model(x).float()
    return (f"    fp16 check at {size}×{size} (autocast): real kernels {psnr(real, ref):.1f} dB, "
            f"emulated {psnr(emulated, ref):.1f} dB vs fp32; real vs emulated {psnr(real, emulated):.1f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="square crop side (multiple of 8)")
    parser.add_argument("--images", type=int, default=4, help="number of images (at most 6 photographs)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--check-fp16", type=int, default=0, metavar="N",
                        help="also compare the fp16 emulation with real CPU fp16 kernels on one N×N crop (slow)")
    parser.add_argument("--scale", type=float, default=None,
                        help="fill scale on ndim ≥ 2 entries for every network (default: the fixtures')")
    parser.add_argument("--only", default=None, help="only the networks whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    images, source = load_images(args.size, args.images)
    print(f"torch {torch.__version__}, CPU, {args.threads} threads; {args.size}×{args.size}; {source}")
    scales = "fixture fill scales" if args.scale is None else f"fill scale {args.scale:g} on ndim ≥ 2 entries"
    print(f"PSNR vs fp32 in dB ({scales}): unclamped with peak 1, lowest and mean over the images, and the")
    print(f"lowest after clamping to [0, 1] as written to disk; supported when the unclamped lowest ≥ {BAR_DB:g} dB\n")
    print(f"{'network':<20}{'mode':<16}{'lowest':>8}{'mean':>8}{'clamped':>9}  {'verdict':<11}{'seconds':>8}")
    for name, model in published_models(args.scale, args.only):
        refs = [run(model, images[i:i + 1], "fp32") for i in range(len(images))]
        spread = float(torch.cat(refs).sub(images).std())
        for mode in MODES:
            start = time.perf_counter()
            outs = [run(model, images[i:i + 1], mode) for i in range(len(images))]
            scores = [psnr(out, ref) for out, ref in zip(outs, refs)]
            clamped = [psnr(out.clamp(0, 1), ref.clamp(0, 1)) for out, ref in zip(outs, refs)]
            low = lowest(scores)
            verdict = "supported" if low >= BAR_DB else "NOT"
            print(f"{name:<20}{mode:<16}{low:>8.1f}{np.mean(scores):>8.1f}{lowest(clamped):>9.1f}  {verdict:<11}"
                  f"{time.perf_counter() - start:>8.1f}", flush=True)
        print(f"{'':<20}(std of fp32 output − input: {spread:.3f})")
        if args.check_fp16:
            print(check_fp16_emulation(model, images[:1], args.check_fp16), flush=True)
        del model, refs


if __name__ == "__main__":
    main()
