"""Self-attention over the positions of a feature map (GCNet, Non-Local, ...)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..registry import register_block
from .base import BlockConfig
from .channel import reduced_channels


class GlobalContext(nn.Module):
    """GC block (Cao et al., 1904.11492).

    Context modelling: 1x1 conv to one map, softmax over H*W, weighted sum of the
    features. Transform: 1x1 C->C/r, LayerNorm, ReLU, 1x1 back to C, the last conv
    zero-initialised so the block starts as the identity. Fusion: add.
    """

    def __init__(self, channels: int, reduction: float = 16) -> None:
        super().__init__()
        hidden = reduced_channels(channels, reduction)
        self.attn = nn.Conv2d(channels, 1, 1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.norm = nn.LayerNorm([hidden, 1, 1])
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.reset_identity_()

    def reset_identity_(self) -> None:
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        weights = self.attn(x).view(n, 1, h * w).softmax(dim=-1)          # (N, 1, HW)
        context = torch.bmm(x.view(n, c, h * w), weights.transpose(1, 2))  # (N, C, 1)
        context = context.view(n, c, 1, 1)
        return x + self.fc2(self.act(self.norm(self.fc1(context))))


@register_block
class GlobalContextConfig(BlockConfig):
    """Global Context block (GCNet), https://arxiv.org/abs/1904.11492"""

    type: Literal["global_context"]
    reduction: float = Field(16, gt=0, description="Bottleneck ratio r of the transform.")

    module = GlobalContext
    residual = True
