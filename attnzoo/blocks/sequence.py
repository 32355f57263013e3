"""Attention as the survey defines it: a weighted sum, a soft key-value lookup.

Two blocks:

- ``attention``: one query/key/value attention with a choice of scoring function
  (additive ``v^T tanh(W k + U q)``, ``dot`` ``k^T q``, ``scaled_dot`` ``k^T q / sqrt(d)``,
  ``bilinear`` ``k^T W q``) and of distribution (``soft`` softmax; ``hard_argmax`` /
  ``hard_sample`` one-hot with a straight-through gradient).
- ``multi_head_attention``: Vaswani et al.'s multi-head attention on
  ``F.scaled_dot_product_attention``, equal to ``nn.MultiheadAttention`` given the same
  weights and a drop-in replacement for timm's ViT ``Attention`` (same parameter names).

Both take token sequences (B, N, C) and feature maps (N, C, H, W), whose H*W positions
are the sequence; a map comes back as a map. Both do self-attention (one input) and
cross-attention (``key``/``value`` given).

Masks follow ``nn.MultiheadAttention``: a boolean ``key_padding_mask`` (B, Nk) or
``attn_mask`` (Nq, Nk) / (B*heads, Nq, Nk) / (B or 1, heads or 1, Nq, Nk) is True where
attention is NOT allowed; a float mask is added to the scores. A boolean ``attn_mask``
of ``F.scaled_dot_product_attention`` and timm means the opposite (True = may attend);
``multi_head_attention`` reads it that way with ``mask_convention: sdpa``, which it takes
when it replaces a timm attention, because timm's blocks pass their masks through. Float
masks mean the same everywhere. A query whose keys are all masked gets NaN, as in PyTorch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..attention_maps import dot_product_affinity, record
from ..registry import register_block
from ._layers import like_input, to_tokens
from .base import BlockConfig, Site

Score = Literal["additive", "dot", "scaled_dot", "bilinear"]
Mode = Literal["soft", "hard_argmax", "hard_sample"]
MaskConvention = Literal["multihead_attention", "sdpa"]

# --- masks -----------------------------------------------------------------------------


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = not allowed) as 0 / -inf; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def causal_mask(n_query: int, n_key: int, dtype: torch.dtype, device: torch.device
                ) -> torch.Tensor:
    """(Nq, Nk) additive mask: query i sees keys 0..i (top-left aligned, as in SDPA)."""
    future = torch.ones(n_query, n_key, dtype=torch.bool, device=device).triu(diagonal=1)
    return _additive(future, dtype)


def _check_attn_mask(attn_mask: torch.Tensor, batch: int, heads: int, n_query: int,
                     n_key: int) -> None:
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() == 2:
        ok = shape == (n_query, n_key)
    elif attn_mask.dim() == 3:
        ok = shape == (batch * heads, n_query, n_key)
    elif attn_mask.dim() == 4:
        ok = shape[0] in (1, batch) and shape[1] in (1, heads) and shape[2:] == (n_query,
                                                                                n_key)
    else:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask must be (Nq, Nk) = ({n_query}, {n_key}), (B*heads, Nq, "
                         f"Nk) = ({batch * heads}, {n_query}, {n_key}) or (B or 1, heads or "
                         f"1, Nq, Nk) with B={batch}, heads={heads}; got {shape}")


def combined_mask(key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
                  is_causal: bool, batch: int, n_query: int, n_key: int,
                  dtype: torch.dtype, device: torch.device, heads: int = 1
                  ) -> torch.Tensor | None:
    """All masks as one additive float mask that broadcasts to (B, heads, Nq, Nk), or
    None when there is none. ``attn_mask`` is (Nq, Nk), (B*heads, Nq, Nk) or 4-D."""
    mask = None
    if attn_mask is not None:
        _check_attn_mask(attn_mask, batch, heads, n_query, n_key)
        mask = _additive(attn_mask, dtype)
        if mask.dim() == 3:
            mask = mask.view(batch, heads, n_query, n_key)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, n_key):
            raise ValueError(f"key_padding_mask must be (B, Nk) = ({batch}, {n_key}), "
                             f"got {tuple(key_padding_mask.shape)}")
        padding = _additive(key_padding_mask, dtype).view(batch, 1, 1, n_key)
        mask = padding if mask is None else mask + padding
    if is_causal:
        causal = causal_mask(n_query, n_key, dtype, device)
        mask = causal if mask is None else mask + causal
    return mask


# --- scoring functions -----------------------------------------------------------------


class DotScore(nn.Module):
    """``s(k, q) = k^T q``, divided by ``sqrt(d)`` when ``scaled`` (d = the key width)."""

    def __init__(self, scaled: bool) -> None:
        super().__init__()
        self.scaled = scaled

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scores = q @ k.transpose(-2, -1)
        return scores / math.sqrt(k.shape[-1]) if self.scaled else scores


class AdditiveScore(nn.Module):
    """``s(k, q) = v^T tanh(W k + U q)`` (Bahdanau et al.); W: (hidden, d_k),
    U: (hidden, d_q), v: (hidden,). Holds a (B, Nq, Nk, hidden) tensor."""

    def __init__(self, query_dim: int, key_dim: int, hidden: int) -> None:
        super().__init__()
        self.key_proj = nn.Linear(key_dim, hidden, bias=False)      # W
        self.query_proj = nn.Linear(query_dim, hidden, bias=False)  # U
        self.v = nn.Linear(hidden, 1, bias=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.key_proj(k).unsqueeze(-3) + self.query_proj(q).unsqueeze(-2))
        return self.v(hidden).squeeze(-1)


class BilinearScore(nn.Module):
    """``s(k, q) = k^T W q`` with W: (d_k, d_q), a dot product made asymmetric."""

    def __init__(self, query_dim: int, key_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(key_dim, query_dim))
        bound = 1 / math.sqrt(query_dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (q @ self.weight.t()) @ k.transpose(-2, -1)


def make_score(score: Score, query_dim: int, key_dim: int, hidden: int) -> nn.Module:
    """The scoring module ``score(q (B, Nq, d_q), k (B, Nk, d_k)) -> (B, Nq, Nk)``."""
    if score in ("dot", "scaled_dot") and query_dim != key_dim:
        raise ValueError(f"score {score!r} needs queries and keys of one width, got "
                         f"{query_dim} and {key_dim}; use 'additive' or 'bilinear'")
    if score == "additive":
        return AdditiveScore(query_dim, key_dim, hidden)
    if score == "bilinear":
        return BilinearScore(query_dim, key_dim)
    return DotScore(scaled=score == "scaled_dot")


def attention_distribution(scores: torch.Tensor, mode: Mode, sample: bool) -> torch.Tensor:
    """Scores -> weights over the last dim. ``soft``: softmax. Hard modes: one-hot at the
    argmax, or (``sample``) at an index drawn from the softmax (Gumbel-max); their
    gradient is the softmax's (straight-through), so the scores still learn."""
    probs = scores.softmax(dim=-1)
    if mode == "soft":
        return probs
    if sample:
        uniform = torch.rand_like(scores).clamp(min=torch.finfo(scores.dtype).tiny, max=1.0)
        index = (scores - torch.log(-torch.log(uniform))).argmax(dim=-1, keepdim=True)
    else:
        index = scores.argmax(dim=-1, keepdim=True)
    one_hot = torch.zeros_like(probs).scatter(-1, index, 1.0)
    return one_hot + (probs - probs.detach())


