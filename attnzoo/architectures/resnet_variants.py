"""timm ResNets laid out as an author's released network: where the stride of a
downsampling bottleneck sits, which stages downsample, and how a dilated ResNet
dilates its first blocks.

``resnet_strides`` is a registered architecture: a timm ResNet (an instance of timm's
own ``ResNet`` class, parameter names unchanged, so the ResNet site aliases, ``stages:``
filters and timm checkpoints work as for ``source: timm``) whose strides are moved:

* ``stride_in_1x1``: the stride of each downsampling bottleneck in its first 1x1 conv,
  as the original MSRA/Caffe ResNet ("v1") and the releases built on it have it
  (GCT's PyTorch and TensorFlow ResNet-50); timm and torchvision put it in the 3x3
  conv ("v1.5");
* ``stage_strides``: the stride of each of the four stages, e.g. ``[1, 2, 2, 1]`` for
  a last stage at stride 1 without dilation (GSoP-Net's released ResNet-50).

``dilated_resnet`` builds the encoders of the segmentation networks (``ccnet``,
``dnlnet``): a timm ResNet as ``features_only`` at output stride 8 or 16, with the
options their authors' ResNets have (a 3x3 deep stem 64-64-128, a max-pool that rounds
up, and the first block of a dilated stage dilated fully or by the previous rate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import timm
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from ..errors import SpecError
from ..registry import register_architecture


def _stride(conv: nn.Conv2d) -> int:
    return int(conv.stride[0])


def _set_stride(conv: nn.Module, stride: int) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise SpecError(f"cannot move a stride through {type(conv).__name__}: only plain "
                        "ResNets (conv downsample, no anti-aliasing) are supported")
    conv.stride = (stride, stride)


def _strided_conv(block: nn.Module) -> nn.Conv2d:
    """The conv that carries the block's stride in timm's layout (3x3 of a bottleneck,
    first 3x3 of a basic block)."""
    conv = block.conv2 if isinstance(block, Bottleneck) else block.conv1
    if getattr(block, "aa", None) is not None and not isinstance(block.aa, nn.Identity):
        raise SpecError("resnet_strides does not support anti-aliased ResNets (aa_layer)")
    if int(conv.dilation[0]) != 1:
        raise SpecError("resnet_strides does not support dilated ResNets (output_stride)")
    return conv


def restride_(model: ResNet, stage_strides: Sequence[int] | None = None,
              stride_in_1x1: bool = False) -> ResNet:
    """Move the strides of a timm ResNet in place (see the module docstring) and update
    its ``feature_info`` reductions. Returns the model."""
    if not isinstance(model, ResNet):
        raise SpecError(f"resnet_strides needs one of timm's ResNets, got {type(model).__name__}")
    stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
    if stage_strides is not None:
        strides = [int(s) for s in stage_strides]
        if len(strides) != 4 or any(s not in (1, 2) for s in strides):
            raise SpecError(f"stage_strides must be four strides of 1 or 2, got {stage_strides}")
        for i, (stage, stride) in enumerate(zip(stages, strides, strict=True), start=1):
            first = stage[0]
            conv = _strided_conv(first)
            if stride == _stride(conv):
                continue
            if stride > _stride(conv):
                raise SpecError(f"stage_strides: stage {i} has stride {_stride(conv)}; "
                                "a stage's stride can be lowered to 1, not raised")
            _set_stride(conv, stride)
            if first.downsample is not None:
                _set_stride(first.downsample[0], stride)
    if stride_in_1x1:
        for stage in stages:
            first = stage[0]
            if not isinstance(first, Bottleneck):
                raise SpecError("stride_in_1x1 needs bottleneck blocks (a 1x1 conv first)")
            conv = _strided_conv(first)
            stride = _stride(conv)
            if stride != 1:
                _set_stride(first.conv1, stride)
                _set_stride(conv, 1)
    _update_reductions(model)
    return model


def _update_reductions(model: ResNet) -> None:
    """Recompute ``feature_info``'s reductions from the strides the model now has."""
    reduction = _stride(model.conv1[0] if isinstance(model.conv1, nn.Sequential)
                        else model.conv1)
    for info in model.feature_info:
        name = info["module"]
        if name.startswith("layer"):
            if name == "layer1" and not isinstance(model.maxpool, nn.Identity):
                reduction *= 2
            first = getattr(model, name)[0]
            reduction *= max(_stride(c) for c in (first.conv1, first.conv2))
        info["reduction"] = reduction


