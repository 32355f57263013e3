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

from ..attention_maps import chosen_queries, dot_product_affinity, key_grid, record
from ..registry import register_block
from ._kernels import (
    attention_any_width,
    conv1x1_from_tokens,
    conv1x1_tokens,
    max_pool_map,
    max_pool_tokens,
    tokens_to_nchw,
)
from ._layers import reduced_channels, to_feature_map, zero_bn_
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
        record(self, "", weights.view(n, 1, h, w))
        context = torch.bmm(x.view(n, c, h * w), weights.transpose(1, 2))  # (N, C, 1)
        context = context.view(n, c, 1, 1)
        return x + self.fc2(self.act(self.norm(self.fc1(context))))


@register_block
class GlobalContextConfig(BlockConfig):
    """Global Context block (GCNet), https://arxiv.org/abs/1904.11492"""

    type: Literal["global_context"]
    reduction: float = Field(16, ge=0.0625, le=1024,
                             description="Bottleneck ratio r of the transform.")

    module = GlobalContext
    residual = True


# --- non_local: Non-local Neural Networks (Wang et al., 1711.07971) -------------------


class NonLocal(nn.Module):
    """Non-local block, embedded Gaussian form (1711.07971, eq. 1-3 and Fig. 2).

    ``y_i = sum_j softmax_j(theta(x_i)^T phi(x_j)) g(x_j)`` and ``z = BN(W y) + x``.
    theta, phi and g are 1x1 convs to ``C / reduction`` channels; ``subsample`` halves
    the key/value grid with a 2x2 max-pool (the paper's subsampling trick, 4x fewer
    pairs; floor mode, as every reference: an odd last row or column is dropped).
    W's BN starts with weight 0, so the block is the identity at construction.

    ``variant``: ``paper`` pools phi(x) and g(x) and does not scale the logits (the
    paper's figure and the common PyTorch ports); ``released`` is the authors' code
    (facebookresearch/video-nonlocal-net, ``nonlocal_helper.py``): it pools x before
    the phi and g convs, divides the logits by sqrt(C / reduction), and initialises the
    convs from N(0, 0.01) with zero biases. ``scaled`` overrides the variant's scaling.

    The convs run as one matrix product straight into token layout, so that the
    pairwise softmax runs in the fused ``scaled_dot_product_attention`` kernel (which
    never holds the (HW) x (HW') matrix), see ``_kernels``.
    """

    def __init__(self, channels: int, reduction: float = 2, subsample: bool = True,
                 scaled: bool | None = None, variant: str = "paper") -> None:
        super().__init__()
        if variant not in ("paper", "released"):
            raise ValueError(f"variant must be 'paper' or 'released', got {variant!r}")
        inner = reduced_channels(channels, reduction)
        self.variant = variant
        self.subsample = subsample
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out_conv = nn.Conv2d(inner, channels, 1)
        self.out_norm = nn.BatchNorm2d(channels)
        if scaled is None:
            scaled = variant == "released"
        self.scale = inner ** -0.5 if scaled else 1.0
        if variant == "released":
            for conv in (self.theta, self.phi, self.g, self.out_conv):
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)
        self.reset_identity_()

    def reset_identity_(self) -> None:
        zero_bn_(self.out_norm)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The sub-sampling of a map (identity without ``subsample``)."""
        return max_pool_map(x) if self.subsample else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        inner = self.theta.out_channels
        query = conv1x1_tokens(x, self.theta)                    # (N, HW, C')
        if self.variant == "released":                          # pool x, then phi and g
            key_value = conv1x1_tokens(self.pool(x), self.phi, self.g)
        else:                                                    # phi and g, then pool
            key_value = conv1x1_tokens(x, self.phi, self.g)      # (N, HW, 2C')
            if self.subsample:
                key_value = max_pool_tokens(key_value, h, w)[0]  # (N, HW', 2C')
        key, value = key_value[..., :inner], key_value[..., inner:]
        record(self, "", dot_product_affinity, query, key, (h, w), self.scale, kind="affinity")
        y = F.scaled_dot_product_attention(query.unsqueeze(1), key.unsqueeze(1),
                                           value.unsqueeze(1), scale=self.scale)
        return x + self.out_norm(conv1x1_from_tokens(y.squeeze(1), self.out_conv, h, w))


@register_block
class NonLocalConfig(BlockConfig):
    """Non-local block (embedded Gaussian), https://arxiv.org/abs/1711.07971"""

    type: Literal["non_local"]
    reduction: float = Field(2, ge=0.0625, le=1024,
                             description="theta, phi and g map C to C / reduction "
                             "channels (the paper's bottleneck: half of C).")
    subsample: bool = Field(True, description="2x2 max-pool (floor mode) of the keys and "
                            "values (the paper's subsampling trick).")
    scaled: bool | None = Field(None, description="Divide theta^T phi by sqrt(C / "
                                "reduction); unset: as the variant (paper: no, released: "
                                "yes).")
    variant: Literal["paper", "released"] = Field(
        "paper", description="'paper': max-pool after phi and g, unscaled logits (the "
        "paper's Fig. 2, the common PyTorch ports); 'released': the authors' code "
        "(video-nonlocal-net): max-pool x before phi and g, logits / sqrt(C'), convs "
        "initialised from N(0, 0.01).")

    module = NonLocal
    residual = True