# --- attention: the survey's query/key/value attention ---------------------------------


class QueryKeyValueAttention(nn.Module):
    """Attention as a soft key-value lookup (the survey's first half).

    With ``projections`` (the key-value model): ``Q = W_Q x_q``, ``K = W_K x_k``,
    ``V = W_V x_v`` to ``dim`` channels, then ``out = W_O sum_i a_i v_i`` back to
    ``channels``. Without (the plain model): the inputs themselves are the query, the
    keys and the values, and ``out = sum_i a_i x_i`` (``value_channels`` wide).
    ``a = distribution(score(K, q))`` under the masks.

    Inputs: (B, N, C) sequences or (N, C, H, W) maps (H*W positions; a map query gives a
    map back). ``key`` defaults to ``query`` (self-attention), ``value`` to ``key``.
    ``need_weights=True`` also returns the (B, Nq, Nk) weights. ``hard_sample`` samples
    in training and takes the argmax in eval, so an eval model is deterministic.
    """

    def __init__(self, channels: int, score: Score = "scaled_dot", mode: Mode = "soft",
                 projections: bool = True, dim: int | None = None,
                 key_channels: int | None = None, value_channels: int | None = None,
                 score_dim: int | None = None) -> None:
        super().__init__()
        key_channels = key_channels or channels
        value_channels = value_channels or key_channels
        self.mode = mode
        if projections:
            width = dim or channels
            self.q_proj = nn.Linear(channels, width)
            self.k_proj = nn.Linear(key_channels, width)
            self.v_proj = nn.Linear(value_channels, width)
            self.out_proj = nn.Linear(width, channels)
            query_dim = key_dim = width
        else:
            if dim is not None:
                raise ValueError("dim is the width of the learnt projections; it needs "
                                 "projections=true")
            self.q_proj = self.k_proj = self.v_proj = self.out_proj = nn.Identity()
            query_dim, key_dim = channels, key_channels
        self.score = make_score(score, query_dim, key_dim, score_dim or query_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                need_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x_q = to_tokens(query)
        x_k = x_q if key is None else to_tokens(key)
        x_v = x_k if value is None else to_tokens(value)
        q, k, v = self.q_proj(x_q), self.k_proj(x_k), self.v_proj(x_v)
        scores = self.score(q, k)                                          # (B, Nq, Nk)
        mask = combined_mask(key_padding_mask, attn_mask, is_causal, scores.shape[0],
                             scores.shape[1], scores.shape[2], scores.dtype, scores.device)
        if mask is not None:
            scores = (scores.unsqueeze(1) + mask).squeeze(1)
        weights = attention_distribution(scores, self.mode,
                                         sample=self.mode == "hard_sample" and self.training)
        record(self, "", weights, kind="other")
        out = like_input(self.out_proj(weights @ v), query)
        return (out, weights) if need_weights else out


@register_block
class AttentionConfig(BlockConfig):
    """Query/key/value attention with a choice of scoring function and of soft or hard
    weights, as the attention survey defines it (scoring functions: Bahdanau et al.,
    https://arxiv.org/abs/1409.0473; Luong et al., https://arxiv.org/abs/1508.04025;
    scaled dot product: Vaswani et al., https://arxiv.org/abs/1706.03762; hard attention:
    Xu et al., https://arxiv.org/abs/1502.03044)."""

    type: Literal["attention"]
    score: Score = Field("scaled_dot", description=(
        "Scoring function s(k, q): additive v^T tanh(W k + U q), dot k^T q, scaled_dot "
        "k^T q / sqrt(d) (the survey's fix for dot's large variance), bilinear k^T W q."))
    mode: Mode = Field("soft", description=(
        "soft: softmax weights (a weighted sum). hard_argmax: all weight on the best key. "
        "hard_sample: on a key sampled from the softmax (in training; argmax in eval). "
        "Hard modes pass the softmax's gradient (straight-through)."))
    projections: bool = Field(True, description=(
        "Learn W_Q, W_K, W_V (the key-value model, Q = W_Q X, K = W_K X, V = W_V X) and an "
        "output projection back to the input channels; false: the inputs are the keys and "
        "values and the query is used as it is."))
    dim: int | None = Field(None, ge=1, le=16384, description=(
        "Width of the projected queries, keys and values; the input channels when unset."))
    key_channels: int | None = Field(None, ge=1, le=16384, description=(
        "Channels of a separate key input (cross-attention); the query's when unset."))
    value_channels: int | None = Field(None, ge=1, le=16384, description=(
        "Channels of a separate value input; the key's when unset."))
    score_dim: int | None = Field(None, ge=1, le=16384, description=(
        "Hidden width of the additive score (rows of W and U); the query width when unset."))

    module = QueryKeyValueAttention
    input_ranks = (3, 4)

    @model_validator(mode="after")
    def _dim_needs_projections(self) -> AttentionConfig:
        if self.dim is not None and not self.projections:
            raise ValueError("dim sets the width of the learnt projections and needs "
                             "projections: true")
        return self

    def build(self, site: Site) -> nn.Module:
        _check_same_shape(self.block_type(), site)
        return self.module(channels=site.channels, **self.module_kwargs())


# --- multi_head_attention ----------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al., 1706.03762) on ``F.scaled_dot_product_attention``.

    ``qkv`` packs W_Q, W_K, W_V as one (3C, C) linear map in that order and ``proj`` is
    W_O: the layout of timm's ViT ``Attention`` (same names) and of
    ``nn.MultiheadAttention`` (``in_proj_weight``/``in_proj_bias``, ``out_proj``).

    Inputs: (B, N, C) sequences (batch first) or (N, C, H, W) maps (H*W positions, a map
    comes back). ``key`` defaults to ``query`` (self-attention), ``value`` to ``key``;
    all have C channels. Masks: see the module docstring; a boolean ``attn_mask`` is True
    where attention is NOT allowed (``nn.MultiheadAttention``) unless ``mask_convention``
    is ``"sdpa"`` (True = may attend, as timm's ViT blocks pass it); ``key_padding_mask``
    is True on padding either way. ``is_causal`` applies the causal mask itself.
    ``need_weights=True`` also returns the attention weights, averaged over heads unless
    ``average_attn_weights`` is False; it computes them explicitly instead of with the
    fused kernel.
    """

    def __init__(self, channels: int, num_heads: int = 8, qkv_bias: bool = True,
                 proj_bias: bool = True, dropout: float = 0.0, proj_drop: float = 0.0,
                 mask_convention: MaskConvention = "multihead_attention") -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.mask_convention = mask_convention
        self.head_dim = channels // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation: Xavier-uniform W_QKV, zero biases."""
        nn.init.xavier_uniform_(self.qkv.weight)
        for bias in (self.qkv.bias, self.proj.bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _project(self, query: torch.Tensor, key: torch.Tensor | None,
                 value: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if key is None and value is None:  # self-attention: one matmul
            return self.qkv(query).chunk(3, dim=-1)
        key = query if key is None else key
        value = key if value is None else value
        weights = self.qkv.weight.chunk(3, dim=0)
        biases = self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None,) * 3
        return (F.linear(query, weights[0], biases[0]), F.linear(key, weights[1], biases[1]),
                F.linear(value, weights[2], biases[2]))

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                need_weights: bool = False, average_attn_weights: bool = True
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x_q = to_tokens(query)
        x_k = None if key is None else to_tokens(key)
        x_v = None if value is None else to_tokens(value)
        q, k, v = (self._heads(t) for t in self._project(x_q, x_k, x_v))  # (B, h, N, d)
        batch, _, n_query, _ = q.shape
        n_key = k.shape[2]
        if attn_mask is not None and attn_mask.dtype == torch.bool \
                and self.mask_convention == "sdpa":
            attn_mask = ~attn_mask
        # With no other mask the fused kernel applies causality itself.
        fused_causal = is_causal and key_padding_mask is None and attn_mask is None \
            and not need_weights
        mask = combined_mask(key_padding_mask, attn_mask, is_causal and not fused_causal,
                             batch, n_query, n_key, q.dtype, q.device, heads=self.num_heads)
        dropout = self.dropout if self.training else 0.0
        record(self, "", _attention_weights, q, k, mask, query, kind="affinity" if (
            query.dim() == 4 and key is None) else "other")
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            weights = (scores if mask is None else scores + mask).softmax(dim=-1)
            weights = F.dropout(weights, dropout) if dropout else weights
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=fused_causal)
        out = out.transpose(1, 2).reshape(batch, n_query, -1)
        out = like_input(self.proj_drop(self.proj(out)), query)
        if not need_weights:
            return out
        return out, (weights.mean(dim=1) if average_attn_weights else weights)


def timm_attention_settings(module: nn.Module) -> dict[str, object]:
    """num_heads, biases and dropouts of a timm ViT-style ``Attention`` (``qkv`` +
    ``proj`` linear maps) that a multi_head_attention is to replace; {} for a module
    that is not one. Raises for variants this block does not reproduce."""
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
            and isinstance(getattr(module, "num_heads", None), int)):
        return {}
    name = type(module).__name__
    if qkv.out_features != 3 * qkv.in_features or proj.in_features != qkv.in_features:
        raise ValueError(f"{name} has a head width other than channels / num_heads "
                         f"(qkv {qkv.in_features}->{qkv.out_features}); not supported")
    for part in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(module, part, nn.Identity()), nn.Identity):
            raise ValueError(f"{name} normalises with {part}; multi_head_attention has no "
                             "such norm and cannot take its place")
    if getattr(module, "gate", None) is not None:
        raise ValueError(f"{name} has an output gate; multi_head_attention has none")
    attn_drop, proj_drop = getattr(module, "attn_drop", None), getattr(module, "proj_drop", None)
    return {
        "num_heads": module.num_heads,
        "qkv_bias": qkv.bias is not None,
        "proj_bias": proj.bias is not None,
        "dropout": attn_drop.p if isinstance(attn_drop, nn.Dropout) else 0.0,
        "proj_drop": proj_drop.p if isinstance(proj_drop, nn.Dropout) else 0.0,
        # its model passes attn_mask on in scaled_dot_product_attention's convention
        "mask_convention": "sdpa",
    }


