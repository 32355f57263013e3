"""Channel attention: reweight the channels of a feature map (SE, ECA, ...)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..registry import register_block
from .base import BlockConfig


def reduced_channels(channels: int, reduction: float, min_channels: int = 1, divisor: int = 1
                     ) -> int:
    """``channels / reduction``, at least ``min_channels``, rounded to a multiple of
    ``divisor`` (1 = the papers' plain C/r)."""
    value = max(min_channels, int(channels / reduction))
    if divisor > 1:
        value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return value


class SqueezeExcite(nn.Module):
    """SE (Hu et al., 1709.01507): GAP -> FC C->C/r -> ReLU -> FC -> sigmoid -> scale.

    The FCs are 1x1 convs with bias, the same maps as ``nn.Linear`` on pooled
    features (and timm's ``SEModule`` layout: ``fc1``, ``fc2``).
    """

    def __init__(self, channels: int, reduction: float = 16, min_channels: int = 1,
                 divisor: int = 1) -> None:
        super().__init__()
        hidden = reduced_channels(channels, reduction, min_channels, divisor)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(w)


@register_block
class SEConfig(BlockConfig):
    """Squeeze-and-Excitation, https://arxiv.org/abs/1709.01507"""

    type: Literal["se"]
    reduction: float = Field(16, gt=0, description="Reduction ratio r of the bottleneck FC.")
    min_channels: int = Field(1, ge=1, description="Lower bound on the hidden width C/r.")
    divisor: int = Field(1, ge=1, description="Round C/r to a multiple of this (timm uses 8).")

    module = SqueezeExcite


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """ECA's adaptive kernel size: t = int(|log2(C) / gamma + b / gamma|), made odd
    by rounding up (the paper's |.|_odd as its reference code computes it)."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class EfficientChannelAttention(nn.Module):
    """ECA (Wang et al., 1910.03151): GAP -> 1-D conv over channels (no reduction,
    kernel from ``eca_kernel_size``) -> sigmoid -> scale."""

    def __init__(self, channels: int, gamma: float = 2, b: float = 1,
                 kernel_size: int | None = None) -> None:
        super().__init__()
        k = kernel_size or eca_kernel_size(channels, gamma, b)
        self.kernel_size = k
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3)).unsqueeze(1)                      # (N, 1, C)
        y = self.conv(y).transpose(1, 2).unsqueeze(-1)       # (N, C, 1, 1)
        return x * torch.sigmoid(y)


@register_block
class ECAConfig(BlockConfig):
    """Efficient Channel Attention, https://arxiv.org/abs/1910.03151"""

    type: Literal["eca"]
    gamma: float = Field(2, gt=0, description="gamma of the kernel-size formula.")
    b: float = Field(1, description="b of the kernel-size formula.")
    kernel_size: int | None = Field(
        None, ge=1, description="Fixed odd kernel size; derived from C by the formula if unset."
    )

    module = EfficientChannelAttention

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, k: int | None) -> int | None:
        if k is not None and k % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep C channels, got {k}")
        return k
