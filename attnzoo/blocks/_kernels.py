"""Fast paths shared by the attention blocks: 1x1 convolutions as matrix products in
token layout, 2x2 max-pooling of tokens, and attention with 2-D relative-position
logits in query chunks.

Why token layout: ``scaled_dot_product_attention`` runs its fused (flash) CPU kernel
only when the last dimension of q, k and v has stride 1. A ``(N, C, H, W)`` map
flattened and transposed to ``(N, H*W, C)`` has stride ``H*W`` there, so the call
silently falls back to the unfused maths, which forms the whole ``(HW) x (HW')``
matrix (several times: logits, the mask checks of the safe softmax, the softmax).
Computing the 1x1 convolutions as one matrix product straight into token layout gives
contiguous rows (the fused kernel) and runs at matrix-product speed on the CPU, where
oneDNN's 1x1 convolution of an NCHW map reaches about half of it.

Nothing here is a registered block; the modules keep their ``nn.Conv2d`` children (and
so their parameter names): these helpers only read their weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Elements of one chunk of position logits (64 MiB in float32): attention with relative
# positions adds a (queries x keys) mask to the logits, and forming it for all queries at
# once would hold a tensor as large as the logits themselves. Not smaller: glibc serves
# blocks under 32 MiB (its largest mmap threshold) from the heap, where a run of masks
# interleaved with the kept outputs fragments it and the process keeps growing (1.3 GiB
# at 96x96 with 16 MiB chunks, 0.24 GiB with 64 MiB ones); a larger block is its own
# mmap, returned on free.
MASK_CHUNK_ELEMENTS = 1 << 24


def _weight_and_bias(convs: tuple[nn.Conv2d, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The 1x1 convs' weights stacked to one (sum C_out, C_in) matrix, and their biases
    (zeros for a conv without one; None when none has one)."""
    weights = [c.weight.flatten(1) for c in convs]
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)
    if all(c.bias is None for c in convs):
        return weight, None
    biases = [c.bias if c.bias is not None else c.weight.new_zeros(c.out_channels)
              for c in convs]
    return weight, biases[0] if len(biases) == 1 else torch.cat(biases)


def conv1x1_tokens(x: torch.Tensor, *convs: nn.Conv2d) -> torch.Tensor:
    """1x1 convolutions of an ``(N, C, H, W)`` map as one matrix product, in token
    layout: ``(N, H*W, sum of their output channels)``, contiguous (the outputs of the
    convs side by side, in the order given). Same values as ``conv(x)`` flattened and
    transposed, to float rounding."""
    weight, bias = _weight_and_bias(convs)
    n = x.shape[0]
    tokens = x.flatten(2).transpose(1, 2)                 # (N, HW, C): a view of NCHW
    w = weight.t().expand(n, -1, -1)
    if bias is None:
        return torch.bmm(tokens, w)
    return torch.baddbmm(bias, tokens, w)


def conv1x1_from_tokens(tokens: torch.Tensor, conv: nn.Conv2d, height: int, width: int
                        ) -> torch.Tensor:
    """A 1x1 convolution of tokens ``(N, H*W, C_in)``, returned as the contiguous NCHW
    map ``(N, C_out, H, W)``."""
    weight, bias = _weight_and_bias((conv,))
    n = tokens.shape[0]
    w = weight.expand(n, -1, -1)
    t = tokens.transpose(1, 2)
    out = torch.bmm(w, t) if bias is None else torch.baddbmm(bias[:, None], w, t)
    return out.view(n, -1, height, width)


def max_pool_tokens(tokens: torch.Tensor, height: int, width: int
                    ) -> tuple[torch.Tensor, int, int]:
    """2x2 max-pooling with stride 2 of tokens ``(N, H*W, C)`` of an H x W map, floor
    mode (an odd last row or column is dropped, as ``nn.MaxPool2d(2)`` does); a side of
    length 1 is not pooled. Returns the pooled tokens and their map size."""
    n, _, c = tokens.shape
    kh, kw = min(2, height), min(2, width)
    grid = tokens.reshape(n, height, width, c).permute(0, 3, 1, 2)   # NCHW view
    pooled = F.max_pool2d(grid, (kh, kw), (kh, kw))
    h, w = pooled.shape[-2:]
    return pooled.permute(0, 2, 3, 1).reshape(n, h * w, c), h, w


