"""Whole networks whose attention is part of the architecture, registered as
``source: attnzoo`` backbones. Importing this package registers them all."""

from __future__ import annotations

from . import (  # noqa: F401  (registration)
    bisenet,
    ccnet,
    danet,
    dnlnet,
    pan,
    ras,
    resattnet,
    resnet_variants,
    stdc,
    tiny,
)
