"""BiSeNet V1 (Yu et al., ECCV 2018, https://arxiv.org/abs/1808.00897).

A spatial path (three stride-2 conv-BN-ReLU, 1/8) keeps detail; a context path
(ResNet-18, timm ``features_only``) with a global-pool tail gives receptive field.
The Attention Refinement Module (ARM) reweights the channels of the last two context
stages; the Feature Fusion Module (FFM) fuses both paths with an SE-like reweighting.
Both are registered block types (``arm``, ``ffm``) and are spec fields of the
architecture, so ``backbone.args.arm: {type: cbam}`` swaps the ARM for CBAM.
STDC-Seg (``stdc.py``) reuses the ARM, the FFM and the context refinement.
"""

from __future__ import annotations

from typing import Any, Literal

import timm
import torch
from pydantic import Field, field_validator
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..attention_maps import record
from ..blocks._layers import ConvBNReLU, check_odd, reduced_channels, resize
from ..blocks.base import BlockConfig, Site
from ..errors import SpecError
from ..registry import register_architecture, register_block
from ._common import SegmentationHead, build_arch_block, feature_size

# --- arm: Attention Refinement Module ------------------------------------------------------


class AttentionRefinement(nn.Module):
    """BiSeNet's ARM: GAP -> 1x1 conv -> BN -> sigmoid -> scale the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.bn(self.conv(x.mean((2, 3), keepdim=True))))
        record(self, "", w, kind="channel")
        return x * w


@register_block
class ARMConfig(BlockConfig):
    """Attention Refinement Module (BiSeNet), https://arxiv.org/abs/1808.00897"""

    type: Literal["arm"]

    module = AttentionRefinement


# --- ffm: Feature Fusion Module --------------------------------------------------------


class FeatureFusion(nn.Module):
    """BiSeNet's FFM: concatenate the inputs -> conv-BN-ReLU to ``out_channels`` ->
    SE-like reweighting (GAP -> 1x1 -> ReLU -> 1x1 -> sigmoid) -> ``x + x * w``.

    ``forward(*features)`` takes the spatial and the context features (any number of
    maps whose channels sum to ``channels``); with one input it is a plain
    channel-preserving block that can be inserted anywhere.
    """

    def __init__(self, channels: int, out_channels: int | None = None, reduction: float = 1,
                 kernel_size: int = 1) -> None:
        super().__init__()
        out = out_channels or channels
        hidden = reduced_channels(out, reduction)
        self.proj = ConvBNReLU(channels, out, kernel_size)
        self.fc1 = nn.Conv2d(out, hidden, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, out, 1, bias=False)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        x = self.proj(torch.cat(features, dim=1))
        w = torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))
        record(self, "", w, kind="channel")
        return x + x * w


@register_block
class FFMConfig(BlockConfig):
    """Feature Fusion Module (BiSeNet), https://arxiv.org/abs/1808.00897"""

    type: Literal["ffm"]
    reduction: float = Field(1, ge=0.0625, le=1024,
                             description="Reduction of the SE-like reweighting "
                             "(1 in the authors' ResNet-18 code).")
    kernel_size: int = Field(1, ge=1, le=7, description="Kernel of the fusing conv-BN-ReLU "
                             "(1x1 in the authors' code).")

    module = FeatureFusion

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, k: int) -> int:
        return check_odd(k)

    def build(self, site: Site) -> nn.Module:
        return FeatureFusion(site.channels, site.output_channels, **self.module_kwargs())


# --- the network -----------------------------------------------------------------------


class SpatialPath(nn.Sequential):
    """Three stride-2 conv-BN-ReLU (7x7, 3x3, 3x3; 1/8) and a 1x1 conv-BN-ReLU to
    ``out_channels``, as in the authors' code."""

    def __init__(self, in_chans: int = 3, width: int = 64, out_channels: int = 128) -> None:
        super().__init__(
            ConvBNReLU(in_chans, width, 7, stride=2),
            ConvBNReLU(width, width, 3, stride=2),
            ConvBNReLU(width, width, 3, stride=2),
            ConvBNReLU(width, out_channels, 1),
        )


