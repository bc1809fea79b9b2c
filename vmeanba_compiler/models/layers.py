"""VMamba building blocks around SS2D: the VSS block, patch embeddings and downsampling.

All activations are channels-last (B, H, W, C) so LayerNorm and Linear act on the last axis
without permutes; only convolutions permute to (B, C, H, W) and back.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ss2d import SS2D


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Channel MLP (Linear-GELU-Linear) used by the v2 blocks after the SS2D mixer."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VSSBlock(nn.Module):
    """Pre-norm residual block: x + ss2d(norm(x)), then x + mlp(norm2(x)) when mlp_ratio > 0."""

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        mlp_ratio: float = 0.0,
        gated: bool = True,
        dt_rank: Union[int, str] = "auto",
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, gated=gated)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim) if mlp_ratio > 0 else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio)) if mlp_ratio > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class ChannelsLastConv(nn.Module):
    """Conv2d applied to channels-last tensors (permute in, conv, permute out)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ToChannelsLast(nn.Module):
    """(B, C, H, W) -> (B, H, W, C): ends the stem's first conv, which sees the NCHW image."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class PatchMerging2D(nn.Module):
    """v0 downsampling: concatenate each 2x2 neighbourhood (4C), LayerNorm, Linear to 2C.

    Odd H or W is zero-padded to even first, so tiny inputs (e.g. 8x8 digits) never fail.
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[1], x.shape[2]
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


def conv_downsample(dim: int, out_dim: int) -> nn.Module:
    """v2 downsampling: 3x3 stride-2 conv, then LayerNorm (channels-last in and out)."""
    return nn.Sequential(
        ChannelsLastConv(nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)), nn.LayerNorm(out_dim)
    )


def patch_embed_v0(in_chans: int, embed_dim: int, patch_size: int = 4) -> nn.Module:
    """v0 stem: non-overlapping patch_size x patch_size conv, then LayerNorm.

    Image (B, in_chans, H, W) -> channels-last (B, H/p, W/p, E).
    """
    conv = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
    return nn.Sequential(conv, ToChannelsLast(), nn.LayerNorm(embed_dim))


def patch_embed_v2(in_chans: int, embed_dim: int) -> nn.Module:
    """v2 stem: two overlapping 3x3 stride-2 convs (total stride 4) with LayerNorm and GELU.

    Image (B, in_chans, H, W) -> channels-last (B, ceil(H/4), ceil(W/4), E).
    """
    mid = embed_dim // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, mid, 3, stride=2, padding=1),
        ToChannelsLast(),
        nn.LayerNorm(mid),
        nn.GELU(),
        ChannelsLastConv(nn.Conv2d(mid, embed_dim, 3, stride=2, padding=1)),
        nn.LayerNorm(embed_dim),
    )
