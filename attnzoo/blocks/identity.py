"""The no-op block: ``replace`` a module with it to remove that module."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..registry import register_block
from .base import BlockConfig


class Identity(nn.Module):
    """Returns its input. The ``identity`` block: ``replace`` a module with it to remove
    that module (e.g. the BN that followed a conv which SK replaces, since SK's branches
    carry their own BN and ReLU)."""

    def __init__(self, channels: int | None = None) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@register_block
class IdentityConfig(BlockConfig):
    """No-op block: removes the module it replaces (channels must not change)."""

    type: Literal["identity"]

    module = Identity
