"""Local statistics: the Test-time Local Converter (TLC; Chu et al., ECCV 2022) as a load-time transformation.

Networks trained on crops compute some statistics over the whole input: NAFNet's
simplified channel attention and MPRNet's channel attention pool over all pixels,
Restormer-family attention forms a channel×channel matrix over all pixels, DRSformer's
expert gate averages the whole map. On a large image (or a tile) those statistics come
from another extent than in training, and a tile sees other statistics than the whole
image. `apply` replaces each such statistic by the same statistic over a window around
each pixel (a record's `stats_window`; by default 1.5× the training crop, TLC's choice),
computed with cumulative sums, so that the output depends only on the neighbourhood of
each pixel:

- pooled means (`nn.AdaptiveAvgPool2d(1)`; DRSformer's expert gate): a box mean per
  pixel, the window shifted inside the map at its borders (as TLC's `AvgPool2d`);
- transposed (channel) attention: the q·kᵀ sums and the norms of q and k over the
  window, from per-cell sums (cells of `cell` image pixels, the model's size multiple)
  boxed over cells; the softmaxed matrix of each cell is interpolated bilinearly
  between cell centres, so it varies smoothly from pixel to pixel.

With a window at least as large as the map, every statistic equals the global one. A tile
then reproduces the whole image's output when it carries `context` pixels around the part
it contributes and starts on the `Conversion.align` grid.

Modules are converted in place by swapping their class for a subclass with a local
`forward` (same parameters, same state-dict keys, no copy); `apply(..., stats="global")`
swaps them back. MPRNet also splits its input into fixed halves and quarters; its
forward is replaced by one whose split lines can be placed where the whole image's
lie (`placed`), so that a tile is split like the image it comes from.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .stats_choice import (DEFAULT_STATS, SPLIT_LINES, STATS, TRAIN_SIZE, WINDOW_FACTOR, Conversion, default_stats,
                           supports, window_for)

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

log = logging.getLogger(__name__)

# Convolutional context an architecture needs beyond a tile's overlap hint: MPRNet's full-resolution
# stage-3 subnetwork (ORSNet) reaches further than the others (measured in tests/test_local_stats.py).
CONVOLUTIONAL_MARGIN = {"MPRNet": 48}
_EPS = 1e-12  # F.normalize's floor on a norm
_CALIBRATION_SIDE = 64


# --------------------------------------------------------------------------- box sums


def box_sum(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """Sums of `x` over windows of `n` along `dim`; the window of i is [i − (n−1)//2, …) shifted inside the axis.

    Computed from cumulative sums; a window at least as long as the axis covers all of it.
    """
    length = x.shape[dim]
    if n >= length:
        return x.sum(dim, keepdim=True).expand_as(x)
    sums = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.cumsum(dim)], dim)
    # Window sums for starts 0 … length − n; the first (n−1)//2 pixels reuse the first, the last ones the last.
    inner = sums.narrow(dim, n, length - n + 1) - sums.narrow(dim, 0, length - n + 1)
    before = (n - 1) // 2
    return torch.cat([_repeat(inner.narrow(dim, 0, 1), dim, before), inner,
                      _repeat(inner.narrow(dim, length - n, 1), dim, n - 1 - before)], dim)


def _repeat(edge: torch.Tensor, dim: int, count: int) -> torch.Tensor:
    shape = list(edge.shape)
    shape[dim] = count
    return edge.expand(shape)


def local_mean(x: torch.Tensor, n: int) -> torch.Tensor:
    """The mean of (B, C, H, W) `x` over the n×n window of each pixel (TLC's `AvgPool2d`, exact form)."""
    h, w = x.shape[-2:]
    # fp32 at least: half-precision cumulative sums lose the window's digits.
    sums = box_sum(box_sum(x.float(), -2, n), -1, n)
    return (sums / (min(n, h) * min(n, w))).to(x.dtype)


# --------------------------------------------------------------------------- channel attention


Mixer = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _softmax(_module: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(dim=-1)


def _topk_mixture(module: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """DRSformer's TKSA: four top-k masked softmaxes mixed by the module's learned scalars."""
    from .archs.drsformer import keep_counts

    masked = torch.full_like(logits, float("-inf"))
    mix = torch.zeros_like(logits)
    scales = (module.attn1, module.attn2, module.attn3, module.attn4)
    for k, scale in zip(keep_counts(logits.shape[-1]), scales):
        index = logits.topk(k, dim=-1).indices
        mix = mix + masked.scatter(-1, index, logits.gather(-1, index)).softmax(dim=-1) * scale
    return mix


def _cells(t: torch.Tensor, c: int, rows: int, cols: int) -> torch.Tensor:
    """(B, h, C, rows·c, cols·c) → (B, h, rows, cols, C, c·c)."""
    b, heads, ch = t.shape[:3]
    t = t.reshape(b, heads, ch, rows, c, cols, c).permute(0, 1, 3, 5, 2, 4, 6)
    return t.reshape(b, heads, rows, cols, ch, c * c)


def local_channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                            mix: Callable[[torch.Tensor], torch.Tensor], window: int, cell: int) -> torch.Tensor:
    """Transposed attention with q·kᵀ and the q, k norms summed over a window around each pixel.

    q, k, v: (B, heads, C', H, W); `window` and `cell` in pixels of this map. Sums are taken
    per cell of `cell`×`cell` pixels and boxed over ⌈window / cell⌉ cells; `mix` turns the
    (…, C', C') logits into the attention matrix, which is interpolated bilinearly between
    cell centres before it is applied to v. Returns (B, heads, C', H, W).
    """
    if cell > 1 and cell % 2:
        raise ValueError(f"cell={cell}: must be 1 or even (cell centres fall between pixels)")
    b, heads, ch, h, w = q.shape
    if window >= h and window >= w:
        # Every pixel's window is the whole map: one matrix, as the published attention computes it.
        qn, kn = F.normalize(q.flatten(-2), dim=-1), F.normalize(k.flatten(-2), dim=-1)
        logits = (qn @ kn.transpose(-2, -1)) * temperature
        return (mix(logits).to(v.dtype) @ v.flatten(-2)).reshape(v.shape)
    rows, cols = -(-h // cell), -(-w // cell)
    pad = (0, cols * cell - w, 0, rows * cell - h)
    qc = _cells(F.pad(q, pad), cell, rows, cols)
    kc = _cells(F.pad(k, pad), cell, rows, cols)
    n = max(1, math.ceil(window / cell))

    def boxed(t: torch.Tensor) -> torch.Tensor:
        return box_sum(box_sum(t.float(), 2, n), 3, n)

    gram = boxed(qc @ kc.transpose(-2, -1))
    q_norm = boxed(qc.square().sum(-1)).sqrt().clamp_min(_EPS)
    k_norm = boxed(kc.square().sum(-1)).sqrt().clamp_min(_EPS)
    logits = gram / (q_norm.unsqueeze(-1) * k_norm.unsqueeze(-2)) * temperature.float().view(1, heads, 1, 1, 1, 1)
    attn = mix(logits).to(v.dtype)  # (B, heads, rows, cols, C', C')
    if cell == 1:
        return (attn @ v.permute(0, 1, 3, 4, 2).unsqueeze(-1)).squeeze(-1).permute(0, 1, 4, 2, 3)
    # Bilinear interpolation between cell centres: blocks of cell×cell pixels offset by half a
    # cell each lie between two centres per axis (clamped at the borders).
    half = cell // 2
    vp = F.pad(v, (half, (cols + 1) * cell - half - w, half, (rows + 1) * cell - half - h))
    vb = _cells(vp, cell, rows + 1, cols + 1)
    ramp = (torch.arange(cell, device=v.device, dtype=torch.float32) + 0.5) / cell
    weights = ((1 - ramp).to(v.dtype), ramp.to(v.dtype))
    out = torch.zeros_like(vb)
    for wy, attn_rows in zip(weights, _neighbours(attn, 2)):
        for wx, corner in zip(weights, _neighbours(attn_rows, 3)):
            out += (corner @ vb) * torch.outer(wy, wx).reshape(-1)
    out = out.reshape(b, heads, rows + 1, cols + 1, ch, cell, cell).permute(0, 1, 4, 2, 5, 3, 6)
    out = out.reshape(b, heads, ch, (rows + 1) * cell, (cols + 1) * cell)
    return out[..., half:half + h, half:half + w]


def _neighbours(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell j − 1 and cell j for the blocks j = 0 … n between cell centres along `dim` (clamped)."""
    return (torch.cat([t.narrow(dim, 0, 1), t], dim),
            torch.cat([t, t.narrow(dim, t.shape[dim] - 1, 1)], dim))


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, c, h, w = t.shape
    return t.reshape(b, heads, c // heads, h, w)


def _mdta_qkv(module: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Restormer's MDTA projections (Restormer, M3SNet, DRSformer, DTPNet): 1×1 then depthwise 3×3."""
    q, k, v = module.qkv_dwconv(module.qkv(x)).chunk(3, dim=1)
    return tuple(_split_heads(t, module.num_heads) for t in (q, k, v))  # type: ignore[return-value]


def _deformable_qkv(module: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeRestormer's deformable attention: q from dilated convs, k and v sampled on the offset grid."""
    from .archs.derestormer import attention_sampling_grid

    b, c, h, w = x.shape
    heads = module.num_heads
    x = module.qkv(x)
    q = module.q_conv1(x) + module.q_conv2(x) + module.q_conv3(x)
    grid = attention_sampling_grid(module.offset_conv(x), heads)

    def sample(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(b * heads, c // heads, h, w).to(grid.dtype)
        t = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return t.reshape(b, heads, c // heads, h, w).to(x.dtype)

    return _split_heads(q, heads), sample(module.k_conv(x)), sample(module.v_conv(x))


def _attention_forward(qkv: Callable[[Any, torch.Tensor], tuple[torch.Tensor, ...]], mixer: Mixer) -> Callable:
    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = qkv(self, x)
        site: Site = self._local_site
        out = local_channel_attention(q, k, v, self.temperature, lambda t: mixer(self, t), site.window, site.cell)
        return self.project_out(out.reshape(b, c, h, w))

    return forward


# --------------------------------------------------------------------------- pooled means


def _pool_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return local_mean(x, self._local_site.window)


def _mefc_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """DRSformer's MEFC with each expert gate fed the local mean: expert weights per pixel."""
    from .archs.drsformer import NUM_EXPERTS

    for i in range(0, len(self.layers), 2):
        gate, steps = self.layers[i], self.layers[i + 1]
        b, _, h, w = x.shape
        logits = gate.ca_fc(local_mean(x, self._local_site.window).permute(0, 2, 3, 1))
        weights = logits.view(b, h, w, gate.steps, NUM_EXPERTS).softmax(dim=-1).permute(0, 3, 4, 1, 2)
        x = steps.preprocess(x)
        for s, mixture in enumerate(steps._ops):
            states = [op(x) * weights[:, s, e, None] for e, op in enumerate(mixture._ops)]
            x = F.relu(mixture._out(torch.cat(states, dim=1)) + x)
    return x


# --------------------------------------------------------------------------- MPRNet's split lines


def _mprnet_forward(self: Any, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MPRNet's forward with the stage-1/2 split lines at `self._local_lines` (per batch item, in
    window coordinates; None: through the middle, as published)."""
    lines = self._local_lines
    height, width = image.shape[-2:]
    if lines is None:
        return _mprnet_split(self, image, int(height / 2), int(width / 2))
    if len(set(lines)) == 1:
        return _mprnet_split(self, image, *lines[0])
    outs = [_mprnet_split(self, image[i:i + 1], *line) for i, line in enumerate(lines)]
    return tuple(torch.cat(parts) for parts in zip(*outs))  # type: ignore[return-value]


def _spans(split: int, length: int) -> list[tuple[int, int]]:
    split = min(max(split, 0), length)
    return [(a, b) for a, b in ((0, split), (split, length)) if b > a]


def _mprnet_split(self: Any, x3_img: torch.Tensor, row: int, col: int) -> tuple[torch.Tensor, ...]:
    """The published multi-patch forward with the horizontal split at `row` and the vertical at `col`
    (either may fall outside the window: that part is then absent)."""
    height, width = x3_img.shape[-2:]
    rows, cols = _spans(row, height), _spans(col, width)
    feat1, res1, sam_feats, stage1 = [], [], [], []
    for r0, r1 in rows:
        band = x3_img[:, :, r0:r1]
        parts = [self.stage1_encoder(self.shallow_feat1(band[..., c0:c1])) for c0, c1 in cols]
        feats = [torch.cat(level, 3) for level in zip(*parts)]
        res = self.stage1_decoder(feats)
        samf, img = self.sam12(res[0], band)
        feat1.append(feats)
        res1.append(res)
        sam_feats.append(samf)
        stage1.append(img)
    feat2 = []
    for (r0, r1), feats, res, samf in zip(rows, feat1, res1, sam_feats):
        band = x3_img[:, :, r0:r1]
        x2 = self.concat12(torch.cat([self.shallow_feat2(band), samf], 1))
        feat2.append(self.stage2_encoder(x2, feats, res))
    feat2 = [torch.cat(level, 2) for level in zip(*feat2)]
    res2 = self.stage2_decoder(feat2)
    x3_samfeats, stage2_img = self.sam23(res2[0], x3_img)
    x3_cat = self.concat23(torch.cat([self.shallow_feat3(x3_img), x3_samfeats], 1))
    x3_cat = self.stage3_orsnet(x3_cat, feat2, res2)
    return self.tail(x3_cat) + x3_img, stage2_img, torch.cat(stage1, 2)


@contextlib.contextmanager
def placed(model: nn.Module, image_size: tuple[int, int], origins: Sequence[tuple[int, int]]) -> Iterator[None]:
    """Within the block, each batch item of `model`'s input is the window at `origins[i]` (y, x) of a
    (padded) image of `image_size`: MPRNet splits it along the image's split lines. A no-op for
    models without split lines."""
    if not hasattr(model, "_local_lines"):
        yield
        return
    height, width = image_size
    model._local_lines = [(int(height / 2) - y, int(width / 2) - x) for y, x in origins]
    try:
        yield
    finally:
        model._local_lines = None


# --------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class Site:
    """One converted module: its statistics window and attention cell in pixels of its own map, and
    the map's downscale from the image."""

    window: int
    cell: int
    scale: int
    kind: str

    @property
    def reach(self) -> int:
        """Image pixels on either side of a pixel that its statistic reads (window, cell interpolation,
        the projections' 3×3 support)."""
        spread = self.window // 2 + (2 * self.cell + 1 if self.kind == "attention" else 0)
        return spread * self.scale


_LOCAL_CLASSES: dict[tuple[type, str], type] = {}
_FORWARDS: dict[str, Callable] = {
    "pool": _pool_forward,
    "attention": _attention_forward(_mdta_qkv, _softmax),
    "topk-attention": _attention_forward(_mdta_qkv, _topk_mixture),
    "deformable-attention": _attention_forward(_deformable_qkv, _softmax),
    "expert-gate": _mefc_forward,
    "split-lines": _mprnet_forward,
}


def _local_class(base: type, kind: str) -> type:
    key = (base, kind)
    if key not in _LOCAL_CLASSES:
        _LOCAL_CLASSES[key] = type(f"Local{base.__name__}", (base,), {
            "forward": _FORWARDS[kind], "_local_kind": kind, "__module__": __name__,
        })
    return _LOCAL_CLASSES[key]


def _global_class(module: nn.Module) -> type:
    cls = type(module)
    return cls.__mro__[1] if getattr(cls, "_local_kind", None) else cls


def _targets(arch: str) -> dict[type, str]:
    """Module classes holding a global statistic in `arch`, with the kind of local replacement."""
    targets: dict[type, str] = {nn.AdaptiveAvgPool2d: "pool"}
    if arch == "Restormer":
        from spandrel_extra_arches.architectures.Restormer.__arch.restormer_arch import (
            Attention,
        )

        targets[Attention] = "attention"
    elif arch == "M3SNet":
        from spandrel_extra_arches.architectures.M3SNet.__arch.M3SNet import (
            Attention as M3SAttention,
        )

        targets[M3SAttention] = "attention"
    elif arch == "DRSformer":
        from .archs.drsformer import MEFC, TopKChannelAttention

        targets.update({TopKChannelAttention: "topk-attention", MEFC: "expert-gate"})
    elif arch == "DTPNet":
        from .archs.blocks import ChannelAttention

        targets[ChannelAttention] = "attention"
    elif arch == "DeRestormer":
        from .archs.derestormer import DeformableChannelAttention

        targets[DeformableChannelAttention] = "deformable-attention"
    return targets


def _revert(model: nn.Module) -> None:
    for module in model.modules():
        base = _global_class(module)
        if base is not type(module) and type(module)._local_kind != "split-lines":
            module.__class__ = base
            del module._local_site


def _follow_split_lines(model: nn.Module) -> None:
    if getattr(type(model), "_local_kind", None) != "split-lines":
        model.__class__ = _local_class(type(model), "split-lines")
        model._local_lines = None


@torch.no_grad()
def _scales(model: nn.Module, modules: list[nn.Module], side: int, channels: int) -> list[int]:
    """Each module's downscale from the image, read off one forward pass on a side×side input."""
    seen: dict[int, tuple[int, int]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        seen.setdefault(id(module), tuple(args[0].shape[-2:]))

    hooks = [m.register_forward_pre_hook(record) for m in modules]
    param = next(model.parameters())
    probe = torch.zeros(1, channels, side, side, device=param.device, dtype=param.dtype)
    # MPRNet: the stage-1/2 parts would look downscaled; calibrate unsplit.
    with placed(model, (2 * side, 2 * side), [(0, 0)]):
        try:
            model(probe)
        finally:
            for hook in hooks:
                hook.remove()
    scales = []
    for m in modules:
        h, w = seen[id(m)]
        if side % h or side % w or side // h != side // w:
            raise RuntimeError(f"{type(m).__name__} sees a {h}×{w} map of a {side}² input: not a power-of-two level")
        scales.append(side // h)
    return scales


def apply(descriptor: ImageModelDescriptor, *, stats: str = "local", window: int | None = None) -> Conversion:
    """Convert `descriptor.model` in place to local (`stats="local"`) or global statistics.

    `window` (image pixels; a record's `stats_window`) defaults to 1.5 × the architecture's
    training crop (`window_for`). Global statistics restore the published modules. MPRNet gets
    split lines that can follow the whole image's either way (`placed`). Raises UsageError for
    local statistics on an architecture this module does not know.
    """
    if stats not in STATS:
        raise UsageError(f"stats='{stats}' is not one of {', '.join(STATS)}")
    arch = descriptor.architecture.id
    if stats == "local" and not supports(arch):
        # Checked here, not only by `window_for`: with a window given, a network whose global
        # operations this module does not know would be converted only in part.
        raise UsageError(f"stats='local': local statistics are not available for {arch} (they are for "
                         f"{', '.join(TRAIN_SIZE)}); use stats='global'")
    model = descriptor.model
    _revert(model)
    split_lines = arch in SPLIT_LINES
    if split_lines:
        _follow_split_lines(model)
    if stats == "global":
        return Conversion(arch=arch, stats="global", split_lines=split_lines)
    window = window_for(arch, window)
    cell = max(1, descriptor.size_requirements.multiple_of)
    targets = _targets(arch)
    modules = [m for m in model.modules() if type(m) in targets and _is_global_pool(m)]
    side = math.lcm(_CALIBRATION_SIDE, cell)
    replaced: dict[str, int] = {}
    reach = 0
    align = cell
    for module, scale in zip(modules, _scales(model, modules, side, descriptor.input_channels)):
        kind = targets[type(module)]
        site = Site(window=max(1, round(window / scale)), cell=max(1, cell // scale), scale=scale,
                    kind="attention" if kind.endswith("attention") else "mean")
        module.__class__ = _local_class(type(module), kind)
        module._local_site = site
        replaced[kind] = replaced.get(kind, 0) + 1
        reach = max(reach, site.reach)
        align = math.lcm(align, scale)
    conversion = Conversion(arch=arch, stats="local", window=window, cell=cell, replaced=replaced, reach=reach,
                            align=align, split_lines=split_lines)
    log.info("%s: local statistics over %d px windows (reach %d px, tiles aligned to %d px); replaced %s",
             arch, window, reach, align,
             ", ".join(f"{n} {kind}" for kind, n in replaced.items()) or "nothing")
    return conversion


def _is_global_pool(module: nn.Module) -> bool:
    if not isinstance(module, nn.AdaptiveAvgPool2d):
        return True
    size = module.output_size
    return size in (1, (1, 1))


def context(conversion: Conversion, margin: int) -> int:
    """Tile context (image pixels kept between a tile's cut edge and the pixels it contributes) for
    tiled output to equal whole-image output: the statistics' reach plus `margin`, the convolutional
    context the model needs anyway, and at least half the reach more. A statistic read near a cut
    edge comes from features that read their own windows in turn, so the difference fades over
    another fraction of the window rather than stopping at the reach (measured in
    benchmarks/local_stats.py: NAFNet, Restormer, MPRNet, M3SNet, DTPNet within 0.01 of an 8-bit level)."""
    return conversion.reach + max(margin, CONVOLUTIONAL_MARGIN.get(conversion.arch, 0), conversion.reach // 2)


__all__ = [
    "DEFAULT_STATS",
    "STATS",
    "TRAIN_SIZE",
    "WINDOW_FACTOR",
    "Conversion",
    "Site",
    "apply",
    "box_sum",
    "context",
    "default_stats",
    "local_channel_attention",
    "local_mean",
    "placed",
    "supports",
    "window_for",
]
