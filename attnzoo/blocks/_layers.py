"""Building pieces shared by the block families and the architectures.

Nothing here is a registered block: these are the layers and helpers that several
blocks or networks are made of (conv-BN-ReLU, resizing, token reshapes, widths).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# --- widths and kernels ----------------------------------------------------------------


def reduced_channels(channels: int, reduction: float, min_channels: int = 1, divisor: int = 1
                     ) -> int:
    """``channels / reduction``, at least ``min_channels``, rounded to a multiple of
    ``divisor`` (1 = the papers' plain C/r)."""
    value = max(min_channels, int(channels / reduction))
    if divisor > 1:
        value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return value


def check_odd(k: int, field: str = "kernel_size", purpose: str = "keep the map size") -> int:
    """``k`` if it is odd, else ValueError "<field> must be odd to <purpose>, got k" (for
    the kernel-size validators of block configs)."""
    if k % 2 == 0:
        raise ValueError(f"{field} must be odd to {purpose}, got {k}")
    return k


# --- conv-BN-ReLU ----------------------------------------------------------------------
# Two layouts of the same layers, because state-dict keys differ: ``ConvBNReLU`` is a
# Sequential (keys ``0.weight``, ``1.running_mean``), ``ConvBnAct`` names its parts
# (``conv.weight``, ``bn.running_mean``). Each keeps the keys of the modules it replaced.


class ConvBNReLU(nn.Sequential):
    """KxK conv (no bias, 'same' padding) -> BN -> ReLU (the ReLU is optional), as a
    Sequential: children ``0`` (conv), ``1`` (BN), ``2`` (ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, relu: bool = True, groups: int = 1) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                      padding=kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ConvBnAct(nn.Module):
    """KxK conv ('same' padding for its dilation; no bias unless ``bias``) -> BN ->
    activation (ReLU unless ``act`` gives another module), with named children
    ``conv``, ``bn``, ``act``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, dilation: int = 1, groups: int = 1, bias: bool = False,
                 act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=dilation * (kernel_size - 1) // 2, dilation=dilation,
                              groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = act if act is not None else nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def zero_bn_(norm: nn.BatchNorm2d) -> None:
    """Zero a BN's weight and bias, so that it outputs 0 (a residual branch ending in it
    starts as the identity)."""
    nn.init.zeros_(norm.weight)
    nn.init.zeros_(norm.bias)


# --- resizing --------------------------------------------------------------------------

_NO_CORNERS = ("nearest", "nearest-exact", "area")


def resize(x: torch.Tensor, size: Any, mode: str = "bilinear",
           align_corners: bool | None = False) -> torch.Tensor:
    """``F.interpolate`` of a feature map or logits to ``size`` (H, W). ``align_corners``
    is dropped for the modes that take none (nearest, area)."""
    if mode in _NO_CORNERS:
        align_corners = None
    return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)


# --- tokens ----------------------------------------------------------------------------


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W, C): one row per position; a (B, N, C) sequence is
    returned as it is."""
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    if x.dim() != 3:
        raise ValueError(f"expected a (B, N, C) sequence or an (N, C, H, W) map, "
                         f"got shape {tuple(x.shape)}")
    return x


def to_feature_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, H*W, C) -> (N, C, H, W), the inverse of ``to_tokens`` on a map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], height, width)


def like_input(tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Tokens (N, H*W, C') back to the layout of ``x``: a map (N, C', H, W) if ``x`` was
    one, else the tokens unchanged."""
    if x.dim() == 4:
        return to_feature_map(tokens, *x.shape[-2:])
    return tokens
