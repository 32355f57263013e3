"""Triplet attention: three rotated spatial gates, one per pair of dimensions."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..attention_maps import record
from ..registry import register_block
from ._layers import check_odd
from .base import BlockConfig


class ZPoolGate(nn.Module):
    """One branch of triplet attention on a (N, D, A, B) tensor: Z-pool over D (max and
    mean, 2 maps), a KxK conv to one map (no bias), BN, sigmoid: the (N, 1, A, B) gate.
    The BN has the authors' momentum 0.01 (PyTorch's convention: 1 - 0.99)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return torch.sigmoid(self.bn(self.conv(pooled)))


class TripletAttention(nn.Module):
    """Triplet attention (Misra et al., 2010.03045; the authors' ``TripletAttention``).

    Branch ``channel_height`` rotates the map so that H is pooled (a gate over C x W),
    branch ``channel_width`` pools W (a gate over H x C), branch ``spatial`` pools C (a
    gate over H x W, as CBAM's spatial gate). The output is the mean of the three gated
    maps, ``x * (g_ch + g_cw + g_hw) / 3`` (without ``spatial``: the mean of two).
    """

    def __init__(self, channels: int | None = None, kernel_size: int = 7,
                 spatial: bool = True) -> None:
        super().__init__()
        self.channel_height = ZPoolGate(kernel_size)
        self.channel_width = ZPoolGate(kernel_size)
        self.spatial = ZPoolGate(kernel_size) if spatial else None

    def gates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The branch gates, broadcastable to x: (N, C, 1, W), (N, C, H, 1) [, (N, 1, H, W)]."""
        g_cw = self.channel_height(x.transpose(1, 2)).transpose(1, 2)   # pools H -> over C, W
        g_ch = self.channel_width(x.transpose(1, 3)).transpose(1, 3)    # pools W -> over H, C
        gates = [g_cw, g_ch]
        if self.spatial is not None:
            gates.append(self.spatial(x))
        return gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.gates(x)
        record(self, "", _mean_gate, gates)
        return sum(x * g for g in gates) / len(gates)


def _mean_gate(gates: list[torch.Tensor]) -> torch.Tensor:
    """The 3-D attention the block applies: the mean of its broadcast gates (N, C, H, W)."""
    return sum(torch.broadcast_tensors(*gates)) / len(gates)


@register_block
class TripletAttentionConfig(BlockConfig):
    """Triplet Attention, https://arxiv.org/abs/2010.03045"""

    type: Literal["triplet_attention"]
    kernel_size: int = Field(7, ge=1, le=31, description="Odd kernel of each branch's conv (the "
                             "paper's main models: 7; it also reports 3).")
    spatial: bool = Field(True, description="Keep the third (H x W) branch; False is the "
                          "authors' no_spatial variant (two branches).")

    module = TripletAttention

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, k: int) -> int:
        return check_odd(k)
