"""Attention blocks, one file per family. Importing this package registers them all."""

from __future__ import annotations

from . import channel, identity, mixed, non_local, self_attention, sequence, spatial  # noqa: F401  (registration)
from .base import BlockConfig, Site

__all__ = ["BlockConfig", "Site"]