# --- disentangled_non_local: Disentangled Non-Local (Yin et al., 2006.06668) ----------


class DisentangledNonLocal(nn.Module):
    """Disentangled non-local block (2006.06668).

    The attention splits into a whitened pairwise term,
    ``softmax_j((q_i - mean q)^T (k_j - mean k) / tau)``, and a unary term,
    ``softmax_j(m(x_j))`` with ``m`` a 1x1 conv to one channel; both weigh the values
    ``g(x_j)`` and their outputs add. ``tau`` is ``temperature`` (times sqrt(C') when
    ``scaled``); q, k are 1x1 convs to C' = C / reduction channels.

    ``variant``: ``mmseg`` (mmsegmentation's DNLHead layout): g maps C to C', the sum
    goes through W (1x1 conv C'->C + BN, BN weight 0 at construction) and adds to the
    input; ``subsample`` pools k, g and m after their convs. ``released`` (the authors'
    yinmh17/DNL-Semantic-Segmentation, ``NonLocal2d_bn`` as its DNL configs set it:
    channel whitening, ``with_gc``, no ``use_out``/``out_bn``): g maps C to C without
    bias, no W and no BN, a learnable ``gamma`` (0 at construction) scales the pairwise
    term only, ``x + gamma * pairwise + unary``; ``subsample`` pools x before the k, g and
    m convs; convs initialised from N(0, 0.01) with zero biases, as the release does.
    """

    def __init__(self, channels: int, reduction: float = 2, temperature: float = 0.05,
                 scaled: bool = True, subsample: bool = False, variant: str = "mmseg"
                 ) -> None:
        super().__init__()
        if variant not in ("mmseg", "released"):
            raise ValueError(f"variant must be 'mmseg' or 'released', got {variant!r}")
        inner = reduced_channels(channels, reduction)
        self.variant = variant
        self.subsample = subsample
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.unary = nn.Conv2d(channels, 1, 1)
        if variant == "released":
            self.g = nn.Conv2d(channels, channels, 1, bias=False)
            self.gamma = nn.Parameter(torch.zeros(1))
            for conv in (self.theta, self.phi, self.g, self.unary):
                nn.init.normal_(conv.weight, std=0.01)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
        else:
            self.g = nn.Conv2d(channels, inner, 1)
            self.out_conv = nn.Conv2d(inner, channels, 1)
            self.out_norm = nn.BatchNorm2d(channels)
        self.scale = (inner ** -0.5 if scaled else 1.0) / temperature
        if variant == "mmseg":   # the released block starts with gamma = 0 only
            self.reset_identity_()

    def reset_identity_(self) -> None:
        if self.variant == "released":
            # The unary term is not scaled by gamma: zero the values too.
            nn.init.zeros_(self.gamma)
            nn.init.zeros_(self.g.weight)
        else:
            zero_bn_(self.out_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        inner = self.theta.out_channels
        query = conv1x1_tokens(x, self.theta)                          # (N, HW, C')
        if self.variant == "released":                                # pool x, then convs
            src = max_pool_map(x) if self.subsample else x
            kvm = conv1x1_tokens(src, self.phi, self.g, self.unary)
        else:                                                          # convs, then pool
            kvm = conv1x1_tokens(x, self.phi, self.g, self.unary)
            if self.subsample:
                kvm = max_pool_tokens(kvm, h, w)[0]
        key, value, logits = kvm[..., :inner], kvm[..., inner:-1], kvm[..., -1]
        query = query - query.mean(1, keepdim=True)                    # whitening
        key = key - key.mean(1, keepdim=True)
        pairwise = attention_any_width(query, key, value, self.scale)  # (N, HW, C_v)
        record(self, "pairwise", dot_product_affinity, query, key, (h, w), self.scale,
               kind="affinity")
        record(self, "unary", _unary_map, logits, h, w)
        unary = torch.bmm(logits.softmax(-1).unsqueeze(1), value)     # (N, 1, C_v), all i
        if self.variant == "released":
            y = to_feature_map(torch.addcmul(unary, self.gamma, pairwise), h, w)
            return x + y
        y = conv1x1_from_tokens(pairwise + unary, self.out_conv, h, w)
        return x + self.out_norm(y)


def _unary_map(logits: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DNL's unary attention, the same for every query: (N, 1, Hk, Wk)."""
    return logits.softmax(-1).view(logits.shape[0], 1, *key_grid(logits.shape[-1], h, w))


@register_block
class DisentangledNonLocalConfig(BlockConfig):
    """Disentangled Non-Local block, https://arxiv.org/abs/2006.06668"""

    type: Literal["disentangled_non_local"]
    reduction: float = Field(2, ge=0.0625, le=1024, description="Query and key have C / reduction "
                             "channels (and the values, in the mmseg variant).")
    temperature: float = Field(0.05, gt=0, le=100,
                               description="Temperature of the pairwise softmax "
                               "(the authors' 0.05).")
    scaled: bool = Field(True, description="Also divide the pairwise logits by "
                         "sqrt(C / reduction), as the authors' code does.")
    subsample: bool = Field(False, description="2x2 max-pool (floor mode) for keys, values "
                            "and unary logits (off in the authors' segmentation models).")
    variant: Literal["mmseg", "released"] = Field(
        "mmseg", description="'mmseg': mmsegmentation's layout (C' values, output conv + "
        "BN); 'released': the authors' code (C->C values without bias, no output conv or "
        "BN, learnable gamma (0 at init) on the pairwise term only, convs from "
        "N(0, 0.01)).")

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

    Logits are computed per row and per column (batched matrix products), so memory
    grows with ``H*W*(H+W)``; no ``HW x HW`` matrix is ever formed.
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
        """One criss-cross pass: ``gamma * aggregate + x``.

        q, k, v come from one matrix product in (N, H, W, C) layout; the row logits and
        the row aggregation are then batched matrix products over the H rows, the column
        ones over the W columns (a transposed view), so every product is a plain GEMM
        over contiguous rows and nothing larger than the (N, H, W, H + W) logits exists.
        """
        n, c, h, w = x.shape
        inner = self.query.out_channels
        qkv = conv1x1_tokens(x, self.query, self.key, self.value).view(n, h, w, -1)
        q, k, v = qkv[..., :inner], qkv[..., inner:2 * inner], qkv[..., 2 * inner:]
        # Column logits: (i, j) against (r, j) for every row r, batched over columns j.
        col = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1))    # (N, W, H_i, H_r)
        # The position itself is in both its row and its column: count it in the row only.
        itself = torch.eye(h, dtype=torch.bool, device=x.device)
        col = col.masked_fill(itself, float("-inf"))
        # Row logits: (i, j) against (i, s) for every column s, batched over rows i.
        row = torch.matmul(q, k.transpose(-1, -2))                       # (N, H, W_j, W_s)
        attn = torch.cat([col.transpose(1, 2), row], dim=-1).softmax(dim=-1)
        col_attn, row_attn = attn.split([h, w], dim=-1)
        record(self, "", _criss_cross_map, col_attn, row_attn, kind="affinity")
        out = torch.matmul(row_attn, v)                                  # (N, H, W, C)
        out_col = torch.matmul(col_attn.transpose(1, 2), v.transpose(1, 2))  # (N, W, H, C)
        out = out + out_col.transpose(1, 2)
        return torch.addcmul(x, self.gamma, tokens_to_nchw(out.view(n, h * w, c), h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            x = self.attend(x)
        return x


def _criss_cross_map(col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """One pass's weights of the chosen queries on the (H, W) map, zero off their cross:
    (N, Q, H, W). col (N, H, W, H): query (i, j) on (r, j); row (N, H, W, W): on (i, s)."""
    n, h, w, _ = col.shape
    index = chosen_queries(h, w, col.device)
    index = torch.arange(h * w, device=col.device) if index is None else index
    maps = col.new_zeros(n, len(index), h, w)
    for q, flat in enumerate(index.tolist()):
        i, j = divmod(flat, w)
        maps[:, q, :, j] += col[:, i, j]
        maps[:, q, i, :] += row[:, i, j]
    return maps


@register_block
class CrissCrossConfig(BlockConfig):
    """Criss-cross attention (CCNet), https://arxiv.org/abs/1811.11721"""

    type: Literal["criss_cross"]
    reduction: float = Field(8, ge=0.0625, le=1024,
                             description="Query and key have C / reduction channels.")
    recurrence: int = Field(2, ge=1, le=8, description="Passes R with shared weights (R = 2 "
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
        record(self, "gather", gather.view(n, -1, h, w))
        record(self, "distribute", distribute.view(n, -1, h, w))
        descriptors = torch.bmm(features, gather.transpose(1, 2))        # (N, m, n)
        z = torch.bmm(descriptors, distribute).reshape(n, -1, h, w)      # (N, m, H, W)
        return x + self.reconstruct(z)


@register_block
class DoubleAttentionConfig(BlockConfig):
    """Double attention (A^2-Nets), https://arxiv.org/abs/1810.11579"""

    type: Literal["double_attention"]
    c_m: int | None = Field(None, ge=1, le=8192, description="Channels m of the gathered features "
                            "(C/2 when unset).")
    c_n: int | None = Field(None, ge=1, le=8192, description="Number n of attention maps / global "
                            "descriptors (C/2 when unset).")

    module = DoubleAttention
    residual = True
