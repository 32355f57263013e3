"""Local self-attention layers that replace a convolution: HaloNet's blocked halo
attention and LambdaNetworks' lambda layer.

Both follow timm's implementations (``timm.layers.HaloAttn``, ``timm.layers.LambdaLayer``)
in their layouts and parameter names, so the same weights give the same outputs (a test
checks it), and are meant to ``replace`` a ResNet bottleneck's 3x3 conv.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..attention_maps import chosen_queries, record
from ..registry import register_block
from ._layers import reduced_channels
from .base import BlockConfig, Site


def _qk_width(dim_out: int, num_heads: int, dim_head: int | None, qk_ratio: float) -> int:
    """Query/key width per head: ``dim_head``, else dim_out * qk_ratio rounded to a
    multiple of 8, split over the heads (timm's rule)."""
    return dim_head or reduced_channels(dim_out, 1 / qk_ratio, 1, 8) // num_heads


def _relative_index(queries: int, keys: int, device: torch.device | None = None
                    ) -> torch.Tensor:
    """(queries, keys) indices ``k - q + keys - 1`` into a table of 2*keys - 1 relative
    embeddings: the layout of the relative logits in HaloNet's reference (and timm)."""
    q = torch.arange(queries, device=device).unsqueeze(1)
    k = torch.arange(keys, device=device).unsqueeze(0)
    return k - q + keys - 1


def _stride(site: Site) -> int:
    """The stride of a replaced module: its ``stride``, or for a module without one (a
    timm attention layer) the ratio of the probed input and output sizes."""
    if site.replaced is not None and not hasattr(site.replaced, "stride") and site.size and (
            site.out_size and len(site.size) == 2 and site.out_size[0]):
        return max(1, round(site.size[0] / site.out_size[0]))
    return site.stride


# --- halo_attention: HaloNet (Vaswani et al., 2103.12731) ---------------------------------


class HaloRelativePosition(nn.Module):
    """Relative position logits of a block's queries against its window's keys: one
    table per axis (``2 * window - 1`` rows of ``dim_head``), added as ``q . r_y + q . r_x``."""

    def __init__(self, window: int, dim_head: int, scale: float) -> None:
        super().__init__()
        self.height_rel = nn.Parameter(torch.empty(2 * window - 1, dim_head))
        self.width_rel = nn.Parameter(torch.empty(2 * window - 1, dim_head))
        nn.init.trunc_normal_(self.height_rel, std=scale)
        nn.init.trunc_normal_(self.width_rel, std=scale)

    def forward(self, q: torch.Tensor, side: int, window: int) -> torch.Tensor:
        """q (..., side * side, d) -> logits (..., side * side, window * window)."""
        index = _relative_index(side, window, q.device)
        q = q.unflatten(-2, (side, side))                                # (..., y, x, d)
        rows = torch.einsum("...yxd,ykd->...yxk", q, self.height_rel[index])
        cols = torch.einsum("...yxd,xkd->...yxk", q, self.width_rel[index])
        logits = rows.unsqueeze(-1) + cols.unsqueeze(-2)                 # (..., y, x, ky, kx)
        return logits.flatten(-4, -3).flatten(-2)


class HaloAttention(nn.Module):
    """Blocked local self-attention with halos (HaloNet, 2103.12731, Fig. 2).

    The map is cut into ``block_size`` x ``block_size`` blocks of queries; each block
    attends to its window, the block grown by ``halo_size`` on every side (zero padded at
    the borders), with relative position logits. q and kv are 1x1 convs; ``num_heads``
    heads; the value width per head is out_channels / num_heads. With stride 2 the
    queries are subsampled (or, with ``avg_down``, a 2x2 average pool follows). A map
    whose sides are not multiples of ``block_size`` is extended at the bottom and right
    with zero keys and values, as the halo beyond the border is, and the output cropped
    to ceil(H / stride) x ceil(W / stride); at multiples this is timm's computation.
    """

    def __init__(self, channels: int, out_channels: int | None = None, stride: int = 1,
                 num_heads: int = 8, dim_head: int | None = None, block_size: int = 8,
                 halo_size: int = 3, qk_ratio: float = 1.0, qkv_bias: bool = False,
                 avg_down: bool = False, scale_pos_embed: bool = False) -> None:
        super().__init__()
        dim_out = out_channels or channels
        if dim_out % num_heads:
            raise ValueError(f"out channels ({dim_out}) must be divisible by num_heads "
                             f"({num_heads})")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.num_heads = num_heads
        self.dim_head_qk = _qk_width(dim_out, num_heads, dim_head, qk_ratio)
        self.dim_head_v = dim_out // num_heads
        self.scale = self.dim_head_qk ** -0.5
        self.scale_pos_embed = scale_pos_embed
        self.block_size = block_size
        self.halo_size = halo_size
        self.window = block_size + 2 * halo_size
        pool = stride > 1 and (avg_down or block_size % stride != 0)
        self.block_stride = stride if stride > 1 and not pool else 1
        self.stride = stride
        # padded sides must divide into blocks and, before a 2x2 pool, be even
        self.multiple = block_size * (2 if pool and block_size % 2 else 1)
        self.query_side = block_size // self.block_stride
        self.q = nn.Conv2d(channels, num_heads * self.dim_head_qk, 1, stride=self.block_stride,
                           bias=qkv_bias)
        self.kv = nn.Conv2d(channels, num_heads * (self.dim_head_qk + self.dim_head_v), 1,
                            bias=qkv_bias)
        self.pos_embed = HaloRelativePosition(self.window, self.dim_head_qk, self.scale)
        self.pool = nn.AvgPool2d(2, 2) if pool else nn.Identity()
        std = channels ** -0.5
        nn.init.trunc_normal_(self.q.weight, std=std)
        nn.init.trunc_normal_(self.kv.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        bs, side, heads, halo = self.block_size, self.query_side, self.num_heads, self.halo_size
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        nbh, nbw = (h + ph) // bs, (w + pw) // bs
        q = self.q(x)
        if ph or pw:
            q = F.pad(q, [0, nbw * side - q.shape[-1], 0, nbh * side - q.shape[-2]])
        q = q.reshape(n * heads, self.dim_head_qk, nbh, side, nbw, side)
        q = q.permute(0, 2, 4, 3, 5, 1).reshape(n * heads, nbh * nbw, side * side, -1)
        kv = F.pad(self.kv(x), [halo, halo + pw, halo, halo + ph])
        kv = kv.unfold(2, self.window, bs).unfold(3, self.window, bs)  # (N, C', nbh, nbw, win, win)
        kv = kv.reshape(n * heads, self.dim_head_qk + self.dim_head_v, nbh * nbw, -1)
        k, v = kv.permute(0, 2, 3, 1).split([self.dim_head_qk, self.dim_head_v], dim=-1)
        pos = self.pos_embed(q, side, self.window)
        if self.scale_pos_embed:
            logits = (q @ k.transpose(-1, -2) + pos) * self.scale
        else:
            logits = (q @ k.transpose(-1, -2)) * self.scale + pos
        attn = logits.softmax(dim=-1)                       # (N*heads, blocks, side^2, win^2)
        record(self, "", self._affinity, attn, n, nbh, nbw, h, w, kind="affinity")
        out = (attn @ v).reshape(n, heads, nbh, nbw, side, side, self.dim_head_v)
        out = out.permute(0, 1, 6, 2, 4, 3, 5).reshape(n, heads * self.dim_head_v,
                                                       nbh * side, nbw * side)
        out = self.pool(out)
        if ph or pw:
            out = out[..., :-(-h // self.stride), :-(-w // self.stride)]
        return out

    def _affinity(self, attn: torch.Tensor, n: int, nbh: int, nbw: int, h: int, w: int
                  ) -> torch.Tensor:
        """The chosen queries' window weights placed on the input's (H, W) grid:
        (N, heads, Q, H, W). Keys in the zero padding beyond the border are cut, so a
        query near the border has weights summing to less than 1."""
        side, win, halo, bs = self.query_side, self.window, self.halo_size, self.block_size
        qh, qw = -(-h // self.block_stride), -(-w // self.block_stride)
        index = chosen_queries(qh, qw, attn.device)
        if index is None:
            index = torch.arange(qh * qw, device=attn.device)
        attn = attn.view(n, self.num_heads, nbh * nbw, side * side, win, win)
        maps = attn.new_zeros(n, self.num_heads, len(index), nbh * bs + 2 * halo,
                              nbw * bs + 2 * halo)
        for i, flat in enumerate(index.tolist()):
            qy, qx = divmod(flat, qw)
            (by, iy), (bx, ix) = divmod(qy, side), divmod(qx, side)
            weights = attn[:, :, by * nbw + bx, iy * side + ix]
            maps[:, :, i, by * bs:by * bs + win, bx * bs:bx * bs + win] = weights
        return maps[..., halo:halo + h, halo:halo + w]


@register_block
class HaloAttentionConfig(BlockConfig):
    """Halo attention (HaloNet), https://arxiv.org/abs/2103.12731 (timm's ``HaloAttn``).
    Meant to ``replace`` a 3x3 conv, whose stride it takes."""

    type: Literal["halo_attention"]
    num_heads: int = Field(8, ge=1, le=128, description="Attention heads (HaloNet: 8).")
    dim_head: int | None = Field(None, ge=1, le=1024, description="Query/key width per head; "
                                 "out_channels * qk_ratio / num_heads when unset.")
    block_size: int = Field(8, ge=1, le=128, description="Side b of the query blocks (HaloNet: 8); "
                            "other map sides are padded with zero keys up to a multiple.")
    halo_size: int = Field(3, ge=0, le=64, description="Halo h around each block (HaloNet: 3): "
                           "windows of b + 2h.")
    qk_ratio: float = Field(1.0, gt=0, le=16, description="Query/key width relative to the "
                            "output width when dim_head is unset.")
    qkv_bias: bool = Field(False, description="Biases in the q and kv projections.")
    avg_down: bool = Field(False, description="With stride 2: a 2x2 average pool after "
                           "attention instead of strided query blocks.")
    scale_pos_embed: bool = Field(False, description="Scale the position logits by "
                                  "1/sqrt(d) too (timm's option; off by default).")

    module = HaloAttention

    def build(self, site: Site) -> nn.Module:
        return HaloAttention(site.channels, site.output_channels, stride=_stride(site),
                             **self.module_kwargs())


# --- lambda_layer: LambdaNetworks (Bello, 2102.08602) --------------------------------------


class LambdaLayer(nn.Module):
    """Lambda layer (2102.08602, Fig. 2 and its code listing; multi-query, intra-depth 1).

    Queries (``num_heads`` x k), keys (k) and values (v = out / num_heads) come from one
    1x1 conv; queries and values are batch-normalised, keys softmax-normalised over the
    positions. The content lambda ``K^T V`` (k x v) is shared by all positions; the
    position lambdas come from a lambda convolution (a 3-D conv with an ``r x r`` kernel
    over the values, with bias) or, with ``r`` unset, from relative position embeddings
    over a fixed (H, W). Each query applies both lambdas; heads are concatenated; a 2x2
    average pool follows with stride 2.
    """

    def __init__(self, channels: int, out_channels: int | None = None, stride: int = 1,
                 size: tuple[int, int] | None = None, num_heads: int = 4,
                 dim_head: int | None = 16, r: int | None = 23, qk_ratio: float = 1.0,
                 qkv_bias: bool = False) -> None:
        super().__init__()
        dim_out = out_channels or channels
        if dim_out % num_heads:
            raise ValueError(f"out channels ({dim_out}) must be divisible by num_heads "
                             f"({num_heads})")
        self.num_heads = num_heads
        self.dim_qk = _qk_width(dim_out, num_heads, dim_head, qk_ratio)
        self.dim_v = dim_out // num_heads
        self.qkv = nn.Conv2d(channels, num_heads * self.dim_qk + self.dim_qk + self.dim_v, 1,
                             bias=qkv_bias)
        self.norm_q = nn.BatchNorm2d(num_heads * self.dim_qk)
        self.norm_v = nn.BatchNorm2d(self.dim_v)
        nn.init.trunc_normal_(self.qkv.weight, std=channels ** -0.5)
        self.size = None
        if r is not None:
            if r % 2 == 0:
                raise ValueError(f"r must be odd, got {r}")
            self.conv_lambda = nn.Conv3d(1, self.dim_qk, (r, r, 1), padding=(r // 2, r // 2, 0))
            nn.init.trunc_normal_(self.conv_lambda.weight, std=self.dim_qk ** -0.5)
            self.pos_emb = None
        else:
            if size is None:
                raise ValueError("a lambda layer without r (relative position embeddings) "
                                 "needs the feature map's size")
            self.size = (int(size[0]), int(size[1]))
            self.conv_lambda = None
            self.pos_emb = nn.Parameter(torch.empty(2 * self.size[0] - 1, 2 * self.size[1] - 1,
                                                    self.dim_qk))
            nn.init.trunc_normal_(self.pos_emb, std=0.02)
        self.pool = nn.AvgPool2d(2, 2) if stride == 2 else nn.Identity()

    def position_embeddings(self, device: torch.device) -> torch.Tensor:
        """(H*W, H*W, k): the embedding of key j relative to query i."""
        h, w = self.size
        rows = _relative_index(h, h, device)                        # (H, H): r_j - r_i + H - 1
        cols = _relative_index(w, w, device)
        emb = self.pos_emb[rows[:, None, :, None], cols[None, :, None, :]]  # (H, W, H, W, k)
        return emb.reshape(h * w, h * w, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        m = h * w
        q, k, v = self.qkv(x).split([self.num_heads * self.dim_qk, self.dim_qk, self.dim_v],
                                    dim=1)
        q = self.norm_q(q).reshape(n, self.num_heads, self.dim_qk, m).transpose(-1, -2)
        v = self.norm_v(v).reshape(n, self.dim_v, m).transpose(-1, -2)      # (N, M, v)
        k = k.reshape(n, self.dim_qk, m).softmax(dim=-1)                     # (N, k, M)
        record(self, "", k.view(n, self.dim_qk, h, w))
        content = q @ (k @ v).unsqueeze(1)                                   # (N, heads, M, v)
        if self.conv_lambda is not None:
            lambdas = self.conv_lambda(v.reshape(n, 1, h, w, self.dim_v))    # (N, k, H, W, v)
            lambdas = lambdas.reshape(n, 1, self.dim_qk, m, self.dim_v).transpose(2, 3)
        else:
            if (h, w) != self.size:
                raise ValueError(f"this lambda layer's position embeddings are for "
                                 f"{self.size[0]}x{self.size[1]} maps, got {h}x{w}")
            emb = self.position_embeddings(x.device)                         # (M, M, k)
            lambdas = (emb.transpose(-1, -2) @ v.unsqueeze(1)).unsqueeze(1)  # (N, 1, M, k, v)
        position = (q.unsqueeze(-2) @ lambdas).squeeze(-2)                   # (N, heads, M, v)
        out = (content + position).transpose(-1, -2).reshape(n, -1, h, w)
        return self.pool(out)


@register_block
class LambdaLayerConfig(BlockConfig):
    """Lambda layer (LambdaNetworks), https://arxiv.org/abs/2102.08602 (timm's
    ``LambdaLayer``). Meant to ``replace`` a 3x3 conv, whose stride it takes."""

    type: Literal["lambda_layer"]
    num_heads: int = Field(4, ge=1, le=128, description="Query heads |h| (the paper's 4).")
    dim_head: int | None = Field(16, ge=1, le=1024, description="Query/key depth |k| (the paper's "
                                 "16); from qk_ratio when unset.")
    r: int | None = Field(23, ge=1, le=127, description="Side of the lambda convolution's scope "
                          "(odd; the paper's ImageNet ResNets: 23, timm's default 9); unset: "
                          "relative position embeddings over the whole (fixed-size) map.")
    qk_ratio: float = Field(1.0, gt=0, le=16, description="Query/key width relative to the output "
                            "width when dim_head is unset.")
    qkv_bias: bool = Field(False, description="Bias in the qkv projection.")

    module = LambdaLayer

    @field_validator("r")
    @classmethod
    def _odd(cls, r: int | None) -> int | None:
        if r is not None and r % 2 == 0:
            raise ValueError(f"r must be odd, got {r}")
        return r

    def build(self, site: Site) -> nn.Module:
        stride = _stride(site)
        if stride not in (1, 2):
            raise ValueError(f"a lambda layer takes stride 1 or 2, got {stride}")
        size = tuple(site.size) if site.size is not None and len(site.size) == 2 else None
        return LambdaLayer(site.channels, site.output_channels, stride=stride, size=size,
                           **self.module_kwargs())
