"""Attention over groups of channels (sub-features), each group attended on its own:
Shuffle Attention (SA-Net), Spatial Group-wise Enhance (SGE) and Efficient Multi-scale
Attention (EMA).

All three reshape (N, C, H, W) to (N * G, C / G, H, W) and share their few parameters
across the groups. ``groups`` is the papers' G; where C is not a multiple of G (or of
2G for SA) the block uses the largest G' <= G that divides it, and says so in its repr:
the zoo ResNets' widths are multiples of 128, so the papers' models get G exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..attention_maps import record
from ..registry import register_block
from .base import BlockConfig


def fitting_groups(channels: int, groups: int, per_group: int = 1) -> int:
    """The largest g <= ``groups`` with ``channels`` a multiple of ``per_group * g``."""
    for g in range(min(groups, channels // per_group), 0, -1):
        if channels % (per_group * g) == 0:
            return g
    raise ValueError(f"{channels} channels do not split into groups of {per_group} or more "
                     "equal parts")


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: (N, g*k, H, W) -> channels interleaved across g."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


# --- shuffle_attention: SA-Net (Zhang & Yang, 2102.00240) -------------------------------


class ShuffleAttention(nn.Module):
    """Shuffle attention (SA-Net, 2102.00240, Fig. 2; the authors' ``sa_layer``).

    Split C into G groups and each group into two halves. Channel half: GAP, a per-
    channel scale and shift (``cweight``, ``cbias``), sigmoid, scale. Spatial half:
    GroupNorm (one group per channel), a per-channel scale and shift (``sweight``,
    ``sbias``), sigmoid, scale. Concatenate, then shuffle the channels (2 groups) so
    information crosses the halves. The scales start at 0 and the shifts at 1, as in
    the authors' code; parameters (3C/G in all) are shared by the G groups.
    """

    def __init__(self, channels: int, groups: int = 64) -> None:
        super().__init__()
        self.groups = fitting_groups(channels, groups, per_group=2)
        half = channels // (2 * self.groups)
        self.cweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.gn = nn.GroupNorm(half, half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x0, x1 = x.reshape(n * self.groups, c // self.groups, h, w).chunk(2, dim=1)
        a_c = torch.sigmoid(self.cweight * x0.mean((2, 3), keepdim=True) + self.cbias)
        a_s = torch.sigmoid(self.sweight * self.gn(x1) + self.sbias)
        record(self, "", _shuffled_gate, a_c, a_s, n)
        out = torch.cat([x0 * a_c, x1 * a_s], dim=1).reshape(n, c, h, w)
        return channel_shuffle(out, 2)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def _shuffled_gate(a_c: torch.Tensor, a_s: torch.Tensor, n: int) -> torch.Tensor:
    """The weight each output channel got, (N, C, H, W), in the output's channel order."""
    gate = torch.cat([a_c.expand_as(a_s), a_s], dim=1)
    return channel_shuffle(gate.reshape(n, -1, *a_s.shape[-2:]), 2)


@register_block
class ShuffleAttentionConfig(BlockConfig):
    """Shuffle Attention (SA-Net), https://arxiv.org/abs/2102.00240"""

    type: Literal["shuffle_attention"]
    groups: int = Field(64, ge=1, le=1024, description="Groups G (the paper's 64); C must be a "
                        "multiple of 2G, else the largest fitting G' < G is used.")

    module = ShuffleAttention


# --- spatial_group_enhance: SGE (Li, Hu & Yang, 1905.09646) ------------------------------


class SpatialGroupEnhance(nn.Module):
    """Spatial group-wise enhance (SGE-Net, 1905.09646, eq. 1-5; the authors' code).

    In each group, the similarity of every position's feature vector to the group's
    global (average) feature, ``c_i = g . x_i``, is normalised over the positions (mean
    0, std 1 with the unbiased std plus 1e-5), scaled and shifted per group (``weight``
    from 0, ``bias`` from 1) and through a sigmoid gates the group's features there.
    """

    def __init__(self, channels: int, groups: int = 64, epsilon: float = 1e-5) -> None:
        super().__init__()
        self.groups = fitting_groups(channels, groups)
        self.epsilon = epsilon
        self.weight = nn.Parameter(torch.zeros(1, self.groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, self.groups, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = x.reshape(n * self.groups, c // self.groups, h, w)
        t = (g * g.mean((2, 3), keepdim=True)).sum(1).reshape(n * self.groups, h * w)
        t = t - t.mean(1, keepdim=True)
        t = t / (t.std(1, keepdim=True) + self.epsilon)
        gate = torch.sigmoid(t.view(n, self.groups, h, w) * self.weight + self.bias)
        record(self, "", gate)
        return (g * gate.view(n * self.groups, 1, h, w)).view(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


@register_block
class SpatialGroupEnhanceConfig(BlockConfig):
    """Spatial Group-wise Enhance (SGE), https://arxiv.org/abs/1905.09646"""

    type: Literal["spatial_group_enhance"]
    groups: int = Field(64, ge=1, le=1024, description="Groups G (the paper's 64); C must be a "
                        "multiple of G, else the largest fitting G' < G is used.")
    epsilon: float = Field(1e-5, gt=0, le=1, description="Added to the std before dividing.")

    module = SpatialGroupEnhance


# --- efficient_multiscale_attention: EMA (Ouyang et al., 2305.13563) ---------------------


class EfficientMultiScaleAttention(nn.Module):
    """Efficient multi-scale attention (EMA, 2305.13563, Fig. 3; the authors' ``EMA``).

    Per group of C/G channels: a 1x1 branch (coordinate-attention-like: pool along W and
    along H, a shared 1x1 conv, sigmoids re-weight the group, then GroupNorm) and a 3x3
    branch (a 3x3 conv). Cross-spatial learning: each branch's global average, softmaxed
    over the group's channels, weighs the other branch's features at every position;
    the two (1, H, W) maps add and, through a sigmoid, gate the group.
    """

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.groups = fitting_groups(channels, groups)
        width = channels // self.groups
        self.gn = nn.GroupNorm(width, width)
        self.conv1x1 = nn.Conv2d(width, width, 1)
        self.conv3x3 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = x.reshape(n * self.groups, c // self.groups, h, w)
        strips = torch.cat([g.mean(3, keepdim=True), g.mean(2, keepdim=True).transpose(2, 3)],
                           dim=2)                                       # (NG, C/G, H+W, 1)
        s_h, s_w = self.conv1x1(strips).split([h, w], dim=2)
        x1 = self.gn(g * s_h.sigmoid() * s_w.transpose(2, 3).sigmoid())
        x2 = self.conv3x3(g)
        w1 = F.softmax(x1.mean((2, 3)), dim=-1).unsqueeze(1)             # (NG, 1, C/G)
        w2 = F.softmax(x2.mean((2, 3)), dim=-1).unsqueeze(1)
        weights = (w1 @ x2.flatten(2) + w2 @ x1.flatten(2)).view(n * self.groups, 1, h, w)
        gate = weights.sigmoid()
        record(self, "", gate.view(n, self.groups, h, w))
        return (g * gate).view(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


@register_block
class EfficientMultiScaleAttentionConfig(BlockConfig):
    """Efficient Multi-Scale Attention (EMA), https://arxiv.org/abs/2305.13563"""

    type: Literal["efficient_multiscale_attention"]
    groups: int = Field(32, ge=1, le=1024,
                        description="Groups G, the authors' factor 32; C must be "
                        "a multiple of G, else the largest fitting G' < G is used.")

    module = EfficientMultiScaleAttention
