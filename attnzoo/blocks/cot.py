"""Contextual Transformer (CoT) block: self-attention whose keys are mined from their
local context by a convolution, meant to replace a ResNet's 3x3 conv."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..attention_maps import record
from ..registry import register_block
from ._layers import check_odd, reduced_channels
from .base import BlockConfig, Site


def local_aggregation(x: torch.Tensor, weights: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Dynamic local convolution: ``out[c, p] = sum_k w[c % G, k, p] * x[c, p + k]`` over
    the KxK neighbourhood of each position (zero padded). x (N, C, H, W); weights
    (N, G, K*K, H, W) with G dividing C (channel c uses weight c mod G, as the authors'
    ``aggregation_zeropad`` kernel)."""
    n, c, h, w = x.shape
    g = weights.shape[1]
    patches = F.unfold(x, kernel_size, padding=kernel_size // 2)        # (N, C*K*K, H*W)
    patches = patches.view(n, c // g, g, kernel_size * kernel_size, h, w)
    return (patches * weights.unsqueeze(1)).sum(3).view(n, c, h, w)


class ContextualTransformer(nn.Module):
    """CoT block (Li et al., 2107.12292, Fig. 2; the authors' ``CotLayer``).

    Static context: keys from a KxK grouped conv (``key_groups``) with BN and ReLU.
    Attention: the keys concatenated with the queries (the input) go through a 1x1 conv
    to C/``factor`` (BN, ReLU) and a 1x1 conv to K*K weights per group of ``share``
    channels, GroupNorm'd; they aggregate the values (1x1 conv + BN of the input) over
    each KxK neighbourhood: the dynamic context, then BN and SiLU. Fusion: static and
    dynamic contexts are mixed per channel by a softmax over the two (an SK-style
    attention: GAP of their sum, 1x1 conv to max(C/2, min_channels) with BN and ReLU, 1x1
    conv to 2C). With stride 2, a 3x3 average pool of stride 2 comes first, as in CoTNet.
    """

    def __init__(self, channels: int, stride: int = 1, kernel_size: int = 3,
                 key_groups: int = 4, share: int = 8, factor: int = 2, reduction: float = 4,
                 min_channels: int = 32) -> None:
        super().__init__()
        c = channels
        if c % key_groups or c % share or c % factor:
            raise ValueError(f"{c} channels must be a multiple of key_groups ({key_groups}), "
                             f"share ({share}) and factor ({factor})")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.kernel_size = kernel_size
        self.groups_w = c // share
        self.avd = nn.AvgPool2d(3, 2, padding=1) if stride == 2 else nn.Identity()
        self.key_embed = nn.Sequential(
            nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=key_groups,
                      bias=False),
            nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.embed = nn.Sequential(
            nn.Conv2d(2 * c, c // factor, 1, bias=False), nn.BatchNorm2d(c // factor),
            nn.ReLU(inplace=True),
            nn.Conv2d(c // factor, kernel_size ** 2 * self.groups_w, 1),
            nn.GroupNorm(self.groups_w, kernel_size ** 2 * self.groups_w))
        self.conv1x1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.SiLU(inplace=True)
        hidden = reduced_channels(c * 2, reduction, min_channels)
        self.se = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.BatchNorm2d(hidden),
                                nn.ReLU(inplace=True), nn.Conv2d(hidden, 2 * c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avd(x)
        n, c, h, w = x.shape
        k = self.key_embed(x)                                               # static context
        weights = self.embed(torch.cat([x, k], dim=1)).view(
            n, self.groups_w, self.kernel_size ** 2, h, w)
        v = local_aggregation(self.conv1x1(x), weights, self.kernel_size)   # dynamic context
        v = self.act(self.bn(v))
        both = torch.stack([v, k], dim=2)                                   # (N, C, 2, H, W)
        mix = self.se(both.sum(2).mean((2, 3), keepdim=True)).view(n, c, 2).softmax(dim=2)
        record(self, "", _fusion_weights, mix, kind="other")
        return (both * mix.view(n, c, 2, 1, 1)).sum(2)


def _fusion_weights(mix: torch.Tensor) -> torch.Tensor:
    """(N, 2, C, 1, 1): weight of the dynamic (0) and static (1) context per channel."""
    return mix.transpose(1, 2)[..., None, None]


@register_block
class ContextualTransformerConfig(BlockConfig):
    """Contextual Transformer block (CoTNet), https://arxiv.org/abs/2107.12292

    Meant to ``replace`` a ResNet bottleneck's 3x3 conv (CoTNet also drops the BN and
    ReLU after it: replace them with ``identity``); it takes the replaced conv's stride.
    """

    type: Literal["contextual_transformer"]
    kernel_size: int = Field(3, ge=1, le=15, description="Odd side K of the local context (3).")
    key_groups: int = Field(4, ge=1, le=64, description="Groups of the key conv (the authors' 4).")
    share: int = Field(8, ge=1, le=64, description="Channels sharing one set of aggregation "
                       "weights (the authors' share_planes 8).")
    factor: int = Field(2, ge=1, le=16, description="The attention embedding has C / factor "
                        "channels (2).")
    reduction: float = Field(4, ge=0.0625, le=1024,
                             description="Fusion attention width: 2C / reduction "
                             "(the authors' reduction factor 4).")
    min_channels: int = Field(32, ge=1, le=4096,
                              description="Lower bound on the fusion width (32).")

    module = ContextualTransformer

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, k: int) -> int:
        return check_odd(k)

    def build(self, site: Site) -> nn.Module:
        if site.output_channels != site.channels:
            raise ValueError("contextual_transformer keeps its channel count (CoTNet's "
                             "bottleneck convs do)")
        return ContextualTransformer(site.channels, stride=site.stride, **self.module_kwargs())
