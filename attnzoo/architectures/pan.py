"""Pyramid Attention Network (Li et al., BMVC 2018, https://arxiv.org/abs/1805.10180).

A ResNet (timm ``features_only``, output stride 16: res5 dilated with rate 2 as in
the paper) feeds the Feature Pyramid Attention module (FPA) on its last stage; three
Global Attention Upsample modules (GAU) then decode with res4, res3 and res2, and a
1x1 classifier gives logits that are upsampled to the input size.

FPA and GAU are registered block types (``fpa``, ``gau``) and spec fields of the
architecture (``backbone.args.fpa`` / ``backbone.args.gau``).

The FPA's pyramid downsamples by 2x2 pooling before each level's conv, as the paper
has it (its ablation compares average and max pooling; average pooling, with the 7/5/3
kernels and the global pooling branch, is its FPA). Choices where the paper is silent
(it has no reference code): the pyramid is one channel wide (a pixel-level attention
map broadcast over the channels), pooling rounds up (``ceil_mode``: a 1x1 map stays
1x1, even sizes are unchanged), the levels are merged by bilinear upsampling and
addition, and the decoder is 256 channels wide.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import timm
import torch
from pydantic import Field
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..attention_maps import record
from ..blocks._layers import ConvBNReLU, resize
from ..blocks.base import BlockConfig, Site
from ..errors import SpecError
from ..registry import register_architecture, register_block
from ._common import build_arch_block, feature_size

# --- fpa: Feature Pyramid Attention --------------------------------------------------------


class FeaturePyramidAttention(nn.Module):
    """FPA: ``master(x) * pyramid(x) + global(x)``.

    * master: 1x1 conv-BN-ReLU, ``channels`` -> ``out_channels``;
    * pyramid: a U-shape over three scales. Down: 2x2 pooling (``downsample``: average
      or max, the paper's two choices; ``"conv"`` makes the conv itself stride 2
      instead), then a 7x7, 5x5, 3x3 conv-BN-ReLU to ``pyramid_channels`` (1: a
      pixel-level attention map). At each scale a second conv of the same kernel
      refines the map; going up, the coarser map is bilinearly upsampled and added, up
      to the input size;
    * global: global average pooling -> 1x1 conv-BN-ReLU, broadcast over the map.
    """

    def __init__(self, channels: int, out_channels: int | None = None,
                 pyramid_channels: int = 1, kernels: tuple[int, ...] = (7, 5, 3),
                 downsample: str = "avg") -> None:
        super().__init__()
        out = out_channels or channels
        if pyramid_channels not in (1, out):
            raise ValueError(f"pyramid_channels must be 1 or out_channels ({out}), "
                             f"got {pyramid_channels}")
        pools = {"avg": nn.AvgPool2d(2, ceil_mode=True), "max": nn.MaxPool2d(2, ceil_mode=True),
                 "conv": nn.Identity()}
        if downsample not in pools:
            raise ValueError(f"downsample must be one of {', '.join(pools)}, got {downsample!r}")
        self.downsample = downsample
        self.pool = pools[downsample]
        self.master = ConvBNReLU(channels, out, 1)
        self.global_branch = ConvBNReLU(channels, out, 1)
        widths = [channels] + [pyramid_channels] * len(kernels)
        stride = 2 if downsample == "conv" else 1
        self.down = nn.ModuleList(
            ConvBNReLU(widths[i], pyramid_channels, k, stride=stride)
            for i, k in enumerate(kernels))
        self.lateral = nn.ModuleList(
            ConvBNReLU(pyramid_channels, pyramid_channels, k) for k in kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = []
        y = x
        for down, lateral in zip(self.down, self.lateral, strict=True):
            y = down(self.pool(y))
            levels.append(lateral(y))
        attention = levels[-1]
        for level in reversed(levels[:-1]):
            attention = level + resize(attention, level.shape[-2:])
        attention = resize(attention, x.shape[-2:])
        record(self, "", attention)
        context = self.global_branch(x.mean((2, 3), keepdim=True))
        return self.master(x) * attention + context


@register_block
class FPAConfig(BlockConfig):
    """Feature Pyramid Attention (PAN), https://arxiv.org/abs/1805.10180"""

    type: Literal["fpa"]
    pyramid_channels: int = Field(1, ge=1, le=4096, description="Width of the pyramid: 1 = a "
                                  "pixel-level attention map, or the output width.")
    kernels: tuple[Annotated[int, Field(ge=1, le=31)], ...] = Field(
        (7, 5, 3), min_length=1, max_length=8, description="Kernel of each pyramid level, "
        "finest first (the paper: 7, 5, 3).")
    downsample: Literal["avg", "max", "conv"] = Field(
        "avg", description="How each pyramid level halves the map: 2x2 average pooling "
        "(the paper's FPA), 2x2 max pooling (the other pooling of its ablation), or a "
        "stride-2 conv (attnzoo's earlier reading).")

    module = FeaturePyramidAttention

    def build(self, site: Site) -> nn.Module:
        return FeaturePyramidAttention(site.channels, site.output_channels,
                                       **self.module_kwargs())


