"""Split attention (ResNeSt): a grouped conv split into radix branches, fused by a
softmax over the branches per channel."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..attention_maps import record
from ..registry import register_block
from ._layers import check_odd, reduced_channels
from .base import BlockConfig, Site


class SplitAttention(nn.Module):
    """Split-attention conv (Zhang et al., 2004.08955, Fig. 2 and the authors' ``SplAtConv2d``).

    A KxK conv with ``groups * radix`` groups maps C_in to ``radix * C_out`` channels
    (radix splits within each of the ``groups`` cardinal groups), then BN and ReLU. The
    radix splits are summed, globally pooled, and go through fc1 (to
    max(C_in * radix / reduction, min_channels)), BN, ReLU and fc2 (back to
    ``radix * C_out``), both grouped by cardinality; a softmax over the radix splits of
    each channel (a sigmoid when ``radix`` is 1) weights them, and the weighted splits
    are summed. Parameter names follow timm's ``SplitAttn`` (conv, bn0, fc1, bn1, fc2), so
    timm's ResNeSt weights load as they are.
    """

    def __init__(self, channels: int, out_channels: int | None = None, stride: int = 1,
                 dilation: int = 1, kernel_size: int = 3, groups: int = 1, radix: int = 2,
                 reduction: float = 4, min_channels: int = 32) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if channels % (groups * radix) or (out_channels * radix) % (groups * radix):
            raise ValueError(f"groups * radix = {groups * radix} must divide the {channels} "
                             f"input and {out_channels * radix} split channels")
        self.radix = radix
        self.groups = groups
        hidden = reduced_channels(channels * radix, reduction, min_channels)
        if hidden % groups:
            raise ValueError(f"the attention width {hidden} does not split into {groups} groups")
        self.conv = nn.Conv2d(channels, out_channels * radix, kernel_size, stride,
                              padding=dilation * (kernel_size // 2), dilation=dilation,
                              groups=groups * radix, bias=False)
        self.bn0 = nn.BatchNorm2d(out_channels * radix)
        self.act0 = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(out_channels, hidden, 1, groups=groups)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, out_channels * radix, 1, groups=groups)

    def split_weights(self, splits: torch.Tensor) -> torch.Tensor:
        """(N, radix, C, H, W) splits -> their weights (N, radix, C, 1, 1)."""
        n, radix, c = splits.shape[:3]
        z = self.act1(self.bn1(self.fc1(splits.sum(1).mean((2, 3), keepdim=True))))
        logits = self.fc2(z)                                          # (N, radix*C, 1, 1)
        if radix == 1:
            return torch.sigmoid(logits).view(n, 1, c, 1, 1)
        # fc2's channels are (group, radix, C/group): softmax over radix per channel.
        logits = logits.view(n, self.groups, radix, c // self.groups).softmax(dim=2)
        return logits.transpose(1, 2).reshape(n, radix, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act0(self.bn0(self.conv(x)))
        n, rc, h, w = y.shape
        splits = y.view(n, self.radix, rc // self.radix, h, w)
        weights = self.split_weights(splits)
        record(self, "", weights, kind="other")
        return (splits * weights).sum(1)


@register_block
class SplitAttentionConfig(BlockConfig):
    """Split Attention (ResNeSt), https://arxiv.org/abs/2004.08955

    Meant to ``replace`` a bottleneck's 3x3 conv (and, with ``identity``, the BN and
    activation after it: the block carries its own); it takes the replaced conv's
    stride, dilation and groups.
    """

    type: Literal["split_attention"]
    radix: int = Field(2, ge=1, le=16, description="Splits R per cardinal group (ResNeSt-50: 2).")
    reduction: float = Field(4, ge=0.0625, le=1024,
                             description="fc1 width: C_in * R / reduction (the "
                             "authors' reduction factor 4).")
    min_channels: int = Field(32, ge=1, le=4096, description="Lower bound on fc1's width (32).")
    groups: int | None = Field(None, ge=1, le=1024,
                               description="Cardinality K; the replaced conv's "
                               "groups when unset (1 elsewhere).")
    kernel_size: int = Field(3, ge=1, le=15, description="Odd kernel of the split conv.")

    module = SplitAttention

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, k: int) -> int:
        return check_odd(k)

    def build(self, site: Site) -> nn.Module:
        replaced = site.replaced
        conv = replaced if isinstance(replaced, nn.Conv2d) else None
        groups = self.groups or (conv.groups if conv is not None else 1)
        dilation = conv.dilation[0] if conv is not None else 1
        return SplitAttention(site.channels, site.output_channels, stride=site.stride,
                              dilation=dilation, kernel_size=self.kernel_size, groups=groups,
                              radix=self.radix, reduction=self.reduction,
                              min_channels=self.min_channels)
