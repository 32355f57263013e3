"""Mixed channel-and-spatial attention (CBAM) and 3-D attention (SimAM)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..attention_maps import record
from ..registry import register_block
from ._layers import check_odd, reduced_channels, zero_bn_
from .base import BlockConfig


class CBAMChannelGate(nn.Module):
    """CBAM's channel attention: a shared MLP over avg- and max-pooled features,
    summed, then sigmoid. The MLP's biases start at 0, as the released ResNet
    initialises every bias."""

    def __init__(self, channels: int, reduction: float = 16, mlp_bias: bool = True) -> None:
        super().__init__()
        hidden = reduced_channels(channels, reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=mlp_bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=mlp_bias)
        for fc in (self.fc1, self.fc2):
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        mx = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        w = torch.sigmoid(avg + mx)
        record(self, "", w, kind="channel")
        return x * w


class CBAMSpatialGate(nn.Module):
    """CBAM's spatial attention: channel-max and channel-mean maps -> KxK conv -> BN
    -> sigmoid.

    ``pool_order`` is the order of the two pooled maps on the conv's input channels:
    ``"max_mean"`` as the authors' released code (``ChannelPool``) and checkpoints,
    ``"mean_max"`` as the paper's eq. 3 writes it and timm's ``CbamModule`` has it.
    The BN has the released code's momentum (0.01) and starts with weight and bias 0,
    as the released ResNet initialises it, so the gate starts at sigmoid(0) = 0.5.
    """

    def __init__(self, kernel_size: int = 7, pool_order: str = "max_mean",
                 bn_momentum: float = 0.01) -> None:
        super().__init__()
        if pool_order not in ("max_mean", "mean_max"):
            raise ValueError(f"pool_order must be 'max_mean' or 'mean_max', got {pool_order!r}")
        self.pool_order = pool_order
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=bn_momentum)
        zero_bn_(self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, mx = x.mean(1, keepdim=True), x.amax(1, keepdim=True)
        pooled = torch.cat([mx, mean] if self.pool_order == "max_mean" else [mean, mx], dim=1)
        w = torch.sigmoid(self.bn(self.conv(pooled)))
        record(self, "", w)
        return x * w

    def extra_repr(self) -> str:
        return f"pool_order={self.pool_order!r}"


class CBAM(nn.Module):
    """CBAM (Woo et al., 1807.06521): channel attention, then spatial attention."""

    def __init__(self, channels: int, reduction: float = 16, spatial_kernel: int = 7,
                 mlp_bias: bool = True, pool_order: str = "max_mean",
                 spatial_bn_momentum: float = 0.01) -> None:
        super().__init__()
        self.channel = CBAMChannelGate(channels, reduction, mlp_bias)
        self.spatial = CBAMSpatialGate(spatial_kernel, pool_order, spatial_bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


@register_block
class CBAMConfig(BlockConfig):
    """Convolutional Block Attention Module, https://arxiv.org/abs/1807.06521"""

    type: Literal["cbam"]
    reduction: float = Field(16, ge=0.0625, le=1024,
                             description="Reduction ratio r of the channel MLP.")
    spatial_kernel: int = Field(7, ge=1, le=31, description="Odd kernel size of the spatial conv.")
    mlp_bias: bool = Field(True, description="Biases in the channel MLP (the paper's "
                           "reference code has them; timm's CbamModule does not).")
    pool_order: Literal["max_mean", "mean_max"] = Field(
        "max_mean", description="Order of the channel-pooled maps fed to the spatial conv: "
        "(max, mean) as the authors' released code and checkpoints, or (mean, max) as the "
        "paper's eq. 3 writes it (and timm's CbamModule).")
    spatial_bn_momentum: float = Field(0.01, gt=0, le=1, description="Momentum of the "
                                       "spatial gate's BatchNorm (0.01 in the released code).")

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
        w = torch.sigmoid(d2 / (4 * (var + self.e_lambda)) + 0.5)  # sigmoid(1 / e*)
        record(self, "", w)
        return x * w

    def extra_repr(self) -> str:
        return f"e_lambda={self.e_lambda}"


@register_block
class SimAMConfig(BlockConfig):
    """SimAM, a parameter-free attention module, https://proceedings.mlr.press/v139/yang21o.html"""

    type: Literal["simam"]
    e_lambda: float = Field(1e-4, gt=0, le=10,
                            description="Regulariser lambda of the energy function.")

    module = SimAM
