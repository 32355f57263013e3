"""Concurrent spatial and channel squeeze & excitation (scSE): an SE channel gate and a
1x1-conv spatial gate applied side by side."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..attention_maps import record
from ..registry import register_block
from ._layers import reduced_channels
from .base import BlockConfig


class ConcurrentSqueezeExcite(nn.Module):
    """scSE (Roy et al., 1803.02579, eq. 1-4).

    cSE: GAP -> FC C -> C/r -> ReLU -> FC -> sigmoid, a weight per channel (``fc1``,
    ``fc2``: 1x1 convs with bias). sSE: a 1x1 conv C -> 1 (bias) -> sigmoid, a weight per
    position (``spatial``). The two recalibrated maps are combined: ``add`` (the MICCAI
    paper, eq. 4), ``max`` (element-wise max-out, the best aggregation in the authors'
    journal version, 1808.08127) or ``mul``.
    """

    def __init__(self, channels: int, reduction: float = 2, combine: str = "add") -> None:
        super().__init__()
        if combine not in ("add", "max", "mul"):
            raise ValueError(f"combine must be 'add', 'max' or 'mul', got {combine!r}")
        self.combine = combine
        hidden = reduced_channels(channels, reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.spatial = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_c = torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))
        a_s = torch.sigmoid(self.spatial(x))
        record(self, "channel", a_c, kind="channel")
        record(self, "spatial", a_s)
        x_c, x_s = x * a_c, x * a_s
        if self.combine == "add":
            return x_c + x_s
        if self.combine == "max":
            return torch.maximum(x_c, x_s)
        return x_c * x_s

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}"


@register_block
class SCSEConfig(BlockConfig):
    """Concurrent spatial and channel squeeze & excitation (scSE),
    https://arxiv.org/abs/1803.02579"""

    type: Literal["scse"]
    reduction: float = Field(2, ge=0.0625, le=1024, description="Reduction ratio r of the channel "
                             "branch (the paper's 2).")
    combine: Literal["add", "max", "mul"] = Field(
        "add", description="How the two recalibrated maps combine: add (the paper), max "
        "(the journal version's best) or mul.")

    module = ConcurrentSqueezeExcite
