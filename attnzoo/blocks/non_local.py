"""The non-local family: attention over all positions of a feature map, added to it.

Non-local (embedded Gaussian), its disentangled form, GCNet's global context (one
query-independent attention map), CCNet's criss-cross attention (row and column
only) and A^2-Nets' double attention (gather to a few global descriptors, then
distribute them). Each is a residual block: ``x + f(x)``, with ``reset_identity_``
making ``f`` zero.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import register_block
from ._layers import reduced_channels, to_feature_map, to_tokens, zero_bn_
from .base import BlockConfig

# --- global_context: GCNet (Cao et al., 1904.11492) -----------------------------------


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


# --- non_local: Non-local Neural Networks (Wang et al., 1711.07971) -------------------


class NonLocal(nn.Module):
    """Non-local block, embedded Gaussian form (1711.07971, eq. 1-3 and Fig. 2).

    ``y_i = sum_j softmax_j(theta(x_i)^T phi(x_j)) g(x_j)`` and ``z = BN(W y) + x``.
    theta, phi and g are 1x1 convs to ``C / reduction`` channels; ``subsample`` puts
    a 2x2 max-pool after phi and g (the paper's subsampling trick, 4x fewer pairs).
    W's BN starts with weight 0, so the block is the identity at construction.
    The pairwise softmax runs in ``scaled_dot_product_attention``.
    """

    def __init__(self, channels: int, reduction: float = 2, subsample: bool = True,
                 scaled: bool = False) -> None:
        super().__init__()
        inner = reduced_channels(channels, reduction)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        # ceil_mode keeps a 1-pixel map usable (tiny inputs); equal to floor on even sizes.
        self.pool = nn.MaxPool2d(2, ceil_mode=True) if subsample else nn.Identity()
        self.out_conv = nn.Conv2d(inner, channels, 1)
        self.out_norm = nn.BatchNorm2d(channels)
        self.scale = inner ** -0.5 if scaled else 1.0
        self.reset_identity_()

    def reset_identity_(self) -> None:
        zero_bn_(self.out_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        query = to_tokens(self.theta(x)).unsqueeze(1)         # (N, 1, HW, C')
        key = to_tokens(self.pool(self.phi(x))).unsqueeze(1)  # (N, 1, HW', C')
        value = to_tokens(self.pool(self.g(x))).unsqueeze(1)
        y = F.scaled_dot_product_attention(query, key, value, scale=self.scale)
        y = to_feature_map(y.squeeze(1), h, w)
        return x + self.out_norm(self.out_conv(y))


@register_block
class NonLocalConfig(BlockConfig):
    """Non-local block (embedded Gaussian), https://arxiv.org/abs/1711.07971"""

    type: Literal["non_local"]
    reduction: float = Field(2, gt=0, description="theta, phi and g map C to C / reduction "
                             "channels (the paper's bottleneck: half of C).")
    subsample: bool = Field(True, description="2x2 max-pool after phi and g (the paper's "
                            "subsampling trick).")
    scaled: bool = Field(False, description="Divide theta^T phi by sqrt(C / reduction), as "
                         "the authors' released code does; the paper's formula has no scale.")

    module = NonLocal
    residual = True


# --- disentangled_non_local: Disentangled Non-Local (Yin et al., 2006.06668) ----------


class DisentangledNonLocal(nn.Module):
    """Disentangled non-local block (2006.06668).

    The attention splits into a whitened pairwise term,
    ``softmax_j((q_i - mean q)^T (k_j - mean k) / tau)``, and a unary term,
    ``softmax_j(m(x_j))`` with ``m`` a 1x1 conv to one channel; both weigh the same
    values ``g(x_j)``, and their outputs add. ``tau`` is ``temperature`` (times
    sqrt(C') when ``scaled``). The output goes through W (1x1 conv + BN, BN weight 0
    at construction) and adds to the input, as in the non-local block.
    """

    def __init__(self, channels: int, reduction: float = 2, temperature: float = 0.05,
                 scaled: bool = True, subsample: bool = False) -> None:
        super().__init__()
        inner = reduced_channels(channels, reduction)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.unary = nn.Conv2d(channels, 1, 1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True) if subsample else nn.Identity()
        self.out_conv = nn.Conv2d(inner, channels, 1)
        self.out_norm = nn.BatchNorm2d(channels)
        self.scale = (inner ** -0.5 if scaled else 1.0) / temperature
        self.reset_identity_()

    def reset_identity_(self) -> None:
        zero_bn_(self.out_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        query = to_tokens(self.theta(x))                       # (N, HW, C')
        key = to_tokens(self.pool(self.phi(x)))                # (N, HW', C')
        value = to_tokens(self.pool(self.g(x)))
        query = query - query.mean(1, keepdim=True)            # whitening
        key = key - key.mean(1, keepdim=True)
        pairwise = F.scaled_dot_product_attention(
            query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), scale=self.scale
        ).squeeze(1)                                           # (N, HW, C')
        unary_weights = self.pool(self.unary(x)).flatten(1).softmax(-1)   # (N, HW')
        unary = torch.bmm(unary_weights.unsqueeze(1), value)  # (N, 1, C'), same for all i
        y = to_feature_map(pairwise + unary, h, w)
        return x + self.out_norm(self.out_conv(y))


@register_block
class DisentangledNonLocalConfig(BlockConfig):
    """Disentangled Non-Local block, https://arxiv.org/abs/2006.06668"""

    type: Literal["disentangled_non_local"]
    reduction: float = Field(2, gt=0, description="Query, key and value have C / reduction "
                             "channels, as in the non-local block.")
    temperature: float = Field(0.05, gt=0, description="Temperature of the pairwise softmax "
                               "(the authors' 0.05).")
    scaled: bool = Field(True, description="Also divide the pairwise logits by "
                         "sqrt(C / reduction), as the authors' code does.")
    subsample: bool = Field(False, description="2x2 max-pool on keys, values and unary "
                            "logits (off in the authors' segmentation models).")

    module = DisentangledNonLocal
    residual = True


# --- criss_cross: CCNet (Huang et al., 1811.11721) ------------------------------------


class CrissCrossAttention(nn.Module):
    """Recurrent criss-cross attention (CCNet, 1811.11721).

    Each position attends to the H + W - 1 positions of its row and column (itself
    once): query/key are 1x1 convs to ``C / reduction`` (C/8), value a 1x1 conv to C;
    one softmax over the column and row logits together; ``out = gamma * A(x) + x``
    with gamma 0 at construction. The module runs ``recurrence`` times (R = 2) with
    shared weights, so information reaches every position.

    Logits are computed per row and per column (einsum), so memory grows with
    ``H*W*(H+W)``; no ``HW x HW`` matrix is ever formed.
    """

    def __init__(self, channels: int, reduction: float = 8, recurrence: int = 2) -> None:
        super().__init__()
        inner = reduced_channels(channels, reduction)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.recurrence = recurrence

    def reset_identity_(self) -> None:
        nn.init.zeros_(self.gamma)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """One criss-cross pass: ``gamma * aggregate + x``."""
        h, w = x.shape[-2:]
        q, k, v = self.query(x), self.key(x), self.value(x)
        # Column logits: position (i, j) against (r, j) for every row r -> (N, H, W, H).
        col = torch.einsum("ncij,ncrj->nijr", q, k)
        # The position itself is in both its row and its column: count it in the row only.
        itself = torch.eye(h, dtype=torch.bool, device=x.device).unsqueeze(1)  # (H, 1, H)
        col = col.masked_fill(itself, float("-inf"))
        # Row logits: position (i, j) against (i, s) for every column s -> (N, H, W, W).
        row = torch.einsum("ncij,ncis->nijs", q, k)
        attn = torch.cat([col, row], dim=-1).softmax(dim=-1)
        col_attn, row_attn = attn.split([h, w], dim=-1)
        out = (torch.einsum("nijr,ncrj->ncij", col_attn, v)
               + torch.einsum("nijs,ncis->ncij", row_attn, v))
        return self.gamma * out + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            x = self.attend(x)
        return x


@register_block
class CrissCrossConfig(BlockConfig):
    """Criss-cross attention (CCNet), https://arxiv.org/abs/1811.11721"""

    type: Literal["criss_cross"]
    reduction: float = Field(8, gt=0, description="Query and key have C / reduction channels.")
    recurrence: int = Field(2, ge=1, description="Passes R with shared weights (R = 2 "
                            "reaches every position).")

    module = CrissCrossAttention
    residual = True


# --- double_attention: A^2-Nets (Chen et al., 1810.11579) ------------------------------


class DoubleAttention(nn.Module):
    """Double attention block (A^2-Nets, 1810.11579, eq. 4-7 and Fig. 2).

    Gather: ``n`` attention maps B (1x1 conv, softmax over the H*W positions) pool the
    ``m`` features A (1x1 conv) into ``n`` global descriptors, ``G = A softmax(B)^T``
    (second-order attention pooling, m x n). Distribute: at every position, attention
    vectors V (1x1 conv, softmax over the ``n`` descriptors) mix the descriptors,
    ``Z = G softmax(V)``. A 1x1 conv maps Z back to C channels and adds it to the input.
    ``m`` and ``n`` default to C/2. ``reset_identity_`` zeroes the last conv.
    """

    def __init__(self, channels: int, c_m: int | None = None, c_n: int | None = None) -> None:
        super().__init__()
        c_m = c_m or max(1, channels // 2)
        c_n = c_n or max(1, channels // 2)
        self.features = nn.Conv2d(channels, c_m, 1)         # A
        self.gather_maps = nn.Conv2d(channels, c_n, 1)      # B
        self.distribute_maps = nn.Conv2d(channels, c_n, 1)  # V
        self.reconstruct = nn.Conv2d(c_m, channels, 1)

    def reset_identity_(self) -> None:
        nn.init.zeros_(self.reconstruct.weight)
        nn.init.zeros_(self.reconstruct.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        features = self.features(x).flatten(2)                           # (N, m, HW)
        gather = self.gather_maps(x).flatten(2).softmax(dim=-1)          # (N, n, HW)
        distribute = self.distribute_maps(x).flatten(2).softmax(dim=1)   # (N, n, HW)
        descriptors = torch.bmm(features, gather.transpose(1, 2))        # (N, m, n)
        z = torch.bmm(descriptors, distribute).reshape(n, -1, h, w)      # (N, m, H, W)
        return x + self.reconstruct(z)


@register_block
class DoubleAttentionConfig(BlockConfig):
    """Double attention (A^2-Nets), https://arxiv.org/abs/1810.11579"""

    type: Literal["double_attention"]
    c_m: int | None = Field(None, ge=1, description="Channels m of the gathered features "
                            "(C/2 when unset).")
    c_n: int | None = Field(None, ge=1, description="Number n of attention maps / global "
                            "descriptors (C/2 when unset).")

    module = DoubleAttention
    residual = True
