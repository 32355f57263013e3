"""DANet, the Dual Attention Network (Fu et al., CVPR 2019, https://arxiv.org/abs/1809.02983),
as its authors' released code builds it (junfu1115/DANet, ``encoding/models/sseg/danet.py``).

* encoder: a dilated timm ResNet, ``features_only``, output stride 8 (res4 dilated by 2,
  res5 by 4; a dilated stage's first block by the previous rate, as the release's
  ResNet), with its 3x3 deep stem (64-64-128);
* head on res5 (C channels), two branches: 3x3 conv-BN-ReLU to C/4, an attention module
  (``position``: PAM, block type ``danet_position``; ``channel``: CAM, ``danet_channel``),
  3x3 conv-BN-ReLU; the branches' sum -> Dropout2d(0.1) -> 1x1 conv to the classes;
* each branch also has its own Dropout2d + 1x1 classifier (the release's extra outputs,
  trained with the fused one);
* outputs bilinearly upsampled to the input size with ``align_corners=True``.

``forward`` returns the fused logits in eval mode and ``(fused, position, channel)`` in
training mode (``branch_outputs: false`` leaves the branch classifiers out). Either
branch can be switched off (``null``), and any registered block can take its place:
with ``position: {type: external_attention}``, ``channel: null`` and
``branch_channels: 256``, ``branch_outputs: false`` the network is EANet's segmentation
model (2105.02358: 3x3 conv-BN-ReLU to 512, external attention, 3x3 conv-BN-ReLU to
256, Dropout2d, 1x1; the release's multi-grid (1, 2, 4) dilations in res5 are not
reproduced: the encoder dilates res5 by 4 throughout).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..blocks._layers import ConvBnAct, resize
from ..blocks.base import Site
from ..errors import SpecError
from ..registry import register_architecture
from ._common import build_arch_block, feature_size

_DEFAULT = object()


class AttentionBranch(nn.Module):
    """One DANet branch: 3x3 conv-BN-ReLU (``reduce``), the attention block, 3x3
    conv-BN-ReLU (``refine``); ``classifier``: Dropout2d + 1x1 conv, its own output
    (None without ``output``)."""

    def __init__(self, channels: int, inner: int, out_channels: int, attention: nn.Module,
                 num_classes: int, dropout: float, output: bool = True) -> None:
        super().__init__()
        self.reduce = ConvBnAct(channels, inner, 3)
        self.attention = attention
        self.refine = ConvBnAct(inner, out_channels, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(
            out_channels, num_classes, 1)) if output else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.refine(self.attention(self.reduce(x)))


class DualAttentionNetwork(nn.Module):
    """DANet (see the module docstring). ``position`` / ``channel``: block configs of
    the two branches, None to leave a branch out (at least one stays)."""

    def __init__(self, num_classes: int = 19, backbone: str = "resnet101", in_chans: int = 3,
                 output_stride: int = 8, position: Any = None, channel: Any = None,
                 head_channels: int | None = None, branch_channels: int | None = None,
                 dropout: float = 0.1, deep_stem: bool = True, branch_outputs: bool = True,
                 input_size: tuple[int, int, int] = (3, 768, 768)) -> None:
        super().__init__()
        if position is None and channel is None:
            raise SpecError("backbone.args: DANet needs at least one branch (position or "
                            "channel)")
        self.num_classes = num_classes
        # timm's dilated ResNet: a dilated stage's first block takes the previous rate, as
        # the release's ResNet; "deep" stem of width 64: its 64-64-128 3x3 convs.
        stem = {"stem_type": "deep", "stem_width": 64} if deep_stem else {}
        self.encoder = timm.create_model(backbone, pretrained=False, features_only=True,
                                         out_indices=(4,), in_chans=in_chans,
                                         output_stride=output_stride, **stem)
        c5 = self.encoder.feature_info.channels()[-1]
        inner = head_channels or c5 // 4
        out = branch_channels or inner
        size = feature_size(input_size, output_stride)
        branches = {}
        for name, config in (("position", position), ("channel", channel)):
            if config is not None:
                block = build_arch_block(config, f"backbone.args.{name}",
                                         Site(channels=inner, size=size))
                branches[name] = AttentionBranch(c5, inner, out, block, num_classes, dropout,
                                                 branch_outputs)
        self.branches = nn.ModuleDict(branches)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(out, num_classes, 1))
        self.pretrained_cfg = {
            "input_size": tuple(input_size), "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "num_classes": num_classes,
            "first_conv": "encoder.conv1", "classifier": "classifier",
        }

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        res5 = self.encoder(x)[-1]
        features = {name: branch(res5) for name, branch in self.branches.items()}
        logits = resize(self.classifier(sum(features.values())), size, align_corners=True)
        heads = [(self.branches[name].classifier, f) for name, f in features.items()
                 if self.branches[name].classifier is not None]
        if not self.training or not heads:
            return logits
        return (logits, *(resize(head(f), size, align_corners=True) for head, f in heads))


@register_architecture("danet", timm_backbone=("encoder", "backbone"))
def danet(num_classes: int = 19, backbone: str = "resnet101", in_chans: int = 3,
          output_stride: int = 8, position: dict[str, Any] | None | object = _DEFAULT,
          channel: dict[str, Any] | None | object = _DEFAULT, head_channels: int | None = None,
          branch_channels: int | None = None, dropout: float = 0.1, deep_stem: bool = True,
          branch_outputs: bool = True) -> DualAttentionNetwork:
    """DANet on a dilated timm ResNet, as the authors' release: ``position`` (default
    ``{type: danet_position}``) and ``channel`` (default ``{type: danet_channel}``) are
    the branches' blocks, ``null`` to drop one; ``head_channels`` (C/4 of res5 when
    unset) and ``branch_channels`` (the head width when unset) size the head;
    ``branch_outputs``: each branch's own classifier (the release's extra training
    outputs; EANet has none); ``num_classes`` 19 (Cityscapes)."""
    position = {"type": "danet_position"} if position is _DEFAULT else position
    channel = {"type": "danet_channel"} if channel is _DEFAULT else channel
    if not timm.is_model(backbone):
        raise SpecError(f"backbone.args.backbone: timm has no model {backbone!r}")
    if output_stride not in (8, 16, 32):
        raise SpecError(f"backbone.args.output_stride must be 8, 16 or 32, got {output_stride}")
    if not 0 <= dropout < 1:
        raise SpecError(f"backbone.args.dropout must be in [0, 1), got {dropout}")
    return DualAttentionNetwork(num_classes=num_classes, backbone=backbone, in_chans=in_chans,
                                output_stride=output_stride, position=position,
                                channel=channel, head_channels=head_channels,
                                branch_channels=branch_channels, dropout=dropout,
                                deep_stem=deep_stem, branch_outputs=branch_outputs)
