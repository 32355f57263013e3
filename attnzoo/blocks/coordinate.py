"""Coordinate attention: channel attention factorised along the two spatial axes."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..attention_maps import record
from ..registry import register_block
from ._layers import reduced_channels
from .base import BlockConfig

_ACTIVATIONS = {"hard_swish": nn.Hardswish, "relu": nn.ReLU, "silu": nn.SiLU}


class CoordinateAttention(nn.Module):
    """Coordinate attention (Hou et al., 2103.02907, Fig. 2c; the authors' ``CoordAtt``).

    Pool each channel along W (one value per row) and along H (one per column); the two
    strips, concatenated, go through a shared 1x1 conv C -> max(min_channels, C/r) with
    bias, BN and h-swish; split again, a 1x1 conv per direction back to C and a sigmoid
    give a_h (N, C, H, 1) and a_w (N, C, 1, W); the output is ``x * a_h * a_w``.
    """

    def __init__(self, channels: int, reduction: float = 32, min_channels: int = 8,
                 activation: str = "hard_swish") -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got "
                             f"{activation!r}")
        hidden = reduced_channels(channels, reduction, min_channels)
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act = _ACTIVATIONS[activation]()
        self.conv_h = nn.Conv2d(hidden, channels, 1)
        self.conv_w = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        strips = torch.cat([x.mean(3, keepdim=True),                    # (N, C, H, 1)
                            x.mean(2, keepdim=True).transpose(2, 3)],   # (N, C, W, 1)
                           dim=2)
        y = self.act(self.bn1(self.conv1(strips)))
        y_h, y_w = y.split([h, w], dim=2)
        a_h = torch.sigmoid(self.conv_h(y_h))                           # (N, C, H, 1)
        a_w = torch.sigmoid(self.conv_w(y_w.transpose(2, 3)))           # (N, C, 1, W)
        record(self, "", torch.mul, a_h, a_w)
        return x * a_h * a_w


@register_block
class CoordinateAttentionConfig(BlockConfig):
    """Coordinate Attention, https://arxiv.org/abs/2103.02907"""

    type: Literal["coordinate_attention"]
    reduction: float = Field(32, ge=0.0625, le=1024,
                             description="Reduction ratio r of the shared 1x1 "
                             "conv: max(min_channels, C / r) channels (the authors' 32).")
    min_channels: int = Field(8, ge=1, le=4096, description="Lower bound on the hidden width (the "
                              "authors' 8).")
    activation: Literal["hard_swish", "relu", "silu"] = Field(
        "hard_swish", description="Non-linearity after the shared conv and BN (the authors' "
        "h-swish; the paper also reports ReLU6-like and SiLU variants).")

    module = CoordinateAttention
