"""Self-attention within a feature map: Polarized Self-Attention, VOLO's outlook
attention, BoTNet's multi-head self-attention with 2-D relative positions.

The non-local family (Non-Local, GCNet, CCNet, A^2-Nets) is in ``non_local.py``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..attention_maps import dot_product_affinity, record
from ..registry import register_block
from ._kernels import conv1x1_tokens, relative_position_attention
from ._layers import resize
from .base import BlockConfig, Site

# --- polarized: Polarized Self-Attention (Liu et al., 2107.00782) ---------------------


class PolarizedSelfAttention(nn.Module):
    """Polarized self-attention (2107.00782).

    ``variant="paper"`` (eq. 1-5): channel-only branch: Wq (C->1) softmax over HW pools
    Wv (C->C/2) into one C/2 vector; Wz (1x1 back to C), LayerNorm, sigmoid -> a weight
    per channel. Spatial-only branch: Wq (C->C/2), global pooling, softmax over channels,
    times Wv (C->C/2) at each position, sigmoid -> a weight per position.

    ``variant="released"`` is the authors' code (DeLightCMU/PSA, ``network/PSA.py``),
    which differs from the equations: in the parallel layout (``PSA_p``) Wz has no
    LayerNorm after it, and the spatial logits get a softmax over the HW positions
    before the sigmoid (the pooled query none); in the sequential layout (``PSA_s``) Wz
    is a bottleneck C/2 -> C/8 (conv with bias, LayerNorm, ReLU) -> C (conv with bias),
    and the spatial branch takes the softmax of Wv over the positions (per channel)
    before pooling it with the (un-softmaxed) pooled query. Its query/value convs start
    from Kaiming normal (fan-in), as the release initialises them.

    ``parallel``: ``A_ch(x)*x + A_sp(x)*x``; ``sequential``: ``A_sp(y)*y`` with
    ``y = A_ch(x)*x``. The 1x1 query/value convs have no bias, as in the authors' code.
    """

    def __init__(self, channels: int, layout: str = "parallel", variant: str = "paper"
                 ) -> None:
        super().__init__()
        if layout not in ("parallel", "sequential"):
            raise ValueError(f"layout must be 'parallel' or 'sequential', got {layout!r}")
        if variant not in ("paper", "released"):
            raise ValueError(f"variant must be 'paper' or 'released', got {variant!r}")
        half = max(1, channels // 2)
        self.layout = layout
        self.variant = variant
        self.channel_query = nn.Conv2d(channels, 1, 1, bias=False)
        self.channel_value = nn.Conv2d(channels, half, 1, bias=False)
        if variant == "released" and layout == "sequential":
            quarter = max(1, half // 4)
            self.channel_up: nn.Module = nn.Sequential(
                nn.Conv2d(half, quarter, 1), nn.LayerNorm([quarter, 1, 1]),
                nn.ReLU(inplace=True), nn.Conv2d(quarter, channels, 1))
        else:
            self.channel_up = nn.Conv2d(half, channels, 1, bias=False)
        if variant == "paper":
            self.channel_norm = nn.LayerNorm(channels)
        self.spatial_query = nn.Conv2d(channels, half, 1, bias=False)
        self.spatial_value = nn.Conv2d(channels, half, 1, bias=False)
        if variant == "released":
            for conv in (self.channel_query, self.channel_value, self.spatial_query,
                         self.spatial_value):
                nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")

    def channel_weights(self, x: torch.Tensor) -> torch.Tensor:
        """A_ch(x), shape (N, C, 1, 1)."""
        weights = self.channel_query(x).flatten(2).softmax(-1)             # (N, 1, HW)
        pooled = torch.bmm(self.channel_value(x).flatten(2), weights.transpose(1, 2))
        z = self.channel_up(pooled.unsqueeze(-1))                           # (N, C, 1, 1)
        if self.variant == "paper":
            z = self.channel_norm(z.flatten(1))[:, :, None, None]
        return torch.sigmoid(z)

    def spatial_weights(self, x: torch.Tensor) -> torch.Tensor:
        """A_sp(x), shape (N, 1, H, W)."""
        h, w = x.shape[-2:]
        query = self.spatial_query(x).mean((2, 3)).unsqueeze(1)            # (N, 1, C/2)
        value = self.spatial_value(x).flatten(2)                            # (N, C/2, HW)
        if self.variant == "paper":
            z = torch.bmm(query.softmax(-1), value)                         # (N, 1, HW)
        elif self.layout == "parallel":
            z = torch.bmm(query, value).softmax(-1)
        else:
            z = torch.bmm(query, value.softmax(-1))
        return torch.sigmoid(z).reshape(-1, 1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_ch = self.channel_weights(x)
        record(self, "channel", a_ch, kind="channel")
        y = x if self.layout == "parallel" else x * a_ch
        a_sp = self.spatial_weights(y)
        record(self, "spatial", a_sp)
        return x * a_ch + x * a_sp if self.layout == "parallel" else y * a_sp


@register_block
class PolarizedConfig(BlockConfig):
    """Polarized Self-Attention, https://arxiv.org/abs/2107.00782"""

    type: Literal["polarized"]
    layout: Literal["parallel", "sequential"] = Field(
        "parallel", description="Sum the channel-only and spatial-only branches (PSA_p), or "
        "apply them one after the other (PSA_s).")
    variant: Literal["paper", "released"] = Field(
        "paper", description="'paper': the paper's eq. 1-5; 'released': the authors' code "
        "(DeLightCMU/PSA): no LayerNorm (parallel) or a C/2->C/8->C LayerNorm bottleneck "
        "(sequential) in the channel branch, and the spatial softmax over positions.")

    module = PolarizedSelfAttention


