"""STDC networks (Fan et al., CVPR 2021, "Rethinking BiSeNet For Real-time Semantic
Segmentation", https://arxiv.org/abs/2104.13188).

The Short-Term Dense Concatenate (STDC) module runs 4 conv-BN-ReLU blocks in a chain,
a 1x1 to ``out/2`` channels then 3x3 convs to ``out/4``, ``out/8``, ``out/8``, and
concatenates all their outputs (``out`` channels). The stride-2 module downsamples
the chain after the first block with a 3x3 depthwise stride-2 conv + BN and
average-pools (3x3/2) the first block's output on its way to the concatenation
(the authors' released code, whose ImageNet numbers the paper reports).

STDC1/STDC2 (ImageNet): two stride-2 conv-BN-ReLU (32, 64 channels), then stages of
(2, 2, 2) / (4, 5, 3) STDC modules to 256/512/1024 channels at strides 8/16/32, a
1x1 conv-BN-ReLU to 1024, global average pooling, FC 1024, ReLU, dropout, FC.

STDC-Seg: the STDC backbone replaces BiSeNet's spatial path (its 1/8 features go to
the FFM); the context path refines the 1/32 and 1/16 features with ARMs and a
global-pool tail; a detail head on the 1/8 features is supervised, in training, by
the detail aggregation target (``detail_target``, Laplacian edges of the labels at
strides 1/2/4) with binary cross-entropy plus dice loss (``detail_loss``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..blocks._layers import ConvBNReLU, resize
from ..blocks.base import BlockConfig, Site
from ..errors import SpecError
from ..registry import register_architecture, register_block
from ._common import (
    ClassifierMixin,
    SegmentationHead,
    build_arch_block,
    feature_size,
    init_weights_,
)
from .bisenet import ContextRefinement

VARIANTS = {"stdc1": (2, 2, 2), "stdc2": (4, 5, 3)}


def stdc_widths(out_channels: int, num_convs: int) -> list[int]:
    """Output widths of the blocks of an STDC module: halving from ``out/2``, the
    last block as wide as the one before, so that they sum to ``out_channels``
    (4 blocks: out/2, out/4, out/8, out/8)."""
    widths = [out_channels // 2 ** (i + 1) for i in range(num_convs - 1)]
    return widths + [widths[-1]]


class STDCModule(nn.Module):
    """Short-Term Dense Concatenate module: ``num_convs`` conv-BN-ReLU blocks in a
    chain (1x1 first, then 3x3), all outputs concatenated. With ``stride=2`` a
    depthwise 3x3/2 conv + BN downsamples the chain after block 1, and block 1's
    own output is average-pooled (3x3/2) before the concatenation."""

    def __init__(self, channels: int, out_channels: int | None = None, stride: int = 1,
                 num_convs: int = 4) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if num_convs < 2 or out_channels % 2 ** (num_convs - 1):
            raise ValueError(f"an STDC module of {num_convs} convs needs at least 2 convs and "
                             f"out channels divisible by {2 ** (num_convs - 1)}, got "
                             f"{out_channels}")
        if stride not in (1, 2):
            raise ValueError(f"an STDC module has stride 1 or 2, got {stride}")
        widths = stdc_widths(out_channels, num_convs)
        in_widths = [channels, *widths[:-1]]
        self.stride = stride
        self.convs = nn.ModuleList(
            ConvBNReLU(c_in, c_out, 1 if i == 0 else 3)
            for i, (c_in, c_out) in enumerate(zip(in_widths, widths, strict=True))
        )
        if stride == 2:
            half = widths[0]
            self.downsample = ConvBNReLU(half, half, 3, stride=2, relu=False, groups=half)
            self.skip = nn.AvgPool2d(3, stride=2, padding=1)
        else:
            self.downsample = nn.Identity()
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.convs[0](x)
        outs = [self.skip(first)]
        y = self.downsample(first)
        for conv in self.convs[1:]:
            y = conv(y)
            outs.append(y)
        return torch.cat(outs, dim=1)


@register_block
class STDCConfig(BlockConfig):
    """Short-Term Dense Concatenate module (STDC), https://arxiv.org/abs/2104.13188"""

    type: Literal["stdc"]
    num_convs: int = Field(4, ge=2, le=16, description="Conv-BN-ReLU blocks in the chain; their "
                           "outputs (out/2, out/4, ..., the last two equal) are concatenated.")

    module = STDCModule

    def build(self, site: Site) -> nn.Module:
        # as a `replace`, it takes the replaced module's out channels and stride
        return STDCModule(site.channels, site.output_channels, site.stride, self.num_convs)


