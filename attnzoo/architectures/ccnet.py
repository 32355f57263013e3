"""CCNet (Huang et al., ICCV 2019, https://arxiv.org/abs/1811.11721): recurrent
criss-cross attention in the head of a dilated ResNet, as its authors' released code
builds it (speedinghzl/CCNet, ``networks/ccnet.py``).

The network (``ContextHeadNet``, shared with ``dnlnet``):

* encoder: a timm ResNet, ``features_only``, output stride 8 (res4 dilated by 2, res5
  by 4), with the release's 3x3 deep stem (64-64-128) and rounding-up max-pool
  (``resnet_variants.dilated_resnet``);
* head on res5 (C channels): 3x3 conv-BN-act to C/4 -> the attention block (a spec
  field, ``criss_cross`` with R = 2 by default) -> 3x3 conv-BN-act -> concatenated with
  res5 -> 3x3 conv-BN-act to 512 -> Dropout2d(0.1) -> 1x1 conv to the classes;
* auxiliary FCN head on res4 (the release's "dsn"): 3x3 conv-BN-act to 512 ->
  Dropout2d(0.1) -> 1x1 conv to the classes, trained with weight 0.4;
* both outputs bilinearly upsampled to the input size with ``align_corners=True``.

CCNet's release uses InPlace-ABN in the head: BN followed by LeakyReLU(0.01), and its
auxiliary conv has a bias. ``forward`` returns the logits in eval mode and
``(logits, aux_logits)`` in training mode.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..blocks._layers import ConvBnAct, resize
from ..blocks.base import Site
from ..registry import register_architecture
from ._common import build_arch_block, feature_size
from .resnet_variants import dilated_resnet


def _activation(name: str) -> nn.Module:
    return nn.LeakyReLU(0.01, inplace=True) if name == "leaky_relu" else nn.ReLU(inplace=True)


class ContextHead(nn.Module):
    """The attention head of CCNet and DNLNet: reduce (3x3 conv-BN-act to
    ``channels // 4``), ``attention``, refine (3x3 conv-BN-act), concatenate with the
    input, fuse (3x3 conv-BN-act to ``mid_channels``), Dropout2d(0.1), classifier."""

    def __init__(self, channels: int, mid_channels: int, num_classes: int,
                 attention: nn.Module, act: str = "relu", dropout: float = 0.1) -> None:
        super().__init__()
        inner = channels // 4
        self.reduce = ConvBnAct(channels, inner, 3, act=_activation(act))
        self.attention = attention
        self.refine = ConvBnAct(inner, inner, 3, act=_activation(act))
        self.fuse = ConvBnAct(channels + inner, mid_channels, 3, act=_activation(act))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(mid_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.refine(self.attention(self.reduce(x)))
        return self.classifier(self.dropout(self.fuse(torch.cat([x, y], dim=1))))


class AuxiliaryHead(nn.Module):
    """The auxiliary FCN head on res4: 3x3 conv-BN-act, Dropout2d(0.1), 1x1 classifier."""

    def __init__(self, channels: int, mid_channels: int, num_classes: int, act: str = "relu",
                 conv_bias: bool = False, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvBnAct(channels, mid_channels, 3, bias=conv_bias, act=_activation(act))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(mid_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class ContextHeadNet(nn.Module):
    """A dilated ResNet with an attention head on res5 and an auxiliary FCN head on
    res4 (see the module docstring). ``attention`` is a block config for the head's
    ``channels // 4``-wide map at the encoder's output stride."""

    def __init__(self, attention: Any, name: str, num_classes: int = 19,
                 backbone: str = "resnet50", in_chans: int = 3, output_stride: int = 8,
                 deep_stem: bool = True, first_dilation: Literal["full", "previous"] = "full",
                 act: str = "relu", aux_conv_bias: bool = False, mid_channels: int = 512,
                 input_size: tuple[int, int, int] = (3, 769, 769)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.encoder = dilated_resnet(backbone, in_chans, output_stride, deep_stem,
                                      first_dilation)
        c4, c5 = self.encoder.feature_info.channels()
        block = build_arch_block(attention, "backbone.args.attention", Site(
            channels=c5 // 4, size=feature_size(input_size, output_stride)))
        self.head = ContextHead(c5, mid_channels, num_classes, block, act)
        self.aux_head = AuxiliaryHead(c4, mid_channels, num_classes, act, aux_conv_bias)
        self.pretrained_cfg = {
            "architecture": name, "input_size": tuple(input_size),
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "num_classes": num_classes, "first_conv": "encoder.conv1",
            "classifier": "head.classifier",
        }

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        res4, res5 = self.encoder(x)
        logits = resize(self.head(res5), size, align_corners=True)
        if not self.training:
            return logits
        return logits, resize(self.aux_head(res4), size, align_corners=True)


@register_architecture("ccnet")
def ccnet(num_classes: int = 19, backbone: str = "resnet50", in_chans: int = 3,
          output_stride: int = 8, attention: dict[str, Any] | None = None,
          deep_stem: bool = True) -> ContextHeadNet:
    """CCNet on a dilated timm ResNet, as the authors' release: ``attention`` (default
    ``{type: criss_cross, recurrence: 2}``) between the head's two 3x3 convs, BN +
    LeakyReLU(0.01) in the heads, the res4/res5 first blocks dilated by their stage's
    full rate, a 3x3 deep stem; ``num_classes`` 19 (Cityscapes, 769x769 crops)."""
    return ContextHeadNet(
        attention if attention is not None else {"type": "criss_cross", "recurrence": 2},
        "ccnet", num_classes=num_classes, backbone=backbone, in_chans=in_chans,
        output_stride=output_stride, deep_stem=deep_stem, first_dilation="full",
        act="leaky_relu", aux_conv_bias=True)
