"""Building blocks shared by derestore's own architectures (Restormer family).

Attribute names are part of the checkpoint format: they must match the
published state dicts key for key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelUnavailable

PUBLISHED_FFN_EXPANSION = 2.66


class BiasFreeLayerNorm(nn.Module):
    """Per-pixel LayerNorm over channels without a bias (`body.weight`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, HW, C)
        var = x.var(-1, keepdim=True, unbiased=False)
        return x / torch.sqrt(var + 1e-5) * self.weight


class WithBiasLayerNorm(nn.Module):
    """Per-pixel LayerNorm over channels with a bias (`body.weight`, `body.bias`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, HW, C)
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class LayerNorm(nn.Module):
    """Channel LayerNorm on (B, C, H, W), applied per pixel."""

    def __init__(self, dim: int, kind: str = "WithBias") -> None:
        super().__init__()
        self.body = BiasFreeLayerNorm(dim) if kind == "BiasFree" else WithBiasLayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.body(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(b, c, h, w)


class GatedFeedForward(nn.Module):
    """Restormer's gated-dconv feed-forward: `project_in`, depthwise `dwconv`, GELU gate, `project_out`."""

    def __init__(self, dim: int, expansion: float = 2.66, bias: bool = False) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


def channel_attention_logits(
    qkv: torch.Tensor, heads: int, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a (B, 3C, H, W) qkv map into the per-head C'×C' logits and the values.

    q and k are L2-normalised along the flattened spatial axis, as in Restormer's MDTA.
    Returns (logits (B, heads, C', C'), v (B, heads, C', HW)).
    """
    b, c3, h, w = qkv.shape
    q, k, v = qkv.reshape(b, 3, heads, c3 // (3 * heads), h * w).unbind(1)
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    return (q @ k.transpose(-2, -1)) * temperature, v


class ChannelAttention(nn.Module):
    """Restormer's multi-Dconv head transposed attention (MDTA)."""

    def __init__(self, dim: int, heads: int, bias: bool = False) -> None:
        super().__init__()
        self.num_heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        logits, v = channel_attention_logits(
            self.qkv_dwconv(self.qkv(x)), self.num_heads, self.temperature
        )
        out = logits.softmax(dim=-1) @ v
        return self.project_out(out.reshape(b, c, h, w))


class TransformerBlock(nn.Module):
    """Pre-norm block: `x + attn(norm1(x))`, then `x + ffn(norm2(x))`.

    `attn` and `ffn` are passed in so that variants (top-k attention,
    mixed-scale FFN) reuse the same skeleton and key names.
    """

    def __init__(self, dim: int, attn: nn.Module, ffn: nn.Module, norm: str = "WithBias") -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, norm)
        self.attn = attn
        self.norm2 = LayerNorm(dim, norm)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def restormer_block(dim: int, heads: int, expansion: float = 2.66, bias: bool = False,
                    norm: str = "WithBias") -> TransformerBlock:
    return TransformerBlock(dim, ChannelAttention(dim, heads, bias),
                            GatedFeedForward(dim, expansion, bias), norm)


def infer_ffn_expansion(dims: Sequence[int], hiddens: Sequence[int], source: str) -> float:
    """An expansion factor f with `int(dim·f) == hidden` at every level, read back from a checkpoint.

    The factor itself is not stored, only the widths it produced. Prefers the
    published 2.66, then a level's exact ratio, then the middle of the
    interval every level allows; raises ModelUnavailable when no f fits.
    """
    low = max(h / d for d, h in zip(dims, hiddens))
    high = min((h + 1) / d for d, h in zip(dims, hiddens))
    for f in (PUBLISHED_FFN_EXPANSION, *(h / d for d, h in zip(dims, hiddens)), (low + high) / 2):
        if all(int(d * f) == h for d, h in zip(dims, hiddens)):
            return f
    raise ModelUnavailable(
        f"{source}: feed-forward widths {list(hiddens)} at {list(dims)} channels fit no single expansion "
        "factor; the file is damaged or edited — re-download it or re-save it from the published code"
    )


class Downsample(nn.Module):
    """3×3 conv halving channels, then PixelUnshuffle(2): (C, H, W) → (2C, H/2, W/2). Key: `body.0`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """3×3 conv doubling channels, then PixelShuffle(2): (C, H, W) → (C/2, 2H, 2W). Key: `body.0`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
