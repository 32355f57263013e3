"""Gather-excite channel attention: Gather-Excite (GENet) and effective Squeeze-Excite
(eSE, VoVNetV2)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..attention_maps import record
from ..registry import register_block
from ._layers import reduced_channels
from .base import BlockConfig, Site


class _ExciteMLP(nn.Module):
    """GE-theta+'s excite: 1x1 conv C -> C/r (bias), ReLU, 1x1 conv back (timm's ConvMlp
    names: ``fc1``, ``fc2``)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatherExcite(nn.Module):
    """Gather-Excite (Hu et al., 1810.12348, sec. 3; layout of timm's ``GatherExcite``).

    Gather aggregates context over an ``extent``: the whole map (``extent`` 0) or
    windows of stride ``extent``. Without parameters (GE-theta-minus) it averages (a
    (2e-1)x(2e-1) average pool of stride e); with parameters (GE-theta) it is a stack
    of log2(e) depthwise 3x3 convs of stride 2 with BN (ReLU between them) or, for the
    global extent, one depthwise conv whose kernel is the whole map (BN after). Excite
    (GE-theta+ with ``mlp``) passes the context through SE's bottleneck MLP, upsamples it
    (nearest) to the map and gates the map with a sigmoid.

    ``global_padding``: the global depthwise conv gathers one value per channel
    (``valid``, the paper: its kernel covers the map; another map size is first
    average-pooled to ``size``) or pads to keep the map size (``same``, as timm builds
    it: a position-dependent gate).
    """

    def __init__(self, channels: int, size: tuple[int, int] | None = None, extent: int = 0,
                 extra_params: bool = True, mlp: bool = True, reduction: float = 16,
                 global_padding: str = "valid") -> None:
        super().__init__()
        if extent and (extent < 2 or extent & (extent - 1)):
            raise ValueError(f"extent must be 0 (global) or a power of two >= 2, got {extent}")
        if global_padding not in ("valid", "same"):
            raise ValueError(f"global_padding must be 'valid' or 'same', got {global_padding!r}")
        self.extent = extent
        self.global_padding = global_padding
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.gather: nn.Sequential | None = None
        if extra_params:
            self.gather = nn.Sequential()
            if extent == 0:
                if self.size is None:
                    raise ValueError("gather_excite with parameters and a global extent needs "
                                     "the feature map's (H, W) for its depthwise kernel")
                pad = ((self.size[0] - 1) // 2, (self.size[1] - 1) // 2) if (
                    global_padding == "same") else 0
                self.gather.add_module("conv1", nn.Conv2d(channels, channels, self.size,
                                                          padding=pad, groups=channels,
                                                          bias=False))
                self.gather.add_module("norm1", nn.BatchNorm2d(channels))
            else:
                steps = int(math.log2(extent))
                for i in range(1, steps + 1):
                    self.gather.add_module(f"conv{i}", nn.Conv2d(
                        channels, channels, 3, stride=2, padding=1, groups=channels, bias=False))
                    self.gather.add_module(f"norm{i}", nn.BatchNorm2d(channels))
                    if i != steps:
                        self.gather.add_module(f"act{i}", nn.ReLU(inplace=True))
        self.mlp = _ExciteMLP(channels, reduced_channels(channels, reduction)) if mlp else (
            nn.Identity())

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """The gathered context, (N, C, h, w) with h, w = 1 for the global extent."""
        if self.gather is not None:
            if (self.extent == 0 and self.global_padding == "valid"
                    and tuple(x.shape[-2:]) != self.size):
                x = F.adaptive_avg_pool2d(x, self.size)
            return self.gather(x)
        if self.extent == 0:
            return x.mean((2, 3), keepdim=True)
        k = 2 * self.extent - 1
        return F.avg_pool2d(x, k, stride=self.extent, padding=k // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.mlp(self.context(x))
        if context.shape[-2:] != (1, 1):
            context = F.interpolate(context, size=x.shape[-2:])
        gate = torch.sigmoid(context)
        record(self, "", gate, kind="channel" if gate.shape[-2:] == (1, 1) else "spatial")
        return x * gate

    def extra_repr(self) -> str:
        return f"extent={self.extent}, size={self.size}, global_padding={self.global_padding!r}"


@register_block
class GatherExciteConfig(BlockConfig):
    """Gather-Excite, https://arxiv.org/abs/1810.12348 (default: GE-theta+, global
    extent, as in the paper's best ResNet-50)."""

    type: Literal["gather_excite"]
    extent: int = Field(0, ge=0, le=64, description="Gather extent e: 0 = the whole map (global), "
                        "else a power of two (2, 4, 8; the paper's E2, E4, E8).")
    extra_params: bool = Field(True, description="Parametric gather, depthwise convs "
                               "(GE-theta); False: average pooling (GE-theta-minus).")
    mlp: bool = Field(True, description="Excite through SE's bottleneck MLP (GE-theta+); "
                      "False: a sigmoid of the context itself.")
    reduction: float = Field(16, ge=0.0625, le=1024,
                             description="Reduction ratio r of the excite MLP.")
    global_padding: Literal["valid", "same"] = Field(
        "valid", description="Global extent with parameters: the depthwise kernel covers "
        "the map and gathers one value per channel (valid, the paper), or pads to keep the "
        "map size (same, timm's GatherExcite).")
    size: tuple[Annotated[int, Field(ge=1, le=1024)],
                Annotated[int, Field(ge=1, le=1024)]] | None = Field(
        None, description="(H, W) of the global depthwise kernel; the map's size at the "
        "site (as the builder probes it) when unset.")

    module = GatherExcite

    @field_validator("extent")
    @classmethod
    def _power_of_two(cls, e: int) -> int:
        if e and (e < 2 or e & (e - 1)):
            raise ValueError(f"extent must be 0 (global) or a power of two >= 2, got {e}")
        return e

    def build(self, site: Site) -> nn.Module:
        if site.output_channels != site.channels:
            raise ValueError("gather_excite keeps its channel count")
        kwargs = self.module_kwargs()
        size = kwargs.pop("size") or (tuple(site.size) if site.size and len(site.size) == 2
                                      else None)
        return GatherExcite(site.channels, size=size, **kwargs)


class EffectiveSqueezeExcite(nn.Module):
    """Effective SE (eSE, Lee & Park, CenterMask 1911.06667, VoVNetV2): GAP -> one 1x1
    conv C -> C (bias, no reduction) -> hard sigmoid (or sigmoid) -> scale. The conv is
    named ``fc`` as in timm's ``EffectiveSEModule``."""

    def __init__(self, channels: int, gate: str = "hard_sigmoid") -> None:
        super().__init__()
        if gate not in ("hard_sigmoid", "sigmoid"):
            raise ValueError(f"gate must be 'hard_sigmoid' or 'sigmoid', got {gate!r}")
        self.fc = nn.Conv2d(channels, channels, 1)
        self.gate = nn.Hardsigmoid() if gate == "hard_sigmoid" else nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.gate(self.fc(x.mean((2, 3), keepdim=True)))
        record(self, "", weights, kind="channel")
        return x * weights


@register_block
class EffectiveSEConfig(BlockConfig):
    """Effective Squeeze-and-Excitation (eSE, VoVNetV2), https://arxiv.org/abs/1911.06667"""

    type: Literal["effective_se"]
    gate: Literal["hard_sigmoid", "sigmoid"] = Field(
        "hard_sigmoid", description="Gate: hard sigmoid, relu6(x + 3) / 6 (the paper's "
        "and timm's), or sigmoid.")

    module = EffectiveSqueezeExcite
