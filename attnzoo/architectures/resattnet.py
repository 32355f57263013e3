"""Residual Attention Network (Wang et al., CVPR 2017, https://arxiv.org/abs/1704.06904).

An attention module has a trunk branch T (``t`` residual units) and a soft mask
branch M: an hourglass that max-pools down to the lowest resolution of the
network (7x7 at 224 input) and interpolates back up, with a residual unit as
the skip connection at every intermediate resolution, then BN-ReLU-1x1 conv
twice and a sigmoid. The output is attention residual learning,
``H = (1 + M) * T``, framed by ``p`` pre- and post-processing residual units.
``r`` residual units sit between adjacent poolings (2r at the bottom).

The layout (pre-activation bottleneck units, mask fed by the pre-processing
unit, skip units, the mask's two BN-ReLU-1x1 layers, no extra sums) follows the
authors' released Attention-56 deploy prototxt. Attention-56 has one module per
stage in stages 1-3, Attention-92 has 1/2/3; both end with three plain units at
7x7, a final BN-ReLU, global average pooling and the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..attention_maps import record
from ..blocks._layers import ConvBNReLU, resize
from ..blocks.base import BlockConfig, Site
from ..errors import SpecError
from ..registry import register_architecture, register_block
from ..validation import parse_block
from ._common import ClassifierMixin, init_weights_

STAGE_CHANNELS = (256, 512, 1024, 2048)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck unit (He et al., 1603.05027), the Residual Unit of
    the paper: BN-ReLU-1x1, BN-ReLU-3x3 (stride), BN-ReLU-1x1 to ``out_channels``;
    the bottleneck width is ``out_channels / 4``. A 1x1 projection of the
    activated input is the shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int | None = None, stride: int = 1
                 ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        mid = out_channels // 4
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.projects = stride != 1 or in_channels != out_channels
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
                         if self.projects else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act(self.bn1(x))
        shortcut = self.shortcut(pre) if self.projects else x
        out = self.conv1(pre)
        out = self.conv2(self.act(self.bn2(out)))
        out = self.conv3(self.act(self.bn3(out)))
        return out + shortcut


def residual_units(channels: int, n: int) -> nn.Sequential:
    """``n`` shape-keeping pre-activation bottleneck units (an empty Sequential is the
    identity)."""
    return nn.Sequential(*(PreActBottleneck(channels) for _ in range(n)))


class SoftMaskBranch(nn.Module):
    """The bottom-up top-down mask: ``depth`` max-poolings (3x3, stride 2), each
    followed by ``r`` units; ``r`` more units at the bottom; on the way up, bilinear
    upsampling plus a skip unit on the same-resolution down feature, then ``r``
    units; a last upsampling to the input size; BN-ReLU-1x1, BN-ReLU-1x1, sigmoid.
    Upsampling is bilinear with align_corners=True, as the Caffe ``Interp`` layer of
    the reference model.
    ``depth=0`` keeps the input resolution (2r units, no pooling)."""

    def __init__(self, channels: int, depth: int, r: int = 1) -> None:
        super().__init__()
        self.depth = depth
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1), *residual_units(channels, r))
            for _ in range(depth)
        )
        self.bottom = residual_units(channels, r if depth else 2 * r)
        self.skips = nn.ModuleList(PreActBottleneck(channels) for _ in range(depth - 1))
        self.up = nn.ModuleList(residual_units(channels, r) for _ in range(depth - 1))
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        downs = []
        y = x
        for down in self.down:
            y = down(y)
            downs.append(y)
        y = self.bottom(y)
        for i in range(self.depth - 2, -1, -1):      # from the deepest skip upwards
            y = resize(y, downs[i].shape[-2:], align_corners=True) + self.skips[i](downs[i])
            y = self.up[i](y)
        if self.depth:
            y = resize(y, x.shape[-2:], align_corners=True)
        return torch.sigmoid(self.head(y))


class ResidualAttentionModule(nn.Module):
    """One attention module: ``p`` units, then trunk T (``t`` units) and soft mask M
    (``SoftMaskBranch`` of ``depth`` poolings) on the same input, ``(1 + M) * T``,
    then ``p`` units. Keeps the channels and the spatial size."""

    def __init__(self, channels: int, p: int = 1, t: int = 2, r: int = 1, depth: int = 1
                 ) -> None:
        super().__init__()
        self.pre = residual_units(channels, p)
        self.trunk = residual_units(channels, t)
        self.mask = SoftMaskBranch(channels, depth, r)
        self.post = residual_units(channels, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        trunk = self.trunk(x)
        mask = self.mask(x)
        record(self, "", mask)
        return self.post((1 + mask) * trunk)


def _halved(size: int, stride: int = 2) -> int:
    # every downsampling layer here (7x7/2 pad 3, 3x3/2 pad 1 conv and pool) gives ceil(n/2)
    return -(-size // stride)


def mask_depth(size: Sequence[int], min_size: int = 7) -> int:
    """Poolings (each to ceil(n/2)) that keep the smaller side at least ``min_size``:
    3 at 56x56, 2 at 28x28, 1 at 14x14, 0 at 7x7 (the paper at 224 input, down to 7x7)."""
    side, depth = min(size), 0
    while _halved(side) >= min_size:
        side, depth = _halved(side), depth + 1
    return depth


@register_block
class ResidualAttentionConfig(BlockConfig):
    """Residual Attention Network's attention module, https://arxiv.org/abs/1704.06904"""

    type: Literal["residual_attention"]
    p: int = Field(1, ge=0, le=8, description="Pre-processing units before the split (and "
                   "post-processing units after the fusion).")
    t: int = Field(2, ge=0, le=8, description="Residual units in the trunk branch.")
    r: int = Field(1, ge=1, le=8,
                   description="Residual units between adjacent poolings of the mask "
                   "branch (2r at its lowest resolution).")
    depth: int | None = Field(
        None, ge=0, le=8,
        description="Max-poolings in the soft mask branch; unset: as many as keep "
        "the map at least `min_size` (3/2/1 at 56/28/14, as the paper at 224 input).")
    min_size: int = Field(7, ge=1, le=1024,
                          description="Lowest mask resolution when `depth` is unset.")

    module = ResidualAttentionModule

    def build(self, site: Site) -> nn.Module:
        if site.output_channels != site.channels:
            raise ValueError(f"residual_attention keeps its channel count and cannot map "
                             f"{site.channels} to {site.output_channels} channels")
        if site.channels < 4:
            raise ValueError(f"residual_attention's bottleneck units need at least 4 channels "
                             f"(width C/4), got {site.channels}")
        depth = self.depth
        if depth is None:
            if not site.size:
                raise ValueError("residual_attention needs the spatial size of its site to "
                                 "choose the mask depth; give `depth`")
            depth = mask_depth(site.size, self.min_size)
        return ResidualAttentionModule(site.channels, p=self.p, t=self.t, r=self.r, depth=depth)


