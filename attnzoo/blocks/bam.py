"""BAM, the Bottleneck Attention Module: channel and spatial branches at stage boundaries."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..attention_maps import record
from ..registry import register_block
from ._layers import reduced_channels
from .base import BlockConfig


class BottleneckAttention(nn.Module):
    """BAM (Park et al., 1807.06514, eq. 1-4 and Fig. 2).

    Channel branch: GAP -> FC C->C/r -> BN -> ReLU -> FC C/r->C, a logit per channel.
    Spatial branch: 1x1 conv C->C/r -> BN -> ReLU -> ``num_dilated`` x (3x3 conv with
    dilation d -> BN -> ReLU) -> 1x1 conv to one map, a logit per position. The two are
    broadcast to (C, H, W) and combined, ``M = sigmoid(Mc + Ms)`` (the paper, ``sum``) or
    ``sigmoid(Mc * Ms)`` (the authors' released code, ``product``), and the block returns
    ``x + x * M``. FCs and convs have biases, as in the released code (the FCs are 1x1
    convs: the same maps on pooled features).
    """

    def __init__(self, channels: int, reduction: float = 16, dilation: int = 4,
                 num_dilated: int = 2, combine: str = "sum") -> None:
        super().__init__()
        if combine not in ("sum", "product"):
            raise ValueError(f"combine must be 'sum' or 'product', got {combine!r}")
        self.combine = combine
        hidden = reduced_channels(channels, reduction)
        self.channel = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1))
        layers: list[nn.Module] = [nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden),
                                   nn.ReLU(inplace=True)]
        for _ in range(num_dilated):
            layers += [nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
                       nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(hidden, 1, 1))
        self.spatial = nn.Sequential(*layers)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """M(F), (N, C, H, W) in [0, 1]."""
        mc = self.channel(x.mean((2, 3), keepdim=True))   # (N, C, 1, 1)
        ms = self.spatial(x)                               # (N, 1, H, W)
        return torch.sigmoid(mc + ms if self.combine == "sum" else mc * ms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.attention(x)
        record(self, "", m)
        return x + x * m

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}"


@register_block
class BAMConfig(BlockConfig):
    """Bottleneck Attention Module, https://arxiv.org/abs/1807.06514 (inserted after a
    stage, where the network downsamples)."""

    type: Literal["bam"]
    reduction: float = Field(16, ge=0.0625, le=1024,
                             description="Reduction ratio r of both branches "
                             "(the paper's 16).")
    dilation: int = Field(4, ge=1, le=64, description="Dilation d of the spatial branch's 3x3 "
                          "convs (the paper's 4).")
    num_dilated: int = Field(2, ge=0, le=8, description="Dilated 3x3 convs in the spatial branch "
                             "(the paper's 2).")
    combine: Literal["sum", "product"] = Field(
        "sum", description="How the branches combine before the sigmoid: sum (the paper's "
        "eq. 2) or product (the authors' released code).")

    module = BottleneckAttention
