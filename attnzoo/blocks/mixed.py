"""Mixed channel-and-spatial attention (CBAM) and 3-D attention (SimAM)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..registry import register_block
from ._layers import check_odd, reduced_channels
from .base import BlockConfig


class CBAMChannelGate(nn.Module):
    """CBAM's channel attention: a shared MLP over avg- and max-pooled features,
    summed, then sigmoid."""

    def __init__(self, channels: int, reduction: float = 16, mlp_bias: bool = True) -> None:
        super().__init__()
        hidden = reduced_channels(channels, reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=mlp_bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        mx = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * torch.sigmoid(avg + mx)


class CBAMSpatialGate(nn.Module):
    """CBAM's spatial attention: channel-mean and channel-max maps -> KxK conv -> BN
    -> sigmoid."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


class CBAM(nn.Module):
    """CBAM (Woo et al., 1807.06521): channel attention, then spatial attention."""

    def __init__(self, channels: int, reduction: float = 16, spatial_kernel: int = 7,
                 mlp_bias: bool = True) -> None:
        super().__init__()
        self.channel = CBAMChannelGate(channels, reduction, mlp_bias)
        self.spatial = CBAMSpatialGate(spatial_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


@register_block
class CBAMConfig(BlockConfig):
    """Convolutional Block Attention Module, https://arxiv.org/abs/1807.06521"""

    type: Literal["cbam"]
    reduction: float = Field(16, gt=0, description="Reduction ratio r of the channel MLP.")
    spatial_kernel: int = Field(7, ge=1, description="Odd kernel size of the spatial conv.")
    mlp_bias: bool = Field(True, description="Biases in the channel MLP (the paper's "
                           "reference code has them; timm's CbamModule does not).")

    @field_validator("spatial_kernel")
    @classmethod
    def _odd(cls, k: int) -> int:
        return check_odd(k, "spatial_kernel")

    module = CBAM


class SimAM(nn.Module):
    """SimAM (Yang et al., ICML 2021): parameter-free 3-D attention from the closed-form
    minimal energy of each neuron: x * sigmoid((x - mu)^2 / (4 (var + lambda)) + 1/2),
    with mean and variance over each channel's H*W positions (variance over n - 1)."""

    def __init__(self, channels: int | None = None, e_lambda: float = 1e-4) -> None:
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[2] * x.shape[3] - 1
        d2 = (x - x.mean((2, 3), keepdim=True)).pow(2)
        var = d2.sum((2, 3), keepdim=True) / max(n, 1)
        return x * torch.sigmoid(d2 / (4 * (var + self.e_lambda)) + 0.5)

    def extra_repr(self) -> str:
        return f"e_lambda={self.e_lambda}"


@register_block
class SimAMConfig(BlockConfig):
    """SimAM, a parameter-free attention module, https://proceedings.mlr.press/v139/yang21o.html"""

    type: Literal["simam"]
    e_lambda: float = Field(1e-4, gt=0, description="Regulariser lambda of the energy function.")

    module = SimAM
