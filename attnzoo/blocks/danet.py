"""DANet's two attention modules: position attention (every position attends to all
positions) and channel attention (every channel map attends to all channel maps)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..attention_maps import chosen_queries, record, select_queries
from ..registry import register_block
from ._layers import reduced_channels, to_feature_map, to_tokens
from .base import BlockConfig


class PositionAttention(nn.Module):
    """DANet's position attention module, PAM (Fu et al., 1809.02983, eq. 1-2).

    Query and key: 1x1 convs (with bias) to C / reduction channels (C/8); value: a 1x1
    conv to C. ``s_ji = softmax_i(q_j . k_i)`` (no scale), ``out_j = sum_i s_ji v_i``,
    and ``y = gamma * out + x`` with gamma starting at 0, as in the authors' code. The
    softmax runs in ``scaled_dot_product_attention``.
    """

    def __init__(self, channels: int, reduction: float = 8) -> None:
        super().__init__()
        inner = reduced_channels(channels, reduction)
        self.query_conv = nn.Conv2d(channels, inner, 1)
        self.key_conv = nn.Conv2d(channels, inner, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def reset_identity_(self) -> None:
        nn.init.zeros_(self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q = to_tokens(self.query_conv(x)).unsqueeze(1)          # (N, 1, HW, C')
        k = to_tokens(self.key_conv(x)).unsqueeze(1)
        v = to_tokens(self.value_conv(x)).unsqueeze(1)          # (N, 1, HW, C)
        record(self, "", _affinity, q.squeeze(1), k.squeeze(1), h, w, kind="affinity")
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0).squeeze(1)
        return self.gamma * to_feature_map(out, h, w) + x


def _affinity(q: torch.Tensor, k: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """softmax(q k^T) rows of the chosen queries, as (N, Q, H, W) maps over the keys."""
    q = select_queries(chosen_queries(h, w, q.device), q, dim=1)
    return (q @ k.transpose(1, 2)).softmax(-1).view(q.shape[0], q.shape[1], h, w)


@register_block
class PositionAttentionConfig(BlockConfig):
    """DANet position attention module (PAM), https://arxiv.org/abs/1809.02983"""

    type: Literal["danet_position"]
    reduction: float = Field(8, ge=0.0625, le=1024, description="Query and key have C / reduction "
                             "channels (the authors' 8).")

    module = PositionAttention
    residual = True


class ChannelAttention(nn.Module):
    """DANet's channel attention module, CAM (1809.02983, eq. 3-4 and the authors' code).

    The (C x C) affinity of the channel maps, ``E = X X^T`` over the H*W positions, is
    turned into ``A = softmax_j(max_j E_ij - E_ij)`` (the released code's form, which
    equals ``softmax(-E)``: a channel attends most to the channels least like it);
    ``y = gamma * A X + x`` with gamma starting at 0. No convolution, no parameter but
    gamma.
    """

    def __init__(self, channels: int | None = None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def reset_identity_(self) -> None:
        nn.init.zeros_(self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        flat = x.reshape(n, c, h * w)
        energy = flat @ flat.transpose(1, 2)                                     # (N, C, C)
        attention = (energy.amax(-1, keepdim=True) - energy).softmax(dim=-1)
        record(self, "", attention, kind="other")
        return self.gamma * (attention @ flat).view(n, c, h, w) + x


@register_block
class ChannelAttentionConfig(BlockConfig):
    """DANet channel attention module (CAM), https://arxiv.org/abs/1809.02983"""

    type: Literal["danet_channel"]

    module = ChannelAttention
    residual = True