# --- gau: Global Attention Upsample ---------------------------------------------------------


class GlobalAttentionUpsample(nn.Module):
    """GAU: ``conv3x3(low) * gate(GAP(high)) + upsample(high)``.

    The low-level map goes through a 3x3 conv-BN-ReLU to the high level's width
    (``out_channels``); the high level's global context (GAP -> 1x1 conv -> BN -> ReLU,
    as the paper writes it) weights its channels; the high level, bilinearly upsampled,
    is added. ``channels`` is the low level's width.
    """

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out = out_channels or channels
        self.low = ConvBNReLU(channels, out, 3)
        self.gate = ConvBNReLU(out, out, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        weights = self.gate(high.mean((2, 3), keepdim=True))
        record(self, "", weights, kind="channel")
        return self.low(low) * weights + resize(high, low.shape[-2:])


@register_block
class GAUConfig(BlockConfig):
    """Global Attention Upsample (PAN), https://arxiv.org/abs/1805.10180. Two inputs
    (low, high): used by the ``pan`` architecture."""

    type: Literal["gau"]

    module = GlobalAttentionUpsample

    def build(self, site: Site) -> nn.Module:
        return GlobalAttentionUpsample(site.channels, site.output_channels)


# --- the network ----------------------------------------------------------------------


class PyramidAttentionNetwork(nn.Module):
    """PAN. ``forward`` returns logits (N, classes, H, W) at the input size in both
    modes: the paper trains it with the single per-pixel loss, no auxiliary head."""

    def __init__(self, num_classes: int = 21, backbone: str = "resnet50", in_chans: int = 3,
                 output_stride: int = 16, decoder_channels: int = 256, fpa: Any = None,
                 gau: Any = None, input_size: tuple[int, int, int] = (3, 512, 512)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.encoder = timm.create_model(backbone, pretrained=False, features_only=True,
                                         out_indices=(1, 2, 3, 4), in_chans=in_chans,
                                         output_stride=output_stride)
        c2, c3, c4, c5 = self.encoder.feature_info.channels()
        s2, s3, s4, s5 = self.encoder.feature_info.reduction()
        d = decoder_channels
        self.fpa = build_arch_block(fpa if fpa is not None else {"type": "fpa"},
                                    "backbone.args.fpa",
                                    Site(channels=c5, out_channels=d,
                                         size=feature_size(input_size, s5)))
        gau = gau if gau is not None else {"type": "gau"}
        self.gau4, self.gau3, self.gau2 = (
            build_arch_block(gau, "backbone.args.gau",
                             Site(channels=c, out_channels=d, size=feature_size(input_size, s)))
            for c, s in ((c4, s4), (c3, s3), (c2, s2)))
        for module in (self.gau4, self.gau3, self.gau2):
            if not isinstance(module, GlobalAttentionUpsample):
                raise SpecError("backbone.args.gau: the decoder needs a two-input "
                                f"upsampling block (type gau), got {type(module).__name__}")
        self.classifier = nn.Conv2d(d, num_classes, 1)
        self.pretrained_cfg = {
            "input_size": tuple(input_size), "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "num_classes": num_classes,
            "first_conv": "encoder.conv1", "classifier": "classifier",
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res2, res3, res4, res5 = self.encoder(x)
        y = self.fpa(res5)
        y = self.gau4(res4, y)
        y = self.gau3(res3, y)
        y = self.gau2(res2, y)
        return resize(self.classifier(y), x.shape[-2:])


@register_architecture("pan", timm_backbone=("encoder", "backbone"))
def pan(num_classes: int = 21, backbone: str = "resnet50", in_chans: int = 3,
        output_stride: int = 16, decoder_channels: int = 256,
        fpa: dict[str, Any] | None = None, gau: dict[str, Any] | None = None
        ) -> PyramidAttentionNetwork:
    """PAN on a timm ResNet. ``num_classes`` 21 (PASCAL VOC); ``output_stride`` 16 (the
    paper) or 32; ``fpa``/``gau``: block configs (default the paper's)."""
    if not timm.is_model(backbone):
        raise SpecError(f"backbone.args.backbone: timm has no model {backbone!r}")
    if output_stride not in (8, 16, 32):
        raise SpecError(f"backbone.args.output_stride must be 8, 16 or 32, got {output_stride}")
    return PyramidAttentionNetwork(num_classes=num_classes, backbone=backbone,
                                   in_chans=in_chans, output_stride=output_stride,
                                   decoder_channels=decoder_channels, fpa=fpa, gau=gau)
