"""``tiny_cnn``: a small plain CNN for tiny images (scikit-learn's 8x8 digits).

It carries no attention of its own: the zoo model ``digits_cbam_tiny`` inserts
CBAM after every block through the builder (``at: {path: "stages.*.*"}``).
Layout: a 3x3 stem, then stages ``stages.<i>`` of conv-BN-ReLU blocks
``stages.<i>.<j>`` (the first block of every stage after the first halves the
resolution), global average pooling and a linear classifier ``fc``. The model
behaves like a timm classifier (``pretrained_cfg``, ``forward_features``,
``forward_head``, ``get_classifier``, ``reset_classifier``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..blocks._layers import ConvBnAct
from ..errors import SpecError
from ..registry import register_architecture
from ._common import ClassifierMixin


class TinyCNN(ClassifierMixin, nn.Module):
    """A few stages of 3x3 conv blocks, pooled and classified.

    Args:
        in_chans: input channels (1 for the digits).
        num_classes: classifier outputs; 0 gives pooled features from ``forward``.
        widths: output channels of each stage.
        depths: number of blocks in each stage.
        drop_rate: dropout before the classifier.
        img_size: the (square) input size the model is made for; only recorded in
            ``pretrained_cfg`` (the network itself takes any size).
    """

    arch_name = "tiny_cnn"

    def __init__(self, in_chans: int = 1, num_classes: int = 10,
                 widths: Sequence[int] = (32, 64), depths: Sequence[int] = (2, 2),
                 drop_rate: float = 0.0, img_size: int = 8) -> None:
        super().__init__()
        widths, depths = list(widths), list(depths)
        self.stem = ConvBnAct(in_chans, widths[0])
        stages = []
        in_ch = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            blocks = [ConvBnAct(in_ch if j == 0 else width, width,
                                stride=2 if (i > 0 and j == 0) else 1) for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.num_features = in_ch
        self.drop_rate = drop_rate
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.fc = self._classifier(num_classes)
        self.pretrained_cfg: dict[str, Any] = {
            "input_size": (in_chans, img_size, img_size),
            "mean": (0.0,) * in_chans,
            "std": (1.0,) * in_chans,
            "num_classes": num_classes,
            "first_conv": "stem.conv",
            "classifier": "fc",
        }

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name for ``pretrained_cfg``."""
        return self.pretrained_cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, (N, num_features, H', W')."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_architecture("tiny_cnn")
def tiny_cnn(in_chans: int = 1, num_classes: int = 10, widths: Sequence[int] = (32, 64),
             depths: Sequence[int] = (2, 2), drop_rate: float = 0.0, img_size: int = 8
             ) -> TinyCNN:
    """A small CNN for tiny images; see :class:`TinyCNN`."""
    where = "backbone tiny_cnn"
    if not widths or len(widths) != len(depths):
        raise SpecError(f"{where}: widths {list(widths)} and depths {list(depths)} must be "
                        "non-empty lists of the same length (one entry per stage)")
    if any(int(w) < 1 for w in widths) or any(int(d) < 1 for d in depths):
        raise SpecError(f"{where}: widths and depths must be positive, got "
                        f"widths={list(widths)}, depths={list(depths)}")
    if in_chans < 1 or num_classes < 0 or img_size < 1:
        raise SpecError(f"{where}: need in_chans >= 1, num_classes >= 0 and img_size >= 1")
    return TinyCNN(in_chans=in_chans, num_classes=num_classes, widths=widths, depths=depths,
                   drop_rate=drop_rate, img_size=img_size)