class ResidualAttentionNet(ClassifierMixin, nn.Module):
    """Residual Attention Network for ImageNet (Table 2 of the paper).

    Stem: 7x7/2 conv 64, BN, ReLU, 3x3/2 max-pool. ``stages.<i>`` (i = 0..3, at
    56/28/14/7 for 224 input): a residual unit to 256/512/1024/2048 channels
    (stride 2 from stage 1 on), then ``attention_modules[i]`` attention modules (stages 0-2)
    or 2 more units (stage 3). Then BN-ReLU, global average pooling, FC.
    """

    arch_name = "resattnet"

    def __init__(self, attention_modules: Sequence[int] = (1, 1, 1), attention: Any = None,
                 num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if len(attention_modules) != 3:
            raise SpecError("resattnet: `attention_modules` counts the attention modules of "
                            f"stages 1-3 (three numbers), got {list(attention_modules)}")
        config = parse_block(attention if attention is not None
                             else {"type": "residual_attention"},
                             where="backbone.args.attention")
        self.num_classes = num_classes
        self.num_features = STAGE_CHANNELS[-1]
        self.drop_rate = drop_rate
        self.stem = nn.Sequential(*ConvBNReLU(in_chans, 64, 7, stride=2),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        size = _halved(_halved(img_size))
        in_ch = 64
        stages = []
        for i, out_ch in enumerate(STAGE_CHANNELS):
            stride = 1 if i == 0 else 2
            size = _halved(size, stride)
            blocks: list[nn.Module] = [PreActBottleneck(in_ch, out_ch, stride)]
            if i < 3:
                site = Site(channels=out_ch, size=(size, size))
                blocks += [config.build(site) for _ in range(attention_modules[i])]
            else:
                blocks += [PreActBottleneck(out_ch) for _ in range(2)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Sequential(nn.BatchNorm2d(self.num_features), nn.ReLU(inplace=True))
        self.fc = self._classifier(num_classes)
        self.pretrained_cfg = {
            "input_size": (in_chans, img_size, img_size), "pool_size": (size, size),
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "interpolation": "bilinear", "crop_pct": 0.875, "num_classes": num_classes,
            "first_conv": "stem.0", "classifier": "fc",
        }
        init_weights_(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_architecture("resattnet")
def resattnet(attention_modules: Sequence[int] = (1, 1, 1),
              attention: dict[str, Any] | None = None, num_classes: int = 1000,
              in_chans: int = 3, img_size: int = 224, drop_rate: float = 0.0
              ) -> ResidualAttentionNet:
    """Residual Attention Network: ``attention_modules`` = attention modules in stages 1-3
    ((1, 1, 1) = Attention-56, (1, 2, 3) = Attention-92); ``attention`` = the block
    config of the module (default ``{type: residual_attention}``, p=1, t=2, r=1)."""
    return ResidualAttentionNet(attention_modules, attention, num_classes, in_chans, img_size,
                                drop_rate)
