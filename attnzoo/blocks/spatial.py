"""Spatial attention: where to look (Spatial Transformer, reverse attention, ...)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..attention_maps import record
from ..registry import register_block
from ._layers import check_odd, resize
from .base import BlockConfig, Site

# --- stn: Spatial Transformer Networks (Jaderberg et al., 1506.02025) -------------------


class SpatialTransformer(nn.Module):
    """Spatial Transformer (1506.02025): a localisation net regresses an affine theta
    (2x3) from the input, ``affine_grid`` turns it into a sampling grid of the input's
    size, and ``grid_sample`` resamples the input with it (bilinear, zeros outside).

    The localisation net is the paper's SVHN one (two 5x5 convs with 32 filters, each
    followed by 2x2 max-pooling and ReLU, then two fully connected layers of 32 units and
    the 6-unit regression layer). As in the paper, it sees the input itself, so its
    first fully connected layer is sized for ``input_size`` (H, W). With
    ``loc_resolution`` set, it sees the input resized to that side instead (an attnzoo
    option, neither the paper's nor the common implementations'): it then works at any
    input size and costs the same at 224 as at 64. The regression layer starts at zero
    weight and the identity bias, so at initialisation the block returns its input
    unchanged.
    """

    def __init__(self, channels: int, loc_resolution: int | None = None,
                 hidden_channels: int = 32, kernel_size: int = 5, fc_units: int = 32,
                 input_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if loc_resolution is None and input_size is None:
            raise ValueError("stn without loc_resolution sizes its localisation net for the "
                             "input's (H, W): give input_size (the site's size)")
        self.loc_resolution = loc_resolution
        side_h, side_w = ((loc_resolution, loc_resolution) if loc_resolution
                          else (int(input_size[0]), int(input_size[1])))
        self.input_size = None if loc_resolution else (side_h, side_w)
        if side_h // 4 < 1 or side_w // 4 < 1:
            raise ValueError(f"the localisation net pools twice by 2 and needs a map of at "
                             f"least 4x4, got {side_h}x{side_w}")
        pad = kernel_size // 2
        self.features = nn.Sequential(
            nn.Conv2d(channels, hidden_channels, kernel_size, padding=pad),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size, padding=pad),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(hidden_channels * (side_h // 4) * (side_w // 4), fc_units),
            nn.ReLU(inplace=True),
            nn.Linear(fc_units, fc_units),
            nn.ReLU(inplace=True),
        )
        self.theta = nn.Linear(fc_units, 6)
        self.reset_identity_()

    def reset_identity_(self) -> None:
        """Make the regression layer output the identity transform for every input."""
        nn.init.zeros_(self.theta.weight)
        with torch.no_grad():
            self.theta.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def affine(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, 2, 3) affine transforms the localisation net predicts for ``x``."""
        if self.loc_resolution:
            x = resize(x, (self.loc_resolution, self.loc_resolution))
        elif tuple(x.shape[-2:]) != self.input_size:
            h, w = self.input_size
            raise ValueError(
                f"stn: its localisation net is sized for {h}x{w} maps (the site's size when "
                f"built) and got {x.shape[-2]}x{x.shape[-1]}; build the model for this "
                "input size (spec input_size), or set loc_resolution to take any size")
        return self.theta(self.fc(self.features(x))).view(-1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.affine(x)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        record(self, "theta", theta, kind="other")
        record(self, "grid", grid, kind="other")
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)

    def extra_repr(self) -> str:
        if self.loc_resolution:
            return f"loc_resolution={self.loc_resolution}"
        return f"input_size={self.input_size}"


@register_block
class STNConfig(BlockConfig):
    """Spatial Transformer, https://arxiv.org/abs/1506.02025"""

    type: Literal["stn"]
    loc_resolution: int | None = Field(
        None, ge=4, le=1024, multiple_of=4, description="Side the input is resized to before the "
        "localisation net, which keeps its cost fixed and lets it take any input size (an "
        "attnzoo option). Unset: the localisation net sees the input as it is and is sized "
        "for the site's (H, W), as in the paper and the common implementations.")
    hidden_channels: int = Field(32, ge=1, le=4096,
                                 description="Filters of the localisation convs.")
    kernel_size: int = Field(5, ge=1, le=31, description="Kernel of the localisation convs.")
    fc_units: int = Field(32, ge=1, le=4096, description="Units of the two fully connected layers.")

    module = SpatialTransformer

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, k: int) -> int:
        return check_odd(k)

    def build(self, site: Site) -> nn.Module:
        if site.output_channels != site.channels:
            raise ValueError("stn keeps its channel count")
        size = tuple(site.size) if site.size and len(site.size) == 2 else None
        return SpatialTransformer(site.channels, input_size=size, **self.module_kwargs())


# --- reverse: Reverse Attention (RAS, Chen et al., 1807.09940) -------------------------


class ReverseAttention(nn.Module):
    """Reverse attention side-output unit of RAS (1807.09940).

    ``forward(features, coarse)`` takes a side feature map and the coarser (deeper)
    saliency logits, upsamples the logits to the side's size, weights every channel of
    the features by ``1 - sigmoid(logits)`` (attention on what is *not yet* found), runs
    1x1 conv -> ``num_convs`` x (3x3 conv, ReLU) -> 3x3 conv to one channel, and adds the
    result to the upsampled logits: the side output learns the residual.

    It takes two inputs, so it lives in architectures with side outputs (``ras``);
    it cannot be inserted after a single module of a plain backbone.
    """

    def __init__(self, channels: int, hidden_channels: int = 64, num_convs: int = 2,
                 kernel_size: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, hidden_channels, 1)]
        for _ in range(num_convs):
            layers += [nn.Conv2d(hidden_channels, hidden_channels, kernel_size,
                                 padding=kernel_size // 2), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(hidden_channels, 1, kernel_size, padding=kernel_size // 2))
        self.residual = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        coarse = resize(coarse, features.shape[-2:])
        reverse_weight = 1.0 - torch.sigmoid(coarse)
        record(self, "", reverse_weight)
        return coarse + self.residual(features * reverse_weight)


@register_block
class ReverseConfig(BlockConfig):
    """Reverse attention (RAS), https://arxiv.org/abs/1807.09940"""

    type: Literal["reverse"]
    hidden_channels: int = Field(64, ge=1, le=4096, description="Width of the side-output convs.")
    num_convs: int = Field(2, ge=0, le=16, description="3x3 conv + ReLU layers between the 1x1 "
                           "conv and the output conv (2 in the paper; 3 in its ResNet port).")
    kernel_size: int = Field(3, ge=1, le=31, description="Kernel of the side-output convs (odd).")

    module = ReverseAttention

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, k: int) -> int:
        return check_odd(k)