class ContextRefinement(nn.Module):
    """The context path's attention head, as BiSeNet has it and STDC-Seg reuses it: the
    1/32 features pass through an ARM, gain the global-average context and are
    upsampled to 1/16; the 1/16 features pass through an ARM, gain that, and are
    upsampled to ``out_size``. Each sum is refined by a 3x3 conv-BN-ReLU after the
    upsampling. ``arm`` is a block config (any one-map block can stand in).
    ``align_corners`` applies to bilinear upsampling (BiSeNet's authors use True)."""

    def __init__(self, c16: int, c32: int, channels: int, arm: Any,
                 input_size: tuple[int, int, int],
                 mode: Literal["nearest", "bilinear"] = "nearest",
                 align_corners: bool = False) -> None:
        super().__init__()
        self.mode = mode
        self.align_corners = align_corners
        self.global_context = ConvBNReLU(c32, channels, 1)
        self.reduce32 = ConvBNReLU(c32, channels, 3)
        self.reduce16 = ConvBNReLU(c16, channels, 3)
        arm = arm if arm is not None else {"type": "arm"}
        self.arm32 = build_arch_block(arm, "backbone.args.arm", Site(
            channels=channels, size=feature_size(input_size, 32)))
        self.arm16 = build_arch_block(arm, "backbone.args.arm", Site(
            channels=channels, size=feature_size(input_size, 16)))
        self.refine32 = ConvBNReLU(channels, channels, 3)
        self.refine16 = ConvBNReLU(channels, channels, 3)

    def forward(self, c16: torch.Tensor, c32: torch.Tensor, out_size: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(refined 1/32 context at 1/16, refined 1/16 context at ``out_size``)."""
        if self.training and c32.shape[0] == 1:  # torch's own error names no module
            raise ValueError(
                "context_head.global_context: its BatchNorm follows global average pooling, "
                "so in training it needs a batch of more than 1 (one pooled value per "
                "channel has no batch statistics: torch's 'Expected more than 1 value per "
                "channel'); train with batch size >= 2, or call model.eval() for inference")
        tail = self.global_context(c32.mean((2, 3), keepdim=True))
        f32 = self.refine32(resize(self.arm32(self.reduce32(c32)) + tail, c16.shape[-2:],
                                   self.mode, self.align_corners))
        f16 = self.refine16(resize(self.arm16(self.reduce16(c16)) + f32, out_size, self.mode,
                                   self.align_corners))
        return f32, f16


class BiSeNetV1(nn.Module):
    """BiSeNet V1. ``forward`` returns logits (N, classes, H, W) at the input size; in
    training mode it returns the tuple ``(logits, aux16, aux8)``: the main output and
    the two auxiliary heads on the context path (after the 1/32 and 1/16 stages), all
    at the input size, which the paper supervises with the same loss.

    Every bilinear upsampling (in the context path and of the three heads' logits) uses
    ``align_corners=True``, as the authors' code (TorchSeg's BiSeNet) does.
    """

    def __init__(self, num_classes: int = 19, backbone: str = "resnet18", in_chans: int = 3,
                 context_channels: int = 128, spatial_channels: int = 128,
                 fusion_channels: int = 256, arm: Any = None, ffm: Any = None,
                 input_size: tuple[int, int, int] = (3, 1024, 2048),
                 align_corners: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.spatial_path = SpatialPath(in_chans, 64, spatial_channels)
        self.context_path = timm.create_model(backbone, pretrained=False, features_only=True,
                                              out_indices=(3, 4), in_chans=in_chans)
        c16, c32 = self.context_path.feature_info.channels()
        cc = context_channels
        self.context_head = ContextRefinement(c16, c32, cc, arm, input_size, mode="bilinear",
                                              align_corners=align_corners)
        self.ffm = build_arch_block(
            ffm if ffm is not None else {"type": "ffm"}, "backbone.args.ffm",
            Site(channels=spatial_channels + cc, out_channels=fusion_channels,
                 size=feature_size(input_size, 8)))
        self.head = SegmentationHead(fusion_channels, 64, num_classes)
        self.aux_head16 = SegmentationHead(cc, 256, num_classes)
        self.aux_head8 = SegmentationHead(cc, 256, num_classes)
        self.pretrained_cfg = {
            "input_size": tuple(input_size), "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "num_classes": num_classes,
            "first_conv": "context_path.conv1", "classifier": "head.classifier",
        }

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        spatial = self.spatial_path(x)
        c16, c32 = self.context_path(x)
        f32, f16 = self.context_head(c16, c32, spatial.shape[-2:])
        corners = self.align_corners
        logits = resize(self.head(self.ffm(spatial, f16)), size, align_corners=corners)
        if not self.training:
            return logits
        return (logits, resize(self.aux_head16(f32), size, align_corners=corners),
                resize(self.aux_head8(f16), size, align_corners=corners))


@register_architecture("bisenetv1", timm_backbone=("context_path", "backbone"))
def bisenetv1(num_classes: int = 19, backbone: str = "resnet18", in_chans: int = 3,
              arm: dict[str, Any] | None = None, ffm: dict[str, Any] | None = None,
              context_channels: int = 128, align_corners: bool = True) -> BiSeNetV1:
    """BiSeNet V1 on a timm ResNet context path. ``arm`` / ``ffm``: block configs
    (default ``{type: arm}`` / ``{type: ffm}``); ``num_classes`` 19 (Cityscapes);
    ``align_corners`` of the bilinear upsamplings (True: the authors' code)."""
    if not timm.is_model(backbone):
        raise SpecError(f"backbone.args.backbone: timm has no model {backbone!r}")
    return BiSeNetV1(num_classes=num_classes, backbone=backbone, in_chans=in_chans,
                     arm=arm, ffm=ffm, context_channels=context_channels,
                     align_corners=align_corners)
