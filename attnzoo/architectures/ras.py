"""Reverse Attention saliency network, RAS (Chen et al., ECCV 2018,
https://arxiv.org/abs/1807.09940), on a ResNet-50 (timm ``features_only``).

A global saliency head on the deepest stage (the paper's "dsn6": 1x1 conv to 256,
three 5x5 conv + ReLU, 1x1 conv to one map) gives the coarse prediction. Side outputs
then go from deep to shallow (res4, res3, res2, stem), each a reverse attention unit
(block type ``reverse``): the side features are weighted by 1 - sigmoid(upsampled
coarser prediction) and refine that prediction residually. The finest side output is
the saliency map. ResNet-50 in place of the paper's VGG-16 follows the authors' own
ResNet-50 port (their TIP 2020 version), which uses the same five stages.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..blocks._layers import resize
from ..blocks.base import Site
from ..blocks.spatial import ReverseAttention
from ..errors import SpecError
from ..registry import register_architecture
from ._common import build_arch_block, feature_size


class GlobalSaliencyHead(nn.Module):
    """RAS's top side output ("dsn6"): 1x1 conv -> 3 x (5x5 conv, ReLU) -> 1x1 conv to
    one saliency-logit map."""

    def __init__(self, channels: int, width: int = 256, num_convs: int = 3,
                 kernel_size: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 1)]
        for _ in range(num_convs):
            layers += [nn.Conv2d(width, width, kernel_size, padding=kernel_size // 2),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 1, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ReverseAttentionSaliency(nn.Module):
    """RAS. ``forward`` returns saliency logits (N, 1, H, W) at the input size (apply a
    sigmoid for the map). In training mode it returns all five side outputs at the
    input size, finest first: ``(s1, s2, s3, s4, s5)`` where ``s1`` is the prediction
    and ``s5`` the global head's; the paper supervises each with cross-entropy.
    """

    def __init__(self, backbone: str = "resnet50", in_chans: int = 3, side: Any = None,
                 head_width: int = 256, input_size: tuple[int, int, int] = (3, 352, 352)
                 ) -> None:
        super().__init__()
        self.num_classes = 1
        self.encoder = timm.create_model(backbone, pretrained=False, features_only=True,
                                         out_indices=(0, 1, 2, 3, 4), in_chans=in_chans)
        channels = self.encoder.feature_info.channels()
        strides = self.encoder.feature_info.reduction()
        self.head = GlobalSaliencyHead(channels[-1], head_width)
        side = side if side is not None else {"type": "reverse"}
        # deep to shallow: res4, res3, res2, stem
        self.sides = nn.ModuleList(
            build_arch_block(side, "backbone.args.side", Site(
                channels=c, size=feature_size(input_size, s)))
            for c, s in zip(channels[-2::-1], strides[-2::-1], strict=True))
        for unit in self.sides:
            if not isinstance(unit, ReverseAttention):
                raise SpecError("backbone.args.side: the side outputs need a two-input "
                                f"refinement block (type reverse), got {type(unit).__name__}")
        self.pretrained_cfg = {
            "input_size": tuple(input_size), "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "num_classes": 1,
            "first_conv": "encoder.conv1", "classifier": "sides.3.residual",
        }

    def forward(self, x: torch.Tensor):
        features = self.encoder(x)
        prediction = self.head(features[-1])
        outputs = [prediction]
        for unit, side_features in zip(self.sides, features[-2::-1], strict=True):
            prediction = unit(side_features, prediction)
            outputs.append(prediction)
        size = x.shape[-2:]
        if not self.training:
            return resize(prediction, size)
        return tuple(resize(o, size) for o in reversed(outputs))


@register_architecture("ras", timm_backbone=("encoder", "backbone"))
def ras(backbone: str = "resnet50", in_chans: int = 3, side: dict[str, Any] | None = None,
        head_width: int = 256, num_classes: int = 1) -> ReverseAttentionSaliency:
    """RAS on a timm ResNet. ``side``: the side-output block config (default
    ``{type: reverse}``). Saliency has one output map: ``num_classes`` must be 1."""
    if num_classes != 1:
        raise SpecError(f"ras predicts one saliency map; num_classes must be 1, got "
                        f"{num_classes}")
    if not timm.is_model(backbone):
        raise SpecError(f"backbone.args.backbone: timm has no model {backbone!r}")
    return ReverseAttentionSaliency(backbone=backbone, in_chans=in_chans, side=side,
                                    head_width=head_width)
