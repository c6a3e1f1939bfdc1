"""DeRestormer (Kingsley-Cyl): deformable-attention Transformer for image restoration.

A multi-input multi-output U-Net (MIMO-UNet / DeepRFT / MSDT lineage): three
levels (C, 2C, 4C channels at full, 1/2 and 1/4 resolution), each stage a
stack of FFT-residual blocks alternating with transformer blocks whose
channel attention samples K and V on a learned, offset grid; DGFM modules
fuse the skips. Every plain convolution of the published network is a DO-Conv
(DeepRFT/MSDT variant: parameters `W`, `D`, `D_diag`), which checkpoints hold
in that training-time form; `DeRestormerArch.load` folds each DO-Conv into a
plain convolution after loading, so inference runs ordinary convs.

Size rule: H and W must be multiples of 4 and at least 8. The published test
protocol runs square `DEFAULT_TILE`×`DEFAULT_TILE` windows
(`window_partition_inference`); on non-square maps the attention grid reads
zeros for part of K/V (a published quirk reproduced exactly), so the
descriptor asks for square inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from spandrel import (
    Architecture,
    ImageModelDescriptor,
    ModelTiling,
    SizeRequirements,
    StateDict,
)
from spandrel.util import KeyCondition, get_seq_len, store_hyperparameters
from torch import nn
from torchvision.ops import deform_conv2d
from typing_extensions import override

from ..errors import InputError
from .blocks import (
    Downsample,
    GatedFeedForward,
    TransformerBlock,
    Upsample,
    channel_attention_logits,
    infer_ffn_expansion,
)

DEFAULT_TILE = 256
"""Window size of the published test protocol (and the tile size to use by default)."""


def full_precision(dtype: torch.dtype) -> torch.dtype:
    """`dtype` if it is fp32 or fp64, else fp32: for the ops that need it (FFT, sampling, deform conv)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# --------------------------------------------------------------------------- DO-Conv


class DOConv2d(nn.Module):
    """Depthwise over-parameterised convolution, training form (DeepRFT/MSDT `doconv_pytorch`).

    Effective kernel `K[o, i, m] = Σ_s (D + D_diag)[i, m, s] · W[o, i, s]`, tap
    `m = row·k + col`; always stride `stride`, padding k//2, no bias. For k = 1
    only `W` exists. `D_diag` is the frozen k²×k² identity per input channel,
    stored as a (non-trainable) parameter because checkpoints hold it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups
        taps = kernel_size * kernel_size
        self.W = nn.Parameter(torch.empty(out_channels, in_channels // groups, taps))
        nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))
        if taps > 1:
            self.D = nn.Parameter(torch.zeros(in_channels, taps, taps))
            self.D_diag = nn.Parameter(identity_d_diag(in_channels, kernel_size), requires_grad=False)

    def kernel(self) -> torch.Tensor:
        """The plain (out, in/groups, k, k) convolution weight; same op order as the published code."""
        k = self.kernel_size
        shape = (self.out_channels, self.in_channels // self.groups, k, k)
        if k == 1:
            return self.W.reshape(shape)
        w = self.W.reshape(self.out_channels // self.groups, self.in_channels, k * k)
        return torch.einsum("ims,ois->oim", self.D + self.D_diag, w).reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), None, self.stride, self.kernel_size // 2, 1, self.groups)

    def folded(self) -> nn.Conv2d:
        """An nn.Conv2d with the effective kernel: same output, no per-call kernel product."""
        k = self.kernel_size
        conv = nn.Conv2d(self.in_channels, self.out_channels, k, self.stride, k // 2,
                         groups=self.groups, bias=False)
        conv.to(device=self.W.device, dtype=self.W.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
        return conv


def identity_d_diag(in_channels: int, kernel_size: int) -> torch.Tensor:
    """The constant `D_diag` of a k×k DO-Conv: the k²×k² identity repeated per input channel."""
    taps = kernel_size * kernel_size
    return torch.eye(taps).expand(in_channels, taps, taps).clone()


def fold_do_convs(model: nn.Module) -> int:
    """Replace every DOConv2d inside `model` by its folded nn.Conv2d, in place; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DOConv2d):
                setattr(parent, name, child.folded())
                count += 1
    return count


