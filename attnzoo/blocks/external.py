"""External attention: attention against two small learnt memories shared by all
samples, linear in the number of positions."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..attention_maps import record
from ..registry import register_block
from .base import BlockConfig


class ExternalAttention(nn.Module):
    """External attention (Guo et al., 2105.02358, Alg. 1 and the authors' EANet head).

    A 1x1 conv (bias) maps the input; the key memory M_k (``memory_units`` S x C, a 1x1
    Conv1d without bias) scores every position against the S units; double
    normalisation: softmax over the positions, then each position's scores divided by
    their sum over the units; the value memory M_v (C x S) reads the result back to C
    channels; a 1x1 conv (no bias) and BN follow; the input is added and, with
    ``final_relu`` (the authors' code), a ReLU ends the block. M_v starts as M_k
    transposed, as the authors initialise it (here a copy, not shared storage).
    """

    def __init__(self, channels: int, memory_units: int = 64, final_relu: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.linear_0 = nn.Conv1d(channels, memory_units, 1, bias=False)
        self.linear_1 = nn.Conv1d(memory_units, channels, 1, bias=False)
        with torch.no_grad():
            self.linear_1.weight.copy_(self.linear_0.weight.permute(1, 0, 2))
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                                   nn.BatchNorm2d(channels))
        self.act = nn.ReLU(inplace=True) if final_relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.conv1(x).flatten(2)                                # (N, C, HW)
        attn = self.linear_0(y).softmax(dim=-1)                     # (N, S, HW)
        attn = attn / (1e-9 + attn.sum(dim=1, keepdim=True))
        record(self, "", attn.view(n, -1, h, w))
        y = self.linear_1(attn).view(n, c, h, w)
        return self.act(self.conv2(y) + x)


@register_block
class ExternalAttentionConfig(BlockConfig):
    """External Attention, https://arxiv.org/abs/2105.02358"""

    type: Literal["external_attention"]
    memory_units: int = Field(64, ge=1, le=4096, description="Units S of the two memories (the "
                              "paper's 64).")
    final_relu: bool = Field(True, description="ReLU after the residual add, as the "
                             "authors' EANet code (the paper's algorithm ends at the add).")

    module = ExternalAttention