def _stages(in_chans: int, layers: Sequence[int], base: int, num_convs: int) -> nn.Sequential:
    stages: list[nn.Module] = [
        nn.Sequential(ConvBNReLU(in_chans, base // 2, 3, stride=2)),
        nn.Sequential(ConvBNReLU(base // 2, base, 3, stride=2)),
    ]
    in_ch = base
    for i, depth in enumerate(layers):
        out_ch = base * 4 * 2 ** i
        stages.append(nn.Sequential(*(
            STDCModule(in_ch if j == 0 else out_ch, out_ch, 2 if j == 0 else 1, num_convs)
            for j in range(depth)
        )))
        in_ch = out_ch
    return nn.Sequential(*stages)


class STDCNet(ClassifierMixin, nn.Module):
    """STDC classification network (Table 2 of the paper).

    ``stages.<i>`` (i = 0..4) are the paper's stages 1-5, at strides 2..32:
    ``stages.0``/``stages.1`` hold one stride-2 conv-BN-ReLU each, ``stages.2-4``
    the STDC modules. ``forward_features`` ends with the 1x1 conv-BN-ReLU to 1024
    (ConvX6); the head squares it (as the authors' code), average-pools, and applies
    FC 1024 -> ReLU -> dropout -> FC. With ``features_only=True`` there is no head
    and ``forward`` returns the five stage outputs.
    """

    classifier_attr = "classifier"
    arch_name = "stdc"

    def __init__(self, layers: Sequence[int] = (2, 2, 2), num_classes: int = 1000,
                 in_chans: int = 3, base: int = 64, num_convs: int = 4,
                 drop_rate: float = 0.2, features_only: bool = False) -> None:
        super().__init__()
        if len(layers) != 3 or min(layers) < 1:
            raise SpecError(f"stdc: `layers` counts the STDC modules of stages 3-5 (three "
                            f"numbers, each at least 1), got {list(layers)}")
        self.stages = _stages(in_chans, layers, base, num_convs)
        self.stage_channels = [base // 2, base, base * 4, base * 8, base * 16]
        self.features_only = features_only
        self.num_classes = num_classes
        self.num_features = max(1024, base * 16)
        self.drop_rate = drop_rate
        self.pretrained_cfg = {
            "input_size": (in_chans, 224, 224), "pool_size": (7, 7),
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "interpolation": "bilinear", "crop_pct": 0.875, "num_classes": num_classes,
            "first_conv": "stages.0.0.0", "classifier": "classifier",
        }
        if not features_only:
            self.conv_last = ConvBNReLU(base * 16, self.num_features, 1)
            self.fc = nn.Linear(self.num_features, self.num_features, bias=False)
            self.act = nn.ReLU(inplace=True)
            self.classifier = self._classifier(num_classes)
        init_weights_(self, linear_std=0.001)

    def _classifier(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        classifier = nn.Linear(self.num_features, num_classes, bias=False)
        nn.init.normal_(classifier.weight, std=0.001)
        return classifier

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the five stages (strides 2, 4, 8, 16, 32)."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(x)
        return x if self.features_only else self.conv_last(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.pow(2).mean((2, 3))      # the square is in the authors' code and weights
        x = F.dropout(self.act(self.fc(x)), self.drop_rate, self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_stages(x)
        return self.forward_head(self.forward_features(x))


def _layers(variant: str | Sequence[int], where: str) -> tuple[int, ...]:
    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise SpecError(f"{where}: unknown STDC variant {variant!r}; "
                            f"choose {', '.join(VARIANTS)} or give three stage depths")
        return VARIANTS[variant]
    return tuple(variant)


@register_architecture("stdcnet")
def stdcnet(layers: str | Sequence[int] = "stdc1", num_classes: int = 1000, in_chans: int = 3,
            drop_rate: float = 0.2, num_convs: int = 4) -> STDCNet:
    """STDC ImageNet backbone: ``layers`` = ``stdc1`` (2, 2, 2), ``stdc2`` (4, 5, 3) or
    three stage depths; ``num_convs`` = blocks per STDC module (4 in the paper)."""
    return STDCNet(_layers(layers, "backbone.args.layers"), num_classes, in_chans,
                   num_convs=num_convs, drop_rate=drop_rate)


# --- STDC-Seg -------------------------------------------------------------------------


class STDCSeg(nn.Module):
    """STDC-Seg: STDC backbone, BiSeNet-style context path with ARMs, FFM, detail head.

    ``forward`` returns logits (N, classes, H, W) at the input size. In training mode
    it returns the tuple ``(logits, aux16, aux32, detail)``: the main logits, the
    auxiliary logits of the context path's 1/16 and 1/32 branches (both supervised by
    the segmentation loss in the paper), and the detail logits (N, 1, H, W) of the
    detail head, to be trained against ``detail_target(labels)`` with ``detail_loss``.
    Every output is upsampled bilinearly (align_corners=True) to the input size.
    """

    def __init__(self, layers: Sequence[int] = (2, 2, 2), num_classes: int = 19,
                 in_chans: int = 3, arm: Any = None, ffm: Any = None,
                 context_channels: int = 128, fusion_channels: int = 256,
                 input_size: Sequence[int] = (3, 512, 1024)) -> None:
        super().__init__()
        input_size = (in_chans, *tuple(input_size)[1:])
        self.num_classes = num_classes
        self.backbone = STDCNet(layers, in_chans=in_chans, features_only=True)
        _, _, c8, c16, c32 = self.backbone.stage_channels
        cc = context_channels
        self.context_head = ContextRefinement(c16, c32, cc, arm, input_size)
        self.ffm = build_arch_block(
            ffm if ffm is not None else {"type": "ffm", "reduction": 4}, "backbone.args.ffm",
            Site(channels=c8 + cc, out_channels=fusion_channels,
                 size=feature_size(input_size, 8)))
        # the heads' 1x1 convs have no bias, as in the authors' code
        self.head = SegmentationHead(fusion_channels, 256, num_classes, bias=False)
        self.aux_head16 = SegmentationHead(cc, 64, num_classes, bias=False)
        self.aux_head32 = SegmentationHead(cc, 64, num_classes, bias=False)
        self.detail_head = SegmentationHead(c8, 64, 1, bias=False)
        self.pretrained_cfg = {
            "input_size": input_size, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "num_classes": num_classes,
            "first_conv": "backbone.stages.0.0.0", "classifier": "head.classifier",
        }

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        _, _, f8, f16, f32 = self.backbone(x)
        ctx32, ctx16 = self.context_head(f16, f32, f8.shape[-2:])  # at 1/16 and 1/8
        logits = resize(self.head(self.ffm(f8, ctx16)), size, align_corners=True)
        if not self.training:
            return logits
        return (logits, resize(self.aux_head16(ctx16), size, align_corners=True),
                resize(self.aux_head32(ctx32), size, align_corners=True),
                resize(self.detail_head(f8), size, align_corners=True))


@register_architecture("stdc_seg")
def stdc_seg(layers: str | Sequence[int] = "stdc1", num_classes: int = 19, in_chans: int = 3,
             arm: dict[str, Any] | None = None, ffm: dict[str, Any] | None = None,
             input_size: Sequence[int] = (3, 512, 1024)) -> STDCSeg:
    """STDC-Seg: ``layers`` = ``stdc1`` / ``stdc2`` backbone; ``arm`` / ``ffm`` = block
    configs (default ``{type: arm}`` / ``{type: ffm, reduction: 4}``); 19 classes and
    512x1024 input (Cityscapes, the paper's STDC1-Seg50)."""
    return STDCSeg(_layers(layers, "backbone.args.layers"), num_classes, in_chans, arm, ffm,
                   input_size=input_size)


# --- the detail guidance (training only) ------------------------------------------------

_LAPLACIAN = ((-1.0, -1.0, -1.0), (-1.0, 8.0, -1.0), (-1.0, -1.0, -1.0))


def detail_target(labels: torch.Tensor, weights: Sequence[float] = (0.6, 0.3, 0.1),
                  threshold: float = 0.1) -> torch.Tensor:
    """The detail aggregation target (N, 1, H, W) of integer labels (N, H, W):
    Laplacian edges of the label map at strides 1, 2 and 4, each thresholded,
    upsampled (nearest) to full size, fused by a 1x1 conv with ``weights`` (the
    paper's initial 6/10, 3/10, 1/10) and thresholded again to a binary map."""
    maps = labels.unsqueeze(1).float()
    kernel = torch.tensor(_LAPLACIAN, dtype=maps.dtype, device=maps.device).view(1, 1, 3, 3)
    edges = []
    for stride in (1, 2, 4):
        edge = F.conv2d(maps, kernel, stride=stride, padding=1).clamp(min=0)
        edge = resize(edge, maps.shape[-2:], mode="nearest")
        edges.append((edge > threshold).to(maps.dtype))
    fuse = torch.tensor(weights, dtype=maps.dtype, device=maps.device).view(1, 3, 1, 1)
    return (F.conv2d(torch.cat(edges, dim=1), fuse) > threshold).to(maps.dtype)


def detail_loss(detail_logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1.0
                ) -> torch.Tensor:
    """The detail loss: binary cross-entropy plus dice loss between the detail logits
    (N, 1, h, w; resized to the labels' size if needed) and ``detail_target(labels)``."""
    target = detail_target(labels)
    if detail_logits.shape[-2:] != target.shape[-2:]:
        detail_logits = resize(detail_logits, target.shape[-2:], align_corners=True)
    bce = F.binary_cross_entropy_with_logits(detail_logits, target)
    prob = torch.sigmoid(detail_logits).flatten(1)
    tgt = target.flatten(1)
    dice = 1 - (2 * (prob * tgt).sum(1) + smooth) / (prob.sum(1) + tgt.sum(1) + smooth)
    return bce + dice.mean()