def _check_same_shape(block_type: str, site: Site) -> None:
    if site.output_channels != site.channels or (
            site.out_size is not None and site.size is not None and site.out_size != site.size):
        raise ValueError(f"block {block_type!r} keeps the shape of its input and cannot map "
                         f"{site.channels} channels at {site.size} to {site.output_channels} "
                         f"at {site.out_size}")


def _attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                       query: torch.Tensor) -> torch.Tensor:
    """The softmax weights, (B, heads, Nq, Nk) for token sequences; for a map attending
    to itself, the chosen queries' weights as maps, (B, heads, Q, H, W)."""
    if query.dim() == 4 and k.shape[2] == q.shape[2]:
        extra = None if mask is None else (
            lambda index: mask if index is None else mask[..., index.to(mask.device), :])
        return dot_product_affinity(q, k, tuple(query.shape[-2:]), q.shape[-1] ** -0.5, extra)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return (scores if mask is None else scores + mask).softmax(dim=-1)


@register_block
class MultiHeadAttentionConfig(BlockConfig):
    """Multi-head (self- or cross-) attention, https://arxiv.org/abs/1706.03762, on
    torch's scaled_dot_product_attention. Replacing a timm ViT ``Attention`` takes its
    heads, biases, dropouts and mask convention for every field left unset, and keeps its
    parameter names."""

    type: Literal["multi_head_attention"]
    num_heads: int | None = Field(None, ge=1, le=128, description=(
        "Attention heads; the replaced attention's when unset, else 8 (Vaswani et al.)."))
    qkv_bias: bool | None = Field(None, description=(
        "Bias in the query/key/value projection; the replaced attention's, else true."))
    proj_bias: bool | None = Field(None, description=(
        "Bias in the output projection; the replaced attention's, else true."))
    dropout: float | None = Field(None, ge=0, lt=1, description=(
        "Dropout on the attention weights in training; the replaced attention's, else 0."))
    proj_drop: float | None = Field(None, ge=0, lt=1, description=(
        "Dropout after the output projection; the replaced attention's, else 0."))
    mask_convention: MaskConvention | None = Field(None, description=(
        "What True means in a boolean attn_mask: multihead_attention (nn.MultiheadAttention: "
        "True = may NOT attend) or sdpa (F.scaled_dot_product_attention and timm: True = may "
        "attend). Unset: sdpa when it replaces a timm attention, whose model passes its "
        "masks through, else multihead_attention. key_padding_mask is True on padding."))

    module = MultiHeadAttention
    input_ranks = (3, 4)

    def build(self, site: Site) -> nn.Module:
        _check_same_shape(self.block_type(), site)
        inherited = timm_attention_settings(site.replaced) if site.replaced is not None else {}
        defaults = {"num_heads": 8, "qkv_bias": True, "proj_bias": True,
                    "dropout": 0.0, "proj_drop": 0.0, "mask_convention": "multihead_attention"}
        kwargs = {name: value if value is not None else inherited.get(name, defaults[name])
                  for name, value in self.module_kwargs().items()}
        return self.module(channels=site.channels, **kwargs)