# --- outlook: Outlook attention (VOLO, Yuan et al., 2106.13112) -----------------------


class OutlookAttention(nn.Module):
    """Outlook attention (VOLO, 2106.13112, Alg. 1).

    For each (strided) centre, a linear layer predicts, per head, the K^2 x K^2
    weights of its KxK window from the centre's features (the input average-pooled
    by ``stride``); the weights (scaled by head_dim^-1/2, softmax) mix the window's
    values (``unfold``), and overlapping windows are summed back (``fold``). Then a
    linear projection. Input and output are NCHW, or NHWC with ``channels_last``
    (how VOLO's outlookers hold their tokens). The linear layers are ``nn.Linear``,
    applied as 1x1 convolutions, so timm's VOLO weights load as they are.
    """

    def __init__(self, channels: int, num_heads: int = 6, kernel_size: int = 3,
                 padding: int = 1, stride: int = 2, qkv_bias: bool = False,
                 channels_last: bool = False) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads "
                             f"({num_heads})")
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.padding = padding
        self.stride = stride
        self.channels_last = channels_last
        self.scale = (channels // num_heads) ** -0.5
        self.v = nn.Linear(channels, channels, bias=qkv_bias)
        self.attn = nn.Linear(channels, kernel_size ** 4 * num_heads)
        self.proj = nn.Linear(channels, channels)

    @staticmethod
    def _pointwise(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """``linear`` on the channels of an NCHW map (a 1x1 convolution)."""
        return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        n, c, h, w = x.shape
        heads, kk = self.num_heads, self.kernel_size ** 2
        value = F.unfold(self._pointwise(x, self.v), self.kernel_size,
                         padding=self.padding, stride=self.stride)   # (N, C*kk, L)
        windows = value.shape[-1]
        value = value.reshape(n, heads, c // heads, kk, windows).permute(0, 1, 4, 3, 2)
        centres = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        attn = self._pointwise(centres, self.attn).flatten(2)         # (N, heads*kk*kk, L)
        attn = attn.reshape(n, heads, kk, kk, windows).permute(0, 1, 4, 2, 3)
        attn = (attn * self.scale).softmax(dim=-1)                    # (N, heads, L, kk, kk)
        record(self, "", attn, kind="other")
        out = (attn @ value).permute(0, 1, 4, 3, 2).reshape(n, c * kk, windows)
        out = F.fold(out, (h, w), self.kernel_size, padding=self.padding, stride=self.stride)
        out = self._pointwise(out, self.proj)
        return out.permute(0, 2, 3, 1) if self.channels_last else out


@register_block
class OutlookConfig(BlockConfig):
    """Outlook attention (VOLO), https://arxiv.org/abs/2106.13112"""

    type: Literal["outlook"]
    num_heads: int = Field(6, ge=1, le=128, description="Heads (VOLO-D1's first stage: 6).")
    kernel_size: int = Field(3, ge=1, le=15, description="Side K of the local window.")
    padding: int = Field(1, ge=0, le=7, description="Padding of unfold/fold.")
    stride: int = Field(2, ge=1, le=8, description="Stride of the window centres (VOLO: 2).")
    qkv_bias: bool = Field(False, description="Bias in the value projection.")
    channels_last: bool = Field(
        False, description="The block's input and output are NHWC (as inside VOLO's "
        "outlookers) instead of NCHW.")

    module = OutlookAttention

    def input_layouts(self) -> tuple[str, ...]:
        return ("nhwc",) if self.channels_last else ("nchw",)


# --- mhsa2d: multi-head self-attention over a map (BoTNet, Srinivas et al., 2101.11605)


def _relative_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """The (length, length, d) embeddings ``table[r - q + length - 1]`` of query q and
    key r; a table learnt at another size is linearly resized to ``2*length - 1`` rows."""
    if table.shape[0] != 2 * length - 1:
        table = resize(table.t().unsqueeze(0), 2 * length - 1, mode="linear",
                       align_corners=True).squeeze(0).t()
    pos = torch.arange(length, device=table.device)
    return table[pos.unsqueeze(0) - pos.unsqueeze(1) + length - 1]


class MultiHeadSelfAttention2d(nn.Module):
    """All-to-all multi-head self-attention over an (H, W) map with 2-D relative
    position logits: BoTNet's MHSA (2101.11605, Fig. 4).

    q, k, v come from one 1x1 conv (no bias); the logits are
    ``q k^T / sqrt(d) + q r^T`` with ``r`` the relative embeddings of the key's row
    offset and column offset (learnt tables of ``2H-1`` and ``2W-1`` rows, made for
    ``size``); softmax; the values of the heads are concatenated. With ``stride`` 2 a
    2x2 average pool follows (BoTNet's first block of the last stage).

    ``variant``: ``timm`` (timm's ``BottleneckAttn``) leaves the query of ``q r^T``
    unscaled; ``released`` is the authors' BoTNet code (``relpos_self_attention``), which
    scales q by ``1/sqrt(d)`` before both products: ``(q k^T + q r^T) / sqrt(d)``.

    Attention runs in ``scaled_dot_product_attention`` with the position logits as an
    additive mask, formed for a chunk of queries at a time from the (H*W, H) row and
    (H*W, W) column logits, so no tensor as large as the (heads, HW, HW) logits exists
    (``_kernels.relative_position_attention``).
    """

    def __init__(self, channels: int, size: tuple[int, int], out_channels: int | None = None,
                 stride: int = 1, num_heads: int = 4, dim_head: int | None = None,
                 qkv_bias: bool = False, variant: str = "timm") -> None:
        super().__init__()
        if variant not in ("timm", "released"):
            raise ValueError(f"variant must be 'timm' or 'released', got {variant!r}")
        self.variant = variant
        out_channels = out_channels or channels
        if out_channels % num_heads:
            raise ValueError(f"out channels ({out_channels}) must be divisible by num_heads "
                             f"({num_heads})")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2 (2x2 average pool), got {stride}")
        self.num_heads = num_heads
        self.dim_head = dim_head or out_channels // num_heads
        self.dim_value = out_channels // num_heads
        self.size = tuple(size)
        self.qkv = nn.Conv2d(channels, num_heads * (2 * self.dim_head + self.dim_value), 1,
                             bias=qkv_bias)
        self.height_rel = nn.Parameter(torch.empty(2 * self.size[0] - 1, self.dim_head))
        self.width_rel = nn.Parameter(torch.empty(2 * self.size[1] - 1, self.dim_head))
        self.pool = nn.AvgPool2d(2, 2) if stride == 2 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.qkv.weight, std=self.qkv.in_channels ** -0.5)
        nn.init.trunc_normal_(self.height_rel, std=self.dim_head ** -0.5)
        nn.init.trunc_normal_(self.width_rel, std=self.dim_head ** -0.5)

    def position_logits(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``q r^T`` for queries q (N, heads, H*W, d): (N, heads, H*W, H*W). The whole
        matrix, for inspection; ``forward`` never forms it."""
        rows, cols = self.relative_logits(q, h, w)
        logits = rows.unsqueeze(-1) + cols.unsqueeze(-2)                # (N, h, HW, H, W)
        return logits.reshape(q.shape[0], q.shape[1], h * w, h * w)

    def relative_logits(self, q: torch.Tensor, h: int, w: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The query's logits against the key's row offset, (N, heads, H*W, H), and
        column offset, (N, heads, H*W, W): ``q r^T = rows[i, row(j)] + cols[i, col(j)]``."""
        q = q.reshape(*q.shape[:2], h, w, -1)
        rows = torch.einsum("nhxyd,xrd->nhxyr", q, _relative_table(self.height_rel, h))
        cols = torch.einsum("nhxyd,ysd->nhxys", q, _relative_table(self.width_rel, w))
        return rows.flatten(2, 3), cols.flatten(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        heads, d, dv = self.num_heads, self.dim_head, self.dim_value
        qkv = conv1x1_tokens(x, self.qkv)                   # (N, HW, heads * (2d + dv))
        q = qkv[..., :heads * d].view(n, h * w, heads, d).transpose(1, 2)   # (N, h, HW, d)
        k = qkv[..., heads * d:2 * heads * d].view(n, h * w, heads, d).transpose(1, 2)
        v = qkv[..., 2 * heads * d:].view(n, h * w, heads, dv).transpose(1, 2)
        rows, cols = self.relative_logits(q, h, w)
        if self.variant == "released":                      # the query scaled for both
            rows, cols = rows * d ** -0.5, cols * d ** -0.5
        record(self, "", dot_product_affinity, q, k, (h, w), d ** -0.5,
               _RelativeLogits(rows, cols), kind="affinity")
        out = relative_position_attention(q, k, v, rows, cols, scale=d ** -0.5)
        # contiguous() first: with a channels-last input, eager strides let torch.export
        # record this reshape as a view that the ONNX exporter's re-traced SDPA output
        # cannot take ("Cannot view a tensor ..."). Same values.
        out = out.transpose(-1, -2).contiguous().reshape(n, heads * dv, h, w)
        return self.pool(out)


class _RelativeLogits:
    """The position logits ``rows[i, row(j)] + cols[i, col(j)]`` of chosen queries i,
    flattened over the keys j (for the recorded affinity)."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        self.rows, self.cols = rows, cols

    def __call__(self, index: torch.Tensor | None) -> torch.Tensor:
        rows, cols = self.rows, self.cols
        if index is not None:
            rows, cols = rows[..., index, :], cols[..., index, :]
        return (rows.unsqueeze(-1) + cols.unsqueeze(-2)).flatten(-2)


@register_block
class MHSA2dConfig(BlockConfig):
    """Multi-head self-attention with 2-D relative positions (BoTNet),
    https://arxiv.org/abs/2101.11605"""

    type: Literal["mhsa2d"]
    num_heads: int = Field(4, ge=1, le=128, description="Attention heads (BoTNet: 4).")
    dim_head: int | None = Field(None, ge=1, le=1024, description="Query/key width per head; "
                                 "out_channels / num_heads when unset.")
    qkv_bias: bool = Field(False, description="Bias in the q, k, v projection.")
    variant: Literal["timm", "released"] = Field(
        "timm", description="'timm': relative logits from the unscaled query (timm's "
        "BottleneckAttn); 'released': the authors' BoTNet code, query scaled by 1/sqrt(d) "
        "for the relative logits too.")

    module = MultiHeadSelfAttention2d

    def build(self, site: Site) -> nn.Module:
        if site.size is None or len(site.size) != 2:
            raise ValueError("mhsa2d needs the (H, W) size of its input for its relative "
                             "position tables (create_block(..., size=(H, W)))")
        return self.module(channels=site.channels, size=site.size,
                           out_channels=site.output_channels, stride=site.stride,
                           **self.module_kwargs())
