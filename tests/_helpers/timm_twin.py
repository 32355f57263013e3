"""resnet50_se and its timm twin seresnet50, the cheapest pair TIMM_EQUIVALENTS has:
timm weights in, the same outputs out. The fixtures ``seresnet50`` and
``seresnet50_checkpoint`` (tests/conftest.py) hold timm's model and its file."""

from __future__ import annotations

import torch

ZOO, TIMM = "resnet50_se", "seresnet50"


def twin_input() -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
