"""Attention blocks, one file per family. Importing this package registers them all."""

from __future__ import annotations

from . import (  # noqa: F401  (registration)
    bam,
    channel,
    coordinate,
    cot,
    danet,
    external,
    gather_excite,
    generalized,
    grouped,
    identity,
    local_self_attention,
    mixed,
    non_local,
    scse,
    self_attention,
    sequence,
    spatial,
    split_attention,
    triplet,
)
from .base import BlockConfig, Site

__all__ = ["BlockConfig", "Site"]