def max_pool_map(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling with stride 2 of an NCHW map, floor mode; a side of length 1 is
    not pooled (the token version's rule)."""
    kh, kw = min(2, x.shape[-2]), min(2, x.shape[-1])
    return F.max_pool2d(x, (kh, kw), (kh, kw))


def relative_position_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                rows: torch.Tensor, cols: torch.Tensor, scale: float
                                ) -> torch.Tensor:
    """``softmax(scale * q k^T + P) v`` with ``P[i, j] = rows[i, row(j)] + cols[i, col(j)]``,
    the 2-D relative-position logits of query i and key j on an H x W map.

    q, k, v: ``(N, heads, H*W, d)`` with unit stride in ``d``; rows: ``(N, heads, H*W, H)``;
    cols: ``(N, heads, H*W, W)``; v may be wider or narrower than q (zero-padded to one
    width for the fused kernel). P is formed for a chunk of queries at a time (at most
    ``MASK_CHUNK_ELEMENTS`` elements), never for all of them, and each chunk runs in
    ``scaled_dot_product_attention`` with its chunk of P as the additive mask; a map whose
    whole mask fits in one chunk makes one call.
    """
    n, heads, hw, d = q.shape
    h, w = rows.shape[-1], cols.shape[-1]
    d_v = v.shape[-1]
    if d < d_v:   # the fused kernel needs one width for q, k and v: zero-pad the narrower
        q, k = F.pad(q, (0, d_v - d)), F.pad(k, (0, d_v - d))
    elif d_v < d:
        v = F.pad(v, (0, d - d_v))
    chunk = max(1, MASK_CHUNK_ELEMENTS // max(1, n * heads * hw))
    outs = []
    for start in range(0, hw, chunk):
        stop = min(hw, start + chunk)
        mask = (rows[:, :, start:stop, :, None] + cols[:, :, start:stop, None, :])
        outs.append(F.scaled_dot_product_attention(
            q[:, :, start:stop], k, v, attn_mask=mask.view(n, heads, stop - start, h * w),
            scale=scale))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out[..., :d_v] if d_v < d else out


def attention_any_width(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """``softmax(scale * q k^T) v`` for tokens q ``(N, L, d)``, k ``(N, S, d)``, v
    ``(N, S, d_v)``, in the fused kernel, which needs one width for q, k and v: the
    narrower side is zero-padded to the wider (zeros add nothing to the logits, and
    padded value channels are dropped from the output). Returns ``(N, L, d_v)``."""
    d, d_v = query.shape[-1], value.shape[-1]
    if d < d_v:
        query = F.pad(query, (0, d_v - d))
        key = F.pad(key, (0, d_v - d))
    elif d_v < d:
        value = F.pad(value, (0, d - d_v))
    out = F.scaled_dot_product_attention(query.unsqueeze(1), key.unsqueeze(1),
                                         value.unsqueeze(1), scale=scale).squeeze(1)
    return out[..., :d_v] if d_v < d else out


def tokens_to_nchw(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tokens ``(N, H*W, C)`` as a contiguous NCHW map ``(N, C, H, W)``. The copy runs as
    one 2-D transpose per image: torch's blocked 2-D transpose is 2-3x faster on the CPU
    than the strided copy a 3-D ``transpose(1, 2).contiguous()`` (or an element-wise op
    reading the transposed view) does."""
    n, _, c = tokens.shape
    maps = [t.t().contiguous() for t in tokens]                      # (C, H*W) each
    out = maps[0].unsqueeze(0) if n == 1 else torch.stack(maps)
    return out.view(n, c, height, width)