class DOConvBlock(nn.Module):
    """Published `BasicConv_do`: DO-Conv (or a 4×4 stride-2 ConvTranspose2d) [+ ReLU], key prefix `main.0`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 relu: bool = True, transpose: bool = False, groups: int = 1) -> None:
        super().__init__()
        if transpose:
            conv: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride,
                                                 kernel_size // 2 - 1, bias=False)
        else:
            conv = DOConv2d(in_channels, out_channels, kernel_size, stride, groups)
        layers = [conv, nn.ReLU(inplace=True)] if relu else [conv]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


# --------------------------------------------------------------------------- blocks


class FFTResBlock(nn.Module):
    """Residual block with a Fourier branch: `main(x) + x + irfft2(main_fft(rfft2(x)))`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.main = nn.Sequential(DOConvBlock(dim, dim, 3), DOConvBlock(dim, dim, 3, relu=False))
        self.main_fft = nn.Sequential(DOConvBlock(2 * dim, 2 * dim, 1),
                                      DOConvBlock(2 * dim, 2 * dim, 1, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # FFTs run in fp32 at least: CPU has no half/bfloat16 FFT, CUDA only for power-of-two sizes.
        exact = full_precision(x.dtype)
        y = torch.fft.rfft2(x.to(exact), norm="backward")
        y = self.main_fft(torch.cat([y.real, y.imag], dim=1).to(x.dtype)).to(exact)
        real, imag = y.chunk(2, dim=1)
        y = torch.fft.irfft2(torch.complex(real, imag), s=(h, w), norm="backward")
        return self.main(x) + x + y.to(x.dtype)


class DOGatedFeedForward(GatedFeedForward):
    """Restormer's gated feed-forward with a depthwise DO-Conv (`dwconv.main.0.{W,D,D_diag}`)."""

    def __init__(self, dim: int, expansion: float) -> None:
        super().__init__(dim, expansion, bias=False)
        hidden2 = self.dwconv.out_channels
        self.dwconv = DOConvBlock(hidden2, hidden2, 3, relu=False, groups=hidden2)


def attention_sampling_grid(offsets: torch.Tensor, heads: int) -> torch.Tensor:
    """The published (b·heads, H, W, 2) grid_sample grid, quirk included.

    The base grid is (row, col) but grid_sample reads (x, y): output (i, j) of
    a head samples column `i + ox/W` and row `j + oy/H`, i.e. the transposed
    position plus a small offset of order 1/W pixel. Computed in fp32 at least:
    in fp16 (bf16) a coordinate near 255 has a resolution of 1/8 (1) pixel,
    which would erase the offset.
    """
    b, _, h, w = offsets.shape
    offsets = offsets.to(full_precision(offsets.dtype))
    rows = torch.arange(h, device=offsets.device, dtype=offsets.dtype)
    cols = torch.arange(w, device=offsets.device, dtype=offsets.dtype)
    base = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)  # (h, w, 2)
    ox, oy = offsets[:, :heads], offsets[:, heads:]
    size = torch.tensor([w, h], device=offsets.device, dtype=offsets.dtype)
    grid = base + torch.stack((ox, oy), dim=-1) / size
    grid = 2.0 * grid / (size - 1) - 1.0
    return grid.reshape(b * heads, h, w, 2)


class DeformableChannelAttention(nn.Module):
    """Published `Attention_DCNv4`: MDTA-style channel attention over offset-sampled K and V.

    q is the sum of three dilated 3×3 convs (dilation 1/2/3); k, v are dilated
    (2) 3×3 convs, resampled bilinearly on `attention_sampling_grid`.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim, 1, bias=False)
        self.q_conv1 = nn.Conv2d(dim, dim, 3, padding=1, dilation=1, bias=False)
        self.q_conv2 = nn.Conv2d(dim, dim, 3, padding=2, dilation=2, bias=False)
        self.q_conv3 = nn.Conv2d(dim, dim, 3, padding=3, dilation=3, bias=False)
        self.k_conv = nn.Conv2d(dim, dim, 3, padding=2, dilation=2, bias=False)
        self.v_conv = nn.Conv2d(dim, dim, 3, padding=2, dilation=2, bias=False)
        self.offset_conv = nn.Conv2d(dim, 2 * heads, 3, padding=1)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = self.qkv(x)
        q = self.q_conv1(x) + self.q_conv2(x) + self.q_conv3(x)
        grid = attention_sampling_grid(self.offset_conv(x), self.num_heads)

        def sample(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(b * self.num_heads, c // self.num_heads, h, w).to(grid.dtype)
            t = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            return t.reshape(b, c, h, w).to(x.dtype)

        qkv = torch.cat([q, sample(self.k_conv(x)), sample(self.v_conv(x))], dim=1)
        logits, v = channel_attention_logits(qkv, self.num_heads, self.temperature)
        out = logits.softmax(dim=-1) @ v
        return self.project_out(out.reshape(b, c, h, w))


class DeformableConv(nn.Module):
    """Modulated deformable conv v2 (stride 1, padding k//2): `offset_conv`, `modulator_conv`, `regular_conv`."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        taps = kernel_size * kernel_size
        self.offset_conv = nn.Conv2d(dim, 2 * taps, kernel_size, padding=pad)
        self.modulator_conv = nn.Conv2d(dim, taps, kernel_size, padding=pad)
        self.regular_conv = nn.Conv2d(dim, dim, kernel_size, padding=pad, bias=False)
        # Zero offsets and a mask of 1 (2·sigmoid(0)) make a fresh module a plain conv.
        for conv in (self.offset_conv, self.modulator_conv):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = 2.0 * torch.sigmoid(self.modulator_conv(x))
        offset = self.offset_conv(x)
        if full_precision(x.dtype) == x.dtype:
            return deform_conv2d(x, offset, self.regular_conv.weight, None,
                                 padding=self.regular_conv.padding, mask=mask)
        # torchvision has no bfloat16 (CPU, CUDA) nor CPU float16 kernel, and its autocast
        # wrapper fails on CPU: run this op in fp32 outside autocast.
        with torch.autocast(x.device.type, enabled=False):
            y = deform_conv2d(x.float(), offset.float(), self.regular_conv.weight.float(), None,
                              padding=self.regular_conv.padding, mask=mask.float())
        return y.to(x.dtype)


class DGFM(nn.Module):
    """Deformable gated fusion of three same-size maps (large/mid/small receptive fields)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_max = nn.Sequential(DOConvBlock(dim, dim, 1), DeformableConv(dim, 7))
        self.conv_mid = nn.Sequential(DOConvBlock(dim, dim, 1), DeformableConv(dim, 5))
        self.conv_small = nn.Sequential(DOConvBlock(dim, dim, 1), DeformableConv(dim, 3))
        self.conv1 = DOConvBlock(dim, dim, 1)
        self.conv2 = DOConvBlock(dim, dim, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        skip = a + b + c
        t = self.conv1(torch.tanh(self.conv_mid(b)) * self.conv_max(a))
        t = self.conv2(torch.tanh(self.conv_small(c)) * t)
        return t + skip


class SCM(nn.Module):
    """Shallow convolutional module: image → `dim` features at a reduced scale."""

    def __init__(self, dim: int, in_channels: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            DOConvBlock(in_channels, dim // 4, 3),
            DOConvBlock(dim // 4, dim // 2, 1),
            DOConvBlock(dim // 2, dim // 2, 3),
            DOConvBlock(dim // 2, dim - in_channels, 1),
        )
        self.conv = DOConvBlock(dim, dim, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x, self.main(x)], dim=1))


class FAM(nn.Module):
    """Feature attention module: `x1 + merge(x1 · x2)`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.merge = DOConvBlock(dim, dim, 3, relu=False)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return x1 + self.merge(x1 * x2)


class Stage(nn.Module):
    """`num_res` pairs of (FFT residual block, deformable-attention transformer block) in `layers`."""

    def __init__(self, dim: int, num_res: int, heads: int, expansion: float) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(num_res):
            blocks.append(FFTResBlock(dim))
            blocks.append(TransformerBlock(dim, DeformableChannelAttention(dim, heads),
                                           DOGatedFeedForward(dim, expansion), "WithBias"))
        self.layers = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# --------------------------------------------------------------------------- network


@store_hyperparameters()
class DeRestormer(nn.Module):
    """The published `DeRestormer(num_res=8, inference=False)`, training-time parameter form.

    `forward(x)` returns only the full-resolution restored image (the published
    forward's element 0), unclamped. The half- and quarter-scale auxiliary
    heads (`ConvsOut`) only feed the training loss: their parameters are kept
    so checkpoints load strictly, but they are not evaluated.
    """

    hyperparameters: dict = {}

    def __init__(self, *, dim: int = 32, num_res: int = 8, heads: Sequence[int] = (1, 2, 4),
                 ffn_expansion: float = 2.66, in_channels: int = 3) -> None:
        super().__init__()
        c1, c2, c4 = dim, dim * 2, dim * 4
        h1, h2, h4 = heads
        self.Encoder = nn.ModuleList([
            Stage(c1, num_res, h1, ffn_expansion),
            Stage(c2, num_res, h2, ffn_expansion),
            Stage(c4, num_res, h4, ffn_expansion),
        ])
        self.feat_extract = nn.ModuleList([
            DOConvBlock(in_channels, c1, 3),
            DOConvBlock(c1, c2, 3, stride=2),
            DOConvBlock(c2, c4, 3, stride=2),
            DOConvBlock(c4, c2, 4, stride=2, transpose=True),
            DOConvBlock(c2, c1, 4, stride=2, transpose=True),
            DOConvBlock(c1, in_channels, 3, relu=False),
        ])
        self.Decoder = nn.ModuleList([
            Stage(c4, num_res, h4, ffn_expansion),
            Stage(c2, num_res, h2, ffn_expansion),
            Stage(c1, num_res, h1, ffn_expansion),
        ])
        self.Convs = nn.ModuleList([DOConvBlock(c4, c2, 1), DOConvBlock(c2, c1, 1)])
        self.ConvsOut = nn.ModuleList([DOConvBlock(c4, in_channels, 3, relu=False),
                                       DOConvBlock(c2, in_channels, 3, relu=False)])
        self.DGFMs = nn.ModuleList([DGFM(c1), DGFM(c2)])
        self.FAM1 = FAM(c4)
        self.SCM1 = SCM(c4, in_channels)
        self.FAM2 = FAM(c2)
        self.SCM2 = SCM(c2, in_channels)
        self.down_1 = Downsample(c1)
        self.up_1 = Upsample(c2)
        self.up_2 = Upsample(c4)
        self.up_3 = Upsample(c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = F.interpolate(x, scale_factor=0.5, mode="nearest")
        x4 = F.interpolate(x2, scale_factor=0.5, mode="nearest")
        z2 = self.SCM2(x2)
        z4 = self.SCM1(x4)

        e1 = self.Encoder[0](self.feat_extract[0](x))
        e2 = self.Encoder[1](self.FAM2(self.feat_extract[1](e1), z2))
        z = self.Encoder[2](self.FAM1(self.feat_extract[2](e2), z4))

        z42 = self.up_2(z)
        s1 = self.DGFMs[0](e1, self.up_1(e2), self.up_3(z42))
        s2 = self.DGFMs[1](self.down_1(e1), e2, z42)

        z = self.feat_extract[3](self.Decoder[0](z))
        z = self.Decoder[1](self.Convs[0](torch.cat([z, s2], dim=1)))
        z = self.feat_extract[4](z)
        z = self.Decoder[2](self.Convs[1](torch.cat([z, s1], dim=1)))
        return self.feat_extract[5](z) + x


# --------------------------------------------------------------------------- windowed inference


def _tiles(x: torch.Tensor, win: int) -> torch.Tensor:
    """(B, C, a·win, b·win) → (B·a·b, C, win, win), ordered image, tile-row, tile-column."""
    b, c, h, w = x.shape
    t = x.reshape(b, c, h // win, win, w // win, win).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(-1, c, win, win)


def _untile(t: torch.Tensor, win: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `_tiles` for an (h, w) region."""
    c = t.shape[1]
    x = t.reshape(-1, h // win, w // win, c, win, win).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(-1, c, h, w)


def window_partition_inference(model_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                               win: int = DEFAULT_TILE, max_batch: int | None = None) -> torch.Tensor:
    """The published DeRestormer test procedure: square windows, no overlap, no blending.

    Windows: the non-overlapping win×win grid over the top-left
    (win·⌊H/win⌋)×(win·⌊W/win⌋) region; if W is not a multiple, one window per
    tile-row over the last `win` columns; if H is not, one per tile-column
    over the last `win` rows; if neither, the bottom-right corner window.
    Each strip contributes only its part beyond the grid. The published script
    runs all windows as one batch; `max_batch` splits that batch (each window
    is processed independently, so only memory changes). The result is not
    clamped. Raises InputError if the image is smaller than one window.
    """
    b, c, height, width = x.shape
    if height < win or width < win:
        raise InputError(
            f"image of {height}×{width} pixels is smaller than the {win}×{win} window of DeRestormer's "
            "published protocol; use a smaller window (tile=) or the default blended tiling"
        )
    h, w = win * (height // win), win * (width // win)
    groups = [_tiles(x[..., :h, :w], win)]
    if w != width:
        groups.append(_tiles(x[..., :h, -win:], win))
    if h != height:
        groups.append(_tiles(x[..., -win:, :w], win))
    if h != height and w != width:
        groups.append(x[..., -win:, -win:])
    windows = torch.cat(groups, dim=0)
    step = max_batch or windows.shape[0]
    out = torch.cat([model_fn(windows[i:i + step]) for i in range(0, windows.shape[0], step)], dim=0)

    counts = [g.shape[0] for g in groups]
    parts = iter(out.split(counts, dim=0))
    res = out.new_zeros(b, out.shape[1], height, width)
    res[..., :h, :w] = _untile(next(parts), win, h, w)
    if w != width:
        res[..., :h, w:] = _untile(next(parts), win, h, win)[..., win - (width - w):]
    if h != height:
        res[..., h:, :w] = _untile(next(parts), win, win, w)[..., win - (height - h):, :]
    if h != height and w != width:
        res[..., h:, w:] = next(parts)[..., win - (height - h):, win - (width - w):]
    return res


# --------------------------------------------------------------------------- spandrel


def canonical_d_diag(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with every DO-Conv identity under `D_diag`.

    Accepts the upstream DO-Conv spelling `d_diag` and regenerates a missing
    identity (it is a constant), so such files load strictly.
    """
    sd = {(k[: -len("d_diag")] + "D_diag" if k.endswith(".d_diag") else k): v
          for k, v in state_dict.items()}
    for key in [k for k in sd if k.endswith(".D") and k[:-1] + "D_diag" not in sd]:
        d = sd[key]
        in_channels, taps = d.shape[0], d.shape[1]
        sd[key + "_diag"] = identity_d_diag(in_channels, math.isqrt(taps)).to(d.dtype)
    return sd


class DeRestormerArch(Architecture[DeRestormer]):
    def __init__(self) -> None:
        super().__init__(
            id="DeRestormer",
            detect=KeyCondition.has_all(
                "feat_extract.0.main.0.W",
                "feat_extract.3.main.0.weight",
                "feat_extract.5.main.0.W",
                "Encoder.0.layers.0.main.0.main.0.W",
                "Encoder.0.layers.0.main_fft.0.main.0.W",
                "Encoder.0.layers.1.norm1.body.weight",
                "Encoder.0.layers.1.attn.temperature",
                "Encoder.0.layers.1.attn.q_conv3.weight",
                "Encoder.0.layers.1.attn.offset_conv.weight",
                "Encoder.0.layers.1.ffn.dwconv.main.0.W",
                "Encoder.2.layers.1.attn.temperature",
                "Decoder.2.layers.1.attn.temperature",
                "Convs.1.main.0.W",
                "ConvsOut.1.main.0.W",
                "DGFMs.0.conv_max.1.offset_conv.weight",
                "DGFMs.0.conv_max.1.modulator_conv.weight",
                "DGFMs.1.conv_small.1.regular_conv.weight",
                "FAM1.merge.main.0.W",
                "SCM1.conv.main.0.W",
                "SCM2.conv.main.0.W",
                "down_1.body.0.weight",
                "up_3.body.0.weight",
            ),
        )

    @override
    def load(self, state_dict: StateDict) -> ImageModelDescriptor[DeRestormer]:
        first = state_dict["feat_extract.0.main.0.W"]
        dim, in_channels = first.shape[:2]
        num_res = get_seq_len(state_dict, "Encoder.0.layers") // 2
        heads = [state_dict[f"Encoder.{i}.layers.1.attn.temperature"].shape[0] for i in range(3)]
        dims = [dim, dim * 2, dim * 4]
        hiddens = [state_dict[f"Encoder.{i}.layers.1.ffn.project_out.weight"].shape[1] for i in range(3)]
        model = DeRestormer(dim=dim, num_res=num_res, heads=heads, in_channels=in_channels,
                            ffn_expansion=infer_ffn_expansion(dims, hiddens, "DeRestormer checkpoint"))
        if first.ndim == 4:
            # The published `inference=True` form: DO-Convs already fused into 4-D `W` kernels.
            fold_do_convs(model)
            model.load_state_dict({(k[:-2] + ".weight" if k.endswith(".W") else k): v
                                   for k, v in state_dict.items()}, strict=True)
        else:
            model.load_state_dict(canonical_d_diag(state_dict), strict=True)
            fold_do_convs(model)
        return ImageModelDescriptor(
            model,
            model.state_dict(),
            architecture=self,
            purpose="Restoration",
            tags=[f"{dim}nf", f"{num_res}res"],
            # benchmarks/arch_precision.py (fixture weights, 4 photographs at 128²): lowest
            # PSNR vs fp32 under autocast fp16 59.0 dB, bf16 41.4 dB; the bar is 45 dB.
            # FFT, attention sampling and deformable conv run in fp32 regardless.
            supports_half=True,
            supports_bfloat16=False,
            scale=1,
            input_channels=in_channels,
            output_channels=in_channels,
            # Multiple of 4: strided convs round up while nearest halving rounds down.
            # Minimum 8: at 4 the quarter-scale attention grid divides by W−1 = 0.
            # Square: trained and tested on square windows only (see module docstring).
            size_requirements=SizeRequirements(minimum=8, multiple_of=4, square=True),
            # Attention and FFT statistics span the whole input, so results depend on the
            # tile size; the published protocol itself tiles (DEFAULT_TILE windows).
            tiling=ModelTiling.SUPPORTED,
        )


__all__ = [
    "DEFAULT_TILE",
    "DeRestormer",
    "DeRestormerArch",
    "fold_do_convs",
    "window_partition_inference",
]
