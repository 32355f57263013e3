"""DNLNet (Yin et al., ECCV 2020, https://arxiv.org/abs/2006.06668): the disentangled
non-local block in the head of a dilated ResNet, as its authors' released code builds
it (yinmh17/DNL-Semantic-Segmentation, ``model/seg/nets/nonlocalnowd.py`` on torchcv's
``deepbase_resnet*_dilated8``).

The network is CCNet's layout (``ccnet.ContextHeadNet``) with the release's
differences: BN + ReLU in the heads, no bias in the auxiliary conv, and the first block
of a dilated stage dilated by the previous stage's rate (torchcv's ``_nostride_dilate``).
The head's block is the ``attention`` field on the head's C/4 = 512-wide map, applied
once; by default the released block (``NonLocal2d_bn`` as the release's best Cityscapes
config, ``NLin``, sets it: C' = 256, channel whitening, logits divided by sqrt(C') and
by the temperature 0.05, the unary term, no output conv or BN): ``{type:
disentangled_non_local, reduction: 2, temperature: 0.05, variant: released}``.
"""

from __future__ import annotations

from typing import Any

from ..registry import register_architecture
from .ccnet import ContextHeadNet

RELEASED_BLOCK = {"type": "disentangled_non_local", "reduction": 2, "temperature": 0.05,
                  "variant": "released"}


@register_architecture("dnlnet")
def dnlnet(num_classes: int = 19, backbone: str = "resnet50", in_chans: int = 3,
           output_stride: int = 8, attention: dict[str, Any] | None = None,
           deep_stem: bool = True) -> ContextHeadNet:
    """DNLNet on a dilated timm ResNet: ``attention`` (default the released
    ``disentangled_non_local``) between the head's two 3x3 convs, BN + ReLU in the
    heads, a 3x3 deep stem; ``num_classes`` 19 (Cityscapes, 769x769 crops)."""
    return ContextHeadNet(
        attention if attention is not None else dict(RELEASED_BLOCK),
        "dnlnet", num_classes=num_classes, backbone=backbone, in_chans=in_chans,
        output_stride=output_stride, deep_stem=deep_stem, first_dilation="previous",
        act="relu", aux_conv_bias=False)
