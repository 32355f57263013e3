"""What the architectures share: attention blocks given as architecture args, feature
sizes, the segmentation head, and timm's classifier methods."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ..blocks._layers import ConvBNReLU
from ..blocks.base import Site
from ..errors import SpecError
from ..validation import parse_block


def build_arch_block(data: Any, where: str, site: Site) -> nn.Module:
    """Parse a block config arg and build it for ``site``, errors naming ``where``."""
    config = parse_block(data, where)
    try:
        return config.build(site)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{where}: cannot build block {config.block_type()!r} with "
                        f"{site.channels} -> {site.output_channels} channels: {exc}") from None


def feature_size(input_size: tuple[int, int, int], stride: int) -> tuple[int, int]:
    """(H, W) of a feature map at ``stride`` for an input of (C, H, W)."""
    return (max(1, input_size[1] // stride), max(1, input_size[2] // stride))


def init_weights_(model: nn.Module, linear_std: float | None = None) -> None:
    """Kaiming-normal (fan_out, ReLU) weights for every conv of ``model`` and, with
    ``linear_std``, normal(0, linear_std) weights for every Linear; biases untouched."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif linear_std is not None and isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=linear_std)


class SegmentationHead(nn.Sequential):
    """3x3 conv-BN-ReLU to ``mid_channels`` -> 1x1 conv to ``out_channels`` (logits at
    the feature's stride): the authors' ``BiSeNetOutput``. ``bias``: whether the 1x1
    conv has one (BiSeNet's does, STDC-Seg's does not)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int,
                 bias: bool = True) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, mid_channels, 3)
        self.classifier = nn.Conv2d(mid_channels, out_channels, 1, bias=bias)


class ClassifierMixin:
    """timm's classifier methods for a network whose head is one attribute.

    A class sets ``classifier_attr`` (the attribute that holds the classifier) and
    ``arch_name`` (for messages); its instances have ``num_features``, ``num_classes``
    and ``pretrained_cfg``. ``_classifier`` makes a head (a Linear with bias, or
    Identity for 0 classes); override it for another layout or initialisation.
    ``forward_head`` stays with each network: their pooling differs.
    """

    classifier_attr: ClassVar[str] = "fc"
    arch_name: ClassVar[str]
    num_features: int
    num_classes: int
    pretrained_cfg: dict[str, Any]

    def _classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_attr)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, randomly initialised classifier with ``num_classes`` outputs (0: none).
        The network pools by average only: ``global_pool`` is None or ``"avg"``."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"{self.arch_name} pools by average only, got "
                             f"global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        setattr(self, self.classifier_attr, self._classifier(num_classes))
