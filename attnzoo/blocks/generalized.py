"""Generalized attention: the four-term spatial attention of "An Empirical Study of
Spatial Attention Mechanisms in Deep Networks" (Zhu et al., 1904.05873), as mmcv's
``GeneralizedAttention`` plugin computes it."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..attention_maps import chosen_queries, record, select_queries
from ..registry import register_block
from .base import BlockConfig


def relative_sine_embedding(queries: int, keys: int, q_stride: int, kv_stride: int,
                            dim: int, magnitude: float, device: torch.device,
                            dtype: torch.dtype, wave_length: float = 1000.0) -> torch.Tensor:
    """(queries, keys, dim // 2) sinusoidal embeddings of the offsets
    ``(i * q_stride - j * kv_stride) * magnitude`` along one axis: ``dim / 4`` frequencies
    ``wave_length ** (-4 f / dim)``, sines then cosines."""
    offsets = (torch.arange(queries, device=device, dtype=dtype)[:, None] * q_stride
               - torch.arange(keys, device=device, dtype=dtype)[None, :] * kv_stride)
    offsets = (offsets * magnitude).unsqueeze(-1)
    freqs = torch.arange(0, dim / 4, device=device, dtype=dtype)
    scale = torch.tensor(wave_length, device=device, dtype=dtype) ** ((4.0 / dim) * freqs)
    return torch.cat([(offsets / scale).sin(), (offsets / scale).cos()], dim=-1)


class GeneralizedAttention(nn.Module):
    """Generalized spatial attention (1904.05873, eq. 2; mmcv's ``GeneralizedAttention``).

    The logit of query i for key j sums up to four terms, chosen by ``attention_type``
    (a string of four 0/1 flags): (1) query and key content ``q_i . k_j``, (2) query
    content and relative position ``q_i . r_ij``, (3) key content only ``u . k_j``, (4)
    relative position only ``v . r_ij``. The relative position ``r_ij`` is a learnt linear
    map of sinusoidal embeddings of the row and column offsets (divided by sqrt 2 each).
    Keys and values are subsampled by ``kv_stride``, queries by ``q_stride`` (the output is
    then bilinearly upsampled); ``spatial_range`` >= 0 restricts keys to a window. Heads
    are concatenated, projected by a 1x1 conv and added, ``x + gamma * out``, gamma from 0.
    """

    def __init__(self, channels: int, num_heads: int = 8, attention_type: str = "1111",
                 kv_stride: int = 2, q_stride: int = 1, spatial_range: int = -1,
                 position_embedding_dim: int | None = None, position_magnitude: float = 1.0
                 ) -> None:
        super().__init__()
        if len(attention_type) != 4 or set(attention_type) - {"0", "1"} or "1" not in (
                attention_type):
            raise ValueError(f"attention_type must be four 0/1 flags, at least one 1, got "
                             f"{attention_type!r}")
        if channels < num_heads:
            raise ValueError(f"{channels} channels cannot make {num_heads} heads")
        self.terms = tuple(c == "1" for c in attention_type)
        self.attention_type = attention_type
        self.num_heads = num_heads
        self.dim_head = channels // num_heads
        self.kv_stride, self.q_stride = kv_stride, q_stride
        self.spatial_range = spatial_range
        self.position_dim = position_embedding_dim or channels
        if self.position_dim % 4:
            raise ValueError(f"the position embedding width ({self.position_dim}) must be a "
                             "multiple of 4: give position_embedding_dim")
        self.position_magnitude = position_magnitude
        inner = self.dim_head * num_heads
        t0, t1, t2, t3 = self.terms
        self.query_conv = nn.Conv2d(channels, inner, 1, bias=False) if t0 or t1 else None
        self.key_conv = nn.Conv2d(channels, inner, 1, bias=False) if t0 or t2 else None
        self.value_conv = nn.Conv2d(channels, inner, 1, bias=False)
        if t1 or t3:
            self.appr_geom_fc_x = nn.Linear(self.position_dim // 2, inner, bias=False)
            self.appr_geom_fc_y = nn.Linear(self.position_dim // 2, inner, bias=False)
        stdv = 1.0 / math.sqrt(self.dim_head * 2)
        self.appr_bias = nn.Parameter(torch.empty(inner).uniform_(-stdv, stdv)) if t2 else None
        self.geom_bias = nn.Parameter(torch.empty(inner).uniform_(-stdv, stdv)) if t3 else None
        self.proj_conv = nn.Conv2d(inner, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def reset_identity_(self) -> None:
        nn.init.zeros_(self.gamma)

    def _positions(self, h: int, w: int, hk: int, wk: int, x: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Relative position features per head: x (heads, W, Wk, d), y (heads, H, Hk, d)."""
        args = (self.q_stride, self.kv_stride, self.position_dim, self.position_magnitude,
                x.device, x.dtype)
        emb_x = relative_sine_embedding(w, wk, *args)
        emb_y = relative_sine_embedding(h, hk, *args)
        pos_x = self.appr_geom_fc_x(emb_x).view(w, wk, self.num_heads, -1).permute(2, 0, 1, 3)
        pos_y = self.appr_geom_fc_y(emb_y).view(h, hk, self.num_heads, -1).permute(2, 0, 1, 3)
        return pos_x / math.sqrt(2), pos_y / math.sqrt(2)

    def _local_mask(self, h: int, w: int, hk: int, wk: int, device: torch.device
                    ) -> torch.Tensor:
        """(H*W, Hk*Wk), True where key j lies outside query i's window (mmcv's rule)."""
        def axis(n: int, nk: int) -> torch.Tensor:
            i = torch.arange(n, device=device)[:, None]
            j = torch.arange(nk, device=device)[None, :]
            lo = ((i - self.spatial_range) // self.kv_stride).clamp(min=0)
            hi = (i + self.spatial_range + 1) // self.kv_stride + 1
            return (j >= lo) & (j < hi)

        inside = axis(h, hk)[:, None, :, None] & axis(w, wk)[None, :, None, :]
        return ~inside.reshape(h * w, hk * wk)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """(N, heads, H*W, Hk*Wk) attention logits and (H, W, Hk, Wk)."""
        t0, t1, t2, t3 = self.terms
        xq = x[:, :, ::self.q_stride, ::self.q_stride] if self.q_stride > 1 else x
        xk = x[:, :, ::self.kv_stride, ::self.kv_stride] if self.kv_stride > 1 else x
        n, heads, d = x.shape[0], self.num_heads, self.dim_head
        h, w = xq.shape[-2:]
        hk, wk = xk.shape[-2:]
        energy = x.new_zeros(n, heads, h, w, hk, wk)
        q = self.query_conv(xq).view(n, heads, d, h, w).permute(0, 1, 3, 4, 2) if (
            t0 or t1) else None                                               # (N, m, H, W, d)
        if t0 or t2:
            k = self.key_conv(xk).view(n, heads, d, hk, wk)
            content = (q if t0 else 0) + (self.appr_bias.view(heads, 1, 1, d) if t2 else 0)
            energy = energy + torch.einsum("nmijd,nmdab->nmijab", content.expand(
                n, heads, h, w, d), k)
        if t1 or t3:
            pos_x, pos_y = self._positions(h, w, hk, wk, x)
            geom = (q if t1 else 0) + (self.geom_bias.view(heads, 1, 1, d) if t3 else 0)
            geom = geom.expand(n, heads, h, w, d)
            energy = energy + torch.einsum("nmijd,mjbd->nmijb", geom, pos_x)[:, :, :, :, None]
            energy = energy + torch.einsum("nmijd,miad->nmija", geom, pos_y)[..., None]
        energy = energy.view(n, heads, h * w, hk * wk)
        if self.spatial_range >= 0:
            energy = energy.masked_fill(self._local_mask(h, w, hk, wk, x.device),
                                        float("-inf"))
        return energy, (h, w, hk, wk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        energy, (h, w, hk, wk) = self.logits(x)
        attention = energy.softmax(dim=-1)
        record(self, "", _affinity, attention, h, w, hk, wk, kind="affinity")
        xk = x[:, :, ::self.kv_stride, ::self.kv_stride] if self.kv_stride > 1 else x
        v = self.value_conv(xk).view(n, self.num_heads, self.dim_head, hk * wk)
        out = (attention @ v.transpose(-1, -2)).transpose(-1, -2).reshape(n, -1, h, w)
        out = self.proj_conv(out)
        if self.q_stride > 1:
            out = F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=False)
        return self.gamma * out + x

    def extra_repr(self) -> str:
        return (f"attention_type={self.attention_type!r}, kv_stride={self.kv_stride}, "
                f"q_stride={self.q_stride}, spatial_range={self.spatial_range}")


def _affinity(attention: torch.Tensor, h: int, w: int, hk: int, wk: int) -> torch.Tensor:
    """(N, heads, Q, Hk, Wk): the chosen queries' attention over the key grid."""
    rows = select_queries(chosen_queries(h, w, attention.device), attention, dim=2)
    return rows.reshape(*rows.shape[:3], hk, wk)


@register_block
class GeneralizedAttentionConfig(BlockConfig):
    """Generalized attention (mmcv's plugin), https://arxiv.org/abs/1904.05873"""

    type: Literal["generalized_attention"]
    num_heads: int = Field(8, ge=1, le=128, description="Heads (mmdet's configs for the paper: 8; "
                           "mmcv's class default is 9).")
    attention_type: str = Field(
        "1111", min_length=4, max_length=4, description="Four 0/1 flags for the terms: "
        "query-key content, query content-relative position, key content only, relative "
        "position only (the paper's full model: 1111; its best detector trade-off: 0010).")
    kv_stride: int = Field(2, ge=1, le=16, description="Subsampling of keys and values (mmcv: 2).")
    q_stride: int = Field(1, ge=1, le=16, description="Subsampling of queries; the output is "
                          "upsampled back (mmcv: 1).")
    spatial_range: int = Field(-1, ge=-1, le=1024, description="Keys within this many positions of "
                               "the query only; -1: all positions (mmcv's default).")
    position_embedding_dim: int | None = Field(
        None, ge=4, le=4096,
        description="Width of the sinusoidal position embedding (a multiple of "
        "4); the channel count when unset.")
    position_magnitude: float = Field(1.0, gt=0, le=1000, description="Multiplier of the position "
                                      "offsets before the embedding.")

    module = GeneralizedAttention
    residual = True

    @field_validator("attention_type")
    @classmethod
    def _flags(cls, value: str) -> str:
        if set(value) - {"0", "1"} or "1" not in value:
            raise ValueError(f"attention_type must be four 0/1 flags with at least one 1, "
                             f"got {value!r}")
        return value