# The whole network is the timm model named by `model`: pretrained_backbone= loads its
# checkpoint (moving a stride changes no tensor shape).
@register_architecture("resnet_strides", timm_backbone=("", "model"))
def resnet_strides(model: str = "resnet50", stage_strides: list[int] | None = None,
                   stride_in_1x1: bool = False, **kwargs: Any) -> ResNet:
    """A timm ResNet ``model`` (built with ``kwargs``: ``num_classes``, ``in_chans``,
    ``drop_rate``, ...) with its strides moved: ``stage_strides`` (four of 1 or 2; a
    stage's stride can only be lowered, and no dilation is added) and
    ``stride_in_1x1`` (the stride of each downsampling bottleneck in its 1x1 conv)."""
    if not timm.is_model(model):
        raise SpecError(f"backbone.args.model: timm has no model {model!r}")
    net = timm.create_model(model, pretrained=False, **kwargs)
    return restride_(net, stage_strides, stride_in_1x1)


# --- dilated encoders of the segmentation networks ------------------------------------


def dilated_resnet(backbone: str, in_chans: int = 3, output_stride: int = 8,
                   deep_stem: bool = True, first_dilation: Literal["full", "previous"] = "full",
                   ceil_pool: bool = True) -> nn.Module:
    """A timm ResNet as ``features_only`` (res4 and res5: ``out_indices=(3, 4)``) at
    ``output_stride`` 8 (res4 dilated by 2, res5 by 4) or 16 (res5 by 2).

    ``deep_stem``: three 3x3 convs 64-64-128 in place of the 7x7 (the "deep base"
    ResNets of PSPNet, CCNet and torchcv). ``first_dilation``: the 3x3 conv of a dilated
    stage's first block dilated by the stage's rate (``"full"``: CCNet's code, mmseg)
    or by the previous stage's (``"previous"``: timm, torchvision and torchcv, which the
    DNL release is built on). ``ceil_pool``: the stem's max-pool rounds up, as in both
    releases.
    """
    if output_stride not in (8, 16):
        raise SpecError(f"backbone.args.output_stride must be 8 or 16, got {output_stride}")
    if not timm.is_model(backbone):
        raise SpecError(f"backbone.args.backbone: timm has no model {backbone!r}")
    stem = {"stem_type": "deep", "stem_width": 64} if deep_stem else {}
    encoder = timm.create_model(backbone, pretrained=False, features_only=True,
                                out_indices=(3, 4), in_chans=in_chans,
                                output_stride=output_stride, **stem)
    if ceil_pool and isinstance(getattr(encoder, "maxpool", None), nn.MaxPool2d):
        encoder.maxpool.ceil_mode = True
    if first_dilation == "full":
        for name in ("layer3", "layer4"):
            stage = getattr(encoder, name)
            rate = int(stage[-1].conv2.dilation[0]) if isinstance(stage[-1], Bottleneck) else (
                int(stage[-1].conv1.dilation[0]))
            first = stage[0]
            conv = first.conv2 if isinstance(first, Bottleneck) else first.conv1
            if int(conv.stride[0]) == 1 and int(conv.dilation[0]) != rate:
                conv.dilation = (rate, rate)
                conv.padding = (rate, rate)
    elif first_dilation != "previous":
        raise SpecError(f"first_dilation must be 'full' or 'previous', got {first_dilation!r}")
    return encoder
